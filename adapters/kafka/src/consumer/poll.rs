//! The poll task: it polls librdkafka, turns records into deliveries tracked in their
//! partitions' watermarks, and hands them to `receive` in batches, holding them when
//! the Worker is slow and pausing the partitions when it stalls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt as _, StreamExt as _};
use rdkafka::Message as _;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;
use redrive_core::Delivery;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::mapping;
use crate::retry::{self, RetryCopy, Routes};
use crate::watermark::{Assigned, Tp, Watermarks};

use super::acker::KafkaAcker;
use super::batch::{Batch, Spare};
use super::lock;
use super::not_due::NotDue;
use super::pause::{pause_full, resume_emptied, set_paused};
use super::rebalance::Context;

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
///
/// With retry topics (`routes`), a record of a delay topic that is not due yet holds
/// its partition, paused, with the records after it, until it is (`not_due.rs`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn poll(
    consumer: Arc<StreamConsumer<Context>>,
    group: Arc<str>,
    state: Arc<Mutex<Watermarks>>,
    tx: mpsc::Sender<Batch>,
    spare: Arc<Spare>,
    batch_max: usize,
    pause_after: Duration,
    routes: Option<Arc<Routes>>,
) {
    let limit = tx.max_capacity();
    let refill = limit.div_ceil(2);
    let mut held: VecDeque<Batch> = VecDeque::new();
    let mut paused = false;
    // Partitions paused alone: for being full, or until a retry record was due.
    let mut full: Vec<Arc<Assigned>> = Vec::new();
    let mut not_due = NotDue::default();
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
            resume_emptied(&consumer, &mut full, paused, |a| not_due.holds(a));
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
        let next_due = not_due.next_due();
        let record = tokio::select! {
            biased;
            () = tx.closed() => return,
            () = until(next_due), if next_due.is_some() => {
                let mut batch = spare.take(batch_max);
                not_due.release(SystemTime::now(), &mut batch, &mut full);
                hand_over(&tx, &mut held, batch);
                continue;
            }
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
        let mut took = Take {
            consumer: &handle,
            group: &group,
            state: &state,
            routes: routes.as_ref(),
            last: &mut last,
            batch: &mut batch,
            received: &mut received,
            not_due: &mut not_due,
            now: SystemTime::now(),
        };
        let mut failed = took.take(record);
        // Then what librdkafka already holds, without waiting and without a `select!`
        // per record.
        while !failed && took.batch.len() < batch_max && !took.received.at_bound() {
            let Some(Some(record)) = stream.next().now_or_never() else {
                break;
            };
            failed = took.take(record);
        }
        // Recorded before the Worker can see them, so none completes unrecorded.
        received.record();
        not_due.pause_new(&consumer);
        for assigned in received.full.drain(..) {
            if pause_full(&consumer, &assigned) {
                full.push(assigned);
            }
        }
        hand_over(&tx, &mut held, batch);
        if paused && held.len() >= limit {
            // Records of partitions assigned since the pause: pause them too.
            set_paused(&consumer, &state, true);
        }
        if failed {
            // A fixed pause, not a backoff: librdkafka and the Worker back off on their own.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Hands `batch` to `receive` if nothing is held before it, else holds it after the rest.
fn hand_over(tx: &mpsc::Sender<Batch>, held: &mut VecDeque<Batch>, batch: Batch) {
    if batch.is_empty() {
        return;
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
}

/// Waits until `due` (wall-clock time, as retry records carry it).
async fn until(due: Option<SystemTime>) {
    let Some(due) = due else {
        return std::future::pending().await;
    };
    let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait).await;
}

/// A record of a retry topic's partition, and when it is due.
type Due = (Arc<Assigned>, SystemTime);

/// What one poll's records are taken into.
struct Take<'a> {
    consumer: &'a Weak<StreamConsumer<Context>>,
    group: &'a Arc<str>,
    state: &'a Mutex<Watermarks>,
    routes: Option<&'a Arc<Routes>>,
    last: &'a mut Option<(Tp, Arc<Assigned>)>,
    batch: &'a mut Batch,
    received: &'a mut Received,
    not_due: &'a mut NotDue,
    now: SystemTime,
}

impl Take<'_> {
    /// Adds `record` to the batch as a delivery to the group (or as the poll error it
    /// is), or holds it until it is due; returns whether it was an error.
    fn take(&mut self, record: KafkaResult<BorrowedMessage<'_>>) -> bool {
        match record {
            Ok(record) => {
                let d = match self.delivery(&record) {
                    Some((d, Some((assigned, due)))) => {
                        self.not_due.hold(&assigned, due, d, self.now)
                    }
                    Some((d, None)) => Some(d),
                    None => None,
                };
                if let Some(d) = d {
                    self.batch.push_back(Ok(d));
                }
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka poll failed");
                self.batch.push_back(Err(e));
                true
            }
        }
    }

    /// A delivery of `record` to the group, tracked in its partition's watermark, with
    /// its partition and when it is due for a record of a retry topic; `None` for a
    /// record the committed offset's metadata says completed before (it is received
    /// complete, counted and skipped).
    ///
    /// `last` is the partition of the record before: records come in runs of one
    /// partition, so most find theirs there without the lock every partition shares.
    /// Rebalances run inside the poll, on this task, so no revoke comes between the
    /// check that `last` is current and the record's arrival in it.
    fn delivery(&mut self, record: &BorrowedMessage<'_>) -> Option<(Delivery, Option<Due>)> {
        let offset = record.offset();
        let cached = self.last.as_ref().filter(|(tp, assigned)| {
            tp.1 == record.partition() && *tp.0 == *record.topic() && assigned.is_current()
        });
        let (tp, assigned) = match cached {
            Some((tp, assigned)) => (tp.clone(), Some(assigned.clone())),
            None => {
                let mut state = lock(self.state);
                let tp: Tp = (state.topic(record.topic()), record.partition());
                let assigned = state.get(&tp);
                if let Some(a) = &assigned {
                    *self.last = Some((tp.clone(), a.clone()));
                }
                (tp, assigned)
            }
        };
        match &assigned {
            Some(a) => {
                self.received.add(a, offset);
                if a.skip(offset) {
                    tracing::debug!(topic = %tp.0, partition = tp.1, offset, "record completed before (the committed offset's metadata says so); skipped");
                    return None;
                }
            }
            None => {
                tracing::warn!(topic = %tp.0, partition = tp.1, offset, "record of a partition not assigned to this consumer; the Worker hands it back unrun");
            }
        }
        let mut message = mapping::message(record, tp.0.clone(), self.group.clone());
        let earlier = assigned.as_ref().and_then(|a| a.earlier_deliveries(offset));
        if let Some(earlier) = earlier {
            let attempt = &mut message.metadata.attempt;
            *attempt = (*attempt).max(earlier.saturating_add(1));
        }
        let mut due = None;
        let retry = self.routes.map(|routes| {
            if let Some(delay_topic) = routes.delay_topic_of(&tp.0) {
                retry::as_origin(&mut message, &delay_topic.origin);
                due = retry::due(&message, delay_topic.delay);
            }
            Box::new(RetryCopy::new(routes.clone(), &message))
        });
        let attempt = message.metadata.attempt;
        let hold = assigned.clone().zip(due);
        let delivery = Delivery::new(
            message,
            KafkaAcker {
                assigned,
                tp,
                offset,
                running: AtomicBool::new(false),
                consumer: self.consumer.clone(),
                attempt,
                runs: AtomicU32::new(0),
                count_first: earlier.is_some(),
                counted: AtomicBool::new(false),
                retry,
            },
        );
        Some((delivery, hold))
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
