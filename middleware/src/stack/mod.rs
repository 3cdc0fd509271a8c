//! The `Stack` builder: every layer in its canonical place, whatever order it is given in.
//!
//! ```
//! use std::sync::Arc;
//! use redrive_core::memory::MemoryBroker;
//! use redrive_core::{handler_fn, BoxError, Message, Worker};
//! use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
//! use redrive_middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, MemoryStore};
//! use redrive_middleware::trace::TraceLayer;
//! use redrive_middleware::Stack;
//!
//! # fn main() -> Result<(), BoxError> {
//! let broker = MemoryBroker::new();
//! let consumer = broker.consumer("orders");
//! let stack = Stack::new()
//!     // Given in any order, built in the canonical one.
//!     .idempotency(IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())?)
//!     .dead_letter(DeadLetterLayer::new(Arc::new(broker.clone()), DeadLetterConfig::default())?)
//!     .trace(TraceLayer::new());
//! assert_eq!(
//!     stack.describe(),
//!     "trace -> dead_letter(max_attempts=5, to=<source>-dlq) -> \
//!      circuit_breaker(consecutive_failures=5, open_for=30s) -> \
//!      idempotency(lease=30s, ttl=86400s) -> handler"
//! );
//! let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
//! // `build` checks the stack against the consumer's capabilities.
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
//! itself is wrapped in [`CatchPanic`], so a panic is an
//! error every layer sees: retried, counted toward the dead-letter limit, dead-lettered.

use std::fmt::Write as _;

use redrive_core::{BoxError, Capabilities, CatchPanic};
use tower::Layer;
use tower::layer::util::Identity;

use crate::Error;

mod part;

use part::Custom;
pub use part::StackPart;
#[allow(
    unused_imports,
    reason = "unused when no layer with a duration is enabled"
)]
pub(crate) use part::secs;

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
}

impl Stack {
    /// A stack with the default circuit breaker alone (see the [module docs](self)).
    pub fn new() -> Self {
        Self::default()
    }
}

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> {
    /// Puts the trace layer in its place (first).
    #[cfg(feature = "trace")]
    #[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
    pub fn trace<M>(
        self,
        layer: crate::trace::TraceLayer<M>,
    ) -> Stack<crate::trace::TraceLayer<M>, Me, Dl, Id, Cb, Rl, Re, To, Us> {
        Stack {
            trace: layer,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the metrics layer in its place (second).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(
        self,
        layer: crate::metrics::MetricsLayer,
    ) -> Stack<Tr, crate::metrics::MetricsLayer, Dl, Id, Cb, Rl, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: layer,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the dead-letter layer in its place (third).
    #[cfg(feature = "dead-letter")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dead-letter")))]
    pub fn dead_letter<P, H>(
        self,
        layer: crate::dead_letter::DeadLetterLayer<P, H>,
    ) -> Stack<Tr, Me, crate::dead_letter::DeadLetterLayer<P, H>, Id, Cb, Rl, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: layer,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the idempotency layer in its place (fifth).
    #[cfg(feature = "idempotency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
    pub fn idempotency<St: ?Sized>(
        self,
        layer: crate::idempotency::IdempotencyLayer<St>,
    ) -> Stack<Tr, Me, Dl, crate::idempotency::IdempotencyLayer<St>, Cb, Rl, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: layer,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Leaves the circuit breaker's place empty. Without a breaker, an outage longer
    /// than the redeliveries last sends every message to the dead-letter queue.
    pub fn without_circuit_breaker(self) -> Stack<Tr, Me, Dl, Id, Identity, Rl, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: Identity::new(),
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the circuit breaker in its place (fourth), instead of the default one.
    #[cfg(feature = "circuit-breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
    pub fn circuit_breaker(
        self,
        layer: crate::circuit_breaker::CircuitBreakerLayer,
    ) -> Stack<Tr, Me, Dl, Id, crate::circuit_breaker::CircuitBreakerLayer, Rl, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: layer,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts a rate limit in its place (sixth): a
    /// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) or a
    /// [`KeyedRateLimitLayer`](crate::rate_limit::KeyedRateLimitLayer).
    #[cfg(feature = "rate-limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
    pub fn rate_limit<L: StackPart>(self, layer: L) -> Stack<Tr, Me, Dl, Id, Cb, L, Re, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: layer,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the retry layer in its place (seventh).
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    pub fn retry<H>(
        self,
        layer: crate::retry::RetryLayer<H>,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, crate::retry::RetryLayer<H>, To, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: layer,
            timeout: self.timeout,
            custom: self.custom,
        }
    }

    /// Puts the per-try timeout in its place (last, closest to the handler).
    #[cfg(feature = "timeout")]
    #[cfg_attr(docsrs, doc(cfg(feature = "timeout")))]
    pub fn timeout(
        self,
        layer: crate::timeout::TimeoutLayer,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, crate::timeout::TimeoutLayer, Us> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: layer,
            custom: self.custom,
        }
    }

    /// Adds a tower layer of your own around the handler: inside the per-try timeout,
    /// so it runs on every try, sees the message with what the Stack put in its
    /// extensions (the idempotency token, the shutdown signal), and its errors are
    /// classified, retried and dead-lettered like the handler's; a panic in it is
    /// caught like one in the handler. Called more than once, the first layer given is
    /// the outermost, as with `tower::ServiceBuilder`. [`describe`](Stack::describe)
    /// shows them as `custom(<how many>)`.
    pub fn around_handler<L>(
        self,
        layer: L,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, tower::layer::util::Stack<L, Us>> {
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: Custom {
                layer: tower::layer::util::Stack::new(layer, self.custom.layer),
                count: self.custom.count + 1,
            },
        }
    }
}

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Tr: StackPart,
    Me: StackPart,
    Dl: StackPart,
    Id: StackPart,
    Cb: StackPart,
    Rl: StackPart,
    Re: StackPart,
    To: StackPart,
{
    fn parts(&self) -> [&dyn StackPart; 9] {
        [
            &self.trace,
            &self.metrics,
            &self.dead_letter,
            &self.circuit_breaker,
            &self.idempotency,
            &self.rate_limit,
            &self.retry,
            &self.timeout,
            &self.custom,
        ]
    }

    /// The built pipeline as text, outermost first, ending in `handler`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for d in self.parts().iter().filter_map(|p| p.describe()) {
            let _ = write!(out, "{d} -> ");
        }
        out.push_str("handler");
        out
    }

    /// Checks every layer against the consumer's capabilities (a retry window longer
    /// than the broker's lease, say), and the layers against each other (a retry
    /// window longer than the idempotency lease). `Worker::builder(..).stack(stack)`
    /// runs it when the Worker is built; call it yourself only when you wrap a handler
    /// with [`service`](Stack::service).
    ///
    /// # Errors
    /// The first layer's [`Error::Config`], naming the layer and what to change.
    pub fn check(&self, caps: &Capabilities) -> Result<(), Error> {
        let parts = self.parts();
        parts.iter().try_for_each(|p| p.check(caps))?;
        let window = parts.iter().filter_map(|p| p.retry_window()).max();
        let lease = parts.iter().filter_map(|p| p.reservation_lease()).min();
        if let (Some(window), Some(lease)) = (window, lease) {
            if window >= lease {
                return Err(Error::config(
                    "idempotency",
                    format!(
                        "retries can keep a message for {window:?} between tries, but the \
                         idempotency lease is {lease:?}; the reservation is renewed while the \
                         call runs, but if the store cannot be reached to renew it, it lapses \
                         and another consumer may run the message while retries go on here; \
                         raise the lease above {window:?} (`IdempotencyConfig::with_lease`) \
                         or shorten the retries"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Wraps `handler` in the stack.
    pub fn service<S>(&self, handler: S) -> <Self as Layer<S>>::Service
    where
        Self: Layer<S>,
    {
        self.layer(handler)
    }
}

/// What lets `Worker::builder(consumer).stack(stack).handler(handler)` wrap the handler
/// and run [`Stack::check`] against the consumer's capabilities at `build`.
impl<H, Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> redrive_core::Pipeline<H>
    for Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Self: Layer<H>,
    Tr: StackPart,
    Me: StackPart,
    Dl: StackPart,
    Id: StackPart,
    Cb: StackPart,
    Rl: StackPart,
    Re: StackPart,
    To: StackPart,
{
    type Service = <Self as Layer<H>>::Service;

    fn check(&self, caps: &Capabilities) -> Result<(), BoxError> {
        Stack::check(self, caps).map_err(Into::into)
    }

    fn wrap(&self, handler: H) -> Self::Service {
        self.layer(handler)
    }
}

impl<S, Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Layer<S> for Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us>
where
    Us: Layer<S>,
    To: Layer<CatchPanic<Us::Service>>,
    Re: Layer<To::Service>,
    Rl: Layer<Re::Service>,
    Id: Layer<Rl::Service>,
    Cb: Layer<Id::Service>,
    Dl: Layer<Cb::Service>,
    Me: Layer<Dl::Service>,
    Tr: Layer<Me::Service>,
{
    type Service = Tr::Service;

    fn layer(&self, handler: S) -> Self::Service {
        // Innermost: a panic in the handler (or in the user's layers around it) is an
        // error every layer sees.
        let s = self.custom.layer.layer(handler);
        let s = self.timeout.layer(CatchPanic::new(s));
        let s = self.retry.layer(s);
        let s = self.rate_limit.layer(s);
        let s = self.idempotency.layer(s);
        let s = self.circuit_breaker.layer(s);
        let s = self.dead_letter.layer(s);
        let s = self.metrics.layer(s);
        self.trace.layer(s)
    }
}
