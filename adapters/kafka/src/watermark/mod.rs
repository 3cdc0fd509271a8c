//! Per-partition offset watermarks: the offset to commit is just past the longest run
//! of completed records, so a slow, parked or failed record holds it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A topic and partition. The topic's name is shared: every record of a topic, its
/// acker and its message's `source.destination` hold the same allocation.
pub(crate) type Tp = (Arc<str>, i32);

/// The default bound on a partition's open records (see
/// [`KafkaConsumerBuilder::max_open_per_partition`](crate::KafkaConsumerBuilder::max_open_per_partition)).
pub(crate) const DEFAULT_MAX_OPEN: usize = 100_000;

/// A record handed out and not yet behind the watermark: 16 bytes.
#[derive(Debug, Clone, Copy)]
struct Open {
    offset: i64,
    /// When it was received: milliseconds since its assignment began, wrapping (ages
    /// are right up to 49 days).
    at: u32,
    done: bool,
}

/// The records of one partition handed out and not yet behind the watermark, in offset
/// order, with whether each completed.
#[derive(Debug, Default)]
struct Partition {
    /// Handed-out records from the oldest incomplete one on. The first is never
    /// complete.
    open: VecDeque<Open>,
    /// The offset to commit next (one past the last record of the complete run), once
    /// any record completed.
    watermark: Option<i64>,
    /// The watermark last committed.
    committed: Option<i64>,
    /// Set when `open` reached the bound, cleared once it is down to half of it.
    full: bool,
}

impl Partition {
    /// The watermark to commit when this partition is given up, if it moved.
    fn uncommitted(&self) -> Option<i64> {
        self.watermark.filter(|w| self.committed != Some(*w))
    }

    fn received(&mut self, offset: i64, at: u32) {
        if self.open.back().is_some_and(|last| offset <= last.offset) {
            // A rewind (a seek, or a fetch after a failed commit): forget what was after.
            self.open.retain(|o| o.offset < offset);
        }
        self.open.push_back(Open {
            offset,
            at,
            done: false,
        });
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
    fn complete(&mut self, offset: i64) -> bool {
        let Some(i) = self.position(offset) else {
            return false;
        };
        self.open[i].done = true;
        let mut moved = false;
        while let Some(&Open {
            offset, done: true, ..
        }) = self.open.front()
        {
            self.open.pop_front();
            self.watermark = Some(offset + 1);
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
    tp: Tp,
    /// The most records open from the oldest incomplete one on before the partition
    /// is paused.
    max_open: usize,
    /// When the assignment began: records' receive times count from it.
    born: Instant,
    /// Wakes the poll task when a full partition has room again.
    wake: Arc<Notify>,
    /// Whether the poll task paused the partition because it was full (set and cleared
    /// on the thread that polls).
    paused: AtomicBool,
}

impl Assigned {
    fn new(tp: Tp, max_open: usize, wake: Arc<Notify>) -> Self {
        Assigned {
            current: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            awaiting_first: AtomicBool::new(true),
            died: Mutex::new(None),
            marks: Mutex::new(Partition::default()),
            tp,
            max_open,
            born: Instant::now(),
            wake,
            paused: AtomicBool::new(false),
        }
    }

    /// The partition.
    pub(crate) fn tp(&self) -> &Tp {
        &self.tp
    }

    /// Now, in a record's receive time: milliseconds since the assignment began,
    /// wrapping.
    fn now(&self) -> u32 {
        // Truncated on purpose: ages are taken with a wrapping subtraction.
        #[allow(clippy::cast_possible_truncation)]
        let ms = self.born.elapsed().as_millis() as u32;
        ms
    }

    /// How many more records may be received before the partition is full.
    pub(crate) fn room(&self) -> usize {
        self.max_open.saturating_sub(self.lock().open.len())
    }

    /// Whether the partition is paused for being full, as [`set_paused`](Self::set_paused)
    /// last said.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Notes whether the partition is paused for being full; returns what was noted
    /// before.
    pub(crate) fn set_paused(&self, paused: bool) -> bool {
        self.paused.swap(paused, Ordering::AcqRel)
    }

    /// Whether the partition reached its bound of open records and is not yet down to
    /// half of it.
    pub(crate) fn is_full(&self) -> bool {
        self.lock().full
    }

    /// The oldest incomplete record, if any: its offset and how long ago it was
    /// received.
    pub(crate) fn stuck(&self) -> Option<(i64, Duration)> {
        let now = self.now();
        let marks = self.lock();
        marks.open.front().map(|o| {
            (
                o.offset,
                Duration::from_millis(u64::from(now.wrapping_sub(o.at))),
            )
        })
    }

    /// What is open in the partition.
    pub(crate) fn backlog(&self) -> PartitionBacklog {
        let now = self.now();
        let marks = self.lock();
        let oldest = marks.open.front();
        PartitionBacklog {
            topic: self.tp.0.to_string(),
            partition: self.tp.1,
            open: marks.open.len(),
            oldest_incomplete: oldest.map(|o| o.offset),
            oldest_age: oldest
                .map(|o| Duration::from_millis(u64::from(now.wrapping_sub(o.at))))
                .unwrap_or_default(),
            paused: self.is_paused(),
            committable: marks.watermark,
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

    /// Forgets which watermark was committed last, so the next commit round commits
    /// the watermark again: after a commit made outside the rounds, which may have
    /// moved the committed offset back.
    pub(crate) fn forget_committed(&self) {
        self.lock().committed = None;
    }

    /// Whether the partition is still assigned in this assignment and not being
    /// revoked.
    pub(crate) fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }

    /// Records were handed out, in this order; one lock for all of them. Returns how
    /// many more it may take: zero when it is full, as many records open as its bound
    /// from the oldest incomplete one on.
    pub(crate) fn received(&self, offsets: &[i64]) -> usize {
        let at = self.now();
        let mut marks = self.lock();
        for &offset in offsets {
            marks.received(offset, at);
        }
        let len = marks.open.len();
        if len >= self.max_open {
            marks.full = true;
        } else if len <= self.max_open / 2 {
            // A rewind forgot records.
            marks.full = false;
        }
        self.max_open.saturating_sub(len)
    }

    /// A record completed; returns whether the watermark moved. A full partition
    /// down to half its bound wakes the poll task to resume it.
    pub(crate) fn complete(&self, offset: i64) -> bool {
        let mut marks = self.lock();
        let moved = marks.complete(offset);
        if moved && marks.full && marks.open.len() <= self.max_open / 2 {
            marks.full = false;
            drop(marks);
            self.wake.notify_one();
        }
        moved
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

/// What is open in one partition a [`KafkaConsumer`](crate::KafkaConsumer) owns: read
/// through [`OpenRecords`](crate::OpenRecords), to export as metrics or to alert on a
/// record that holds its partition.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionBacklog {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Records handed out from the oldest incomplete one on (completed or not): what
    /// the partition's commit waits behind. At
    /// [`max_open_per_partition`](crate::KafkaConsumerBuilder::max_open_per_partition)
    /// the partition is paused.
    pub open: usize,
    /// The offset of the oldest incomplete record, which holds the committed offset.
    pub oldest_incomplete: Option<i64>,
    /// How long ago the oldest incomplete record was received (zero when none is open;
    /// wraps after 49 days).
    pub oldest_age: Duration,
    /// Whether the partition is paused for having `open` at the bound.
    pub paused: bool,
    /// The offset to commit (one past the last record of the complete run), once a
    /// record completed in this assignment.
    pub committable: Option<i64>,
}

/// Every partition this consumer owns.
#[derive(Debug)]
pub(crate) struct Watermarks {
    partitions: HashMap<Tp, Arc<Assigned>>,
    /// Names of the topics seen, to share one allocation per topic.
    topics: Vec<Arc<str>>,
    /// Each partition's bound on open records.
    max_open: usize,
    /// Wakes the poll task when a full partition has room again.
    wake: Arc<Notify>,
}

impl Default for Watermarks {
    fn default() -> Self {
        Watermarks::new(DEFAULT_MAX_OPEN)
    }
}

impl Watermarks {
    /// No partition yet; each will hold at most `max_open` open records.
    pub(crate) fn new(max_open: usize) -> Self {
        Watermarks {
            partitions: HashMap::new(),
            topics: Vec::new(),
            max_open,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notified when a full partition has room again.
    pub(crate) fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// What is open in each partition, by topic and partition.
    pub(crate) fn backlog(&self) -> Vec<PartitionBacklog> {
        let mut out: Vec<PartitionBacklog> =
            self.partitions.values().map(|a| a.backlog()).collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }

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
        let assigned = Arc::new(Assigned::new(tp.clone(), self.max_open, self.wake.clone()));
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
mod tests;
