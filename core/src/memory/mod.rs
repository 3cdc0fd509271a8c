//! An in-memory broker: named queues with leases, delayed nacks, delivery counts and
//! an optional dead-letter policy. For tests, examples and the quickstart; one process only.
//!
//! ```
//! use redrive_core::memory::{MemoryBroker, QueueConfig};
//! use redrive_core::{Consumer, OutgoingMessage, Publisher};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), redrive_core::Error> {
//! let broker = MemoryBroker::new();
//! broker.declare("jobs", QueueConfig::default().with_dead_letter(3, "jobs-dlq"));
//! broker.publish("jobs", OutgoingMessage::new("hi").with_key("user-1")).await?;
//! assert_eq!(broker.depth("jobs"), 1);
//!
//! let mut consumer = broker.consumer("jobs");
//! let delivery = consumer.receive().await?.expect("a message");
//! assert_eq!(delivery.message.attempt(), 1);
//! delivery.ack().await?;
//! assert_eq!(broker.depth("jobs") + broker.in_flight("jobs"), 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//! - A received message is invisible for the queue's lease; if it is not settled by
//!   then it becomes visible again (a late ack fails with [`Error::LeaseExpired`]).
//! - `nack(delay)` makes the message visible after `delay`; messages that come back
//!   go to the head of the queue in their original order.
//! - Each receive counts a delivery; `attempt` is that count.
//! - With a dead-letter policy, a message received more than `max_deliveries` times is
//!   moved to the dead-letter queue instead of being delivered (as SQS's redrive policy).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::delivery::SettleFuture;
use crate::{
    Acker, Capabilities, Consumer, Delivery, Error, Headers, Message, Metadata, OrderingScope,
    OutgoingMessage, Publisher, Result, Source,
};

/// The value of `messaging.system` for the in-memory broker.
pub const SYSTEM: &str = "memory";

/// The largest nack delay the in-memory broker accepts (as SQS: 12 hours).
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(12 * 3600);

/// A queue's settings.
///
/// | setting | default |
/// |---|---|
/// | `lease` | 30 s |
/// | dead-letter policy | none |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    lease: Duration,
    dead_letter: Option<(u32, String)>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            lease: Duration::from_secs(30),
            dead_letter: None,
        }
    }
}

impl QueueConfig {
    /// Sets how long a received message stays invisible.
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Moves a message to `queue` once it has been received `max_deliveries` times
    /// without an ack.
    #[must_use]
    pub fn with_dead_letter(mut self, max_deliveries: u32, queue: impl Into<String>) -> Self {
        self.dead_letter = Some((max_deliveries, queue.into()));
        self
    }
}

/// A message as it sits in a queue, for inspection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedMessage {
    /// The broker's message id.
    pub id: Arc<str>,
    /// The body.
    pub payload: Bytes,
    /// The headers.
    pub headers: Headers,
    /// The ordering key.
    pub key: Option<Bytes>,
    /// How many times it has been received.
    pub deliveries: u32,
    /// When it was published.
    pub enqueued_at: SystemTime,
}

#[derive(Clone)]
struct Stored {
    seq: u64,
    msg: QueuedMessage,
}

struct InFlight {
    stored: Stored,
    receipt: u64,
    deadline: Instant,
}

#[derive(Default)]
struct QueueState {
    ready: VecDeque<Stored>,
    delayed: BTreeMap<(Instant, u64), Stored>,
    in_flight: HashMap<u64, InFlight>,
}

impl QueueState {
    /// Moves due delayed and lease-expired messages to the head of the queue, oldest first.
    fn promote(&mut self, now: Instant) {
        let mut back: Vec<Stored> = Vec::new();
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            back.push(entry.remove());
        }
        if self.in_flight.values().any(|f| f.deadline <= now) {
            let expired: Vec<u64> = self
                .in_flight
                .iter()
                .filter(|(_, f)| f.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                if let Some(f) = self.in_flight.remove(&k) {
                    back.push(f.stored);
                }
            }
        }
        if back.is_empty() {
            return;
        }
        back.sort_by_key(|s| s.seq);
        for s in back.into_iter().rev() {
            self.ready.push_front(s);
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let delayed = self.delayed.keys().next().map(|k| k.0);
        let lease = self.in_flight.values().map(|f| f.deadline).min();
        match (delayed, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct Queue {
    name: Arc<str>,
    config: QueueConfig,
    state: Mutex<QueueState>,
    notify: Notify,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, stored: Stored) {
        self.lock().ready.push_back(stored);
        self.notify.notify_one();
    }
}

struct Inner {
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    seq: AtomicU64,
}

/// The in-memory broker. Clones share the same queues.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queues = self.inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_struct("MemoryBroker")
            .field("queues", &queues.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MemoryBroker {
    /// A broker with no queues. Queues are created on first use with the default
    /// [`QueueConfig`], or by [`declare`](Self::declare).
    pub fn new() -> Self {
        MemoryBroker {
            inner: Arc::new(Inner {
                queues: Mutex::new(HashMap::new()),
                seq: AtomicU64::new(1),
            }),
        }
    }

    /// Creates `name` with `config`, or changes the config of an existing, empty queue.
    ///
    /// # Panics
    /// If the queue exists and holds messages (its config cannot change under them).
    pub fn declare(&self, name: &str, config: QueueConfig) {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.get(name) {
            if q.config == config {
                return;
            }
            let s = q.lock();
            assert!(
                s.ready.is_empty() && s.delayed.is_empty() && s.in_flight.is_empty(),
                "queue `{name}` holds messages; declare it before use"
            );
        }
        queues.insert(
            name.to_owned(),
            Arc::new(Queue {
                name: name.into(),
                config,
                state: Mutex::default(),
                notify: Notify::new(),
            }),
        );
    }

    fn queue(&self, name: &str) -> Arc<Queue> {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(Queue {
                    name: name.into(),
                    config: QueueConfig::default(),
                    state: Mutex::default(),
                    notify: Notify::new(),
                })
            })
            .clone()
    }

    /// A consumer of `queue`.
    pub fn consumer(&self, queue: &str) -> MemoryConsumer {
        MemoryConsumer {
            broker: self.clone(),
            queue: self.queue(queue),
        }
    }

    /// Messages waiting in `queue` (visible now or delayed), not counting in-flight ones.
    pub fn depth(&self, queue: &str) -> usize {
        let q = self.queue(queue);
        let s = q.lock();
        s.ready.len() + s.delayed.len()
    }

    /// Messages in `queue` nacked or published with a delay that has not passed yet
    /// (counted in [`depth`](Self::depth) too).
    pub fn delayed(&self, queue: &str) -> usize {
        self.queue(queue).lock().delayed.len()
    }

    /// Messages received from `queue` and not yet settled.
    pub fn in_flight(&self, queue: &str) -> usize {
        self.queue(queue).lock().in_flight.len()
    }

    /// Every message in `queue`, waiting or in flight, in publish order.
    pub fn messages(&self, queue: &str) -> Vec<QueuedMessage> {
        let q = self.queue(queue);
        let s = q.lock();
        let mut all: Vec<&Stored> = s
            .ready
            .iter()
            .chain(s.delayed.values())
            .chain(s.in_flight.values().map(|f| &f.stored))
            .collect();
        all.sort_by_key(|st| st.seq);
        all.into_iter().map(|st| st.msg.clone()).collect()
    }

    fn store(&self, message: OutgoingMessage) -> Stored {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        Stored {
            seq,
            msg: QueuedMessage {
                id: format!("mem-{seq}").into(),
                payload: message.payload,
                headers: message.headers,
                key: message.key,
                deliveries: 0,
                enqueued_at: SystemTime::now(),
            },
        }
    }
}

impl Publisher for MemoryBroker {
    async fn publish(&self, destination: &str, message: OutgoingMessage) -> Result<()> {
        if destination.is_empty() {
            return Err(Error::UnknownDestination(String::new()));
        }
        let stored = self.store(message);
        self.queue(destination).push(stored);
        Ok(())
    }
}

/// Consumes one queue of a [`MemoryBroker`].
pub struct MemoryConsumer {
    broker: MemoryBroker,
    queue: Arc<Queue>,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer")
            .field("queue", &self.queue.name)
            .finish()
    }
}

impl MemoryConsumer {
    /// Takes the next visible message, moving over-delivered ones to the dead-letter queue.
    fn try_take(&self, now: Instant) -> std::result::Result<Delivery, Option<Instant>> {
        loop {
            let mut s = self.queue.lock();
            s.promote(now);
            let Some(mut stored) = s.ready.pop_front() else {
                return Err(s.next_wake());
            };
            stored.msg.deliveries += 1;
            if let Some((max, dlq)) = &self.queue.config.dead_letter {
                if stored.msg.deliveries > *max {
                    drop(s);
                    stored.msg.deliveries = 0;
                    tracing::info!(queue = %self.queue.name, dlq = %dlq, id = %stored.msg.id, "delivery limit reached; moved to the dead-letter queue");
                    self.broker.queue(dlq).push(stored);
                    continue;
                }
            }
            let receipt = self.broker.inner.seq.fetch_add(1, Ordering::Relaxed);
            let message = Message {
                payload: stored.msg.payload.clone(),
                headers: stored.msg.headers.clone(),
                key: stored.msg.key.clone(),
                metadata: Metadata {
                    message_id: Some(stored.msg.id.clone()),
                    source: Source {
                        system: SYSTEM,
                        destination: self.queue.name.clone(),
                        partition: None,
                        offset: None,
                        group: None,
                    },
                    attempt: stored.msg.deliveries,
                    enqueued_at: Some(stored.msg.enqueued_at),
                    received_at: SystemTime::now(),
                },
                extensions: Default::default(),
            };
            let seq = stored.seq;
            s.in_flight.insert(
                seq,
                InFlight {
                    stored,
                    receipt,
                    deadline: now + self.queue.config.lease,
                },
            );
            return Ok(Delivery::new(
                message,
                MemoryAcker {
                    queue: self.queue.clone(),
                    seq,
                    receipt,
                },
            ));
        }
    }
}

impl Consumer for MemoryConsumer {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        loop {
            let notified = self.queue.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match self.try_take(Instant::now()) {
                Ok(d) => return Ok(Some(d)),
                Err(Some(wake)) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(wake) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new()
            .with_max_nack_delay(MAX_NACK_DELAY)
            .with_delivery_count(true)
            .with_lease(Some(self.queue.config.lease), true)
            .with_ordering(OrderingScope::Queue)
    }
}

struct MemoryAcker {
    queue: Arc<Queue>,
    seq: u64,
    receipt: u64,
}

impl MemoryAcker {
    fn take(&self, s: &mut QueueState) -> Result<Stored> {
        match s.in_flight.get(&self.seq) {
            Some(f) if f.receipt == self.receipt && f.deadline > Instant::now() => {
                Ok(s.in_flight.remove(&self.seq).expect("present").stored)
            }
            _ => Err(Error::LeaseExpired),
        }
    }
}

impl Acker for MemoryAcker {
    fn ack(&self) -> SettleFuture<'_> {
        let r = self.take(&mut self.queue.lock()).map(drop);
        SettleFuture::ready(r)
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        let r = {
            let mut s = self.queue.lock();
            self.take(&mut s).map(|stored| {
                if delay.is_zero() {
                    s.ready.push_front(stored);
                } else {
                    let at = Instant::now() + delay.min(MAX_NACK_DELAY);
                    s.delayed.insert((at, stored.seq), stored);
                }
            })
        };
        // Wake a receiver: the message is visible now, or its wake-up time changed.
        self.queue.notify.notify_one();
        SettleFuture::ready(r)
    }

    fn extend(&self, lease: Duration) -> SettleFuture<'_> {
        let r = {
            let mut s = self.queue.lock();
            match s.in_flight.get_mut(&self.seq) {
                Some(f) if f.receipt == self.receipt && f.deadline > Instant::now() => {
                    f.deadline = Instant::now() + lease;
                    Ok(())
                }
                _ => Err(Error::LeaseExpired),
            }
        };
        SettleFuture::ready(r)
    }
}

#[cfg(test)]
mod tests;
