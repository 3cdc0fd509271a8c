//! What a committed offset's metadata keeps past the offset itself: the records
//! completed after it, and the deliveries of records that did not complete.
//!
//! A committed offset says only "everything before this is done". Records completed
//! past a slow or failing one would be processed again after a restart or a
//! rebalance, and a record's attempt count would start again at 1. The metadata
//! carries both, compactly:
//!
//! ```text
//! redrive:a=<offset>:<deliveries>,<offset>:<deliveries>;d=<gap>.<len>.<gap>.<len>
//! ```
//!
//! - `a=`: for each open record delivered at least once without completing, its offset
//!   and how many deliveries it had (the one running included).
//! - `d=`: the completed offsets past the committed one, as runs: skip `gap` offsets
//!   (the first gap counts from the committed offset), then `len` completed ones.
//!
//! Both are optional, in either order; unknown fields are ignored, so a later version
//! can add some. It stays within [`MAX_BYTES`]: what does not fit is left out (those
//! records are processed again, or counted from their header again, after a restart:
//! at least once still holds), and a partition whose completed records make more than
//! [`MAX_RUNS`] runs is paused until they merge.

use std::fmt::Write as _;

/// Every field starts after this.
const PREFIX: &str = "redrive:";

/// The most bytes of metadata written: under Kafka's default
/// `offset.metadata.max.bytes` (4096), whose excess fails the whole commit.
pub(crate) const MAX_BYTES: usize = 4000;

/// The most runs of completed records past the oldest incomplete one a partition
/// holds before it is paused: about 14 bytes each at worst, so they fit in
/// [`MAX_BYTES`] with the delivery counts beside them.
pub(crate) const MAX_RUNS: usize = 128;

/// What the metadata keeps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    /// Open records delivered without completing: offset and deliveries, by offset.
    pub(crate) attempts: Vec<(i64, u32)>,
    /// Completed offsets past the committed one: inclusive ranges, ascending, apart.
    pub(crate) done: Vec<(i64, i64)>,
}

impl Kept {
    /// Whether it keeps nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.attempts.is_empty() && self.done.is_empty()
    }

    /// Whether `offset` completed before.
    pub(crate) fn is_done(&self, offset: i64) -> bool {
        let i = self.done.partition_point(|&(_, end)| end < offset);
        self.done.get(i).is_some_and(|&(start, _)| start <= offset)
    }

    /// How many deliveries `offset` had without completing, if it had any.
    pub(crate) fn deliveries(&self, offset: i64) -> Option<u32> {
        self.attempts
            .binary_search_by_key(&offset, |&(o, _)| o)
            .ok()
            .map(|i| self.attempts[i].1)
    }

    /// How many offsets it keeps as completed.
    pub(crate) fn done_count(&self) -> u64 {
        self.done
            .iter()
            .map(|&(s, e)| u64::try_from(e - s + 1).unwrap_or(0))
            .sum()
    }

    /// Writes the metadata for a commit at `committed` into `out` (cleared first).
    /// Returns whether something was left out to stay within [`MAX_BYTES`].
    pub(crate) fn encode(&self, committed: i64, out: &mut String) -> bool {
        out.clear();
        let mut item = String::new();
        let mut truncated = false;
        // Delivery counts take at most half, so completed runs always have room.
        for &(offset, n) in self.attempts.iter().filter(|&&(o, _)| o >= committed) {
            item.clear();
            let _ = write!(item, "{offset}:{n}");
            let head = if out.is_empty() { "redrive:a=" } else { "," };
            if out.len() + head.len() + item.len() > MAX_BYTES / 2 {
                truncated = true;
                break;
            }
            out.push_str(head);
            out.push_str(&item);
        }
        let mut previous = committed - 1;
        let mut first = true;
        for &(start, end) in self.done.iter().filter(|&&(_, e)| e >= committed) {
            let start = start.max(committed);
            item.clear();
            let _ = write!(item, "{}.{}", start - previous - 1, end - start + 1);
            let head = match (first, out.is_empty()) {
                (false, _) => ".",
                (true, true) => "redrive:d=",
                (true, false) => ";d=",
            };
            if out.len() + head.len() + item.len() > MAX_BYTES {
                return true;
            }
            out.push_str(head);
            out.push_str(&item);
            previous = end;
            first = false;
        }
        truncated
    }

    /// Reads the metadata of an offset committed at `committed`: `None` if it is not
    /// redrive's (another tool's, or none). A field that does not read is left out,
    /// alone, with a warning.
    pub(crate) fn parse(committed: i64, metadata: &str) -> Option<Kept> {
        let fields = metadata.strip_prefix(PREFIX)?;
        let mut kept = Kept::default();
        for field in fields.split(';') {
            if let Some(a) = field.strip_prefix("a=") {
                match parse_attempts(a) {
                    Some(attempts) => kept.attempts = attempts,
                    None => tracing::warn!(
                        field,
                        "unreadable delivery counts in a committed offset's metadata; left out"
                    ),
                }
            } else if let Some(d) = field.strip_prefix("d=") {
                match parse_done(committed, d) {
                    Some(done) => kept.done = done,
                    None => tracing::warn!(
                        field,
                        "unreadable completed offsets in a committed offset's metadata; left out (those records are processed again)"
                    ),
                }
            }
        }
        Some(kept)
    }
}

fn parse_attempts(field: &str) -> Option<Vec<(i64, u32)>> {
    let mut out: Vec<(i64, u32)> = Vec::new();
    for item in field.split(',') {
        let (offset, count) = item.split_once(':')?;
        let (offset, count): (i64, u32) = (offset.parse().ok()?, count.parse().ok()?);
        if offset < 0 || out.last().is_some_and(|&(o, _)| o >= offset) {
            return None;
        }
        out.push((offset, count));
    }
    Some(out)
}

fn parse_done(committed: i64, field: &str) -> Option<Vec<(i64, i64)>> {
    let numbers: Vec<i64> = field
        .split('.')
        .map(|n| n.parse().ok().filter(|n: &i64| *n >= 0))
        .collect::<Option<_>>()?;
    if numbers.len() % 2 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(numbers.len() / 2);
    let mut next = committed;
    for pair in numbers.chunks_exact(2) {
        let (gap, len) = (pair[0], pair[1]);
        if len == 0 || (!out.is_empty() && gap == 0) {
            return None;
        }
        let start = next.checked_add(gap)?;
        let end = start.checked_add(len - 1)?;
        out.push((start, end));
        next = end.checked_add(1)?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(kept: &Kept, committed: i64) -> (String, bool) {
        let mut s = String::new();
        let truncated = kept.encode(committed, &mut s);
        (s, truncated)
    }

    #[test]
    fn a_stuck_record_with_ten_thousand_done_after_it_is_a_few_bytes() {
        let kept = Kept {
            attempts: vec![(100, 2)],
            done: vec![(101, 10_100)],
        };
        let (s, truncated) = encoded(&kept, 100);
        assert_eq!(s, "redrive:a=100:2;d=1.10000");
        assert!(!truncated);
        assert_eq!(Kept::parse(100, &s), Some(kept));
    }

    #[test]
    fn runs_and_counts_read_back() {
        let kept = Kept {
            attempts: vec![(5, 1), (9, 3)],
            done: vec![(6, 8), (10, 10), (20, 24)],
        };
        let (s, _) = encoded(&kept, 5);
        assert_eq!(s, "redrive:a=5:1,9:3;d=1.3.1.1.9.5");
        assert_eq!(Kept::parse(5, &s), Some(kept.clone()));
        assert!(kept.is_done(7) && kept.is_done(10) && kept.is_done(24));
        assert!(!kept.is_done(5) && !kept.is_done(9) && !kept.is_done(11) && !kept.is_done(25));
        assert_eq!(kept.deliveries(9), Some(3));
        assert_eq!(kept.deliveries(6), None);
        assert_eq!(kept.done_count(), 9);
    }

    #[test]
    fn nothing_kept_is_no_metadata() {
        assert_eq!(encoded(&Kept::default(), 3), (String::new(), false));
    }

    #[test]
    fn the_earlier_delivery_count_still_reads() {
        assert_eq!(
            Kept::parse(42, "redrive:a=42:3"),
            Some(Kept {
                attempts: vec![(42, 3)],
                done: vec![],
            })
        );
    }

    #[test]
    fn what_is_not_redrives_or_does_not_read_is_left_out() {
        assert_eq!(Kept::parse(0, ""), None);
        assert_eq!(Kept::parse(0, "app-data"), None);
        for bad in [
            "redrive:a=42",
            "redrive:a=x:1",
            "redrive:a=1:-1",
            "redrive:a=3:1,2:1",
            "redrive:d=1",
            "redrive:d=1.0",
            "redrive:d=1.2.0.3",
            "redrive:d=-1.2",
            "redrive:d=9223372036854775807.2",
        ] {
            assert_eq!(Kept::parse(0, bad), Some(Kept::default()), "{bad}");
        }
        assert_eq!(
            Kept::parse(0, "redrive:x=1;d=2.1"),
            Some(Kept {
                attempts: vec![],
                done: vec![(2, 2)]
            }),
            "an unknown field is skipped"
        );
    }

    #[test]
    fn what_does_not_fit_is_left_out_and_said() {
        let kept = Kept {
            attempts: (0..1000).map(|i| (i * 2, 1)).collect(),
            done: (0..1000).map(|i| (i * 2 + 1, i * 2 + 1)).collect(),
        };
        let (s, truncated) = encoded(&kept, 0);
        assert!(truncated);
        assert!(s.len() <= MAX_BYTES, "{}", s.len());
        let back = Kept::parse(0, &s).expect("redrive's");
        assert!(!back.attempts.is_empty() && !back.done.is_empty());
        assert_eq!(back.attempts[..], kept.attempts[..back.attempts.len()]);
        assert_eq!(back.done[..], kept.done[..back.done.len()]);
    }

    #[test]
    fn the_most_runs_fit_with_counts_beside_them() {
        // Runs far apart, with large offsets: the widest a partition at its bounds writes.
        let base = 9_000_000_000_000;
        let kept = Kept {
            attempts: (0..64).map(|i| (base + i * 100_000, u32::MAX)).collect(),
            done: (0..MAX_RUNS as i64)
                .map(|i| (base + i * 99_999 + 1, base + i * 99_999 + 99_998))
                .collect(),
        };
        let (s, truncated) = encoded(&kept, base);
        assert!(!truncated, "{} bytes", s.len());
        assert_eq!(Kept::parse(base, &s), Some(kept));
    }

    #[test]
    fn ranges_before_the_committed_offset_are_not_written() {
        let kept = Kept {
            attempts: vec![(3, 1), (12, 2)],
            done: vec![(1, 2), (4, 11), (13, 13)],
        };
        let (s, _) = encoded(&kept, 10);
        assert_eq!(s, "redrive:a=12:2;d=0.2.1.1");
        assert_eq!(
            Kept::parse(10, &s),
            Some(Kept {
                attempts: vec![(12, 2)],
                done: vec![(10, 11), (13, 13)],
            })
        );
    }
}
