//! [`MetricsLayer`], which builds [`Metrics`] services, and the [`RetryCounter`] it hands
//! out.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use redrive_core::Message;
use tower::Layer;

use super::instruments::{CIRCUIT_DESCRIPTION, CIRCUIT_UNIT, Count, Instruments};
use super::{ATTR_CONSUMER_GROUP, ATTR_DESTINATION, ATTR_PARTITION, ATTR_SYSTEM, Metrics};

/// Builds [`Metrics`] services; clones share the instruments.
#[derive(Clone)]
pub struct MetricsLayer {
    pub(super) meter: Meter,
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

    /// Reports a queue's figures, as its broker tells them, as gauges for `destination`
    /// (a queue, its dead-letter queue, …): `redrive.queue.depth` always, and
    /// `redrive.queue.consumers`, `redrive.queue.in_flight` and `redrive.queue.delayed`
    /// when the reading has them (RabbitMQ tells consumers; SQS tells messages in flight
    /// and delayed). `read` is called at each collection and must return at once, from
    /// figures a poller keeps (such as the RabbitMQ or SQS adapter's `QueueStats`); when
    /// it returns `None` (not read yet, the queue is missing, the broker is unreachable)
    /// nothing is observed, so the series goes stale rather than report a figure that is
    /// not the broker's.
    ///
    /// ```
    /// use redrive_middleware::metrics::{MetricsLayer, QueueReading};
    ///
    /// let metrics = MetricsLayer::new(&opentelemetry::global::meter("orders-consumer"));
    /// metrics.observe_queue("rabbitmq", "orders-dlq", || {
    ///     Some(QueueReading::new(3).with_consumers(0))
    /// });
    /// metrics.observe_queue("aws_sqs", "payments", || {
    ///     Some(QueueReading::new(12).with_in_flight(4).with_delayed(1))
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
        let gauges: [QueueGauge; 4] = [
            (
                "redrive.queue.depth",
                "{message}",
                "Messages ready in the queue, as the broker reports them",
                |r| Some(r.depth),
            ),
            (
                "redrive.queue.consumers",
                "{consumer}",
                "Consumers on the queue, as the broker reports them",
                |r| r.consumers,
            ),
            (
                "redrive.queue.in_flight",
                "{message}",
                "Messages received and not yet settled, as the broker reports them",
                |r| r.in_flight,
            ),
            (
                "redrive.queue.delayed",
                "{message}",
                "Messages sent with a delay and not yet visible, as the broker reports them",
                |r| r.delayed,
            ),
        ];
        for (name, unit, description, figure) in gauges {
            let (read, attrs) = (read.clone(), attrs.clone());
            let _gauge = self
                .meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| {
                    if let Some(value) = read().as_ref().and_then(figure) {
                        observer.observe(value, &attrs);
                    }
                })
                .build();
        }
    }

    /// Reports a topic's partitions for consumer group `group` as gauges:
    /// `redrive.consumer.lag` (records the group has not committed yet) and
    /// `redrive.consumer.oldest_incomplete_age` (seconds since this process received the
    /// oldest record it has not finished), each with `messaging.system`,
    /// `messaging.destination.name` (`destination`, the topic),
    /// `messaging.destination.partition.id` and `messaging.consumer.group.name`, and each
    /// only for the partitions whose reading has that figure. `read` is called at each
    /// collection and must return at once, from figures a poller keeps (such as the
    /// Kafka adapter's `ConsumerLag`, or its consumer's open records); a partition
    /// missing from what it returns is not observed, so its series goes stale. Call it
    /// once per source of figures (the lag from a poller, the ages from the consumer):
    /// each call observes only the figures its readings have.
    ///
    /// ```
    /// use std::time::Duration;
    /// use redrive_middleware::metrics::{MetricsLayer, PartitionReading};
    ///
    /// let metrics = MetricsLayer::new(&opentelemetry::global::meter("billing"));
    /// metrics.observe_partitions("kafka", "orders", "billing", || {
    ///     vec![
    ///         PartitionReading::new(0).with_lag(120),
    ///         PartitionReading::new(1)
    ///             .with_lag(0)
    ///             .with_oldest_incomplete_age(Duration::from_secs(2)),
    ///     ]
    /// });
    /// ```
    pub fn observe_partitions(
        &self,
        system: &'static str,
        destination: impl Into<String>,
        group: impl Into<String>,
        read: impl Fn() -> Vec<PartitionReading> + Send + Sync + 'static,
    ) {
        let destination: Arc<str> = destination.into().into();
        let group: Arc<str> = group.into().into();
        let attrs = move |partition: i32| {
            [
                KeyValue::new(ATTR_SYSTEM, system),
                KeyValue::new(ATTR_DESTINATION, destination.clone()),
                KeyValue::new(ATTR_PARTITION, partition.to_string()),
                KeyValue::new(ATTR_CONSUMER_GROUP, group.clone()),
            ]
        };
        let read = Arc::new(read);
        let (lag_read, lag_attrs) = (read.clone(), attrs.clone());
        let _lag = self
            .meter
            .u64_observable_gauge("redrive.consumer.lag")
            .with_unit("{message}")
            .with_description(
                "Records in the partition the consumer group has not committed, as the broker reports them",
            )
            .with_callback(move |observer| {
                for r in lag_read() {
                    if let Some(lag) = r.lag {
                        observer.observe(lag, &lag_attrs(r.partition));
                    }
                }
            })
            .build();
        let _age = self
            .meter
            .f64_observable_gauge("redrive.consumer.oldest_incomplete_age")
            .with_unit("s")
            .with_description(
                "Time since the oldest record this consumer has not finished was received",
            )
            .with_callback(move |observer| {
                for r in read() {
                    if let Some(age) = r.oldest_incomplete_age {
                        observer.observe(age.as_secs_f64(), &attrs(r.partition));
                    }
                }
            })
            .build();
    }
}

/// A gauge of [`MetricsLayer::observe_queue`]: name, unit, description, and the figure
/// of a reading it reports.
type QueueGauge = (
    &'static str,
    &'static str,
    &'static str,
    fn(&QueueReading) -> Option<u64>,
);

/// A queue's figures as its broker reports them, for [`MetricsLayer::observe_queue`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueReading {
    /// Messages ready in the queue (`redrive.queue.depth`).
    pub depth: u64,
    /// Consumers on the queue (`redrive.queue.consumers`), where the broker tells.
    pub consumers: Option<u64>,
    /// Messages received and not yet settled (`redrive.queue.in_flight`), where the
    /// broker tells (SQS: `ApproximateNumberOfMessagesNotVisible`).
    pub in_flight: Option<u64>,
    /// Messages sent with a delay and not yet ready (`redrive.queue.delayed`), where the
    /// broker tells (SQS: `ApproximateNumberOfMessagesDelayed`).
    pub delayed: Option<u64>,
}

impl QueueReading {
    /// A reading of `depth` messages ready, without the other figures.
    pub fn new(depth: u64) -> Self {
        QueueReading {
            depth,
            consumers: None,
            in_flight: None,
            delayed: None,
        }
    }

    /// Sets the number of consumers on the queue.
    #[must_use]
    pub fn with_consumers(mut self, consumers: u64) -> Self {
        self.consumers = Some(consumers);
        self
    }

    /// Sets the number of messages received and not yet settled.
    #[must_use]
    pub fn with_in_flight(mut self, in_flight: u64) -> Self {
        self.in_flight = Some(in_flight);
        self
    }

    /// Sets the number of messages sent with a delay and not yet ready.
    #[must_use]
    pub fn with_delayed(mut self, delayed: u64) -> Self {
        self.delayed = Some(delayed);
        self
    }
}

/// One partition's figures, for [`MetricsLayer::observe_partitions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionReading {
    /// The partition.
    pub partition: i32,
    /// Records after the group's committed offset (`redrive.consumer.lag`), where known.
    pub lag: Option<u64>,
    /// How long ago this consumer received the oldest record of the partition it has not
    /// finished (`redrive.consumer.oldest_incomplete_age`), where this consumer owns the
    /// partition.
    pub oldest_incomplete_age: Option<Duration>,
}

impl PartitionReading {
    /// A reading of `partition` without figures yet.
    pub fn new(partition: i32) -> Self {
        PartitionReading {
            partition,
            lag: None,
            oldest_incomplete_age: None,
        }
    }

    /// Sets the group's lag on the partition.
    #[must_use]
    pub fn with_lag(mut self, lag: u64) -> Self {
        self.lag = Some(lag);
        self
    }

    /// Sets the age of the oldest record of the partition this consumer has not finished.
    #[must_use]
    pub fn with_oldest_incomplete_age(mut self, age: Duration) -> Self {
        self.oldest_incomplete_age = Some(age);
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
