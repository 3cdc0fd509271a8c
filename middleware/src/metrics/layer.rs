//! [`MetricsLayer`], which builds [`Metrics`] services, and the [`RetryCounter`] it hands
//! out.

use std::fmt;
use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use redrive_core::Message;
use tower::Layer;

use super::instruments::{CIRCUIT_DESCRIPTION, CIRCUIT_UNIT, Count, Instruments};
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

    /// Reports the state of the circuit breaker in the same stack as the
    /// `redrive.circuit.state` gauge, for every destination this layer measures; `state`
    /// returns 0 (closed), 1 (half-open) or 2 (open), at once. A
    /// [`Stack`](crate::Stack) does this for its breaker, the default one included; call
    /// it for a stack of your own. A later call replaces the earlier one's `state`.
    ///
    /// ```
    /// # #[cfg(feature = "circuit-breaker")] {
    /// use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    /// use redrive_middleware::metrics::MetricsLayer;
    ///
    /// let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::default()).unwrap();
    /// let metrics = MetricsLayer::new(&opentelemetry::global::meter("orders-consumer"));
    /// let handle = breaker.handle();
    /// metrics.circuit_state(move || handle.state().code());
    /// # }
    /// ```
    pub fn circuit_state(&self, state: impl Fn() -> i64 + Send + Sync + 'static) {
        *self
            .instruments
            .circuit
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(state));
    }

    /// Reports a circuit breaker's state as the `redrive.circuit.state` gauge for
    /// `destination`; `state` returns 0 (closed), 1 (half-open) or 2 (open). For a
    /// breaker outside the stack this layer measures; see
    /// [`circuit_state`](Self::circuit_state) for the one inside.
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
            .with_unit(CIRCUIT_UNIT)
            .with_description(CIRCUIT_DESCRIPTION)
            .with_callback(move |observer| observer.observe(state(), &attrs))
            .build();
    }

    /// Reports a queue's depth and consumers, as the broker tells them, as the gauges
    /// `redrive.queue.depth` and `redrive.queue.consumers` for `destination` (a queue,
    /// its dead-letter queue, …). `read` is called at each collection and must return
    /// at once, from figures a poller keeps (such as the RabbitMQ adapter's
    /// `QueueStats`); when it returns `None` (not read yet, the queue is missing, the
    /// broker is unreachable) nothing is observed, so the series goes stale rather than
    /// report a figure that is not the broker's. A reading without consumers reports
    /// the depth only.
    ///
    /// ```
    /// use redrive_middleware::metrics::{MetricsLayer, QueueReading};
    ///
    /// let metrics = MetricsLayer::new(&opentelemetry::global::meter("orders-consumer"));
    /// metrics.observe_queue("rabbitmq", "orders-dlq", || {
    ///     Some(QueueReading::new(3).with_consumers(0))
    /// });
    /// ```
    pub fn observe_queue(
        &self,
        system: &'static str,
        destination: impl Into<String>,
        read: impl Fn() -> Option<QueueReading> + Send + Sync + 'static,
    ) {
        let attrs: Arc<[KeyValue]> = Arc::new([
            KeyValue::new(ATTR_SYSTEM, system),
            KeyValue::new(ATTR_DESTINATION, destination.into()),
        ]);
        let read = Arc::new(read);
        // The meter provider keeps the callbacks registered for its own lifetime. Each
        // gauge calls `read` once per collection: it only copies figures out.
        let (depth_read, depth_attrs) = (read.clone(), attrs.clone());
        let _depth = self
            .meter
            .u64_observable_gauge("redrive.queue.depth")
            .with_unit("{message}")
            .with_description("Messages ready in the queue, as the broker reports them")
            .with_callback(move |observer| {
                if let Some(reading) = depth_read() {
                    observer.observe(reading.depth, &depth_attrs);
                }
            })
            .build();
        let _consumers = self
            .meter
            .u64_observable_gauge("redrive.queue.consumers")
            .with_unit("{consumer}")
            .with_description("Consumers on the queue, as the broker reports them")
            .with_callback(move |observer| {
                if let Some(consumers) = read().and_then(|r| r.consumers) {
                    observer.observe(consumers, &attrs);
                }
            })
            .build();
    }
}

/// A queue's figures as its broker reports them, for [`MetricsLayer::observe_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueReading {
    /// Messages ready in the queue (`redrive.queue.depth`).
    pub depth: u64,
    /// Consumers on the queue (`redrive.queue.consumers`), where the broker tells.
    pub consumers: Option<u64>,
}

impl QueueReading {
    /// A reading of `depth` messages ready, without a consumer count.
    pub fn new(depth: u64) -> Self {
        QueueReading {
            depth,
            consumers: None,
        }
    }

    /// Sets the number of consumers on the queue.
    #[must_use]
    pub fn with_consumers(mut self, consumers: u64) -> Self {
        self.consumers = Some(consumers);
        self
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
