//! The consumer: a consumer-group member whose committed offsets follow the watermark.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, ClientContext, Message as _, Offset, TopicPartitionList};
use redrive_core::delivery::SettleFuture;
use redrive_core::{Acker, Capabilities, Consumer, Delivery, OrderingScope};
use tokio::runtime::RuntimeFlavor;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::mapping;
use crate::watermark::{Assigned, DEFAULT_MAX_OPEN, PartitionBacklog, Tp, Watermarks};

/// Settings the adapter owns; setting them through [`KafkaConsumerBuilder::set`] is an
/// error, because offsets are committed from the watermark and nowhere else.
const OWNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// Builds a [`KafkaConsumer`].
///
/// | setting | default |
/// |---|---|
/// | `commit_interval` (how often moved watermarks are committed) | 1 s |
/// | `buffer` (records polled ahead of the Worker before partitions pause) | 256 |
/// | `close_timeout` (the final commit and leaving the group, at most) | 10 s |
/// | `revoke_timeout` (a revoke waits this long for running records) | 10 s |
/// | `max_open_per_partition` (records open behind a partition's oldest incomplete one before it pauses) | 100 000 |
/// | `auto.offset.reset` | `earliest` |
/// | any other librdkafka setting | through [`set`](Self::set) |
#[derive(Clone, Debug)]
#[must_use]
pub struct KafkaConsumerBuilder {
    topics: Vec<String>,
    config: ClientConfig,
    commit_interval: Duration,
    close_timeout: Duration,
    revoke_timeout: Duration,
    buffer: usize,
    max_open: usize,
}

impl KafkaConsumerBuilder {
    /// How many records are polled ahead of the Worker (at least 1; rounded up to whole
    /// batches of up to 64 records, one batch per poll; up to about twice this many are
    /// held). When that stays full (for a third of `max.poll.interval.ms`, at most
    /// 10 s), the assigned partitions are paused and polling goes on, so the consumer
    /// keeps its group membership however long the Worker holds back
    /// (`max.poll.interval.ms` is never exceeded); they resume when there is room.
    pub fn buffer(mut self, records: usize) -> Self {
        self.buffer = records;
        self
    }

    /// How many records of one partition may be open, from its oldest incomplete record
    /// on (at least 1; default 100 000, 16 bytes each). A record that does not complete
    /// (a handler that hangs without a timeout layer, a record parked for good) holds
    /// its partition's committed offset, and every record received after it is kept
    /// until it completes. At the bound the partition is paused, with a warning naming
    /// its oldest incomplete record: its records already received are still handed
    /// out, none is lost, and the other partitions flow on. It resumes, where it
    /// stopped, once completions bring it down to half the bound. Read the counts
    /// through [`KafkaConsumer::open_records`].
    ///
    /// Keep it well above the records in flight in a healthy flow (about twice the
    /// [`buffer`](Self::buffer) plus the Worker's concurrency and waiting records), or
    /// partitions pause under normal load.
    pub fn max_open_per_partition(mut self, records: usize) -> Self {
        self.max_open = records;
        self
    }

    /// Sets a librdkafka consumer setting (`session.timeout.ms`, `security.protocol`, …).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// How often watermarks that moved are committed (at least 10 ms). The last ones
    /// are committed by [`close`](Consumer::close) and when partitions are revoked.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The longest [`close`](Consumer::close) waits for the final commit and for the
    /// consumer to leave its group; past it, close returns and logs.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// How long a rebalance that takes partitions away waits for their records that are
    /// running in a handler (zero: not at all). Records of those partitions not yet
    /// started are handed back unrun at once, parked ones are dropped; the running ones
    /// complete, and the watermark committed for the new owner covers them, so they are
    /// not processed twice. Past the deadline the rest is delivered again to the new
    /// owner. Keep it well under `max.poll.interval.ms`: the poll waits with it.
    ///
    /// The wait needs a multi-thread tokio runtime (the Worker completes records while
    /// the poll task waits); on a current-thread runtime the revoke does not wait.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// Checks the settings, creates the consumer and subscribes it.
    ///
    /// # Errors
    /// [`Error::Config`] for settings that cannot work (an owned setting changed, no
    /// topic, a commit interval under 10 ms), [`Error::Kafka`] if librdkafka refuses
    /// the configuration or the subscription.
    pub fn build(self) -> Result<KafkaConsumer> {
        for (key, value) in OWNED {
            if let Some(v) = self.config.get(key).filter(|v| v != value) {
                return Err(Error::Config(format!(
                    "`{key}={v}` is not supported: the adapter commits offsets itself, from the \
                     watermark of completed records; leave `{key}` unset"
                )));
            }
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return Err(Error::Config("name at least one topic, none empty".into()));
        }
        if self.commit_interval < Duration::from_millis(10) {
            return Err(Error::Config(format!(
                "commit interval {:?} is under 10 ms; commits that often load the broker for nothing",
                self.commit_interval
            )));
        }
        if self.buffer == 0 {
            return Err(Error::Config(
                "the buffer must hold at least 1 record".into(),
            ));
        }
        if self.max_open == 0 {
            return Err(Error::Config(
                "max_open_per_partition must allow at least 1 record".into(),
            ));
        }
        if self.config.get("group.id").is_none_or(str::is_empty) {
            return Err(Error::Config("a group id is required".into()));
        }
        // librdkafka's default max.poll.interval.ms is 300 s.
        let max_poll = self
            .config
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis);
        let pause_after = (max_poll / 3).min(Duration::from_secs(10));
        let group: Arc<str> = self.config.get("group.id").unwrap_or_default().into();
        let mut config = self.config;
        for (key, value) in OWNED {
            config.set(*key, *value);
        }
        let state = Arc::new(Mutex::new(Watermarks::new(self.max_open)));
        let context = Context {
            state: state.clone(),
            revoke_timeout: self.revoke_timeout,
        };
        let consumer: StreamConsumer<Context> = config.create_with_context(context)?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let committer = tokio::spawn(commit_every(
            Arc::downgrade(&consumer),
            state.clone(),
            self.commit_interval,
        ));
        // Records travel in batches of what one poll found, so the channel's costs are
        // paid per batch; a batch holds at most the buffer, so the buffer still bounds
        // what is polled ahead (rounded up to whole batches).
        let batch_max = self.buffer.min(BATCH);
        let (tx, rx) = mpsc::channel(self.buffer.div_ceil(batch_max));
        let spare = Arc::new(Spare::new(tx.max_capacity()));
        let poller = tokio::spawn(poll(
            consumer.clone(),
            group,
            state.clone(),
            tx,
            spare.clone(),
            batch_max,
            pause_after,
        ));
        Ok(KafkaConsumer {
            consumer: Some(consumer),
            rx,
            ready: Batch::new(),
            spare,
            state,
            tasks: vec![committer, poller],
            close_timeout: self.close_timeout,
            topics: self.topics,
        })
    }
}

/// A consumer-group member. See the [crate docs](crate) for the guarantees.
///
/// Offsets are committed from per-partition watermarks: just past the longest run of
/// records whose deliveries were acked. Create it inside a tokio runtime (a task
/// commits the watermarks every [`commit_interval`](KafkaConsumerBuilder::commit_interval)).
pub struct KafkaConsumer {
    consumer: Option<Arc<StreamConsumer<Context>>>,
    rx: mpsc::Receiver<Batch>,
    /// The rest of the batch last received, handed out before the next is taken.
    ready: Batch,
    /// Emptied batches, handed back to the poll task to fill again.
    spare: Arc<Spare>,
    state: Arc<Mutex<Watermarks>>,
    tasks: Vec<JoinHandle<()>>,
    close_timeout: Duration,
    topics: Vec<String>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topics", &self.topics)
            .field("closed", &self.consumer.is_none())
            .finish()
    }
}

impl KafkaConsumer {
    /// Starts building a consumer in group `group_id` of `topics` at `brokers`
    /// (`host:port,host:port`).
    pub fn builder<T: Into<String>>(
        brokers: &str,
        group_id: &str,
        topics: impl IntoIterator<Item = T>,
    ) -> KafkaConsumerBuilder {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        KafkaConsumerBuilder {
            topics: topics.into_iter().map(Into::into).collect(),
            config,
            commit_interval: Duration::from_secs(1),
            close_timeout: Duration::from_secs(10),
            revoke_timeout: Duration::from_secs(10),
            buffer: 256,
            max_open: DEFAULT_MAX_OPEN,
        }
    }

    /// A handle on what is open in each partition this consumer owns (see
    /// [`max_open_per_partition`](KafkaConsumerBuilder::max_open_per_partition)), to
    /// read while the Worker runs the consumer: for metrics, or to alert on a record
    /// that holds its partition.
    pub fn open_records(&self) -> OpenRecords {
        OpenRecords {
            state: Arc::downgrade(&self.state),
        }
    }

    /// Commits every watermark that moved, and waits for the broker (up to the close
    /// timeout). Called by `close`; useful before a planned pause.
    ///
    /// # Errors
    /// [`Error::Kafka`] if the commit failed (the watermarks are offered again),
    /// [`Error::Commit`] if it did not finish within the close timeout,
    /// [`Error::Closed`] after `close`.
    pub async fn commit_now(&self) -> Result<()> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(Error::Closed);
        };
        let state = self.state.clone();
        let work = off_runtime(move || commit(&*consumer, &state, CommitMode::Sync));
        match tokio::time::timeout(self.close_timeout, work).await {
            Ok(Some(result)) => result.map_err(Error::from),
            Ok(None) => Err(Error::Commit("the commit thread panicked".into())),
            Err(_) => Err(Error::Commit(format!(
                "it did not finish within the close timeout ({:?}); the completed records \
                 after the last commit will be delivered again",
                self.close_timeout
            ))),
        }
    }
}

/// What is open in each partition a [`KafkaConsumer`] owns, from
/// [`KafkaConsumer::open_records`]. Clones read the same consumer; once it is dropped
/// there is nothing to read.
#[derive(Clone, Debug)]
pub struct OpenRecords {
    state: Weak<Mutex<Watermarks>>,
}

impl OpenRecords {
    /// Each partition the consumer owns, by topic and partition.
    pub fn partitions(&self) -> Vec<PartitionBacklog> {
        self.state
            .upgrade()
            .map(|state| lock(&state).backlog())
            .unwrap_or_default()
    }
}

/// Runs a blocking librdkafka call on a thread of its own and waits for it. Unlike
/// `spawn_blocking`, a call that outlives its caller's timeout does not hold up the
/// runtime's shutdown (or the process's exit).
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("redrive-kafka-close".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread for a blocking kafka call");
        return None;
    }
    rx.await.ok()
}

fn lock(state: &Mutex<Watermarks>) -> MutexGuard<'_, Watermarks> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Commits the watermarks that moved; on failure they are offered again.
fn commit<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    state: &Mutex<Watermarks>,
    mode: CommitMode,
) -> KafkaResult<()> {
    let dirty = lock(state).take_dirty();
    if dirty.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(dirty.len());
    for ((topic, partition), offset) in &dirty {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    let result = consumer.commit(&tpl, mode);
    if let Err(e) = &result {
        tracing::warn!(error = %e, "offset commit failed; trying again with the next commit");
        lock(state).commit_failed(&dirty);
    } else {
        tracing::trace!(?dirty, "offsets committed");
    }
    result
}

async fn commit_every(
    consumer: Weak<StreamConsumer<Context>>,
    state: Arc<Mutex<Watermarks>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(consumer) = consumer.upgrade() else {
            return;
        };
        // Async: the request is queued, the result comes to `commit_callback`.
        let _ = commit(&*consumer, &state, CommitMode::Async);
    }
}

/// Polls the consumer and hands records to `receive` through `tx`, in batches of what
/// one poll found (at most `batch_max`), holding up to another `tx`'s worth in order
/// when it is full. When the hold stays full for `pause_after` (the Worker is stalled:
/// keys parked, the breaker open), the assigned partitions are paused and polling goes
/// on, so rebalances are served and the consumer never exceeds
/// `max.poll.interval.ms`; they resume once everything held is handed over. Short
/// stalls cost nothing: pausing drops librdkafka's prefetched records, and resuming
/// fetches them again, from the record after the last one polled.
///
/// A partition whose open records reach their bound (a record holds it) is paused
/// alone, at the end of the batch that filled it, and resumed once it is down to half
/// the bound (the acker that gets it there wakes this task).
async fn poll(
    consumer: Arc<StreamConsumer<Context>>,
    group: Arc<str>,
    state: Arc<Mutex<Watermarks>>,
    tx: mpsc::Sender<Batch>,
    spare: Arc<Spare>,
    batch_max: usize,
    pause_after: Duration,
) {
    let limit = tx.max_capacity();
    let refill = limit.div_ceil(2);
    let mut held: VecDeque<Batch> = VecDeque::new();
    let mut paused = false;
    // Partitions paused for being full.
    let mut full: Vec<Arc<Assigned>> = Vec::new();
    let wake = lock(&state).wake();
    let mut last = None;
    // Kept across polls, so its list of offsets is allocated once.
    let mut received = Received::default();
    // One stream for the task's life: `recv()` would register and drop a waker slot
    // (two lock round trips) per record.
    let mut stream = consumer.stream();
    let handle = Arc::downgrade(&consumer);
    loop {
        while let Some(batch) = held.pop_front() {
            match tx.try_send(batch) {
                Ok(()) => {}
                Err(TrySendError::Full(batch)) => {
                    held.push_front(batch);
                    break;
                }
                Err(TrySendError::Closed(_)) => return,
            }
        }
        if !full.is_empty() {
            resume_emptied(&consumer, &mut full, paused);
        }
        if held.is_empty() && paused {
            paused = !set_paused(&consumer, &state, false);
        }
        if held.len() >= limit && !paused {
            // Full: wait for room without polling, but not long enough to be dropped
            // from the group. Woken once half the channel is free rather than for each
            // batch taken: the wake-up is paid by the Worker's thread (a system call
            // when this task's thread sleeps), once per `refill` batches.
            tokio::select! {
                biased;
                () = tx.closed() => return,
                permits = tx.reserve_many(refill) => match permits {
                    Ok(permits) => {
                        for (permit, batch) in permits.zip(held.drain(..refill)) {
                            permit.send(batch);
                        }
                    }
                    Err(_) => return,
                },
                () = tokio::time::sleep(pause_after) => {
                    // Room for fewer than `refill` batches: the Worker is slow, not
                    // stalled. Hand over what fits (at the top of the loop) and wait again.
                    if tx.capacity() > 0 {
                        continue;
                    }
                    tracing::info!(held = held.len(), ?pause_after, "the worker is not taking records; pausing the partitions and polling on");
                    paused = set_paused(&consumer, &state, true);
                }
            }
            continue;
        }
        let record = tokio::select! {
            biased;
            () = tx.closed() => return,
            permit = tx.reserve(), if !held.is_empty() => {
                match permit {
                    Ok(permit) => permit.send(held.pop_front().expect("held is not empty")),
                    Err(_) => return,
                }
                continue;
            }
            // A full partition has room: resumed at the top of the loop.
            () = wake.notified(), if !full.is_empty() => continue,
            record = stream.next() => record.expect("kafka streams never end"),
        };
        let mut batch = spare.take(batch_max);
        let mut failed = take(
            record,
            &handle,
            &group,
            &state,
            &mut last,
            &mut batch,
            &mut received,
        );
        // Then what librdkafka already holds, without waiting and without a `select!`
        // per record.
        while !failed && batch.len() < batch_max && !received.at_bound() {
            let Some(Some(record)) = stream.next().now_or_never() else {
                break;
            };
            failed = take(
                record,
                &handle,
                &group,
                &state,
                &mut last,
                &mut batch,
                &mut received,
            );
        }
        // Recorded before the Worker can see them, so none completes unrecorded.
        received.record();
        for assigned in received.full.drain(..) {
            if pause_full(&consumer, &assigned) {
                full.push(assigned);
            }
        }
        if held.is_empty() {
            match tx.try_send(batch) {
                // A closed channel is seen at the top of the poll loop.
                Ok(()) | Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(batch)) => held.push_back(batch),
            }
        } else {
            held.push_back(batch);
        }
        if paused && held.len() >= limit {
            // Records of partitions assigned since the pause: pause them too.
            set_paused(&consumer, &state, true);
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Records polled together, handed to `receive` in one channel send.
type Batch = VecDeque<KafkaResult<Delivery>>;

/// Batches `receive` has emptied, kept for the poll task to fill again: a batch of 64
/// deliveries is about 15 KiB, so reusing them spares an allocation of that size per
/// poll, freed on whichever thread received it.
struct Spare {
    batches: Mutex<Vec<Batch>>,
    /// The most kept: as many as can be on their way at once.
    max: usize,
}

impl Spare {
    fn new(max: usize) -> Self {
        Spare {
            batches: Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// An empty batch with room for `capacity` deliveries, reused if one is kept.
    fn take(&self, capacity: usize) -> Batch {
        let kept = self
            .batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        kept.unwrap_or_else(|| Batch::with_capacity(capacity))
    }

    /// Keeps `batch`, emptied, unless enough are kept.
    fn put(&self, batch: Batch) {
        debug_assert!(batch.is_empty());
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if batches.len() < self.max && batch.capacity() > 0 {
            batches.push(batch);
        }
    }
}

/// The most records in one batch: what the poll task takes from librdkafka's queue in
/// one go once one has arrived.
const BATCH: usize = 64;

/// Adds `record` to `batch` as a delivery to `group` (or as the poll error it is);
/// returns whether it was an error.
fn take(
    record: KafkaResult<BorrowedMessage<'_>>,
    consumer: &Weak<StreamConsumer<Context>>,
    group: &Arc<str>,
    state: &Mutex<Watermarks>,
    last: &mut Option<(Tp, Arc<Assigned>)>,
    batch: &mut Batch,
    received: &mut Received,
) -> bool {
    match record {
        Ok(record) => {
            batch.push_back(Ok(delivery(
                &record, consumer, group, state, last, received,
            )));
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "kafka poll failed");
            batch.push_back(Err(e));
            true
        }
    }
}

/// Offsets of a batch's records, to be recorded in their partitions' marks with one
/// lock per run of records of one partition.
#[derive(Default)]
struct Received {
    assigned: Option<Arc<Assigned>>,
    offsets: Vec<i64>,
    /// How many more records `assigned` could take when its run began (or when the
    /// last of it was recorded).
    room: usize,
    /// Partitions that became full, not yet paused.
    full: Vec<Arc<Assigned>>,
}

impl Received {
    fn add(&mut self, assigned: &Arc<Assigned>, offset: i64) {
        if !self
            .assigned
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, assigned))
        {
            self.record();
            self.assigned = Some(assigned.clone());
            self.room = assigned.room();
        }
        self.offsets.push(offset);
    }

    /// Whether the partition of the run being added is full: the batch ends here.
    fn at_bound(&self) -> bool {
        self.assigned.is_some() && self.offsets.len() >= self.room
    }

    /// Records the offsets added since the last call.
    fn record(&mut self) {
        if let Some(assigned) = self.assigned.as_ref().filter(|_| !self.offsets.is_empty()) {
            self.room = assigned.received(&self.offsets);
            if self.room == 0 && !assigned.is_paused() {
                self.full.push(assigned.clone());
            }
        }
        self.offsets.clear();
    }
}

/// The partition of `assigned` is full: pauses it, with a warning. Returns whether it
/// is paused (not when it is no longer this consumer's, or the pause failed).
fn pause_full(consumer: &StreamConsumer<Context>, assigned: &Arc<Assigned>) -> bool {
    if !assigned.is_current() || assigned.is_paused() {
        return false;
    }
    let (topic, partition) = assigned.tp();
    let (stuck_offset, stuck_for) = assigned.stuck().unwrap_or_default();
    match consumer.pause(&one_partition(assigned.tp())) {
        Ok(()) => {
            assigned.set_paused(true);
            tracing::warn!(
                topic = &**topic,
                partition,
                stuck_offset,
                ?stuck_for,
                "a kafka partition reached its bound of open records behind an incomplete \
                 record (max_open_per_partition); pausing it until that record completes"
            );
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, topic = &**topic, partition, stuck_offset, "pausing a kafka partition at its bound of open records failed");
            false
        }
    }
}

/// Resumes the partitions of `full` that have room again (keeping them paused while
/// every partition is, `all_paused`: resuming those resumes them), and forgets those a
/// rebalance took.
fn resume_emptied(
    consumer: &StreamConsumer<Context>,
    full: &mut Vec<Arc<Assigned>>,
    all_paused: bool,
) {
    full.retain(|assigned| {
        // A rebalance resumed it when it took it away.
        if !assigned.is_paused() || !assigned.is_current() {
            return false;
        }
        if assigned.is_full() {
            return true;
        }
        let (topic, partition) = assigned.tp();
        if all_paused {
            assigned.set_paused(false);
            return false;
        }
        match consumer.resume(&one_partition(assigned.tp())) {
            Ok(()) => {
                assigned.set_paused(false);
                tracing::info!(
                    topic = &**topic,
                    partition,
                    "a kafka partition paused at its bound of open records has room again; resumed"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = &**topic, partition, "resuming a kafka partition failed; trying again");
                true
            }
        }
    });
}

/// A list of one partition.
fn one_partition(tp: &Tp) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Resumes the partition of `assigned` if it was paused for being full: librdkafka
/// keeps a partition paused across rebalances, and this assignment's tracking ends
/// (called when it is revoked or replaced).
fn resume_taken<C: rdkafka::consumer::Consumer<Context>>(consumer: &C, assigned: &Assigned) {
    if assigned.set_paused(false) {
        if let Err(e) = consumer.resume(&one_partition(assigned.tp())) {
            let (topic, partition) = assigned.tp();
            tracing::warn!(error = %e, topic = &**topic, partition, "resuming a kafka partition paused at its bound failed as it was revoked; if assigned again it stays paused");
        }
    }
}

/// Pauses or resumes every assigned partition (but those paused for being full, which
/// stay paused); returns whether that worked.
fn set_paused(consumer: &StreamConsumer<Context>, state: &Mutex<Watermarks>, pause: bool) -> bool {
    let result = consumer.assignment().and_then(|tpl| {
        if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&not_full(tpl, state))
        }
    });
    match result {
        Ok(()) => {
            tracing::debug!(pause, "kafka partitions paused or resumed for backpressure");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, pause, "pausing or resuming kafka partitions failed");
            false
        }
    }
}

/// `tpl` without the partitions paused for being full.
fn not_full(tpl: TopicPartitionList, state: &Mutex<Watermarks>) -> TopicPartitionList {
    let mut state = lock(state);
    let full = |topic: &str, partition: i32| {
        let tp: Tp = (state.topic(topic), partition);
        state.get(&tp).is_some_and(|a| a.is_paused())
    };
    let mut full = full;
    if !tpl
        .elements()
        .iter()
        .any(|e| full(e.topic(), e.partition()))
    {
        return tpl;
    }
    let mut out = TopicPartitionList::with_capacity(tpl.count());
    for e in tpl.elements() {
        if !full(e.topic(), e.partition()) {
            out.add_partition(e.topic(), e.partition());
        }
    }
    out
}

/// A delivery of `record` to `group`, tracked in its partition's watermark.
///
/// `last` is the partition of the record before: records come in runs of one
/// partition, so most find theirs there without the lock every partition shares.
/// Rebalances run inside the poll, on this task, so no revoke comes between the check
/// that `last` is current and the record's arrival in it.
fn delivery(
    record: &BorrowedMessage<'_>,
    consumer: &Weak<StreamConsumer<Context>>,
    group: &Arc<str>,
    state: &Mutex<Watermarks>,
    last: &mut Option<(Tp, Arc<Assigned>)>,
    received: &mut Received,
) -> Delivery {
    let offset = record.offset();
    let cached = last.as_ref().filter(|(tp, assigned)| {
        tp.1 == record.partition() && *tp.0 == *record.topic() && assigned.is_current()
    });
    let (tp, assigned) = match cached {
        Some((tp, assigned)) => (tp.clone(), Some(assigned.clone())),
        None => {
            let mut state = lock(state);
            let tp: Tp = (state.topic(record.topic()), record.partition());
            let assigned = state.get(&tp);
            if let Some(a) = &assigned {
                *last = Some((tp.clone(), a.clone()));
            }
            (tp, assigned)
        }
    };
    match &assigned {
        Some(a) => received.add(a, offset),
        None => {
            tracing::warn!(topic = %tp.0, partition = tp.1, offset, "record of a partition not assigned to this consumer; the Worker hands it back unrun");
        }
    }
    let mut message = mapping::message(record, tp.0.clone(), group.clone());
    let first = assigned
        .as_ref()
        .and_then(|a| a.first_record(offset))
        .map(|died| {
            let deliveries = died.saturating_add(1);
            let attempt = &mut message.metadata.attempt;
            *attempt = (*attempt).max(deliveries);
            Box::new(FirstRecord {
                consumer: consumer.clone(),
                deliveries,
                recorded: AtomicBool::new(false),
            })
        });
    Delivery::new(
        message,
        KafkaAcker {
            assigned,
            tp,
            offset,
            running: AtomicBool::new(false),
            first,
        },
    )
}

/// Waits until no record of `tps` runs in a handler, or `timeout` passed.
///
/// Called from the rebalance callback, on the thread that polls: on a multi-thread
/// runtime that worker thread is handed over (`block_in_place`) so the Worker's tasks run
/// on; off the runtime (librdkafka closing) it just waits; on a current-thread runtime
/// waiting would stop the very tasks it waits for, so it does not.
fn wait_for_running(state: &Mutex<Watermarks>, tps: &[Tp], timeout: Duration) {
    let running = || lock(state).running(tps);
    if timeout.is_zero() || running() == 0 {
        return;
    }
    let wait = || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let n = running();
            if n == 0 || std::time::Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let left = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        Ok(_) => {
            tracing::info!(
                running = running(),
                "partitions revoked on a current-thread runtime: not waiting for their running records, which are delivered again to the new owner"
            );
            return;
        }
        Err(_) => wait(),
    };
    if left > 0 {
        tracing::warn!(
            running = left,
            ?timeout,
            "revoke deadline passed with records still running; they are delivered again to the new owner"
        );
    }
}

/// Tracks assignments and commit results for the watermarks.
struct Context {
    state: Arc<Mutex<Watermarks>>,
    revoke_timeout: Duration,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut replaced: Vec<Arc<Assigned>> = Vec::new();
                let assigned: Vec<(Tp, Arc<Assigned>)> = {
                    let mut state = lock(&self.state);
                    tpl.elements()
                        .iter()
                        .map(|e| {
                            let tp: Tp = (state.topic(e.topic()), e.partition());
                            replaced.extend(state.get(&tp));
                            let a = state.assign(tp.clone());
                            (tp, a)
                        })
                        .collect()
                };
                // Assigned again without a revoke.
                for old in &replaced {
                    resume_taken(consumer, old);
                }
                read_deaths(consumer, tpl, &assigned);
                tracing::info!(partitions = tpl.count(), "kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                // Stop starting their records, let the running ones complete (up to the
                // deadline), then commit what is complete before the partitions go to
                // another member. Acks that come later are ignored: those records are
                // delivered again to the new owner.
                let tps: Vec<Tp> = {
                    let mut state = lock(&self.state);
                    tpl.elements()
                        .iter()
                        .map(|e| {
                            let tp: Tp = (state.topic(e.topic()), e.partition());
                            state.start_revoke(&tp);
                            tp
                        })
                        .collect()
                };
                wait_for_running(&self.state, &tps, self.revoke_timeout);
                let mut last = TopicPartitionList::new();
                {
                    let mut state = lock(&self.state);
                    for tp in &tps {
                        if let Some(a) = state.get(tp) {
                            resume_taken(consumer, &a);
                        }
                        if let Some(w) = state.revoke(tp) {
                            let _ = last.add_partition_offset(&tp.0, tp.1, Offset::Offset(w));
                        }
                    }
                }
                if last.count() > 0 {
                    if let Err(e) = consumer.commit(&last, CommitMode::Sync) {
                        tracing::warn!(error = %e, "commit of revoked partitions failed; their completed records may be delivered again");
                    }
                }
                tracing::info!(partitions = tpl.count(), "kafka partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; trying again with the next commit");
            let mut state = lock(&self.state);
            let failed: Vec<(Tp, i64)> = offsets
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((state.topic(e.topic()), e.partition()), o)),
                    _ => None,
                })
                .collect();
            state.commit_failed(&failed);
        }
    }
}

/// The committed offset's metadata that counts the deliveries of the record at the
/// committed offset which ended without a fate: `redrive:a=<offset>:<deliveries>`.
/// Committed when the first record of an assignment starts running (it may be one
/// that killed its consumer before), cleared by the commit past it when it completes.
/// At assignment, a record found there is delivered with `attempt` one above the
/// count, so a record that kills its consumer is seen with a rising attempt after each
/// restart, and a dead-letter layer's `max_attempts` ends the loop.
const DIED: &str = "redrive:a=";

fn died_metadata(offset: i64, deliveries: u32) -> String {
    format!("{DIED}{offset}:{deliveries}")
}

fn parse_died(metadata: &str) -> Option<(i64, u32)> {
    let (offset, count) = metadata.strip_prefix(DIED)?.split_once(':')?;
    Some((offset.parse().ok()?, count.parse().ok()?))
}

/// How long reading the committed offsets at assignment, or committing a count before
/// a record runs, may take; past it the count is not kept (and a warning says so).
const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the committed offsets' metadata of newly assigned partitions, and gives each
/// partition the count of deliveries without a fate it holds.
fn read_deaths(
    consumer: &BaseConsumer<Context>,
    tpl: &TopicPartitionList,
    assigned: &[(Tp, Arc<Assigned>)],
) {
    let committed = blocking(|| consumer.committed_offsets(tpl.clone(), COUNT_TIMEOUT));
    let committed = match committed {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading the committed offsets failed; deliveries that ended without a fate before this assignment are not counted");
            return;
        }
    };
    for e in committed.elements() {
        // rdkafka panics on metadata that is not UTF-8 (anything may commit some).
        let metadata = catch_unwind(AssertUnwindSafe(|| parse_died(e.metadata())));
        let Ok(Some((offset, count))) = metadata else {
            continue;
        };
        if let Some((_, a)) = assigned
            .iter()
            .find(|(tp, _)| tp.1 == e.partition() && *tp.0 == *e.topic())
        {
            tracing::info!(
                topic = e.topic(),
                partition = e.partition(),
                offset,
                deliveries = count,
                "a record was delivered before without a fate (its consumer died running it)"
            );
            a.set_died(offset, count);
        }
    }
}

/// Commits `offset` of `tp`, with `metadata` if given, and waits for the broker.
fn commit_one<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    tp: &Tp,
    offset: i64,
    metadata: Option<&str>,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))?;
    if let Some(metadata) = metadata {
        if let Some(mut e) = tpl.find_partition(&tp.0, tp.1) {
            e.set_metadata(metadata);
        }
    }
    consumer.commit(&tpl, CommitMode::Sync)
}

/// Commits the first record's count of deliveries before its handler runs, so a crash
/// in the handler leaves it counted; waits at most [`COUNT_TIMEOUT`].
fn commit_before_running(first: &FirstRecord, tp: &Tp, offset: i64, metadata: &str) {
    let Some(consumer) = first.consumer.upgrade() else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (tp2, metadata2) = (tp.clone(), metadata.to_owned());
    let spawned = std::thread::Builder::new()
        .name("redrive-kafka-count".into())
        .spawn(move || {
            let _ = tx.send(commit_one(&*consumer, &tp2, offset, Some(&metadata2)));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to commit a delivery count");
        return;
    }
    match blocking(|| rx.recv_timeout(COUNT_TIMEOUT)) {
        Ok(Ok(())) => {
            tracing::debug!(topic = %tp.0, partition = tp.1, offset, metadata, "delivery count committed")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, offset, "committing the delivery count failed; a crash in this run is not counted")
        }
        Err(_) => {
            tracing::warn!(timeout = ?COUNT_TIMEOUT, topic = %tp.0, partition = tp.1, offset, "committing the delivery count took too long; a crash in this run may not be counted")
        }
    }
}

/// Runs `f`, which blocks, handing the worker thread over first on a multi-thread
/// runtime so its other tasks run on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

fn capabilities() -> Capabilities {
    Capabilities::new()
        .with_max_nack_delay(Duration::ZERO)
        .with_can_nack(false)
        .with_delivery_count(false)
        .with_lease(None, false)
        .with_ordering(OrderingScope::Partition)
}

impl Consumer for KafkaConsumer {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        loop {
            match self.ready.pop_front() {
                Some(Ok(d)) => return Ok(Some(d)),
                Some(Err(e)) => return Err(Error::from(e).into()),
                None => {}
            }
            // A channel receive, and the batch is stored before anything else can
            // happen: dropping this future loses nothing.
            match self.rx.recv().await {
                Some(batch) => self.spare.put(std::mem::replace(&mut self.ready, batch)),
                None => return Ok(None),
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    async fn close(&mut self) -> redrive_core::Result<()> {
        let tasks: Vec<JoinHandle<()>> = self.tasks.drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Once it has ended it holds no handle on the consumer, so the last handle,
            // dropped below off the runtime, is ours.
            let _ = task.await;
        }
        // Records polled and not taken stay incomplete: they hold their watermarks and
        // are delivered again after a restart.
        self.rx.close();
        self.ready = Batch::new();
        let result = self.commit_now().await;
        if let Some(consumer) = self.consumer.take() {
            // Leaving the group can wait on the broker: do it off the runtime, within
            // the close timeout.
            let leave = off_runtime(move || {
                consumer.unsubscribe();
                drop(consumer);
            });
            if tokio::time::timeout(self.close_timeout, leave)
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?self.close_timeout, "the kafka consumer did not leave its group within the close timeout; the broker will expire its session");
            }
        }
        result.map_err(Into::into)
    }
}

impl Drop for KafkaConsumer {
    /// A consumer dropped without [`close`](Consumer::close) (a crash, a panic) commits
    /// nothing more: records after the last commit are delivered again. Its tasks stop,
    /// and librdkafka is closed on a thread of its own, never on the runtime.
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(consumer) = self.consumer.take() {
            let spawned = std::thread::Builder::new()
                .name("redrive-kafka-drop".into())
                .spawn(move || {
                    // The aborted poll task lets go of its handle at its next poll.
                    for _ in 0..500 {
                        if Arc::strong_count(&consumer) == 1 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    drop(consumer);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a thread to close the kafka consumer");
            }
        }
    }
}

/// Marks a record complete in its partition's watermark.
struct KafkaAcker {
    /// The record's partition, as assigned when it was polled; `None` if it was not.
    assigned: Option<Arc<Assigned>>,
    tp: Tp,
    offset: i64,
    /// Whether the record is in a handler, as the Worker last said.
    running: AtomicBool,
    /// Set for the first record of an assignment, whose deliveries are counted in the
    /// committed offset's metadata.
    first: Option<Box<FirstRecord>>,
}

/// The first record of an assignment: the one at the committed offset, which may have
/// died with an earlier consumer (see [`DIED`]).
struct FirstRecord {
    consumer: Weak<StreamConsumer<Context>>,
    /// Its deliveries so far, this one included.
    deliveries: u32,
    /// Whether its start was committed.
    recorded: AtomicBool,
}

impl KafkaAcker {
    fn set_running(&self, running: bool) {
        if self.running.swap(running, Ordering::AcqRel) == running {
            return;
        }
        if let Some(assigned) = &self.assigned {
            if running {
                assigned.started();
            } else {
                assigned.stopped();
            }
        }
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        // A call aborted at the shutdown deadline ends without a settle: it runs no more.
        if *self.running.get_mut() {
            self.set_running(false);
        }
    }
}

impl Acker for KafkaAcker {
    fn ack(&self) -> SettleFuture<'_> {
        if let Some(assigned) = &self.assigned {
            if !assigned.complete(self.offset) {
                tracing::trace!(topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "ack below an incomplete record, or of a revoked partition");
            }
        }
        // Its run ends after its completion is marked: a revoke that waits for the
        // partition's runs to end then commits a watermark that counts it.
        self.set_running(false);
        match self.first.as_deref() {
            // Not after a revoke: the partition's new owner commits it now.
            Some(first) if first.recorded.load(Ordering::Acquire) && self.is_current() => {
                // Its count of deliveries is committed: commit past it before the ack
                // completes, or a crash now would count one more for a record that
                // completed.
                let consumer = first.consumer.clone();
                let assigned = self.assigned.clone();
                let (tp, past) = (self.tp.clone(), self.offset + 1);
                SettleFuture::new(async move {
                    let cleared = tokio::time::timeout(
                        COUNT_TIMEOUT,
                        off_runtime(move || {
                            consumer.upgrade().map(|c| commit_one(&*c, &tp, past, None))
                        }),
                    )
                    .await;
                    if !matches!(cleared, Ok(Some(Some(Ok(()))))) {
                        tracing::warn!(
                            ?cleared,
                            "committing past a counted record failed or took too long; the periodic commit tries again"
                        );
                    }
                    // The periodic commit may have committed a later watermark first,
                    // which this commit just moved back: it commits the watermark again.
                    if let Some(a) = assigned {
                        a.forget_committed();
                    }
                    Ok(())
                })
            }
            _ => SettleFuture::ready(Ok(())),
        }
    }

    fn nack(&self, _delay: Duration) -> SettleFuture<'_> {
        self.set_running(false);
        // Kafka cannot hand back one record. It stays incomplete and holds its
        // partition's watermark, so it is delivered again after a restart or a
        // rebalance. The Worker parks failures instead of nacking them; nacks come only
        // from handing back at shutdown.
        tracing::debug!(topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "record handed back: it holds the watermark and is delivered again after a restart");
        SettleFuture::ready(Ok(()))
    }

    fn extend(&self, _lease: Duration) -> SettleFuture<'_> {
        // Records have no lease: a consumer keeps its partitions while it polls.
        SettleFuture::ready(Ok(()))
    }

    fn running(&self, running: bool) {
        if running {
            if let Some(first) = self.first.as_deref().filter(|_| self.is_current()) {
                if !first.recorded.swap(true, Ordering::AcqRel) {
                    let metadata = died_metadata(self.offset, first.deliveries);
                    commit_before_running(first, &self.tp, self.offset, &metadata);
                }
            }
        }
        self.set_running(running);
    }

    fn is_current(&self) -> bool {
        // After a revoke the record belongs to the partition's new owner: the Worker
        // hands it back unrun, also when it was parked or waiting behind its key.
        self.assigned.as_ref().is_some_and(|a| a.is_current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_debug_hides_sasl_and_ssl_secrets() {
        let builder = KafkaConsumer::builder("127.0.0.1:9092", "g", ["t"])
            .set("security.protocol", "SASL_SSL")
            .set("sasl.username", "svc")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "k3y-s3cret");
        let text = format!("{builder:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("k3y-s3cret"), "{text}");
    }

    #[test]
    fn a_bound_of_no_open_record_is_refused() {
        let err = KafkaConsumer::builder("127.0.0.1:9092", "g", ["t"])
            .max_open_per_partition(0)
            .build()
            .expect_err("no record could ever be open");
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("max_open_per_partition")),
            "{err}"
        );
    }

    fn acker(assigned: &Arc<Assigned>, offset: i64) -> KafkaAcker {
        KafkaAcker {
            assigned: Some(assigned.clone()),
            tp: ("t".into(), 0),
            offset,
            running: AtomicBool::new(false),
            first: None,
        }
    }

    #[test]
    fn deaths_are_written_and_read_back() {
        assert_eq!(died_metadata(42, 3), "redrive:a=42:3");
        assert_eq!(parse_died("redrive:a=42:3"), Some((42, 3)));
        for other in [
            "",
            "redrive:a=42",
            "redrive:a=x:1",
            "redrive:a=1:-1",
            "app-data",
        ] {
            assert_eq!(parse_died(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn an_acker_counts_its_record_running_once_until_it_settles_or_drops() {
        let mut w = Watermarks::default();
        let tp: Tp = ("t".into(), 0);
        let assigned = w.assign(tp.clone());
        assigned.received(&[0, 1, 2]);
        let (a0, a1, a2) = (
            acker(&assigned, 0),
            acker(&assigned, 1),
            acker(&assigned, 2),
        );
        a0.running(true);
        a0.running(true);
        a1.running(true);
        a2.running(true);
        assert_eq!(
            w.running(std::slice::from_ref(&tp)),
            3,
            "said twice, counted once"
        );
        a1.running(false);
        a1.running(false);
        assert_eq!(w.running(std::slice::from_ref(&tp)), 2, "parked");
        a0.ack().await.unwrap();
        assert_eq!(w.running(std::slice::from_ref(&tp)), 1, "acked");
        a0.running(false);
        assert_eq!(
            w.running(std::slice::from_ref(&tp)),
            1,
            "nothing to undo after the ack"
        );
        drop(a2);
        assert_eq!(w.running(std::slice::from_ref(&tp)), 0, "dropped mid-run");
        a1.nack(Duration::ZERO).await.unwrap();
        assert_eq!(w.running(std::slice::from_ref(&tp)), 0);
        assert_eq!(w.revoke(&tp), Some(1));
    }
}
