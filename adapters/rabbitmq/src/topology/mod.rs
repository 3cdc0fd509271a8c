//! The queues a consumer needs: the queue itself, its dead-letter queue and its delay
//! queues, declared idempotently.
//!
//! ```no_run
//! use std::time::Duration;
//! use redrive_rabbitmq::{QueueKind, Topology};
//!
//! # async fn f(connection: &lapin::Connection) -> redrive_rabbitmq::Result<()> {
//! let topology = Topology::new("orders")
//!     .with_kind(QueueKind::Quorum)
//!     .with_dead_letter_queue("orders-dlq")
//!     .with_delivery_limit(20)
//!     .with_max_delay(Duration::from_secs(3600));
//! topology.declare(connection).await?; // an error names the argument that differs
//! # Ok(()) }
//! ```
//!
//! # Messages no consumer can settle
//! The dead-letter layer counts a message's delivery attempts and dead-letters it with
//! its full envelope. It cannot count a delivery that never returns: a message that
//! kills the process (abort, out of memory, stack overflow), or that breaks the
//! connection (a header lapin cannot parse) is redelivered forever unless the broker
//! counts. So the topology puts a guard on a **quorum** queue with a dead-letter
//! queue: the broker counts every return, including those of a closed channel, and
//! dead-letters a message delivered more than the [delivery
//! limit](Topology::with_delivery_limit) times to the dead-letter queue itself:
//!
//! | argument | value |
//! |---|---|
//! | `x-delivery-limit` | the delivery limit ([`DEFAULT_DELIVERY_LIMIT`], 20) |
//! | `x-dead-letter-exchange` | `""` (the default exchange) |
//! | `x-dead-letter-routing-key` | the dead-letter queue |
//! | `x-dead-letter-strategy` | `at-least-once`: the message leaves the queue only once the dead-letter queue confirmed it |
//! | `x-overflow` | `reject-publish`, which `at-least-once` needs (it only acts with a length limit) |
//!
//! These work on RabbitMQ 3.10 and later. A message that reaches the dead-letter queue
//! this way has no redrive envelope; the broker's `x-death` header (reason
//! `delivery_limit`) says why it is there. Keep the limit well above the dead-letter
//! layer's `max_attempts` (default 5), so redrive's own dead-lettering, with its
//! envelope, comes first for every message a handler can fail; every `basic.nack`
//! with requeue (a zero-delay nack on a quorum queue, a hand-back at shutdown) counts
//! toward it too. Messages that were delivered in the same prefetch window as one that
//! breaks the connection are returned with it and counted once: when the client could
//! not parse the message (a header name that is not UTF-8), the consumer then takes one
//! message at a time until the window is behind it, so only that message reaches the
//! limit (see the [crate docs](crate)). A message that kills the process takes its
//! window with it on every delivery: a prefetch well below the limit leaves them room.
//!
//! - **Quorum without a dead-letter queue**: no limit is declared. A delivery limit
//!   without a dead-letter exchange *drops* the message, which the topology never does
//!   on its own; the consumer warns at start that the queue is unprotected. RabbitMQ
//!   4.0 and later give every quorum queue a default limit of 20 and drop at that
//!   limit when there is no dead-letter exchange: declare a dead-letter queue there.
//! - **Classic queues** cannot count deliveries on the broker: a message that kills the
//!   process or the connection is redelivered forever (the [`ATTEMPT`](crate::ATTEMPT)
//!   header only counts republishes). The consumer warns at start; use a quorum queue.
//! - **The dead-letter queue** gets no limit and no dead-letter exchange. On RabbitMQ
//!   4.x it has the broker's default limit of 20 like every quorum queue: a tool that
//!   hands a dead letter back 20 times loses it (RabbitMQ 4.x accepts a
//!   `delivery-limit` of -1 in a policy to turn that off; 3.x does not).
//!
//! # Migrating an existing quorum queue
//! A queue's declare arguments cannot change: declaring a quorum queue that exists
//! without these arguments fails with [`Error::TopologyMismatch`] naming the first
//! argument that differs (`x-delivery-limit`, …). Either
//! - keep the old declaration with [`without_delivery_limit`](Topology::without_delivery_limit)
//!   and put the guard in a policy, which applies to an existing queue:
//!   `rabbitmqctl set_policy orders-guard '^orders$'
//!   '{"delivery-limit":20,"dead-letter-exchange":"","dead-letter-routing-key":"orders-dlq","dead-letter-strategy":"at-least-once","overflow":"reject-publish"}'
//!   --apply-to quorum_queues`; or
//! - drain the queue, delete it, and let the topology declare it again.
//!
//! # Delay queues
//! RabbitMQ has no per-message delay, so a delayed nack publishes a copy of the message
//! to a delay queue with the delay as its per-message `expiration`; the delay queue has
//! no consumer and dead-letters expired messages through the default exchange back into
//! the queue. RabbitMQ only expires messages at the head of a queue, so one delay queue
//! for all delays would hold a short delay behind a long one. Delays are therefore
//! sorted into buckets by powers of two of milliseconds (`orders.delay.1024ms` takes
//! delays in (512 ms, 1024 ms]): within a bucket a message can wait at most twice its
//! delay, and never less than its delay. Buckets are declared by the consumer when
//! first used (or all at once by [`Topology::declare_delay_queues`]), durable.
//!
//! A copy is as safe on its way back as the message was in the queue:
//! - it is published **persistent** (`delivery_mode` 2), whatever the original had, so
//!   a broker restart during the delay does not lose it (a quorum queue keeps even a
//!   transient message; a classic delay queue would not);
//! - a **quorum** queue's delay queues are quorum queues too, named
//!   `<queue>.delay-quorum.<bucket>ms`, that dead-letter **at least once**: the broker
//!   removes an expired copy only once the queue confirmed it, and keeps retrying while
//!   the queue cannot take it (no leader during a node restart, a length limit). They
//!   are declared with
//!
//!   | argument | value |
//!   |---|---|
//!   | `x-queue-type` | `quorum` |
//!   | `x-message-ttl` | the bucket's upper bound, so no copy waits longer than its bucket |
//!   | `x-dead-letter-exchange` | `""` (the default exchange) |
//!   | `x-dead-letter-routing-key` | the queue |
//!   | `x-dead-letter-strategy` | `at-least-once` |
//!   | `x-overflow` | `reject-publish`, which `at-least-once` needs |
//!
//!   which work on RabbitMQ 3.10 and later. Each is a Raft group of its own: only the
//!   buckets a consumer uses are declared.
//! - a **classic** queue's delay queues are classic, named `<queue>.delay.<bucket>ms`,
//!   with `x-dead-letter-exchange` and `x-dead-letter-routing-key` only. RabbitMQ
//!   dead-letters from a classic queue at most once, which is no weaker than the
//!   classic queue the copy returns to.
//!
//! ## Upgrading from classic delay queues behind a quorum queue
//! Before copies were persistent, a quorum queue's delay queues were classic and named
//! `<queue>.delay.<bucket>ms`. A queue's arguments cannot change, so the quorum delay
//! queues have new names and the old ones are left alone: consumers of this version
//! never publish to them, and the copies already in them still dead-letter back into
//! the queue when their delay ends (their arguments route them there), so an upgrade,
//! also a rolling one beside consumers of the old version, loses nothing. Once no old
//! consumer runs and they are empty, delete them:
//! `rabbitmqctl delete_queue --if-empty orders.delay.1024ms` for each bucket. Consumers
//! built with [`declare(false)`](crate::ConsumerBuilder::declare) need the new delay
//! queues to exist first: run [`Topology::declare_delay_queues`] once before they
//! start. A classic queue's delay queues keep their names and arguments.

// One file per job (a comment, as this module's docs are for users):
// - `arguments.rs`: the declare arguments of the queue, its dead-letter queue and its
//   delay queues, and what a topology leaves unguarded.
// - `delay.rs`: the delay buckets and the names of their queues.
// - `declare.rs`: declaring the queues on the broker.
mod arguments;
mod declare;
mod delay;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::error::{Error, Result};

pub(crate) use self::arguments::GUARD_ARGUMENTS;

/// The largest delay RabbitMQ's per-message TTL can express: 2³² − 1 ms (about 49 days).
pub const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// The default largest nack delay: 12 hours.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(12 * 3600);

/// The default delivery limit of a quorum queue with a dead-letter queue: 20, as
/// RabbitMQ 4.x's own default, and well above the dead-letter layer's default
/// `max_attempts` of 5.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// The kind of queue: it decides how deliveries are counted and how a nack works.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueKind {
    /// A classic queue: the broker does not count deliveries, so every redelivery is a
    /// republish that increments the [`ATTEMPT`](crate::ATTEMPT) header.
    #[default]
    Classic,
    /// A quorum queue: the broker counts deliveries (`x-delivery-count`); a nack without
    /// delay hands the message back with `basic.nack(requeue)`.
    Quorum,
}

impl QueueKind {
    /// The `x-queue-type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Quorum => "quorum",
        }
    }
}

/// A queue, its dead-letter queue and its delay queues. See the [module docs](self).
///
/// | setting | default |
/// |---|---|
/// | kind | [`QueueKind::Classic`] |
/// | dead-letter queue | none |
/// | delivery limit (quorum with a dead-letter queue) | [`DEFAULT_DELIVERY_LIMIT`] (20) |
/// | largest delay | [`DEFAULT_MAX_DELAY`] (12 h); at most [`MAX_DELAY`] |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    kind: QueueKind,
    dead_letter_queue: Option<String>,
    delivery_limit: Option<u32>,
    max_delay: Duration,
}

impl Topology {
    /// The topology of `queue`, with the defaults above.
    pub fn new(queue: impl Into<String>) -> Self {
        Topology {
            queue: queue.into(),
            kind: QueueKind::Classic,
            dead_letter_queue: None,
            delivery_limit: Some(DEFAULT_DELIVERY_LIMIT),
            max_delay: DEFAULT_MAX_DELAY,
        }
    }

    /// Sets the queue's kind.
    #[must_use]
    pub fn with_kind(mut self, kind: QueueKind) -> Self {
        self.kind = kind;
        self
    }

    /// Declares a dead-letter queue of the same kind beside the queue (the dead-letter
    /// layer publishes to it).
    #[must_use]
    pub fn with_dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(queue.into());
        self
    }

    /// Sets the delivery limit of a quorum queue with a dead-letter queue: a message
    /// delivered more than `limit` times without being settled is dead-lettered by the
    /// broker (see the [module docs](self#messages-no-consumer-can-settle)). Keep it well
    /// above the dead-letter layer's `max_attempts`. At least 1; ignored for classic
    /// queues and without a dead-letter queue.
    #[must_use]
    pub fn with_delivery_limit(mut self, limit: u32) -> Self {
        self.delivery_limit = Some(limit);
        self
    }

    /// Declares no delivery limit and no dead-letter exchange on the queue, as before
    /// they existed: for a queue declared that way already, whose guard comes from a
    /// policy (see [migrating](self#migrating-an-existing-quorum-queue)). Without either,
    /// a message that kills the process or the connection is redelivered forever.
    #[must_use]
    pub fn without_delivery_limit(mut self) -> Self {
        self.delivery_limit = None;
        self
    }

    /// Sets the largest nack delay; it is what the consumer declares in its capabilities.
    /// Zero turns delayed nacks off.
    #[must_use]
    pub fn with_max_delay(mut self, max: Duration) -> Self {
        self.max_delay = max;
        self
    }

    /// The queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The queue's kind.
    pub fn kind(&self) -> QueueKind {
        self.kind
    }

    /// The dead-letter queue, if one is declared.
    pub fn dead_letter_queue(&self) -> Option<&str> {
        self.dead_letter_queue.as_deref()
    }

    /// The delivery limit the queue is declared with: `Some` only for a quorum queue
    /// with a dead-letter queue and a limit.
    pub fn delivery_limit(&self) -> Option<u32> {
        match (self.kind, &self.dead_letter_queue) {
            (QueueKind::Quorum, Some(_)) => self.delivery_limit,
            _ => None,
        }
    }

    /// The largest nack delay.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Checks the names and the largest delay.
    ///
    /// # Errors
    /// [`Error::Config`], saying what to change.
    pub fn validate(&self) -> Result<()> {
        if self.queue.is_empty() {
            return Err(Error::Config("the queue name must not be empty".into()));
        }
        if self.max_delay > MAX_DELAY {
            return Err(Error::Config(format!(
                "the largest delay {:?} is above what RabbitMQ's message TTL can express ({MAX_DELAY:?}); lower it",
                self.max_delay
            )));
        }
        let longest = self.delay_queue(self.max_delay.max(Duration::from_millis(1)));
        if longest.len() > 255 {
            return Err(Error::Config(format!(
                "queue name `{}` is too long for its delay queues (`{longest}` exceeds 255 bytes); shorten it",
                self.queue
            )));
        }
        if self.dead_letter_queue.as_deref() == Some(self.queue.as_str()) {
            return Err(Error::Config(
                "the dead-letter queue must not be the queue itself".into(),
            ));
        }
        if self.delivery_limit == Some(0) {
            return Err(Error::Config(format!(
                "a delivery limit of 0 dead-letters a message on its first redelivery, before \
                 the dead-letter layer can count attempts; use at least 1, well above its \
                 max_attempts (the default is {DEFAULT_DELIVERY_LIMIT})"
            )));
        }
        Ok(())
    }
}
