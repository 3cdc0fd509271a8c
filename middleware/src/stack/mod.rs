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
//! itself is wrapped in [`CatchPanic`], so a panic is an
//! error every layer sees: retried, counted toward the dead-letter limit, dead-lettered.

use std::fmt::Write as _;

use redrive_core::{BoxError, Capabilities, CatchPanic, Classifier};
use tower::Layer;
use tower::layer::util::Identity;

use crate::{ConfigError, Error};

mod part;
mod slot;

use part::Custom;
pub use part::StackPart;
#[allow(
    unused_imports,
    reason = "unused when no layer with a duration is enabled"
)]
pub(crate) use part::secs;
pub use slot::{Classify, IntoLayer, MetricsPlace, RetryPlace};

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

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> {
    /// Takes what a place was given: records its settings' error, if any.
    #[cfg_attr(
        not(any(feature = "retry", feature = "timeout", feature = "circuit-breaker")),
        allow(dead_code, reason = "only the places that take settings use it")
    )]
    fn take<L>(&mut self, given: impl IntoLayer<L>) -> L {
        let settings = given.is_settings();
        let built = given.into_layer(self.settings.classifier.as_ref());
        self.settings.built_from_settings |= settings;
        self.settings.errors.extend(built.error);
        built.layer
    }

    /// Classifies errors with `classifier` in every layer that classifies (retry,
    /// circuit breaker, dead letter) and that the Stack builds: those given their
    /// settings, and the default circuit breaker. A layer given ready-made keeps its
    /// own. Call it before giving the layers their settings: called after, it is an
    /// error that [`check`](Stack::check) reports.
    pub fn classifier(mut self, classifier: Classifier) -> Self
    where
        Cb: slot::Classify,
    {
        if self.settings.built_from_settings {
            self.settings.errors.push(ConfigError::new(
                "stack",
                "`classifier` was called after a layer was given its settings, which \
                 were classified without it; call `classifier` first",
            ));
        }
        if !self.settings.breaker_replaced {
            self.circuit_breaker.classify(&classifier);
        }
        self.settings.classifier = Some(classifier);
        self
    }

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
            settings: self.settings,
        }
    }

    /// Puts the metrics layer in its place (second). A retry layer the Stack builds
    /// from settings counts its retries into it (`redrive.messages.retried`); one
    /// given ready-made counts with the hook you give it
    /// ([`retry_counter`](crate::metrics::MetricsLayer::retry_counter)).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(
        mut self,
        layer: crate::metrics::MetricsLayer,
    ) -> Stack<Tr, crate::metrics::MetricsLayer, Dl, Id, Cb, Rl, Re, To, Us>
    where
        Re: RetryPlace,
    {
        if self.settings.retry_built {
            layer.wire(&mut self.retry);
        }
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
            settings: self.settings,
        }
    }

    /// Puts a dead-letter layer in its place (third), publishing through
    /// `publisher` (taken by value: publishers share their connection inside) with
    /// `config`, which is checked with the rest of the Stack.
    #[cfg(feature = "dead-letter")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dead-letter")))]
    pub fn dead_letter<P: redrive_core::Publisher>(
        mut self,
        publisher: P,
        config: crate::dead_letter::DeadLetterConfig,
    ) -> Stack<Tr, Me, crate::dead_letter::DeadLetterLayer<P>, Id, Cb, Rl, Re, To, Us> {
        let built = slot::dead_letter(publisher, config, self.settings.classifier.as_ref());
        self.settings.built_from_settings = true;
        self.settings.errors.extend(built.error);
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: built.layer,
            idempotency: self.idempotency,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
            settings: self.settings,
        }
    }

    /// Puts a dead-letter layer built yourself in its place (third): one with a hook
    /// ([`on_dead_letter`](crate::dead_letter::DeadLetterLayer::on_dead_letter)), or
    /// a publisher shared with other code.
    #[cfg(feature = "dead-letter")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dead-letter")))]
    pub fn dead_letter_layer<P, H>(
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
            settings: self.settings,
        }
    }

    /// Puts an idempotency layer in its place (fifth), keeping keys in `store` (taken
    /// by value: stores share their connection inside) with `config`, which is
    /// checked with the rest of the Stack.
    #[cfg(feature = "idempotency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
    pub fn idempotency<St: crate::idempotency::IdempotencyStore>(
        mut self,
        store: St,
        config: crate::idempotency::IdempotencyConfig,
    ) -> Stack<Tr, Me, Dl, crate::idempotency::IdempotencyLayer<St>, Cb, Rl, Re, To, Us> {
        let built = slot::idempotency(store, config);
        self.settings.errors.extend(built.error);
        Stack {
            trace: self.trace,
            metrics: self.metrics,
            dead_letter: self.dead_letter,
            idempotency: built.layer,
            circuit_breaker: self.circuit_breaker,
            rate_limit: self.rate_limit,
            retry: self.retry,
            timeout: self.timeout,
            custom: self.custom,
            settings: self.settings,
        }
    }

    /// Puts an idempotency layer built yourself in its place (fifth): one whose
    /// store is shared with other code, or behind a `dyn` store.
    #[cfg(feature = "idempotency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "idempotency")))]
    pub fn idempotency_layer<St: ?Sized>(
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
            settings: self.settings,
        }
    }

    /// Leaves the circuit breaker's place empty. Without a breaker, an outage longer
    /// than the redeliveries last sends every message to the dead-letter queue.
    pub fn without_circuit_breaker(mut self) -> Stack<Tr, Me, Dl, Id, Identity, Rl, Re, To, Us> {
        self.settings.breaker_replaced = true;
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
            settings: self.settings,
        }
    }

    /// Puts the circuit breaker in its place (fourth), instead of the default one: a
    /// [`CircuitBreakerLayer`](crate::circuit_breaker::CircuitBreakerLayer), or the
    /// [`CircuitBreakerConfig`](crate::circuit_breaker::CircuitBreakerConfig) to build
    /// it from.
    #[cfg(feature = "circuit-breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
    pub fn circuit_breaker(
        mut self,
        breaker: impl IntoLayer<crate::circuit_breaker::CircuitBreakerLayer>,
    ) -> Stack<Tr, Me, Dl, Id, crate::circuit_breaker::CircuitBreakerLayer, Rl, Re, To, Us> {
        let layer = self.take(breaker);
        self.settings.breaker_replaced = true;
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
            settings: self.settings,
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
            settings: self.settings,
        }
    }

    /// Puts the retry layer in its place (seventh): a
    /// [`RetryLayer`](crate::retry::RetryLayer), or the
    /// [`RetryConfig`](crate::retry::RetryConfig) to build it from.
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    pub fn retry<H>(
        mut self,
        retry: impl IntoLayer<crate::retry::RetryLayer<H>>,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, crate::retry::RetryLayer<H>, To, Us>
    where
        crate::retry::RetryLayer<H>: StackPart,
        Me: MetricsPlace,
    {
        self.settings.retry_built = retry.is_settings();
        let mut layer = self.take(retry);
        if self.settings.retry_built {
            self.metrics.wire(&mut layer);
        }
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
            settings: self.settings,
        }
    }

    /// Puts the per-try timeout in its place (last, closest to the handler): a
    /// [`TimeoutLayer`](crate::timeout::TimeoutLayer), or the deadline as a
    /// [`Duration`](std::time::Duration).
    #[cfg(feature = "timeout")]
    #[cfg_attr(docsrs, doc(cfg(feature = "timeout")))]
    pub fn timeout(
        mut self,
        timeout: impl IntoLayer<crate::timeout::TimeoutLayer>,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, crate::timeout::TimeoutLayer, Us> {
        let layer = self.take(timeout);
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
            settings: self.settings,
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
            settings: self.settings,
        }
    }
}

#[cfg(feature = "circuit-breaker")]
impl<Tr, Me, Dl, Id, Rl, Re, To, Us>
    Stack<Tr, Me, Dl, Id, crate::circuit_breaker::CircuitBreakerLayer, Rl, Re, To, Us>
{
    /// A handle on the circuit breaker in place (the default one, or the one given):
    /// its state and the messages it holds, for metrics and health checks.
    #[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
    pub fn circuit_handle(&self) -> crate::circuit_breaker::CircuitHandle {
        self.circuit_breaker.handle()
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
        if let Some(e) = self.settings.errors.first() {
            return Err(Error::config(e.layer(), e.message()));
        }
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
    ///
    /// # Panics
    /// If a place was given settings that cannot work; [`check`](Stack::check) first.
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
    Us: Layer<H>,
    To: Layer<CatchPanic<Us::Service>>,
    Re: Layer<To::Service>,
    Rl: Layer<Re::Service>,
    Id: Layer<Rl::Service>,
    Cb: Layer<Id::Service>,
    Dl: Layer<Cb::Service>,
    Me: Layer<Dl::Service>,
    Tr: Layer<Me::Service>,
    Tr: StackPart,
    Me: StackPart,
    Dl: StackPart,
    Id: StackPart,
    Cb: StackPart,
    Rl: StackPart,
    Re: StackPart,
    To: StackPart,
{
    type Service = Tr::Service;

    fn check(&self, caps: &Capabilities) -> Result<(), BoxError> {
        Stack::check(self, caps).map_err(Into::into)
    }

    fn wrap(&self, handler: H) -> Self::Service {
        // The Worker's builder reports `check`'s errors at `build`, and never runs
        // this service then: the stand-ins of bad settings are never used.
        self.wrap_unchecked(handler)
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

    /// # Panics
    /// If a place was given settings that cannot work: [`check`](Stack::check)
    /// reports them, and `Worker::builder(..).build()` runs it before it wraps the
    /// handler. A Stack used as a plain tower layer must be checked first.
    fn layer(&self, handler: S) -> Self::Service {
        if let Some(e) = self.settings.errors.first() {
            panic!(
                "the Stack was used with settings that cannot work ({e}); `Stack::check` \
                 reports them"
            );
        }
        self.wrap_unchecked(handler)
    }
}

impl<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> Stack<Tr, Me, Dl, Id, Cb, Rl, Re, To, Us> {
    /// The handler in every layer, outermost first, without looking at the errors of
    /// the settings.
    fn wrap_unchecked<S>(&self, handler: S) -> Tr::Service
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
