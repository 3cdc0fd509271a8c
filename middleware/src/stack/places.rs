//! The places of a [`Stack`]: each takes its layer, or the settings to build it from.

use redrive_core::Classifier;
use tower::layer::util::Identity;

use crate::ConfigError;

use super::Stack;
use super::part::Custom;
use super::slot::{self, IntoLayer};

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
        Re: slot::RetryPlace,
    {
        if self.settings.retry_built {
            slot::MetricsPlace::wire(&layer, &mut self.retry);
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
    pub fn rate_limit<L: super::StackPart>(
        self,
        layer: L,
    ) -> Stack<Tr, Me, Dl, Id, Cb, L, Re, To, Us> {
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
    /// [`RetryConfig`](crate::retry::RetryConfig) to build it from. One built from
    /// settings takes the Stack's [`classifier`](Stack::classifier) and counts its
    /// retries into the Stack's metrics layer.
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    pub fn retry<H>(
        mut self,
        retry: impl IntoLayer<crate::retry::RetryLayer<H>>,
    ) -> Stack<Tr, Me, Dl, Id, Cb, Rl, crate::retry::RetryLayer<H>, To, Us>
    where
        crate::retry::RetryLayer<H>: super::StackPart,
        Me: slot::MetricsPlace,
    {
        self.settings.retry_built = retry.is_settings();
        let mut layer = self.take(retry);
        if self.settings.retry_built {
            slot::MetricsPlace::wire(&self.metrics, &mut layer);
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
