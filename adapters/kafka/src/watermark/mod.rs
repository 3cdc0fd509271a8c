//! Per-partition offset watermarks: the offset to commit is just past the longest run
//! of completed records, so a slow, parked or failed record holds it.

mod metadata;
mod partition;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

pub(crate) use self::metadata::Kept;
use self::metadata::MAX_RUNS;
use self::partition::Partition;

/// A topic and partition. The topic's name is shared: every record of a topic, its
/// acker and its message's `source.destination` hold the same allocation.
pub(crate) type Tp = (Arc<str>, i32);

/// The default bound on a partition's open records (see
/// [`KafkaConsumerBuilder::max_open_per_partition`](crate::KafkaConsumerBuilder::max_open_per_partition)).
pub(crate) const DEFAULT_MAX_OPEN: usize = 100_000;

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
    /// What the committed offset's metadata kept at assignment: records completed
    /// past it, to skip, and delivery counts. Set before the first record arrives.
    kept: OnceLock<Kept>,
    /// Records skipped for having completed before.
    skipped: AtomicU64,
    marks: Mutex<Partition>,
    tp: Tp,
    /// The most records open from the oldest incomplete one on before the partition
    /// is paused.
    max_open: usize,
    /// The most runs of completed records before the partition is paused
    /// (`usize::MAX`: never paused for them).
    max_runs: usize,
    /// Whether the metadata was found too long in this assignment (warned once).
    truncated: AtomicBool,
    /// When the assignment began: records' receive times count from it.
    born: Instant,
    /// Wakes the poll task when a full partition has room again.
    wake: Arc<Notify>,
    /// Whether the poll task paused the partition because it was full (set and cleared
    /// on the thread that polls).
    paused: AtomicBool,
}

impl Assigned {
    fn new(tp: Tp, max_open: usize, max_runs: usize, wake: Arc<Notify>) -> Self {
        Assigned {
            current: AtomicBool::new(true),
            running: AtomicUsize::new(0),
            awaiting_first: AtomicBool::new(true),
            kept: OnceLock::new(),
            skipped: AtomicU64::new(0),
            marks: Mutex::new(Partition::default()),
            tp,
            max_open,
            max_runs,
            truncated: AtomicBool::new(false),
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

    /// How many more records may be received before the partition is full: none
    /// while its completed runs are at their bound.
    pub(crate) fn room(&self) -> usize {
        let marks = self.lock();
        if marks.too_many_runs(self.max_runs) {
            return 0;
        }
        self.max_open.saturating_sub(marks.open.len())
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
            runs: marks.runs,
            skipped: self.skipped.load(Ordering::Relaxed),
        }
    }

    /// Keeps what the committed offset's metadata kept at assignment (before any
    /// record of it is received).
    pub(crate) fn set_kept(&self, kept: Kept) {
        let _ = self.kept.set(kept);
    }

    /// Whether the record at `offset` completed before, as the committed metadata
    /// says: it is skipped (received complete, counted, never handed out). One atomic
    /// load when the metadata kept nothing.
    pub(crate) fn skip(&self, offset: i64) -> bool {
        let done = self.kept.get().is_some_and(|k| k.is_done(offset));
        if done {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// How many deliveries of the record at `offset` ended without completing before
    /// this one, when they are to be counted in the committed metadata before it runs:
    /// for the first record received in the assignment (the one at the committed
    /// offset, which may have killed its consumer; zero if nothing was counted), and
    /// for any record the metadata counted. `None` for the rest (an atomic load, and a
    /// search only when the metadata counted records).
    pub(crate) fn earlier_deliveries(&self, offset: i64) -> Option<u32> {
        let counted = self.kept.get().and_then(|k| k.deliveries(offset));
        let first = self.awaiting_first.load(Ordering::Relaxed)
            && self.awaiting_first.swap(false, Ordering::AcqRel);
        if first {
            Some(counted.unwrap_or(0))
        } else {
            counted
        }
    }

    /// The open record at `offset` is about to run for the `deliveries`th time:
    /// kept in the metadata of the next commit. Returns whether it is open.
    pub(crate) fn delivered(&self, offset: i64, deliveries: u32) -> bool {
        self.lock().delivered(offset, deliveries)
    }

    /// The offset to commit now, and its metadata; `None` before any record was
    /// received.
    pub(crate) fn commit_point(&self) -> Option<(i64, String)> {
        let marks = self.lock();
        let offset = marks.commit_offset()?;
        Some((offset, self.metadata(&marks, offset)))
    }

    fn metadata(&self, marks: &Partition, offset: i64) -> String {
        let mut out = String::new();
        if marks.kept(self.kept.get()).encode(offset, &mut out)
            && !self.truncated.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                topic = &*self.tp.0,
                partition = self.tp.1,
                "what the committed offset keeps of completed records and delivery counts is past Kafka's metadata bound; the rest is processed again after a restart (said once per assignment)"
            );
        }
        out
    }

    fn lock(&self) -> MutexGuard<'_, Partition> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets what was committed last, so the next commit round commits again: after
    /// a commit made outside the rounds, which may have moved the committed offset
    /// back or written older metadata.
    pub(crate) fn forget_committed(&self) {
        self.lock().changed = true;
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
        let kept = self.kept.get().filter(|k| !k.is_empty());
        let mut marks = self.lock();
        for &offset in offsets {
            let (deliveries, done) = kept.map_or((0, false), |k| {
                let n = k.deliveries(offset).unwrap_or(0);
                (u16::try_from(n).unwrap_or(u16::MAX), k.is_done(offset))
            });
            marks.received(offset, at, deliveries, done);
        }
        let len = marks.open.len();
        if len >= self.max_open || marks.too_many_runs(self.max_runs) {
            marks.full = true;
            return 0;
        } else if len <= self.max_open / 2 && marks.runs <= self.max_runs / 2 {
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
        if marks.full && marks.open.len() <= self.max_open / 2 && marks.runs <= self.max_runs / 2 {
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
    /// Runs of completed records past the oldest incomplete one, which the committed
    /// offset's metadata keeps; at 128 the partition is paused until they merge.
    pub runs: usize,
    /// Records skipped in this assignment because the committed offset's metadata
    /// said they completed before (a restart or a rebalance redoes none of them).
    pub skipped: u64,
}

/// Every partition this consumer owns.
#[derive(Debug)]
pub(crate) struct Watermarks {
    partitions: HashMap<Tp, Arc<Assigned>>,
    /// Names of the topics seen, to share one allocation per topic.
    topics: Vec<Arc<str>>,
    /// Each partition's bound on open records.
    max_open: usize,
    /// Each partition's bound on runs of completed records.
    max_runs: usize,
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
            max_runs: MAX_RUNS,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Partitions are not paused for their runs of completed records: those past the
    /// metadata's bound are not kept (processed again after a restart).
    pub(crate) fn without_runs_bound(mut self) -> Self {
        self.max_runs = usize::MAX;
        self
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
        let assigned = Arc::new(Assigned::new(
            tp.clone(),
            self.max_open,
            self.max_runs,
            self.wake.clone(),
        ));
        if let Some(old) = self.partitions.insert(tp, assigned.clone()) {
            old.current.store(false, Ordering::Release);
        }
        assigned
    }

    /// The partition was revoked: its tracking ends, and late completions go nowhere.
    /// Returns its watermark if it moved since the last commit.
    pub(crate) fn revoke(&mut self, tp: &Tp) -> Option<Commit> {
        let assigned = self.partitions.remove(tp)?;
        assigned.current.store(false, Ordering::Release);
        let marks = assigned.lock();
        let offset = marks.uncommitted()?;
        Some(Commit {
            tp: tp.clone(),
            offset,
            metadata: assigned.metadata(&marks, offset),
        })
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

    /// Commits of the partitions whose offset or metadata changed since they were
    /// last taken, marked as committed.
    pub(crate) fn take_dirty(&mut self) -> Vec<Commit> {
        let mut out = Vec::new();
        for (tp, a) in &self.partitions {
            let mut p = a.lock();
            if let Some(offset) = p.uncommitted() {
                let metadata = a.metadata(&p, offset);
                p.committed = Some(offset);
                p.changed = false;
                out.push(Commit {
                    tp: tp.clone(),
                    offset,
                    metadata,
                });
            }
        }
        out
    }

    /// Puts back commits that failed, so the next round tries again.
    pub(crate) fn commit_failed<'a>(&mut self, failed: impl IntoIterator<Item = (&'a Tp, i64)>) {
        for (tp, offset) in failed {
            if let Some(a) = self.partitions.get(tp) {
                let mut p = a.lock();
                if p.committed == Some(offset) {
                    p.changed = true;
                }
            }
        }
    }
}

/// A partition's offset to commit, with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Commit {
    pub(crate) tp: Tp,
    pub(crate) offset: i64,
    /// Empty when it keeps nothing.
    pub(crate) metadata: String,
}

#[cfg(test)]
mod tests;
