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

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::error::{Error, Result, mismatch};

/// The largest delay RabbitMQ's per-message TTL can express: 2³² − 1 ms (about 49 days).
pub const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// The default largest nack delay: 12 hours.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(12 * 3600);

/// The default delivery limit of a quorum queue with a dead-letter queue: 20, as
/// RabbitMQ 4.x's own default, and well above the dead-letter layer's default
/// `max_attempts` of 5.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

const X_QUEUE_TYPE: &str = "x-queue-type";
const X_DELIVERY_LIMIT: &str = "x-delivery-limit";
const X_DEAD_LETTER_EXCHANGE: &str = "x-dead-letter-exchange";
const X_DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";
const X_DEAD_LETTER_STRATEGY: &str = "x-dead-letter-strategy";
const X_OVERFLOW: &str = "x-overflow";
const X_MESSAGE_TTL: &str = "x-message-ttl";

/// The arguments a queue declared before the topology had a delivery limit lacks.
pub(crate) const GUARD_ARGUMENTS: [&str; 5] = [
    X_DELIVERY_LIMIT,
    X_DEAD_LETTER_EXCHANGE,
    X_DEAD_LETTER_ROUTING_KEY,
    X_DEAD_LETTER_STRATEGY,
    X_OVERFLOW,
];

/// The smallest delay bucket, in milliseconds (2⁷).
const MIN_BUCKET_EXP: u32 = 7;

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

    /// What a message that kills the process or the connection on every delivery
    /// meets with this topology, when nothing guards against it: `None` when the broker
    /// dead-letters it after the delivery limit.
    pub(crate) fn unguarded(&self) -> Option<&'static str> {
        match (self.kind, &self.dead_letter_queue, self.delivery_limit) {
            (QueueKind::Classic, ..) => Some(
                "a classic queue cannot count deliveries on the broker: a message that kills \
                 the process or breaks the connection on every delivery (an abort, running out \
                 of memory, a header name or property lapin cannot parse as UTF-8) is redelivered \
                 forever, never reaches the dead-letter queue, and holds up the messages behind \
                 it; use a quorum queue \
                 (Topology::with_kind(QueueKind::Quorum)) with a dead-letter queue",
            ),
            (QueueKind::Quorum, None, _) => Some(
                "this quorum queue has no dead-letter queue, so no delivery limit is declared \
                 (one without a dead-letter exchange drops messages): a message that kills the \
                 process or breaks the connection on every delivery is redelivered forever, and \
                 RabbitMQ 4.x drops it after its default limit of 20 deliveries; add \
                 Topology::with_dead_letter_queue",
            ),
            (QueueKind::Quorum, Some(_), None) => Some(
                "this topology declares no delivery limit (without_delivery_limit): unless a \
                 policy sets `delivery-limit` and a dead-letter exchange on the queue, a message \
                 that kills the process or breaks the connection on every delivery is \
                 redelivered forever",
            ),
            (QueueKind::Quorum, Some(_), Some(_)) => None,
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

    /// The delay queue that holds a message delayed by `delay`: `<queue>.delay.<bucket>ms`
    /// for a classic queue, `<queue>.delay-quorum.<bucket>ms` for a quorum queue (see
    /// the [module docs](self#delay-queues)).
    pub fn delay_queue(&self, delay: Duration) -> String {
        self.bucket_queue(bucket_exp(delay))
    }

    /// Every delay queue up to the largest delay.
    pub fn delay_queues(&self) -> Vec<String> {
        self.bucket_exps()
            .map(|exp| self.bucket_queue(exp))
            .collect()
    }

    /// The bucket exponents up to the largest delay.
    fn bucket_exps(&self) -> std::ops::Range<u32> {
        if self.max_delay.is_zero() {
            return 0..0;
        }
        MIN_BUCKET_EXP..bucket_exp(self.max_delay) + 1
    }

    /// The delay queue of the bucket of 2^`exp` ms.
    fn bucket_queue(&self, exp: u32) -> String {
        let infix = match self.kind {
            QueueKind::Classic => "delay",
            QueueKind::Quorum => "delay-quorum",
        };
        format!("{}.{infix}.{}ms", self.queue, 1u64 << exp)
    }

    /// The declare arguments of the delay queue of the bucket of 2^`exp` ms (see the
    /// [module docs](self#delay-queues)).
    fn delay_queue_arguments(&self, exp: u32) -> FieldTable {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let mut args = self.kind_arguments();
        args.insert(X_DEAD_LETTER_EXCHANGE.into(), text(""));
        args.insert(X_DEAD_LETTER_ROUTING_KEY.into(), text(&self.queue));
        if self.kind == QueueKind::Quorum {
            let ttl = (1u64 << exp).min(u64::from(u32::MAX));
            args.insert(
                X_MESSAGE_TTL.into(),
                AMQPValue::LongLongInt(i64::try_from(ttl).unwrap_or(i64::MAX)),
            );
            args.insert(X_DEAD_LETTER_STRATEGY.into(), text("at-least-once"));
            args.insert(X_OVERFLOW.into(), text("reject-publish"));
        }
        args
    }

    /// The dead-letter queue's declare arguments: its kind only.
    fn kind_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.kind == QueueKind::Quorum {
            args.insert(
                X_QUEUE_TYPE.into(),
                AMQPValue::LongString(LongString::from(self.kind.as_str())),
            );
        }
        args
    }

    /// The queue's declare arguments: its kind, and on a quorum queue with a dead-letter
    /// queue the guard (the [module docs](self#messages-no-consumer-can-settle)).
    pub(crate) fn queue_arguments(&self) -> FieldTable {
        let mut args = self.kind_arguments();
        if let (Some(limit), Some(dlq)) = (self.delivery_limit(), &self.dead_letter_queue) {
            let text = |s: &str| AMQPValue::LongString(LongString::from(s));
            args.insert(
                X_DELIVERY_LIMIT.into(),
                AMQPValue::LongLongInt(i64::from(limit)),
            );
            args.insert(X_DEAD_LETTER_EXCHANGE.into(), text(""));
            args.insert(X_DEAD_LETTER_ROUTING_KEY.into(), text(dlq));
            args.insert(X_DEAD_LETTER_STRATEGY.into(), text("at-least-once"));
            args.insert(X_OVERFLOW.into(), text("reject-publish"));
        }
        args
    }

    /// Declares the queue and the dead-letter queue, each on a fresh channel of
    /// `connection`. Declaring what exists with the same arguments does nothing. Delay
    /// queues are declared by the consumer when first used; see
    /// [`declare_delay_queues`](Self::declare_delay_queues) to create them ahead.
    ///
    /// # Errors
    /// [`Error::TopologyMismatch`] naming the argument when a queue exists with other
    /// arguments; [`Error::Amqp`] when the broker fails otherwise.
    pub async fn declare(&self, connection: &lapin::Connection) -> Result<()> {
        self.validate()?;
        if let Err(e) = declare_queue(connection, &self.queue, self.queue_arguments()).await {
            let guard = matches!(&e, Error::TopologyMismatch { argument, .. }
                if GUARD_ARGUMENTS.contains(&argument.as_str()));
            if guard {
                // The broker names the first argument that differs, and a queue of the
                // other kind lacks the guard too: declaring the kind alone (which changes
                // nothing on a queue that exists) tells the two apart.
                if let Err(kind @ Error::TopologyMismatch { .. }) =
                    declare_queue(connection, &self.queue, self.kind_arguments()).await
                {
                    return Err(kind);
                }
            }
            return Err(e);
        }
        if let Some(dlq) = &self.dead_letter_queue {
            declare_queue(connection, dlq, self.kind_arguments()).await?;
        }
        Ok(())
    }

    /// Declares every delay queue up to the largest delay, for consumers built with
    /// [`declare(false)`](crate::ConsumerBuilder::declare).
    ///
    /// # Errors
    /// As [`declare`](Self::declare).
    pub async fn declare_delay_queues(&self, connection: &lapin::Connection) -> Result<()> {
        self.validate()?;
        for exp in self.bucket_exps() {
            declare_queue(
                connection,
                &self.bucket_queue(exp),
                self.delay_queue_arguments(exp),
            )
            .await?;
        }
        Ok(())
    }

    /// Declares the delay queue that holds a message delayed by `delay`; returns its name.
    pub(crate) async fn declare_delay_queue(
        &self,
        connection: &lapin::Connection,
        delay: Duration,
    ) -> Result<String> {
        let exp = bucket_exp(delay);
        let name = self.bucket_queue(exp);
        declare_queue(connection, &name, self.delay_queue_arguments(exp)).await?;
        Ok(name)
    }
}

/// Declares a durable queue on a channel of its own (a failed declare closes its channel).
async fn declare_queue(connection: &lapin::Connection, name: &str, args: FieldTable) -> Result<()> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            name,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await;
    match declared {
        Ok(_) => {
            let _ = channel.close(200, "declared").await;
            Ok(())
        }
        Err(e) => Err(mismatch(name, e)),
    }
}

/// The power of two (in ms) of `delay`'s bucket.
fn bucket_exp(delay: Duration) -> u32 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let exp = 64 - (ms - 1).leading_zeros();
    exp.clamp(MIN_BUCKET_EXP, 63)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_go_to_power_of_two_buckets() {
        let t = Topology::new("q");
        assert_eq!(t.delay_queue(Duration::from_millis(1)), "q.delay.128ms");
        assert_eq!(t.delay_queue(Duration::from_millis(128)), "q.delay.128ms");
        assert_eq!(t.delay_queue(Duration::from_millis(129)), "q.delay.256ms");
        assert_eq!(t.delay_queue(Duration::from_millis(1024)), "q.delay.1024ms");
        assert_eq!(t.delay_queue(Duration::from_millis(1025)), "q.delay.2048ms");
        let all = t.with_max_delay(Duration::from_secs(1)).delay_queues();
        assert_eq!(all.first().unwrap(), "q.delay.128ms");
        assert_eq!(all.last().unwrap(), "q.delay.1024ms");
        assert_eq!(all.len(), 4);
        assert_eq!(
            Topology::new("q")
                .with_max_delay(MAX_DELAY)
                .delay_queues()
                .len(),
            26
        );
    }

    #[test]
    fn a_quorum_queue_has_quorum_delay_queues_that_dead_letter_at_least_once() {
        let t = Topology::new("q").with_kind(QueueKind::Quorum);
        assert_eq!(
            t.delay_queue(Duration::from_millis(1000)),
            "q.delay-quorum.1024ms",
            "not the name of a classic delay queue an older version declared"
        );
        let args = t.delay_queue_arguments(10);
        let arg = |name: &str| args.inner().get(name).cloned();
        let text = |s: &str| Some(AMQPValue::LongString(s.into()));
        assert_eq!(arg(X_QUEUE_TYPE), text("quorum"));
        assert_eq!(arg(X_MESSAGE_TTL), Some(AMQPValue::LongLongInt(1024)));
        assert_eq!(arg(X_DEAD_LETTER_EXCHANGE), text(""));
        assert_eq!(arg(X_DEAD_LETTER_ROUTING_KEY), text("q"));
        assert_eq!(arg(X_DEAD_LETTER_STRATEGY), text("at-least-once"));
        assert_eq!(arg(X_OVERFLOW), text("reject-publish"));
        // The largest bucket's TTL stays within what RabbitMQ takes.
        let top = t.with_max_delay(MAX_DELAY);
        let last = top.bucket_exps().last().unwrap();
        assert_eq!(
            top.delay_queue_arguments(last).inner().get(X_MESSAGE_TTL),
            Some(&AMQPValue::LongLongInt(i64::from(u32::MAX)))
        );

        // A classic queue's delay queues keep their names and arguments.
        let classic = Topology::new("q");
        assert_eq!(
            classic.delay_queue(Duration::from_millis(1000)),
            "q.delay.1024ms"
        );
        assert_eq!(classic.delay_queue_arguments(10).inner().len(), 2);
    }

    #[test]
    fn validation_says_what_to_change() {
        let err = Topology::new("q")
            .with_max_delay(MAX_DELAY + Duration::from_millis(1))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("lower it"), "{err}");
        assert!(Topology::new("").validate().is_err());
        assert!(
            Topology::new("q")
                .with_dead_letter_queue("q")
                .validate()
                .is_err()
        );
        assert!(Topology::new("x".repeat(250)).validate().is_err());
        Topology::new("q").validate().unwrap();
        let err = Topology::new("q")
            .with_delivery_limit(0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }

    #[test]
    fn only_a_quorum_queue_with_a_dlq_gets_the_delivery_limit() {
        let arg = |t: &Topology, name: &str| t.queue_arguments().inner().get(name).cloned();
        let guarded = Topology::new("q")
            .with_kind(QueueKind::Quorum)
            .with_dead_letter_queue("q-dlq");
        assert_eq!(guarded.delivery_limit(), Some(DEFAULT_DELIVERY_LIMIT));
        assert_eq!(
            arg(&guarded, X_DELIVERY_LIMIT),
            Some(AMQPValue::LongLongInt(20))
        );
        assert_eq!(
            arg(&guarded, X_DEAD_LETTER_ROUTING_KEY),
            Some(AMQPValue::LongString("q-dlq".into()))
        );
        assert_eq!(
            arg(&guarded, X_DEAD_LETTER_STRATEGY),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        assert!(guarded.unguarded().is_none());
        // The DLQ itself gets its kind only.
        assert_eq!(guarded.kind_arguments().inner().len(), 1);

        let no_dlq = Topology::new("q").with_kind(QueueKind::Quorum);
        assert_eq!(no_dlq.delivery_limit(), None);
        assert_eq!(
            arg(&no_dlq, X_DELIVERY_LIMIT),
            None,
            "a limit without a DLX drops"
        );
        assert!(
            no_dlq
                .unguarded()
                .unwrap()
                .contains("with_dead_letter_queue")
        );

        let classic = Topology::new("q").with_dead_letter_queue("q-dlq");
        assert_eq!(classic.queue_arguments().inner().len(), 0);
        assert!(classic.unguarded().unwrap().contains("use a quorum queue"));

        let off = guarded.without_delivery_limit();
        assert_eq!(off.queue_arguments().inner().len(), 1);
        assert!(off.unguarded().is_some());
    }
}
