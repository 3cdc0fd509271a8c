//! Per-partition offset watermarks: the offset to commit is just past the longest run
//! of completed records, so a slow, parked or failed record holds it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// A topic and partition. The topic's name is shared: every record of a topic, its
/// acker and its message's `source.destination` hold the same allocation.
pub(crate) type Tp = (Arc<str>, i32);

/// Where a handed-out record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    /// Queued, waiting behind its key, parked or handed back: not in a handler.
    Open,
    /// In a handler.
    Running,
    Complete,
}

/// The records of one partition handed out and not yet behind the watermark, in offset
/// order, with where each is.
#[derive(Debug, Default)]
pub(crate) struct Partition {
    /// Bumped on every assignment, so completions from an earlier assignment of the
    /// same partition are ignored.
    generation: u64,
    /// Set when a revoke begins: its records are no longer this consumer's to start.
    revoking: bool,
    /// Handed-out records from the oldest incomplete one on.
    open: VecDeque<(i64, Mark)>,
    /// The offset to commit next (one past the last record of the complete run), once
    /// any record completed.
    watermark: Option<i64>,
    /// The watermark last committed.
    committed: Option<i64>,
}

impl Partition {
    /// The watermark to commit when this partition is given up, if it moved.
    pub(crate) fn uncommitted(&self) -> Option<i64> {
        self.watermark.filter(|w| self.committed != Some(*w))
    }

    fn received(&mut self, offset: i64) {
        if self.open.back().is_some_and(|&(last, _)| offset <= last) {
            // A rewind (a seek, or a fetch after a failed commit): forget what was after.
            self.open.retain(|&(o, _)| o < offset);
        }
        self.open.push_back((offset, Mark::Open));
    }

    fn mark(&mut self, offset: i64) -> Option<&mut Mark> {
        let i = self.open.binary_search_by_key(&offset, |&(o, _)| o).ok()?;
        Some(&mut self.open[i].1)
    }

    /// `offset` started (`true`) or stopped (`false`) running without completing.
    fn set_running(&mut self, offset: i64, running: bool) {
        if let Some(mark) = self.mark(offset).filter(|m| **m != Mark::Complete) {
            *mark = if running { Mark::Running } else { Mark::Open };
        }
    }

    /// How many records are running; read only while a revoke waits.
    fn running(&self) -> usize {
        self.open.iter().filter(|e| e.1 == Mark::Running).count()
    }

    /// Marks `offset` complete and advances the watermark over the complete run.
    /// Returns whether the watermark moved.
    fn complete(&mut self, offset: i64) -> bool {
        let Some(mark) = self.mark(offset) else {
            return false;
        };
        *mark = Mark::Complete;
        let mut moved = false;
        while let Some(&(o, Mark::Complete)) = self.open.front() {
            self.open.pop_front();
            self.watermark = Some(o + 1);
            moved = true;
        }
        moved
    }
}

/// Every partition this consumer owns.
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    partitions: HashMap<Tp, Partition>,
    /// Names of the topics seen, to share one allocation per topic.
    topics: Vec<Arc<str>>,
    next_generation: u64,
}

impl Watermarks {
    /// The shared name of `topic`.
    pub(crate) fn topic(&mut self, topic: &str) -> Arc<str> {
        if let Some(t) = self.topics.iter().find(|t| ***t == *topic) {
            return t.clone();
        }
        let t: Arc<str> = topic.into();
        self.topics.push(t.clone());
        t
    }

    /// The partition was assigned: tracking starts afresh. Returns its generation.
    pub(crate) fn assign(&mut self, tp: Tp) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.partitions.insert(
            tp,
            Partition {
                generation,
                ..Partition::default()
            },
        );
        generation
    }

    /// The partition was revoked: its tracking ends; late completions are ignored.
    pub(crate) fn revoke(&mut self, tp: &Tp) -> Option<Partition> {
        self.partitions.remove(tp)
    }

    /// A record was handed out; returns its partition's generation, or `None` if the
    /// partition is not assigned to this consumer.
    pub(crate) fn received(&mut self, tp: &Tp, offset: i64) -> Option<u64> {
        let p = self.partitions.get_mut(tp)?;
        p.received(offset);
        Some(p.generation)
    }

    /// A record completed. Ignored (returns false) if its partition was revoked or
    /// reassigned since it was handed out.
    pub(crate) fn complete(&mut self, tp: &Tp, generation: u64, offset: i64) -> bool {
        match self.partitions.get_mut(tp) {
            Some(p) if p.generation == generation => p.complete(offset),
            _ => false,
        }
    }

    /// A record started or stopped running (see [`Acker::running`]). Ignored if its
    /// partition was revoked or reassigned since it was handed out.
    ///
    /// [`Acker::running`]: redrive_core::Acker::running
    pub(crate) fn set_running(&mut self, tp: &Tp, generation: u64, offset: i64, running: bool) {
        if let Some(p) = self.partitions.get_mut(tp) {
            if p.generation == generation {
                p.set_running(offset, running);
            }
        }
    }

    /// A revoke of `tp` begins: its records are no longer this consumer's to start, and
    /// those running may still complete.
    pub(crate) fn start_revoke(&mut self, tp: &Tp) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.revoking = true;
        }
    }

    /// How many records of `tps` are running.
    pub(crate) fn running(&self, tps: &[Tp]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .map(Partition::running)
            .sum()
    }

    /// Whether `tp` is still assigned in `generation` and not being revoked.
    pub(crate) fn is_current(&self, tp: &Tp, generation: u64) -> bool {
        self.partitions
            .get(tp)
            .is_some_and(|p| p.generation == generation && !p.revoking)
    }

    /// Watermarks that moved since they were last taken, marked as committed.
    pub(crate) fn take_dirty(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if let Some(w) = p.watermark {
                if p.committed != Some(w) {
                    p.committed = Some(w);
                    out.push((tp.clone(), w));
                }
            }
        }
        out
    }

    /// Puts back watermarks whose commit failed, so the next round tries again.
    pub(crate) fn commit_failed(&mut self, offsets: &[(Tp, i64)]) {
        for (tp, w) in offsets {
            if let Some(p) = self.partitions.get_mut(tp) {
                if p.committed == Some(*w) {
                    p.committed = None;
                }
            }
        }
    }

    /// The watermark of `tp`, if a record of it completed.
    #[cfg(test)]
    pub(crate) fn watermark(&self, tp: &Tp) -> Option<i64> {
        self.partitions.get(tp).and_then(|p| p.watermark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> Tp {
        ("t".into(), p)
    }

    #[test]
    fn advances_only_over_the_complete_run() {
        let mut w = Watermarks::default();
        w.assign(tp(0));
        let g = w.received(&tp(0), 10).unwrap();
        for o in 11..15 {
            w.received(&tp(0), o);
        }
        assert!(!w.complete(&tp(0), g, 12));
        assert!(!w.complete(&tp(0), g, 11));
        assert_eq!(w.watermark(&tp(0)), None, "10 holds it");
        assert!(w.complete(&tp(0), g, 10));
        assert_eq!(w.watermark(&tp(0)), Some(13));
        assert!(w.complete(&tp(0), g, 13));
        assert_eq!(w.watermark(&tp(0)), Some(14));
        assert_eq!(w.take_dirty(), vec![(tp(0), 14)]);
        assert_eq!(w.take_dirty(), vec![], "taken once");
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_it() {
        // Compaction and transaction markers leave gaps.
        let mut w = Watermarks::default();
        w.assign(tp(0));
        let g = w.received(&tp(0), 3).unwrap();
        w.received(&tp(0), 7);
        w.complete(&tp(0), g, 3);
        w.complete(&tp(0), g, 7);
        assert_eq!(w.watermark(&tp(0)), Some(8));
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let mut w = Watermarks::default();
        assert_eq!(w.received(&tp(1), 0), None, "not assigned");
        w.assign(tp(1));
        let old = w.received(&tp(1), 0).unwrap();
        w.revoke(&tp(1));
        assert!(!w.complete(&tp(1), old, 0));
        assert!(!w.is_current(&tp(1), old));
        let new = w.assign(tp(1));
        assert!(w.is_current(&tp(1), new) && !w.is_current(&tp(1), old));
        w.received(&tp(1), 0);
        assert!(!w.complete(&tp(1), old, 0), "old generation");
        assert!(w.complete(&tp(1), new, 0));
        assert_eq!(w.watermark(&tp(1)), Some(1));
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut w = Watermarks::default();
        w.assign(tp(0));
        let g = w.received(&tp(0), 0).unwrap();
        w.complete(&tp(0), g, 0);
        let dirty = w.take_dirty();
        w.commit_failed(&dirty);
        assert_eq!(w.take_dirty(), dirty);
    }

    #[test]
    fn a_rewind_forgets_what_came_after() {
        let mut w = Watermarks::default();
        w.assign(tp(0));
        let g = w.received(&tp(0), 0).unwrap();
        w.received(&tp(0), 1);
        w.received(&tp(0), 2);
        w.received(&tp(0), 1); // fetched again from 1
        assert!(w.complete(&tp(0), g, 0));
        assert!(!w.complete(&tp(0), g, 2), "2 is not handed out again yet");
        assert!(w.complete(&tp(0), g, 1));
        assert_eq!(w.watermark(&tp(0)), Some(2));
    }

    #[test]
    fn running_records_are_counted_until_they_complete_or_stop() {
        let mut w = Watermarks::default();
        w.assign(tp(0));
        let g = w.received(&tp(0), 0).unwrap();
        w.received(&tp(0), 1);
        w.received(&tp(0), 2);
        w.set_running(&tp(0), g, 0, true);
        w.set_running(&tp(0), g, 0, true); // said twice, counted once
        w.set_running(&tp(0), g, 1, true);
        assert_eq!(w.running(&[tp(0)]), 2);
        w.set_running(&tp(0), g, 1, false); // parked
        assert_eq!(w.running(&[tp(0)]), 1);
        w.start_revoke(&tp(0));
        assert!(!w.is_current(&tp(0), g), "not to be started while revoking");
        assert!(w.complete(&tp(0), g, 0), "a running record still completes");
        assert_eq!(w.running(&[tp(0)]), 0);
        w.set_running(&tp(0), g, 0, false); // after its ack: nothing to undo
        assert_eq!(w.running(&[tp(0), tp(1)]), 0);
        assert_eq!(w.revoke(&tp(0)).and_then(|p| p.uncommitted()), Some(1));
    }
}
