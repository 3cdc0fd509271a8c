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
//!     .with_dead_letter_queue("orders.dlq")
//!     .with_max_delay(Duration::from_secs(3600));
//! topology.declare(connection).await?; // an error names the argument that differs
//! # Ok(()) }
//! ```
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
//! first used (or all at once by [`Topology::declare_delay_queues`]), durable, classic.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::error::{Error, Result, mismatch};

/// The largest delay RabbitMQ's per-message TTL can express: 2³² − 1 ms (about 49 days).
pub const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// The default largest nack delay: 12 hours.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(12 * 3600);

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
/// | largest delay | [`DEFAULT_MAX_DELAY`] (12 h); at most [`MAX_DELAY`] |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    queue: String,
    kind: QueueKind,
    dead_letter_queue: Option<String>,
    max_delay: Duration,
}

impl Topology {
    /// The topology of `queue`, with the defaults above.
    pub fn new(queue: impl Into<String>) -> Self {
        Topology {
            queue: queue.into(),
            kind: QueueKind::Classic,
            dead_letter_queue: None,
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
        Ok(())
    }

    /// The delay queue that holds a message delayed by `delay`.
    pub fn delay_queue(&self, delay: Duration) -> String {
        format!("{}.delay.{}ms", self.queue, 1u64 << bucket_exp(delay))
    }

    /// Every delay queue up to the largest delay.
    pub fn delay_queues(&self) -> Vec<String> {
        if self.max_delay.is_zero() {
            return Vec::new();
        }
        (MIN_BUCKET_EXP..=bucket_exp(self.max_delay))
            .map(|e| format!("{}.delay.{}ms", self.queue, 1u64 << e))
            .collect()
    }

    /// The queue's declare arguments.
    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.kind == QueueKind::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from(self.kind.as_str())),
            );
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
        declare_queue(connection, &self.queue, self.queue_arguments()).await?;
        if let Some(dlq) = &self.dead_letter_queue {
            declare_queue(connection, dlq, self.queue_arguments()).await?;
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
        for q in self.delay_queues() {
            self.declare_delay_queue(connection, &q).await?;
        }
        Ok(())
    }

    /// Declares one delay queue of this topology.
    pub(crate) async fn declare_delay_queue(
        &self,
        connection: &lapin::Connection,
        name: &str,
    ) -> Result<()> {
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        declare_queue(connection, name, args).await
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
    }
}
