//! The layers the middleware benches measure, each as the benches configure it, shared
//! by `layers` and `parallel`.

use std::sync::Arc;
use std::time::Duration;

use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Message, Outcome, handler_fn};
use redrive_middleware::Stack;
use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{IdempotencyConfig, IdempotencyLayer, MemoryStore};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::rate_limit::{RateLimitConfig, RateLimitLayer};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;
use redrive_middleware::trace::TraceLayer;
use tower::Service;

/// The no-op handler every row wraps.
pub(crate) type Handler =
    redrive_core::handler::HandlerFn<fn(Message) -> std::future::Ready<Result<(), BoxError>>>;

pub(crate) fn noop() -> Handler {
    handler_fn(|_m: Message| std::future::ready(Ok(())))
}

/// The message every call copies; the benches give each copy its own message id, so
/// idempotency sees a new key every time.
pub(crate) fn message() -> Message {
    let mut m = Message::new(&b"{\"id\":1}"[..]);
    m.metadata.source.system = "memory";
    m.metadata.source.destination = "bench".into();
    m
}

/// What the layers share: the dead-letter broker, the idempotency store and the meter.
pub(crate) struct Layers {
    broker: Arc<MemoryBroker>,
    store: Arc<MemoryStore>,
    meter: opentelemetry::metrics::Meter,
}

impl Layers {
    pub(crate) fn new() -> Self {
        use opentelemetry::metrics::MeterProvider as _;
        // Instruments aggregate as in production; the exporter keeps what it is given.
        let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
            .with_periodic_exporter(opentelemetry_sdk::metrics::InMemoryMetricExporter::default())
            .build();
        let meter = provider.meter("bench");
        // The provider lives for the whole bench process.
        std::mem::forget(provider);
        Layers {
            broker: Arc::new(MemoryBroker::new()),
            store: Arc::new(MemoryStore::new()),
            meter,
        }
    }

    /// With the feature `metrics-bound`, with bound histograms.
    pub(crate) fn metrics(&self) -> MetricsLayer {
        let layer = MetricsLayer::new(&self.meter);
        #[cfg(feature = "metrics-bound")]
        let layer = layer.with_bound_histograms();
        layer
    }

    pub(crate) fn dead_letter(&self) -> DeadLetterLayer<MemoryBroker> {
        DeadLetterLayer::new(self.broker.clone(), DeadLetterConfig::default()).expect("config")
    }

    /// Keys expire after 1 ms, so the store stays small however long the bench runs.
    pub(crate) fn idempotency(&self) -> IdempotencyLayer<MemoryStore> {
        IdempotencyLayer::new(
            self.store.clone(),
            IdempotencyConfig::default().with_ttl(Duration::from_millis(1)),
        )
        .expect("config")
    }

    pub(crate) fn circuit_breaker(&self) -> CircuitBreakerLayer {
        CircuitBreakerLayer::new(CircuitBreakerConfig::default()).expect("config")
    }

    /// A limit far above what the benches reach: the cost of asking, not of waiting.
    pub(crate) fn rate_limit(&self) -> RateLimitLayer {
        RateLimitLayer::new(RateLimitConfig::per_second(1_000_000_000)).expect("config")
    }

    pub(crate) fn retry(&self) -> RetryLayer {
        RetryLayer::new(RetryConfig::default()).expect("config")
    }

    pub(crate) fn timeout(&self) -> TimeoutLayer {
        TimeoutLayer::new(Duration::from_secs(30)).expect("config")
    }

    /// All eight, in the Stack's order, around the no-op handler.
    pub(crate) fn full_stack(
        &self,
    ) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send> + Clone + Send + 'static
    {
        Stack::new()
            .trace(TraceLayer::new())
            .metrics(self.metrics())
            .dead_letter_layer(self.dead_letter())
            .idempotency_layer(self.idempotency())
            .circuit_breaker(self.circuit_breaker())
            .rate_limit(self.rate_limit())
            .retry(self.retry())
            .timeout(self.timeout())
            .service(noop())
    }
}
