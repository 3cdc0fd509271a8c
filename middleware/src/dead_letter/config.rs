//! The dead-letter layer's settings.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redrive_core::{Capabilities, Classification, Classifier};

use super::ConfigError;

pub(crate) type Filter = dyn Fn(&(dyn StdError + 'static), &Classification) -> bool + Send + Sync;

/// The dead-letter layer's settings, checked by [`DeadLetterLayer::new`](super::DeadLetterLayer::new).
///
/// | setting | default |
/// |---|---|
/// | `destination` | [`default_destination`]: `<source destination>-dlq` (`orders.fifo` → `orders-dlq.fifo`) |
/// | `max_attempts` | 5 delivery attempts |
/// | `abandon_margin` | 2: a message that comes back more than `max_attempts + 2` times without this layer seeing a result is dead-lettered without running ([`Reason::Abandoned`](super::Reason::Abandoned)) |
/// | `rejected_delay` | 10 min: how long a message whose dead letter the broker refuses for good waits before it comes back |
/// | `max_error_len` | 1024 bytes |
/// | `consumer_name` | none (the [`CONSUMER`](super::CONSUMER) header is left out) |
/// | `classifier` | [`Classifier::default`] (markers only) |
/// | `filter` | none: every permanent or exhausted error is dead-lettered |
#[derive(Clone)]
pub struct DeadLetterConfig {
    pub(crate) destination: Option<String>,
    pub(crate) max_attempts: u32,
    pub(crate) abandon_margin: u32,
    pub(crate) max_error_len: usize,
    pub(crate) rejected_delay: Duration,
    pub(crate) consumer_name: Option<String>,
    pub(crate) classifier: Classifier,
    pub(crate) filter: Option<Arc<Filter>>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            destination: None,
            max_attempts: 5,
            abandon_margin: 2,
            max_error_len: 1024,
            rejected_delay: Duration::from_secs(600),
            consumer_name: None,
            classifier: Classifier::default(),
            filter: None,
        }
    }
}

impl fmt::Debug for DeadLetterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterConfig")
            .field("destination", &self.destination)
            .field("max_attempts", &self.max_attempts)
            .field("abandon_margin", &self.abandon_margin)
            .field("max_error_len", &self.max_error_len)
            .field("rejected_delay", &self.rejected_delay)
            .field("consumer_name", &self.consumer_name)
            .field("classifier", &self.classifier)
            .field("filter", &self.filter.is_some())
            .finish()
    }
}

impl DeadLetterConfig {
    /// Publishes to `destination` instead of [`default_destination`].
    #[must_use]
    pub fn with_destination(mut self, destination: impl Into<String>) -> Self {
        self.destination = Some(destination.into());
        self
    }

    /// Dead-letters a message whose delivery attempt `n` (or a later one) fails, whatever
    /// the error. At least 1.
    #[must_use]
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// How long a message waits before it comes back when the broker refuses its dead
    /// letter for good, whole and trimmed (an invalid destination name, a message over
    /// the broker's limits). The message is never dropped; this only keeps it from
    /// cycling at the Worker's redelivery pace while a person fixes the destination.
    /// The Worker caps it at the broker's largest nack delay.
    #[must_use]
    pub fn with_rejected_delay(mut self, delay: Duration) -> Self {
        self.rejected_delay = delay;
        self
    }

    /// How many deliveries past `max_attempts` a message may come back before it is
    /// dead-lettered without running, as [`Reason::Abandoned`](super::Reason::Abandoned).
    ///
    /// A message normally gets its fate here at attempt `max_attempts` at the latest.
    /// One that comes back later had deliveries that ended without a result this layer
    /// saw: the process or its connection died while handling it (a crash loop), the
    /// filter declined its error, its dead letter could not be published, or the broker
    /// counted deliveries that never ran (SQS counts every receive; a hand-back at
    /// shutdown counts). The margin gives the latter kinds a few more runs before the
    /// crash-loop guard takes the message out of the queue.
    #[must_use]
    pub fn with_abandon_margin(mut self, n: u32) -> Self {
        self.abandon_margin = n;
        self
    }

    /// Truncates the [`ERROR_MESSAGE`](super::ERROR_MESSAGE) header to `bytes`, on a
    /// character boundary.
    #[must_use]
    pub fn with_max_error_len(mut self, bytes: usize) -> Self {
        self.max_error_len = bytes;
        self
    }

    /// Names this consumer in the [`CONSUMER`](super::CONSUMER) header.
    #[must_use]
    pub fn with_consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// Classifies errors with `classifier` (use the one the rest of the stack uses).
    #[must_use]
    pub fn with_classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Dead-letters only the errors for which `filter` returns `true`; the others go up
    /// unchanged and the Worker nacks them.
    ///
    /// The filter sees only errors that would be dead-lettered: permanent ones, and any
    /// error on the last attempt.
    #[must_use]
    pub fn with_filter<F>(mut self, filter: F) -> Self
    where
        F: Fn(&(dyn StdError + 'static), &Classification) -> bool + Send + Sync + 'static,
    {
        self.filter = Some(Arc::new(filter));
        self
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(ConfigError::new(
                "dead-letter",
                "`max_attempts` is 0; delivery attempts start at 1, so set it to 1 or more",
            ));
        }
        if self.destination.as_deref() == Some("") {
            return Err(ConfigError::new(
                "dead-letter",
                "the destination is empty; name a queue or topic, or leave it unset for \
                 `<source destination>-dlq`",
            ));
        }
        Ok(())
    }

    /// Checks these settings against what the consumer's broker can do.
    ///
    /// The attempt limit counts [`Metadata::attempt`](redrive_core::Metadata::attempt).
    /// When the broker counts deliveries itself (`caps.delivery_count`: SQS
    /// `ApproximateReceiveCount`, RabbitMQ quorum queues' `x-delivery-count`), that count
    /// survives consumer crashes and restarts. When it does not, `attempt` is whatever
    /// the adapter keeps in a header it maintains across redeliveries, or the Worker's
    /// own count for a message it parks; the Worker's count starts again at 1 after a
    /// restart, so a message can see more than `max_attempts` attempts in total before it
    /// is dead-lettered. This logs that at `warn` level; it is not an error.
    ///
    /// # Errors
    /// The same as [`DeadLetterLayer::new`](super::DeadLetterLayer::new).
    pub fn check(&self, caps: &Capabilities) -> Result<(), ConfigError> {
        self.validate()?;
        if !caps.delivery_count && self.max_attempts > 1 {
            tracing::warn!(
                max_attempts = self.max_attempts,
                "the broker does not count deliveries: the dead-letter limit counts the \
                 adapter's attempt header or the Worker's count for parked messages, which \
                 may restart at 1 after a crash"
            );
        }
        Ok(())
    }
}

/// The dead-letter destination of messages from `source` when none is configured:
/// `<source>-dlq`, or `<stem>-dlq.fifo` for a source named `<stem>.fifo` (an SQS FIFO
/// queue's dead-letter queue must be FIFO too). Letters, digits, `-` and `_` are all
/// SQS allows in a queue name, so the suffix is `-dlq` (a name with a dot in it is
/// refused by SQS); RabbitMQ and Kafka accept it as well.
///
/// ```
/// use redrive_middleware::dead_letter::default_destination;
///
/// assert_eq!(default_destination("orders"), "orders-dlq");
/// assert_eq!(default_destination("orders.fifo"), "orders-dlq.fifo");
/// ```
pub fn default_destination(source: &str) -> String {
    match source.strip_suffix(".fifo") {
        Some(stem) => format!("{stem}-dlq.fifo"),
        None => format!("{source}-dlq"),
    }
}
