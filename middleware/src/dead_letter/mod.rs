//! Dead-lettering: a message that cannot succeed is published, with an envelope that
//! says why, to a dead-letter destination, and then reported handled so the original is
//! acked.
//!
//! ```
//! use std::sync::Arc;
//! use redrive_core::memory::MemoryBroker;
//! use redrive_core::{classify, handler, BoxError, Message, Outcome};
//! use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let broker = Arc::new(MemoryBroker::new());
//! let config = DeadLetterConfig::default()
//!     .with_max_attempts(3)
//!     .with_consumer_name("billing");
//! let service = ServiceBuilder::new()
//!     .layer(DeadLetterLayer::new(broker.clone(), config)?)
//!     .service(handler::handler_fn(|_msg: Message| async {
//!         Err::<(), BoxError>(classify::permanent("missing field `id`"))
//!     }));
//!
//! let mut msg = Message::new("{}");
//! msg.metadata.source.destination = "orders".into();
//! assert_eq!(service.oneshot(msg).await?, Outcome::DeadLettered);
//!
//! let dead = broker.messages("orders-dlq");
//! assert_eq!(dead[0].headers.get_str(dead_letter::ERROR_KIND), Some("permanent"));
//! assert_eq!(dead[0].headers.get_str(dead_letter::ERROR_MESSAGE), Some("missing field `id`"));
//! assert_eq!(dead[0].headers.get_str(dead_letter::CONSUMER), Some("billing"));
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Nothing is lost.** The layer answers `Ok(`[`Outcome::DeadLettered`]`)` (and the
//!   Worker acks the original) only after the [`Publisher`] confirmed the dead-letter
//!   message. If the publish fails, or if no destination can be worked out, the call
//!   fails with a transient [`DeadLetterError`]; the Worker nacks, the message comes
//!   back, and dead-lettering is tried again.
//! - **A dead letter that cannot be published whole is trimmed.** When the envelope
//!   does not fit the message's [`HeaderLimits`](redrive_core::HeaderLimits), or the
//!   broker refuses the publish for good ([`redrive_core::Error::is_deterministic`]: an
//!   invalid name, a message over its limits), the layer publishes a trimmed dead
//!   letter: of the message's own headers only the trace context, the correlation id,
//!   the message id and the idempotency key stay, the error text is cut to 256 bytes,
//!   and [`DROPPED_HEADERS`] counts what went. If the broker refuses that too, the call
//!   fails with a [`DeadLetterError`] that [`is_rejected`](DeadLetterError::is_rejected),
//!   logged at `error`, marked to come back only after the configured rejected delay
//!   (10 min by default): the message stays in its queue, and it does not cycle at the
//!   Worker's pace while someone fixes the destination.
//! - **When**: the inner service's error is permanent (by the configured
//!   [`Classifier`](redrive_core::Classifier)), or the message's
//!   [`attempt`](redrive_core::Metadata::attempt) has reached `max_attempts`, and the
//!   optional filter agrees. Any other error goes up unchanged; successes pass through.
//! - **A message that kills its consumer still gets here.** A message whose `attempt`
//!   is above `max_attempts` plus a margin (2 by default,
//!   [`DeadLetterConfig::with_abandon_margin`]) had deliveries that ended without a
//!   result this layer saw (most often: the process, or its connection, died while
//!   handling it): it is dead-lettered at once, without running, with the reason
//!   [`Reason::Abandoned`]. This needs an attempt
//!   count that survives crashes: the broker's own (SQS, RabbitMQ quorum queues) or the
//!   adapter's durable one. A panic is a failure like any other (see
//!   [`redrive_core::handler`]): it counts toward the limit and its message is in the
//!   envelope.
//! - **Where**: the configured destination, else [`default_destination`]
//!   (`<source destination>-dlq`).
//! - **What**: the payload, key and every header as they came in, including the trace
//!   context ([`TRACEPARENT`], [`TRACESTATE`], [`CORRELATION_ID`]), which the layer never
//!   writes; plus the envelope below. Envelope headers from an earlier dead-lettering
//!   (a message redriven from a DLQ that failed again) are replaced, never piled up.
//! - Duplicates are possible, as with any publish-then-ack: if the process dies after
//!   the confirm and before the ack, the message is dead-lettered again on redelivery.
//!
//! # The envelope
//!
//! | header | value |
//! |---|---|
//! | [`ORIGINAL_SYSTEM`] | `messaging.system` of the source (`rabbitmq`, `kafka`, …) |
//! | [`ORIGINAL_DESTINATION`] | the queue or topic consumed from |
//! | [`ORIGINAL_PARTITION`], [`ORIGINAL_OFFSET`] | where the broker has them |
//! | [`ORIGINAL_MESSAGE_ID`] | the message id, if any |
//! | [`ORIGINAL_ENQUEUED_AT`] | when the broker accepted it, if it says |
//! | [`ATTEMPTS`] | the delivery attempt that failed last |
//! | [`FIRST_FAILURE_AT`] | the earliest known failure (below) |
//! | [`LAST_FAILURE_AT`] | now: the failure that dead-lettered it |
//! | [`ERROR_KIND`] | `permanent`, `exhausted` or `abandoned` ([`Reason`]) |
//! | [`ERROR_MESSAGE`] | the error and its sources, truncated to `max_error_len` |
//! | [`CONSUMER`] | the configured consumer name, if any |
//! | [`DROPPED_HEADERS`] | on a trimmed dead letter only: how many of its own headers were left out |
//!
//! Times are RFC 3339 in UTC with milliseconds (`2024-02-29T12:34:56.789Z`).
//!
//! **First failure time.** Nothing in redrive records when an earlier delivery attempt
//! failed (the broker keeps a count, not times), so the layer knows only two things: a
//! [`FIRST_FAILURE_AT`] header the message already carries from an earlier
//! dead-lettering, which is kept when it parses and is not in the future; otherwise
//! the time of this, the last, failure. So for a message dead-lettered for the first
//! time after several attempts, first and last failure are the same instant, and the
//! real first failure was earlier, at most [`ATTEMPTS`] − 1 redelivery delays before.
//!
//! # Where `attempt` comes from
//! See [`DeadLetterConfig::check`]: the broker's own delivery count when it keeps one
//! ([`Capabilities::delivery_count`](redrive_core::Capabilities)), else the adapter's
//! header or the Worker's count for a parked message, which restarts with the process.
//!
//! # Order
//! Outside idempotency, the circuit breaker, retries and the timeout (see the crate
//! docs): it sees the final error of a delivery attempt, after in-process retries.

mod config;
mod envelope;
mod error;
pub mod future;
mod layer;
mod letter;
mod queue;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use redrive_core::{BoxError, Message, Metadata, Outcome, OutgoingMessage, Publisher};
use tower::Service;

pub use crate::error::ConfigError;
pub use config::DeadLetterConfig;
pub use config::default_destination;
pub use envelope::{
    ATTEMPTS, CONSUMER, CORRELATION_ID, DROPPED_HEADERS, ENVELOPE_HEADERS, ERROR_KIND,
    ERROR_MESSAGE, FIRST_FAILURE_AT, LAST_FAILURE_AT, ORIGINAL_DESTINATION, ORIGINAL_ENQUEUED_AT,
    ORIGINAL_MESSAGE_ID, ORIGINAL_OFFSET, ORIGINAL_PARTITION, ORIGINAL_SYSTEM, Reason, TRACEPARENT,
    TRACESTATE,
};
pub use error::DeadLetterError;
pub use layer::DeadLetterLayer;
pub use letter::{Letter, REPLAYS, Selection};
pub use queue::{DeadLetterQueue, Progress, Replay};

use future::ResponseFuture;
use layer::Shared;

/// Publishes messages that cannot succeed to a dead-letter destination. See the
/// [module docs](self).
pub struct DeadLetter<S, P, H = ()> {
    inner: S,
    shared: Arc<Shared<P, H>>,
}

impl<S: Clone, P, H> Clone for DeadLetter<S, P, H> {
    fn clone(&self) -> Self {
        DeadLetter {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, P, H> fmt::Debug for DeadLetter<S, P, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, P, H> DeadLetter<S, P, H> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, H> Service<Message> for DeadLetter<S, P, H>
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
    P: Publisher,
    H: OnDeadLetter,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, P, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let message = msg.to_outgoing();
        let metadata = msg.metadata.clone();
        let config = &self.shared.config;
        let max_attempts = config.max_attempts;
        if metadata.attempt > max_attempts.saturating_add(config.abandon_margin) {
            return ResponseFuture::abandoned(self.shared.clone(), message, metadata, max_attempts);
        }
        ResponseFuture::new(self.inner.call(msg), self.shared.clone(), message, metadata)
    }
}

/// A confirmed dead-letter publish, as [`OnDeadLetter`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetterEvent<'a> {
    /// Where the message was published.
    pub destination: &'a str,
    /// Why.
    pub reason: Reason,
    /// The inner service's error.
    pub error: &'a (dyn StdError + Send + Sync + 'static),
    /// The original message's metadata.
    pub metadata: &'a Metadata,
    /// The message as published, envelope included.
    pub message: &'a OutgoingMessage,
}

/// Called after each confirmed dead-letter publish. Implemented for `()` (nothing) and
/// for closures `Fn(&DeadLetterEvent<'_>)`.
///
/// ```
/// # use std::sync::Arc;
/// # use std::sync::atomic::{AtomicU64, Ordering};
/// # use redrive_core::memory::MemoryBroker;
/// use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterEvent, DeadLetterLayer};
///
/// let count = Arc::new(AtomicU64::new(0));
/// let seen = count.clone();
/// let layer = DeadLetterLayer::new(Arc::new(MemoryBroker::new()), DeadLetterConfig::default())?
///     .on_dead_letter(move |event: &DeadLetterEvent<'_>| {
///         seen.fetch_add(1, Ordering::Relaxed);
///         eprintln!("{} → {} ({})", event.metadata.source.destination, event.destination, event.reason);
///     });
/// # let _ = layer;
/// # Ok::<(), redrive_middleware::dead_letter::ConfigError>(())
/// ```
pub trait OnDeadLetter: Send + Sync + 'static {
    /// A message was dead-lettered and the publish confirmed.
    fn on_dead_letter(&self, event: &DeadLetterEvent<'_>);
}

impl OnDeadLetter for () {
    fn on_dead_letter(&self, _: &DeadLetterEvent<'_>) {}
}

impl<F> OnDeadLetter for F
where
    F: Fn(&DeadLetterEvent<'_>) + Send + Sync + 'static,
{
    fn on_dead_letter(&self, event: &DeadLetterEvent<'_>) {
        self(event)
    }
}
