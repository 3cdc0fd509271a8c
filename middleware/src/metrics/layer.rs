//! [`MetricsLayer`], which builds [`Metrics`] services, and the [`RetryCounter`] it hands
//! out.

use std::fmt;
use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use redrive_core::Message;
use tower::Layer;

use super::instruments::{Count, Instruments};
use super::{ATTR_DESTINATION, ATTR_SYSTEM, Metrics};

/// Builds [`Metrics`] services; clones share the instruments.
#[derive(Clone)]
pub struct MetricsLayer {
    meter: Meter,
    instruments: Arc<Instruments>,
}

impl fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsLayer").finish_non_exhaustive()
    }
}

impl MetricsLayer {
    /// Instruments created on `meter`, the histograms with the buckets
    /// [`DURATION_BUCKETS`](super::DURATION_BUCKETS) and
    /// [`AGE_BUCKETS`](super::AGE_BUCKETS).
    pub fn new(meter: &Meter) -> Self {
        Self::with_buckets(meter, super::DURATION_BUCKETS, super::AGE_BUCKETS)
    }

    /// Instruments created on `meter`, with these bucket boundaries (in seconds,
    /// ascending) for `messaging.process.duration` and `redrive.message.age`: for
    /// handlers far faster or slower than the defaults cover. A meter provider's views
    /// can still override them.
    pub fn with_buckets(meter: &Meter, duration: &[f64], age: &[f64]) -> Self {
        MetricsLayer {
            meter: meter.clone(),
            instruments: Arc::new(Instruments::new(meter, duration, age)),
        }
    }

    /// Binds each destination's histograms to its attributes once, so recording a
    /// duration or an age skips the SDK's attribute lookup (see [the module
    /// docs](super#bound-histograms-feature-metrics-bound)). Only for a meter provider
    /// that implements binding, as `opentelemetry_sdk`'s does: with one that does not,
    /// the histograms record nothing. Call it before the layer handles messages;
    /// destinations seen before keep recording unbound.
    #[cfg(feature = "metrics-bound")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics-bound")))]
    #[must_use]
    pub fn with_bound_histograms(self) -> Self {
        self.instruments
            .bind
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Instruments on the global meter provider's `redrive` meter.
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter("redrive"))
    }

    /// A handle that counts in-process retries into `redrive.messages.retried`; give
    /// it to the retry layer's hook.
    pub fn retry_counter(&self) -> RetryCounter {
        RetryCounter {
            instruments: self.instruments.clone(),
        }
    }

    /// Reports a circuit breaker's state as the `redrive.circuit.state` gauge for
    /// `destination`; `state` returns 0 (closed), 1 (half-open) or 2 (open).
    pub fn observe_circuit(
        &self,
        system: &'static str,
        destination: impl Into<String>,
        state: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        let attrs = [
            KeyValue::new(ATTR_SYSTEM, system),
            KeyValue::new(ATTR_DESTINATION, destination.into()),
        ];
        // The meter provider keeps the callback registered for its own lifetime.
        let _gauge = self
            .meter
            .i64_observable_gauge("redrive.circuit.state")
            .with_unit("1")
            .with_description("Circuit breaker state: 0 closed, 1 half-open, 2 open")
            .with_callback(move |observer| observer.observe(state(), &attrs))
            .build();
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;

    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            instruments: self.instruments.clone(),
            last: None,
        }
    }
}

/// Counts in-process retries; see [`MetricsLayer::retry_counter`].
#[derive(Clone)]
pub struct RetryCounter {
    instruments: Arc<Instruments>,
}

impl RetryCounter {
    /// Counts one retry of `msg`.
    pub fn record(&self, msg: &Message) {
        self.instruments.destination(msg).add(Count::Retried);
    }
}

impl fmt::Debug for RetryCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryCounter").finish_non_exhaustive()
    }
}

/// Give it to the retry layer: `RetryLayer::new(..)?.on_retry(metrics.retry_counter())`.
#[cfg(feature = "retry")]
impl crate::retry::OnRetry for RetryCounter {
    fn on_retry(&self, event: &crate::retry::RetryEvent<'_>) {
        self.record(event.message);
    }
}
