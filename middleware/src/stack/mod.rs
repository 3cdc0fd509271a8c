//! The `Stack` builder: every layer in its canonical place, whatever order it is given in.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::memory::MemoryBroker;
//! use redrive_core::{handler_fn, BoxError, Message, Worker};
//! use redrive_middleware::dead_letter::DeadLetterConfig;
//! use redrive_middleware::idempotency::{IdempotencyConfig, MemoryStore};
//! use redrive_middleware::retry::RetryConfig;
//! use redrive_middleware::trace::TraceLayer;
//! use redrive_middleware::Stack;
//!
//! # fn main() -> Result<(), BoxError> {
//! let broker = MemoryBroker::new();
//! let consumer = broker.consumer("orders");
//! let stack = Stack::new()
//!     // Given in any order, built in the canonical one; settings are checked at `build`.
//!     .idempotency(MemoryStore::new(), IdempotencyConfig::default())
//!     .dead_letter(broker.clone(), DeadLetterConfig::default())
//!     .retry(RetryConfig::default())
//!     .timeout(Duration::from_secs(10))
//!     .trace(TraceLayer::new());
//! assert_eq!(
//!     stack.describe(),
//!     "trace -> dead_letter(max_attempts=5, to=<source>-dlq) -> \
//!      circuit_breaker(consecutive_failures=5, open_for=30s) -> \
//!      idempotency(lease=30s, ttl=86400s) -> retry(max_tries=3, window=300ms, budget) -> \
//!      timeout(10s) -> handler"
//! );
//! let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
//! // `build` checks the settings, and the stack against the consumer's capabilities.
//! let worker = Worker::builder(consumer).stack(stack).handler(handler).build()?;
//! # let _ = worker;
//! # Ok(())
//! # }
//! ```
//!
//! # Order
//! Outermost first, as DESIGN.md fixes it and [`Stack::describe`] prints it:
//!
//! | # | layer | why here |
//! |---|---|---|
//! | 1 | `trace` | one span around everything done for a delivery, including the DLQ publish |
//! | 2 | `metrics` | sees each delivery's final result and times all of it |
//! | 3 | `dead_letter` | sees the error left after retries; takes poison out of the queue |
//! | 4 | `circuit_breaker` | counts the failures retries could not fix, the idempotency store's included; pauses intake while open, and holds the messages that failed meanwhile so an outage uses none of their delivery attempts |
//! | 5 | `idempotency` | reserves the key once per delivery, around all retries |
//! | 6 | `rate_limit` | paces calls to the downstream, retries included |
//! | 7 | `retry` | in-process tries with backoff |
//! | 8 | `timeout` | a deadline per try |
//! | 9 | your own layers ([`around_handler`](Stack::around_handler)) | run on every try, with the Stack's extensions on the message; their errors are treated like the handler's |
//!
//! A circuit breaker with `CircuitBreakerConfig::default()` is in place from
//! [`Stack::new`] on (with the `circuit-breaker` feature): without one, an outage of the
//! downstream or the idempotency store longer than the redeliveries last would send
//! every message to the dead-letter queue. Replace it with
//! [`circuit_breaker`](Stack::circuit_breaker), or remove it with
//! [`without_circuit_breaker`](Stack::without_circuit_breaker).
//!
//! Omitted layers are left out at no cost (`tower::layer::util::Identity`). The handler
//! itself is wrapped in [`CatchPanic`](redrive_core::CatchPanic), so a panic is an
//! error every layer sees: retried, counted toward the dead-letter limit, dead-lettered.

use redrive_core::Classifier;
use tower::layer::util::Identity;

use crate::ConfigError;

// One file per job:
// - `places.rs`: the places, each taking its layer or the settings to build it from;
// - `build.rs`: the description, the checks, and the layers around a handler;
// - `slot.rs`: what a place accepts ([`IntoLayer`]) and the wiring between places;
// - `part.rs`: what the Stack needs of each layer ([`StackPart`]).
mod build;
mod part;
mod places;
mod slot;

use part::Custom;
pub use part::StackPart;
#[allow(
    unused_imports,
    reason = "unused when no layer with a duration is enabled"
)]
pub(crate) use part::secs;
pub use slot::{BreakerPlace, Classify, IntoLayer, MetricsPlace, RetryPlace};

/// The circuit breaker a new [`Stack`] starts with: [`CircuitBreakerLayer`] with its
/// default settings, or no layer without the `circuit-breaker` feature.
///
/// [`CircuitBreakerLayer`]: crate::circuit_breaker::CircuitBreakerLayer
#[cfg(feature = "circuit-breaker")]
pub type DefaultBreaker = crate::circuit_breaker::CircuitBreakerLayer;
/// The circuit breaker a new [`Stack`] starts with: none without the
/// `circuit-breaker` feature.
#[cfg(not(feature = "circuit-breaker"))]
pub type DefaultBreaker = Identity;

/// The builder; see the [module docs](self). Each type parameter is one place,
/// [`Identity`] while empty (the circuit breaker's starts as [`DefaultBreaker`]).
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct Stack<
    Tr = Identity,
    Me = Identity,
    Dl = Identity,
    Id = Identity,
    Cb = DefaultBreaker,
    Rl = Identity,
    Re = Identity,
    To = Identity,
    Us = Identity,
> {
    trace: Tr,
    metrics: Me,
    dead_letter: Dl,
    idempotency: Id,
    circuit_breaker: Cb,
    rate_limit: Rl,
    retry: Re,
    timeout: To,
    custom: Custom<Us>,
    settings: Settings,
}

/// What the Stack keeps beside its layers: the classifier for the layers it builds
/// from settings, and the errors of settings that could not work.
#[derive(Clone, Debug, Default)]
struct Settings {
    classifier: Option<Classifier>,
    /// Whether a place was given settings (which took the classifier as it was then).
    built_from_settings: bool,
    /// Whether the breaker is still the default one, which takes the classifier.
    breaker_replaced: bool,
    /// Whether the retry layer was built from settings, so it counts into metrics.
    #[cfg_attr(
        not(any(feature = "retry", feature = "metrics")),
        allow(dead_code, reason = "read by the retry and metrics places")
    )]
    retry_built: bool,
    errors: Vec<ConfigError>,
}

impl Stack {
    /// A stack with the default circuit breaker alone (see the [module docs](self)).
    pub fn new() -> Self {
        Self::default()
    }
}
