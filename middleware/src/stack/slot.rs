//! What a [`Stack`](super::Stack) place accepts: the layer itself, or the settings it
//! is built from, checked when the Worker is built.

use redrive_core::Classifier;

use crate::ConfigError;

/// What a [`Stack`](super::Stack) place takes: the layer `L` itself, or what builds
/// it (a [`RetryConfig`](crate::retry::RetryConfig) for the retry place, a
/// [`CircuitBreakerConfig`](crate::circuit_breaker::CircuitBreakerConfig) for the
/// breaker's, a [`Duration`](std::time::Duration) for the timeout's).
///
/// Settings given this way are checked with the rest of the Stack
/// ([`Stack::check`](super::Stack::check), which `Worker::builder(..).build()` runs),
/// so a Stack is written without a `?` per layer, and they are classified with the
/// Stack's [`classifier`](super::Stack::classifier). A layer given ready-made keeps
/// its own classifier.
///
/// Sealed: implemented for redrive's layers and their settings.
pub trait IntoLayer<L>: sealed::Sealed<L> {
    /// The layer, or the settings' error together with a working stand-in (the
    /// layer's defaults) that the Stack never runs: it reports the error first.
    #[doc(hidden)]
    fn into_layer(self, classifier: Option<&Classifier>) -> Built<L>;

    /// Whether these are settings, which take the Stack's classifier.
    #[doc(hidden)]
    fn is_settings(&self) -> bool {
        true
    }
}

/// A layer built for a place, and the error of its settings if they could not work.
#[doc(hidden)]
#[derive(Debug)]
#[cfg_attr(
    not(any(
        feature = "retry",
        feature = "timeout",
        feature = "circuit-breaker",
        feature = "idempotency",
        feature = "dead-letter"
    )),
    allow(dead_code, reason = "only the places that take settings read it")
)]
pub struct Built<L> {
    pub(super) layer: L,
    pub(super) error: Option<ConfigError>,
}

impl<L> Built<L> {
    /// `layer` when `result` is an error: the stand-in the Stack holds in its place.
    #[allow(dead_code, reason = "unused when no layer with settings is enabled")]
    fn or_stand_in(result: Result<L, ConfigError>, stand_in: impl FnOnce() -> L) -> Self {
        match result {
            Ok(layer) => Built { layer, error: None },
            Err(e) => Built {
                layer: stand_in(),
                error: Some(e),
            },
        }
    }
}

mod sealed {
    pub trait Sealed<L> {}
    pub trait SealedPlace {}
}

/// Every layer goes in its own place as it is.
impl<L: super::StackPart> sealed::Sealed<L> for L {}

impl<L: super::StackPart> IntoLayer<L> for L {
    fn into_layer(self, _: Option<&Classifier>) -> Built<L> {
        Built {
            layer: self,
            error: None,
        }
    }

    fn is_settings(&self) -> bool {
        false
    }
}

#[cfg(feature = "retry")]
impl sealed::Sealed<crate::retry::RetryLayer> for crate::retry::RetryConfig {}

#[cfg(feature = "retry")]
impl IntoLayer<crate::retry::RetryLayer> for crate::retry::RetryConfig {
    fn into_layer(self, classifier: Option<&Classifier>) -> Built<crate::retry::RetryLayer> {
        use crate::retry::{RetryConfig, RetryLayer};
        let config = match classifier {
            Some(c) => self.with_classifier(c.clone()),
            None => self,
        };
        Built::or_stand_in(RetryLayer::new(config), || {
            RetryLayer::new(RetryConfig::default()).expect("the default retry settings work")
        })
    }
}

#[cfg(feature = "circuit-breaker")]
impl sealed::Sealed<crate::circuit_breaker::CircuitBreakerLayer>
    for crate::circuit_breaker::CircuitBreakerConfig
{
}

#[cfg(feature = "circuit-breaker")]
impl IntoLayer<crate::circuit_breaker::CircuitBreakerLayer>
    for crate::circuit_breaker::CircuitBreakerConfig
{
    fn into_layer(
        self,
        classifier: Option<&Classifier>,
    ) -> Built<crate::circuit_breaker::CircuitBreakerLayer> {
        use crate::circuit_breaker::CircuitBreakerLayer;
        let config = match classifier {
            Some(c) => self.with_classifier(c.clone()),
            None => self,
        };
        Built::or_stand_in(
            CircuitBreakerLayer::new(config),
            CircuitBreakerLayer::default,
        )
    }
}

#[cfg(feature = "timeout")]
impl sealed::Sealed<crate::timeout::TimeoutLayer> for std::time::Duration {}

/// A per-try deadline.
#[cfg(feature = "timeout")]
impl IntoLayer<crate::timeout::TimeoutLayer> for std::time::Duration {
    fn into_layer(self, _: Option<&Classifier>) -> Built<crate::timeout::TimeoutLayer> {
        use crate::timeout::TimeoutLayer;
        Built::or_stand_in(TimeoutLayer::new(self), TimeoutLayer::default)
    }
}

#[cfg(feature = "idempotency")]
pub(super) fn idempotency<St: crate::idempotency::IdempotencyStore>(
    store: St,
    config: crate::idempotency::IdempotencyConfig,
) -> Built<crate::idempotency::IdempotencyLayer<St>> {
    use crate::idempotency::{IdempotencyConfig, IdempotencyLayer};
    let store = std::sync::Arc::new(store);
    Built::or_stand_in(IdempotencyLayer::new(store.clone(), config), || {
        IdempotencyLayer::new(store, IdempotencyConfig::default())
            .expect("the default idempotency settings work")
    })
}

#[cfg(feature = "dead-letter")]
pub(super) fn dead_letter<P: redrive_core::Publisher>(
    publisher: P,
    config: crate::dead_letter::DeadLetterConfig,
    classifier: Option<&Classifier>,
) -> Built<crate::dead_letter::DeadLetterLayer<P>> {
    use crate::dead_letter::{DeadLetterConfig, DeadLetterLayer};
    let config = match classifier {
        Some(c) => config.with_classifier(c.clone()),
        None => config,
    };
    let publisher = std::sync::Arc::new(publisher);
    Built::or_stand_in(DeadLetterLayer::new(publisher.clone(), config), || {
        DeadLetterLayer::new(publisher, DeadLetterConfig::default())
            .expect("the default dead-letter settings work")
    })
}

/// The circuit breaker's place, which takes the Stack's
/// [`classifier`](super::Stack::classifier) while it holds the default breaker.
/// Implemented for the two things the place can hold.
pub trait Classify: sealed::SealedPlace {
    /// Classifies with `classifier` from now on.
    #[doc(hidden)]
    fn classify(&mut self, classifier: &Classifier);
}

impl sealed::SealedPlace for tower::layer::util::Identity {}

impl Classify for tower::layer::util::Identity {
    fn classify(&mut self, _: &Classifier) {}
}

#[cfg(feature = "circuit-breaker")]
impl sealed::SealedPlace for crate::circuit_breaker::CircuitBreakerLayer {}

/// Rebuilds the breaker with the classifier: only the default breaker, which no
/// service has used yet and which has no hook, is given one.
#[cfg(feature = "circuit-breaker")]
impl Classify for crate::circuit_breaker::CircuitBreakerLayer {
    fn classify(&mut self, classifier: &Classifier) {
        let config = self.config().clone().with_classifier(classifier.clone());
        *self = crate::circuit_breaker::CircuitBreakerLayer::new(config)
            .expect("the breaker's settings were checked when it was built");
    }
}

/// The metrics place: it lends the layers the Stack builds from settings its
/// instruments (the retry layer counts `redrive.messages.retried`), and reports the
/// breaker's state (`redrive.circuit.state`).
pub trait MetricsPlace: sealed::SealedPlace {
    /// Gives `retry` the retry counter, if this place holds a metrics layer.
    #[doc(hidden)]
    fn wire<R: RetryPlace>(&self, retry: &mut R);

    /// Reports `breaker`'s state, if this place holds a metrics layer and `breaker`
    /// a circuit breaker.
    #[doc(hidden)]
    fn follow<B: BreakerPlace>(&self, breaker: &B);

    /// Reports the Worker's own figures, if this place holds a metrics layer.
    #[doc(hidden)]
    fn observe_worker(&self, health: &redrive_core::Health);

    /// Has `part` report its own state, if this place holds a metrics layer.
    #[doc(hidden)]
    fn report_part<P: super::StackPart>(&self, part: &P);
}

/// The circuit breaker place, whose state the Stack's metrics layer reports.
pub trait BreakerPlace: sealed::SealedPlace {
    /// A handle on the breaker in place, if there is one.
    #[cfg(feature = "circuit-breaker")]
    #[doc(hidden)]
    fn breaker(&self) -> Option<crate::circuit_breaker::CircuitHandle>;
}

impl BreakerPlace for tower::layer::util::Identity {
    #[cfg(feature = "circuit-breaker")]
    fn breaker(&self) -> Option<crate::circuit_breaker::CircuitHandle> {
        None
    }
}

#[cfg(feature = "circuit-breaker")]
impl BreakerPlace for crate::circuit_breaker::CircuitBreakerLayer {
    fn breaker(&self) -> Option<crate::circuit_breaker::CircuitHandle> {
        Some(self.handle())
    }
}

/// The retry place, which counts its retries into the Stack's metrics when the Stack
/// built it from settings.
pub trait RetryPlace: sealed::SealedPlace {
    /// Counts each retry into `counter` too.
    #[cfg(feature = "metrics")]
    #[doc(hidden)]
    fn count_into(&mut self, counter: crate::metrics::RetryCounter);
}

impl MetricsPlace for tower::layer::util::Identity {
    fn wire<R: RetryPlace>(&self, _: &mut R) {}

    fn follow<B: BreakerPlace>(&self, _: &B) {}

    fn observe_worker(&self, _: &redrive_core::Health) {}

    fn report_part<P: super::StackPart>(&self, _: &P) {}
}

impl RetryPlace for tower::layer::util::Identity {
    #[cfg(feature = "metrics")]
    fn count_into(&mut self, _: crate::metrics::RetryCounter) {}
}

#[cfg(feature = "metrics")]
impl sealed::SealedPlace for crate::metrics::MetricsLayer {}

#[cfg(feature = "metrics")]
impl MetricsPlace for crate::metrics::MetricsLayer {
    fn wire<R: RetryPlace>(&self, retry: &mut R) {
        retry.count_into(self.retry_counter());
    }

    #[cfg_attr(
        not(feature = "circuit-breaker"),
        allow(unused_variables, reason = "no breaker to follow")
    )]
    fn follow<B: BreakerPlace>(&self, breaker: &B) {
        #[cfg(feature = "circuit-breaker")]
        if let Some(handle) = breaker.breaker() {
            self.circuit_state(move || handle.state().code());
        }
    }

    fn observe_worker(&self, health: &redrive_core::Health) {
        crate::metrics::MetricsLayer::observe_worker(self, health.clone());
    }

    fn report_part<P: super::StackPart>(&self, part: &P) {
        part.report_into(self);
    }
}

#[cfg(feature = "retry")]
impl<H> sealed::SealedPlace for crate::retry::RetryLayer<H> {}

#[cfg(feature = "retry")]
impl<H> RetryPlace for crate::retry::RetryLayer<H> {
    #[cfg(feature = "metrics")]
    fn count_into(&mut self, counter: crate::metrics::RetryCounter) {
        if !crate::retry::RetryLayer::count_into(self, counter) {
            tracing::debug!("the retry layer is shared; it keeps its own hooks");
        }
    }
}
