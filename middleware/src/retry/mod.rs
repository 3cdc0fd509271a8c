//! In-process retries of the inner service, with backoff and jitter, bounded by tries,
//! elapsed time, the broker's lease and a retry budget.
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message};
//! use redrive_middleware::retry::{Backoff, Jitter, RetryConfig, RetryLayer, Try};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let config = RetryConfig::default()
//!     .with_backoff(
//!         Backoff::exponential(Duration::from_millis(100), Duration::from_secs(2))
//!             .with_jitter(Jitter::Equal),
//!     )
//!     .with_max_tries(4)
//!     .with_max_elapsed(Duration::from_secs(10));
//!
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = calls.clone();
//! let service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(config)?)
//!     .service(handler::handler_fn(move |msg: Message| {
//!         let seen = seen.clone();
//!         async move {
//!             seen.fetch_add(1, Ordering::Relaxed);
//!             // Fails twice, then succeeds on the third try.
//!             match msg.extensions.get::<Try>() {
//!                 Some(t) if t.number < 3 => Err::<(), BoxError>("downstream unavailable".into()),
//!                 _ => Ok(()),
//!             }
//!         }
//!     }));
//!
//! service.oneshot(Message::new("order")).await?;
//! assert_eq!(calls.load(Ordering::Relaxed), 3);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **What is retried**: an error the [`Classifier`](redrive_core::Classifier) calls
//!   transient. A [permanent](redrive_core::classify::Permanent) error is returned at
//!   once. A [`retry_after`](redrive_core::classify::RetryAfter) hint replaces the
//!   computed delay, when it is no longer than the backoff's max and fits in what is
//!   left of the retry [`window`](RetryConfig::window); a longer hint is not waited
//!   for in process: the error goes up and the Worker redelivers the message after
//!   the hint.
//! - **How often**: at most `max_tries` tries per delivery attempt; no retry starts
//!   later than `max_elapsed` after the first try began; the sleeps of one delivery
//!   attempt add up to at most the [`window`](RetryConfig::window), whatever the
//!   hints; and only while the shared
//!   [`Budget`] allows, so an outage costs at most `1 + ratio` times the normal load,
//!   not `max_tries` times. When retries stop, the last error goes up unchanged and
//!   the Worker settles the message (nack, park or dead letter).
//! - **Shutdown**: the Worker puts a [`Shutdown`](redrive_core::Shutdown) in every
//!   message's extensions. Once it has begun, no retry starts, and a backoff sleep in
//!   progress ends early with the last error, so in-flight messages finish quickly.
//! - **Backpressure**: each retry calls a clone of the inner service with a clone of
//!   the message (cheap: the payload is shared). The clone's `poll_ready` is asked
//!   only after the delay, so nothing the inner service hands out on readiness (a
//!   concurrency permit, a rate-limit cell) is held while sleeping. The Worker's own
//!   concurrency slot stays taken for the whole delivery attempt, sleeps included.
//! - **Visibility**: before each try the layer puts a [`Try`] in the message's
//!   extensions, so the handler and inner layers know the try number (1-based;
//!   [`Metadata::attempt`](redrive_core::Metadata::attempt) counts delivery attempts,
//!   which span several tries). [`OnRetry`] sees every retry.
//! - **Leases**: [`RetryConfig::check`] refuses a retry window that cannot fit in a
//!   broker lease that cannot be extended. Where the lease is extendable, the Worker
//!   extends it while the message is in flight, retries included.
//!
//! # Order
//! Inside the circuit breaker and rate limit, outside the per-try
//! [`timeout`](crate::timeout): each try gets its own deadline, and the breaker sees
//! only a delivery attempt's final result.
//!
//! tower's own `Retry` (behind tower's `retry` feature) takes a `Policy` that sees
//! requests and results; redrive needs the message's extensions (the Worker's
//! shutdown signal, the try number), classification and a budget shared across
//! messages in one place, so this layer is its own, and small.

mod backoff;
mod budget;
mod config;
pub mod future;
mod layer;

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use redrive_core::{BoxError, Message};
use tower::Service;

pub use crate::error::ConfigError;
pub use backoff::{Backoff, Jitter};
pub use budget::Budget;
pub use config::RetryConfig;
pub use layer::RetryLayer;

use future::ResponseFuture;
use layer::Shared;

/// The try number within one delivery attempt, 1-based, in the message's
/// [`extensions`](redrive_core::Message::extensions) while the retry layer runs it.
///
/// ```
/// # use redrive_core::Message;
/// use redrive_middleware::retry::Try;
///
/// # fn f(msg: &Message) {
/// let number = msg.extensions.get::<Try>().map_or(1, |t| t.number);
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Try {
    /// 1 for the first try, 2 for the first retry, and so on.
    pub number: u32,
}

impl Try {
    /// Try `number`, as a test of a handler that reads it builds one.
    pub const fn new(number: u32) -> Self {
        Try { number }
    }
}

/// Retries the inner service. See the [module docs](self).
pub struct Retry<S, H = ()> {
    inner: S,
    shared: Arc<Shared<H>>,
}

impl<S: Clone, H> Clone for Retry<S, H> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, H> fmt::Debug for Retry<S, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, H> Retry<S, H> {
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

impl<S, H> Service<Message> for Retry<S, H>
where
    S: Service<Message> + Clone,
    S::Error: Into<BoxError>,
    H: OnRetry,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S, H>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut msg: Message) -> Self::Future {
        if let Some(budget) = &self.shared.budget {
            budget.deposit();
        }
        // The clone serves the retries; `self.inner` is the one made ready.
        let retries = self.inner.clone();
        msg.extensions.insert_shared(self.shared.first_try.clone());
        let copy = msg.clone();
        let span = future::try_span(&msg, 1);
        let first = {
            let _entered = span.enter();
            self.inner.call(msg)
        };
        ResponseFuture::new(first, retries, copy, self.shared.clone(), span)
    }
}

/// A retry about to be made, as [`OnRetry`] sees it.
#[derive(Debug)]
#[non_exhaustive]
pub struct RetryEvent<'a> {
    /// The try that failed (1-based); the retry will be try `try_number + 1`.
    pub try_number: u32,
    /// How long the layer waits before the retry.
    pub delay: Duration,
    /// The failed try's error.
    pub error: &'a (dyn StdError + Send + Sync + 'static),
    /// The message.
    pub message: &'a Message,
}

/// Called before each retry. Implemented for `()` (nothing) and for closures
/// `Fn(&RetryEvent<'_>)`.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use redrive_middleware::retry::{RetryConfig, RetryEvent, RetryLayer};
///
/// let retried = Arc::new(AtomicU64::new(0));
/// let count = retried.clone();
/// let layer = RetryLayer::new(RetryConfig::default())?.on_retry(move |event: &RetryEvent<'_>| {
///     count.fetch_add(1, Ordering::Relaxed);
///     tracing::info!(try_number = event.try_number, delay = ?event.delay, "retrying");
/// });
/// # let _ = layer;
/// # Ok::<(), redrive_middleware::retry::ConfigError>(())
/// ```
pub trait OnRetry: Send + Sync + 'static {
    /// A try failed and will be retried after `event.delay`.
    fn on_retry(&self, event: &RetryEvent<'_>);
}

impl OnRetry for () {
    fn on_retry(&self, _: &RetryEvent<'_>) {}
}

impl<F> OnRetry for F
where
    F: Fn(&RetryEvent<'_>) + Send + Sync + 'static,
{
    fn on_retry(&self, event: &RetryEvent<'_>) {
        self(event)
    }
}
