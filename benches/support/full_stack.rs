//! The full middleware Stack the adapter benches measure, shared by them through
//! `#[path]`: trace, metrics into an SDK meter provider, dead letter, idempotency (with
//! the in-memory store, or the store given), circuit breaker, a rate limit far above any
//! rate reached, retry and timeout, around `handler`.

use std::sync::Arc;
use std::time::Duration;

use redrive_core::{BoxError, Message, Outcome, Publisher};
use redrive_middleware::Stack;
use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
use redrive_middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::idempotency::{
    IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore,
};
use redrive_middleware::metrics::MetricsLayer;
use redrive_middleware::rate_limit::{RateLimitConfig, RateLimitLayer};
use redrive_middleware::retry::{RetryConfig, RetryLayer};
use redrive_middleware::timeout::TimeoutLayer;
use redrive_middleware::trace::TraceLayer;
use tower::Service;

/// The full Stack around `handler`, dead-lettering through `dead_letters`.
#[allow(dead_code, reason = "each bench uses one of the two")]
pub(crate) fn full_stack<P, S>(
    dead_letters: P,
    handler: S,
) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send + 'static> + Send + 'static
where
    P: Publisher,
    S: Service<Message, Response = Outcome, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    full_stack_on(dead_letters, Arc::new(MemoryStore::new()), handler)
}

/// The full Stack around `handler`, with `store` as the idempotency store.
pub(crate) fn full_stack_on<P, St, S>(
    dead_letters: P,
    store: Arc<St>,
    handler: S,
) -> impl Service<Message, Response = Outcome, Error = BoxError, Future: Send + 'static> + Send + 'static
where
    P: Publisher,
    St: IdempotencyStore + ?Sized + 'static,
    S: Service<Message, Response = Outcome, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    use opentelemetry::metrics::MeterProvider as _;
    // Instruments aggregate as in production; the exporter keeps what it is given.
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(opentelemetry_sdk::metrics::InMemoryMetricExporter::default())
        .build();
    let meter = provider.meter("redrive-bench");
    // The provider lives for the whole bench process.
    std::mem::forget(provider);
    Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&meter))
        .dead_letter_layer(
            DeadLetterLayer::new(Arc::new(dead_letters), DeadLetterConfig::default())
                .expect("dead-letter config"),
        )
        .idempotency_layer(
            IdempotencyLayer::new(store, IdempotencyConfig::default()).expect("idempotency config"),
        )
        .circuit_breaker(
            CircuitBreakerLayer::new(CircuitBreakerConfig::default()).expect("breaker config"),
        )
        .rate_limit(
            RateLimitLayer::new(RateLimitConfig::per_second(1_000_000_000))
                .expect("rate limit config"),
        )
        .retry(RetryLayer::new(RetryConfig::default()).expect("retry config"))
        .timeout(TimeoutLayer::new(Duration::from_secs(30)).expect("timeout config"))
        .service(handler)
}
