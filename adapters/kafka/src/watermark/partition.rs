//! One partition's open records: where its watermark is, what completed past it, and
//! what the committed offset's metadata keeps of them.

use std::collections::VecDeque;

use super::metadata::Kept;

/// A record handed out and not yet behind the watermark: 16 bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Open {
    pub(super) offset: i64,
    /// When it was received: milliseconds since its assignment began, wrapping (ages
    /// are right up to 49 days).
    pub(super) at: u32,
    /// Deliveries it had without completing (the one running included), once the
    /// acker counted one; kept in the committed offset's metadata.
    pub(super) deliveries: u16,
    pub(super) done: bool,
}

/// The records of one partition handed out and not yet behind the watermark, in offset
/// order, with whether each completed.
#[derive(Debug, Default)]
pub(super) struct Partition {
    /// Handed-out records from the oldest incomplete one on. The first is never
    /// complete.
    pub(super) open: VecDeque<Open>,
    /// The offset to commit next (one past the last record of the complete run), once
    /// any record completed.
    pub(super) watermark: Option<i64>,
    /// The offset last committed, with what `changed` then said.
    pub(super) committed: Option<i64>,
    /// Whether something the metadata keeps (a completion past the watermark, a
    /// delivery count) changed since the last commit was taken.
    pub(super) changed: bool,
    /// Set when `open` reached the bound (of records, or of runs), cleared once it is
    /// down to half of both.
    pub(super) full: bool,
    /// Runs of completed records in `open`, each after an incomplete one.
    pub(super) runs: usize,
    /// The highest offset received in this assignment.
    pub(super) seen: Option<i64>,
}

impl Partition {
    /// The offset to commit: the watermark, or before any record completed, the oldest
    /// open one (so completions past it and counts are kept all the same).
    pub(super) fn commit_offset(&self) -> Option<i64> {
        self.watermark
            .or_else(|| self.open.front().map(|o| o.offset))
    }

    /// The offset to commit if it, or what its metadata keeps, changed since the last
    /// commit was taken.
    pub(super) fn uncommitted(&self) -> Option<i64> {
        match self.watermark {
            Some(w) => (self.changed || self.committed != Some(w)).then_some(w),
            // Nothing completed at the front: only what the metadata keeps changed.
            None => self.commit_offset().filter(|_| self.changed),
        }
    }

    /// A record was received; `done` if it completed before (the committed metadata
    /// says so), so it is complete on arrival.
    pub(super) fn received(&mut self, offset: i64, at: u32, deliveries: u16, done: bool) {
        if self.open.back().is_some_and(|last| offset <= last.offset) {
            // A rewind (a seek, or a fetch after a failed commit): forget what was after.
            self.open.retain(|o| o.offset < offset);
            self.recount_runs();
        }
        self.seen = Some(self.seen.map_or(offset, |s| s.max(offset)));
        if done && self.open.is_empty() {
            // Complete at the front: straight behind the watermark.
            self.watermark = Some(offset + 1);
            return;
        }
        if done && !self.open.back().is_some_and(|o| o.done) {
            self.runs += 1;
        }
        self.open.push_back(Open {
            offset,
            at,
            deliveries,
            done,
        });
    }

    fn recount_runs(&mut self) {
        let mut runs = 0;
        let mut previous_done = false;
        for o in &self.open {
            if o.done && !previous_done {
                runs += 1;
            }
            previous_done = o.done;
        }
        self.runs = runs;
    }

    /// Whether its runs of completed records reached `bound`.
    pub(super) fn too_many_runs(&self, bound: usize) -> bool {
        self.runs >= bound
    }

    /// Where `offset` is in `open`. A partition's offsets run on one by one but for gaps
    /// (compaction, transaction markers), so its distance from the oldest open record
    /// is nearly always its place; a search finds it when a gap moved it.
    fn position(&self, offset: i64) -> Option<usize> {
        let oldest = self.open.front()?.offset;
        let guess = usize::try_from(offset.checked_sub(oldest)?).ok()?;
        if self.open.get(guess).is_some_and(|o| o.offset == offset) {
            return Some(guess);
        }
        self.open.binary_search_by_key(&offset, |o| o.offset).ok()
    }

    /// Marks `offset` complete and advances the watermark over the complete run.
    /// Returns whether the watermark moved.
    pub(super) fn complete(&mut self, offset: i64) -> bool {
        let Some(i) = self.position(offset) else {
            return false;
        };
        if self.open[i].done {
            return false;
        }
        let left = i > 0 && self.open[i - 1].done;
        let right = self.open.get(i + 1).is_some_and(|o| o.done);
        self.open[i].done = true;
        self.changed = true;
        match (left, right) {
            (true, true) => self.runs -= 1,
            (false, false) => self.runs += 1,
            _ => {}
        }
        let mut moved = false;
        while let Some(&Open {
            offset, done: true, ..
        }) = self.open.front()
        {
            self.open.pop_front();
            self.watermark = Some(offset + 1);
            moved = true;
        }
        if moved {
            // The run at the front went behind the watermark.
            self.runs -= 1;
        }
        moved
    }

    /// The open record at `offset` had `deliveries` so far without completing.
    /// Returns whether it is open.
    pub(super) fn delivered(&mut self, offset: i64, deliveries: u32) -> bool {
        let Some(i) = self.position(offset) else {
            return false;
        };
        let o = &mut self.open[i];
        if o.done {
            return false;
        }
        o.deliveries = u16::try_from(deliveries).unwrap_or(u16::MAX);
        self.changed = true;
        true
    }

    /// What the committed offset's metadata keeps: the completed runs and delivery
    /// counts in `open`, and what `inherited` (this assignment's committed metadata)
    /// keeps past the records received so far.
    pub(super) fn kept(&self, inherited: Option<&Kept>) -> Kept {
        let mut kept = Kept::default();
        let mut run: Option<(i64, i64)> = None;
        for o in &self.open {
            if o.done {
                run = Some(run.map_or((o.offset, o.offset), |(s, _)| (s, o.offset)));
                continue;
            }
            kept.done.extend(run.take());
            if o.deliveries > 0 {
                kept.attempts.push((o.offset, u32::from(o.deliveries)));
            }
        }
        kept.done.extend(run);
        let Some(inherited) = inherited else {
            return kept;
        };
        let past = |o: i64| self.seen.is_none_or(|s| o > s);
        kept.attempts
            .extend(inherited.attempts.iter().filter(|(o, _)| past(*o)).copied());
        let first_unseen = self.seen.map_or(i64::MIN, |s| s + 1);
        kept.done.extend(
            inherited
                .done
                .iter()
                .filter(|(_, e)| past(*e))
                .map(|&(s, e)| (s.max(first_unseen), e)),
        );
        // A run received and one inherited may touch: one run.
        kept.done.dedup_by(|next, run| {
            let touches = next.0 == run.1 + 1;
            if touches {
                run.1 = next.1;
            }
            touches
        });
        kept
    }
}
