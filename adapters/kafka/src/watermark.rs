//! Per-partition offset watermarks: the offset to commit is just past the longest run
//! of completed records, so a slow, parked or failed record holds it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// A topic and partition. The topic's name is shared: every record of a topic, its
/// acker and its message's `source.destination` hold the same allocation.
pub(crate) type Tp = (Arc<str>, i32);

/// The records of one partition handed out and not yet behind the watermark, in offset
/// order, with whether each completed.
#[derive(Debug, Default)]
struct Partition {
    /// Handed-out records from the oldest incomplete one on, and whether each completed.
    open: VecDeque<(i64, bool)>,
    /// The offset to commit next (one past the last record of the complete run), once
    /// any record completed.
    watermark: Option<i64>,
    /// The watermark last committed.
    committed: Option<i64>,
}

impl Partition {
    /// The watermark to commit when this partition is given up, if it moved.
    fn uncommitted(&self) -> Option<i64> {
        self.watermark.filter(|w| self.committed != Some(*w))
    }

    fn received(&mut self, offset: i64) {
        if self.open.back().is_some_and(|&(last, _)| offset <= last) {
            // A rewind (a seek, or a fetch after a failed commit): forget what was after.
            self.open.retain(|&(o, _)| o < offset);
        }
        self.open.push_back((offset, false));
    }

    /// Where `offset` is in `open`. A partition's offsets run on one by one but for gaps
    /// (compaction, transaction markers), so its distance from the oldest open record
    /// is nearly always its place; a search finds it when a gap moved it.
    fn position(&self, offset: i64) -> Option<usize> {
        let &(oldest, _) = self.open.front()?;
        let guess = usize::try_from(offset.checked_sub(oldest)?).ok()?;
        if self.open.get(guess).is_some_and(|&(o, _)| o == offset) {
            return Some(guess);
        }
        self.open.binary_search_by_key(&offset, |&(o, _)| o).ok()
    }

    /// Marks `offset` complete and advances the watermark over the complete run.
    /// Returns whether the watermark moved.
    fn complete(&mut self, offset: i64) -> bool {
        let Some(i) = self.position(offset) else {
            return false;
        };
        self.open[i].1 = true;
        let mut moved = false;
        while let Some(&(o, true)) = self.open.front() {
            self.open.pop_front();
            self.watermark = Some(o + 1);
            moved = true;
        }
        moved
    }
}

/// One assignment of one partition: its marks, and whether its records may still
/// start.
///
/// Every record's acker holds its own partition's, so settling a record touches that
/// partition alone: no lookup, no lock shared with other partitions. A new assignment
/// of the same partition gets a new one; acks of records from an earlier assignment
/// land in that one's, which nobody commits any more.
#[derive(Debug)]
pub(crate) struct Assigned {
    /// Cleared when a revoke begins: its records are no longer this consumer's to start.
    current: AtomicBool,
    /// Records in a handler, counted by their ackers (each counts its record once), so
    /// starting and stopping a run takes no lock; read while a revoke waits.
    running: AtomicUsize,
    /// Set until the assignment's first record is received (see
    /// [`first_record`](Self::first_record)).
    awaiting_first: AtomicBool,
    /// Deliveries of a record that ended without a fate, as the committed offset's
    /// metadata gave them at assignment: its offset and their count.
    died: Mutex<Option<(i64, u32)>>,
    marks: Mutex<Partition>,
}

impl Assigned {
    fn new() -> Self {
        Assigned {
            current: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            awaiting_first: AtomicBool::new(true),
            died: Mutex::new(None),
            marks: Mutex::new(Partition::default()),
        }
    }

    /// The committed offset's metadata says the record at `offset` was delivered
    /// `count` times without a fate (its consumer died running it).
    pub(crate) fn set_died(&self, offset: i64, count: u32) {
        *self.died.lock().unwrap_or_else(PoisonError::into_inner) = Some((offset, count));
    }

    /// For the first record received in this assignment, the one at the committed
    /// offset, which may have died with an earlier consumer: how many earlier
    /// deliveries of it ended without a fate. `None` for every later record (one
    /// atomic load).
    pub(crate) fn first_record(&self, offset: i64) -> Option<u32> {
        if !self.awaiting_first.load(Ordering::Relaxed)
            || !self.awaiting_first.swap(false, Ordering::AcqRel)
        {
            return None;
        }
        let died = *self.died.lock().unwrap_or_else(PoisonError::into_inner);
        Some(match died {
            Some((o, count)) if o == offset => count,
            _ => 0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Partition> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the partition is still assigned in this assignment and not being
    /// revoked.
    pub(crate) fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// Records were handed out, in this order; one lock for all of them.
    pub(crate) fn received(&self, offsets: &[i64]) {
        let mut marks = self.lock();
        for &offset in offsets {
            marks.received(offset);
        }
    }

    /// A record completed; returns whether the watermark moved.
    pub(crate) fn complete(&self, offset: i64) -> bool {
        self.lock().complete(offset)
    }

    /// A record started running in a handler (see [`Acker::running`]). The caller
    /// counts each record once: [`stopped`](Self::stopped) undoes it.
    ///
    /// [`Acker::running`]: redrive_core::Acker::running
    pub(crate) fn started(&self) {
        self.running.fetch_add(1, Ordering::AcqRel);
    }

    /// A record counted by [`started`](Self::started) ended its run.
    pub(crate) fn stopped(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// How many records are running.
    fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// The watermark, if a record completed.
    #[cfg(test)]
    fn watermark(&self) -> Option<i64> {
        self.lock().watermark
    }
}

/// Every partition this consumer owns.
#[derive(Debug, Default)]
pub(crate) struct Watermarks {
    partitions: HashMap<Tp, Arc<Assigned>>,
    /// Names of the topics seen, to share one allocation per topic.
    topics: Vec<Arc<str>>,
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

    /// The partition was assigned: tracking starts afresh.
    pub(crate) fn assign(&mut self, tp: Tp) -> Arc<Assigned> {
        let assigned = Arc::new(Assigned::new());
        if let Some(old) = self.partitions.insert(tp, assigned.clone()) {
            old.current.store(false, Ordering::Release);
        }
        assigned
    }

    /// The partition was revoked: its tracking ends, and late completions go nowhere.
    /// Returns its watermark if it moved since the last commit.
    pub(crate) fn revoke(&mut self, tp: &Tp) -> Option<i64> {
        let assigned = self.partitions.remove(tp)?;
        assigned.current.store(false, Ordering::Release);
        assigned.lock().uncommitted()
    }

    /// The partition's current assignment, if this consumer owns it.
    pub(crate) fn get(&self, tp: &Tp) -> Option<Arc<Assigned>> {
        self.partitions.get(tp).cloned()
    }

    /// A revoke of `tp` begins: its records are no longer this consumer's to start, and
    /// those running may still complete.
    pub(crate) fn start_revoke(&mut self, tp: &Tp) {
        if let Some(a) = self.partitions.get(tp) {
            a.current.store(false, Ordering::Release);
        }
    }

    /// How many records of `tps` are running.
    pub(crate) fn running(&self, tps: &[Tp]) -> usize {
        tps.iter()
            .filter_map(|tp| self.partitions.get(tp))
            .map(|a| a.running())
            .sum()
    }

    /// Watermarks that moved since they were last taken, marked as committed.
    pub(crate) fn take_dirty(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, a) in &self.partitions {
            let mut p = a.lock();
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
            if let Some(a) = self.partitions.get(tp) {
                let mut p = a.lock();
                if p.committed == Some(*w) {
                    p.committed = None;
                }
            }
        }
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
        let a = w.assign(tp(0));
        for o in 10..15 {
            a.received(&[o]);
        }
        assert!(!a.complete(12));
        assert!(!a.complete(11));
        assert_eq!(a.watermark(), None, "10 holds it");
        assert!(a.complete(10));
        assert_eq!(a.watermark(), Some(13));
        assert!(a.complete(13));
        assert_eq!(a.watermark(), Some(14));
        assert_eq!(w.take_dirty(), vec![(tp(0), 14)]);
        assert_eq!(w.take_dirty(), vec![], "taken once");
    }

    #[test]
    fn the_first_record_of_an_assignment_carries_its_count() {
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.set_died(5, 2);
        assert_eq!(a.first_record(5), Some(2), "the counted record");
        assert_eq!(a.first_record(6), None, "only the first record");
        let b = w.assign(tp(1));
        b.set_died(5, 2);
        assert_eq!(b.first_record(7), Some(0), "a count for another record");
        let c = w.assign(tp(2));
        assert_eq!(c.first_record(0), Some(0), "no count committed");
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_it() {
        // Compaction and transaction markers leave gaps.
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.received(&[3]);
        a.received(&[7]);
        a.complete(3);
        a.complete(7);
        assert_eq!(a.watermark(), Some(8));
        // Out of order across gaps: each record is found though its place is not its
        // distance from the oldest open one.
        a.received(&[9, 10, 20, 21, 30]);
        assert!(!a.complete(21));
        assert!(!a.complete(10));
        assert!(!a.complete(11), "never received");
        assert!(!a.complete(30));
        assert_eq!(a.watermark(), Some(8), "9 holds it");
        assert!(a.complete(9));
        assert_eq!(a.watermark(), Some(11));
        assert!(a.complete(20));
        assert_eq!(a.watermark(), Some(31));
        assert!(!a.complete(5), "behind the watermark");
    }

    #[test]
    fn completions_from_an_earlier_assignment_are_ignored() {
        let mut w = Watermarks::default();
        assert!(w.get(&tp(1)).is_none(), "not assigned");
        let old = w.assign(tp(1));
        old.received(&[0]);
        assert_eq!(w.revoke(&tp(1)), None, "nothing completed");
        assert!(!old.is_current());
        let new = w.assign(tp(1));
        assert!(new.is_current() && !old.is_current());
        new.received(&[0]);
        old.complete(0);
        assert_eq!(
            w.take_dirty(),
            vec![],
            "the old assignment's ack is not committed"
        );
        assert!(new.complete(0));
        assert_eq!(w.take_dirty(), vec![(tp(1), 1)]);
    }

    #[test]
    fn an_assignment_replaced_without_a_revoke_is_no_longer_current() {
        let mut w = Watermarks::default();
        let old = w.assign(tp(0));
        let new = w.assign(tp(0));
        assert!(!old.is_current() && new.is_current());
        assert!(Arc::ptr_eq(&w.get(&tp(0)).unwrap(), &new));
    }

    #[test]
    fn a_failed_commit_is_offered_again() {
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.received(&[0]);
        a.complete(0);
        let dirty = w.take_dirty();
        w.commit_failed(&dirty);
        assert_eq!(w.take_dirty(), dirty);
    }

    #[test]
    fn a_rewind_forgets_what_came_after() {
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.received(&[0]);
        a.received(&[1]);
        a.received(&[2]);
        a.received(&[1]); // fetched again from 1
        assert!(a.complete(0));
        assert!(!a.complete(2), "2 is not handed out again yet");
        assert!(a.complete(1));
        assert_eq!(a.watermark(), Some(2));
    }

    #[test]
    fn running_records_are_counted_until_they_stop() {
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.received(&[0, 1, 2]);
        a.started();
        a.started();
        assert_eq!(w.running(&[tp(0)]), 2);
        a.stopped(); // parked
        assert_eq!(w.running(&[tp(0)]), 1);
        w.start_revoke(&tp(0));
        assert!(!a.is_current(), "not to be started while revoking");
        assert!(a.complete(0), "a running record still completes");
        a.stopped();
        assert_eq!(w.running(&[tp(0), tp(1)]), 0);
        assert_eq!(w.revoke(&tp(0)), Some(1));
    }

    #[test]
    fn records_received_together_are_marked_in_order() {
        let mut w = Watermarks::default();
        let a = w.assign(tp(0));
        a.received(&[5, 6, 7]);
        a.received(&[6, 7]); // fetched again from 6
        assert!(!a.complete(7));
        assert!(a.complete(5));
        assert!(a.complete(6));
        assert_eq!(a.watermark(), Some(8));
    }
}
