//! Overhead per message of each layer alone and of the full stack, against a bare
//! no-op handler, on the success path.
//!
//! `cargo bench -p redrive-middleware --bench layers`; each benchmark's time is one
//! message (`ready` + `call` + awaiting the response), including the same message
//! clone the bare handler pays for. Subtract `bare` to get a layer's overhead. With
//! `--features metrics-bound`, the metrics layer binds its histograms
//! (`MetricsLayer::with_bound_histograms`).
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
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
use tower::{Layer, Service, ServiceExt};

type Handler =
    redrive_core::handler::HandlerFn<fn(Message) -> std::future::Ready<Result<(), BoxError>>>;

fn noop() -> Handler {
    handler_fn(|_m: Message| std::future::ready(Ok(())))
}

fn message() -> Message {
    let mut m = Message::new(&b"{\"id\":1}"[..]);
    m.metadata.source.system = "memory";
    m.metadata.source.destination = "bench".into();
    m
}

/// Times `iters` messages through `svc`; each gets a fresh message id (so idempotency
/// sees a new key every time).
fn measure<S>(rt: &tokio::runtime::Runtime, svc: &mut S, iters: u64) -> Duration
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: std::fmt::Debug,
{
    let base = message();
    rt.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            let mut m = base.clone();
            m.metadata.message_id = Some(i.to_string().into());
            let svc = svc.ready().await.expect("ready");
            let out = svc.call(m).await.expect("call").into();
            debug_assert_eq!(out, Outcome::Processed);
        }
        start.elapsed()
    })
}

fn meter() -> opentelemetry::metrics::Meter {
    use opentelemetry::metrics::MeterProvider as _;
    let reader = opentelemetry_sdk::metrics::InMemoryMetricExporter::default();
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(reader)
        .build();
    let meter = provider.meter("bench");
    // Keep the provider alive for the process.
    std::mem::forget(provider);
    meter
}

/// The metrics layer; with the feature `metrics-bound`, with bound histograms.
fn metrics_layer(meter: &opentelemetry::metrics::Meter) -> MetricsLayer {
    let layer = MetricsLayer::new(meter);
    #[cfg(feature = "metrics-bound")]
    let layer = layer.with_bound_histograms();
    layer
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("layer_overhead_per_message");
    let broker = Arc::new(MemoryBroker::new());
    let store = Arc::new(MemoryStore::new());
    let idem = || {
        IdempotencyLayer::new(
            store.clone(),
            IdempotencyConfig::default().with_ttl(Duration::from_millis(1)),
        )
        .expect("config")
    };
    let dlq = || DeadLetterLayer::new(broker.clone(), DeadLetterConfig::default()).expect("config");
    let meter = meter();

    let mut bare = noop();
    group.bench_function("bare", |b| b.iter_custom(|n| measure(&rt, &mut bare, n)));
    let mut trace = TraceLayer::new().layer(noop());
    group.bench_function("trace", |b| b.iter_custom(|n| measure(&rt, &mut trace, n)));
    let mut metrics = metrics_layer(&meter).layer(noop());
    group.bench_function("metrics", |b| {
        b.iter_custom(|n| measure(&rt, &mut metrics, n))
    });
    let mut dead_letter = dlq().layer(noop());
    group.bench_function("dead_letter", |b| {
        b.iter_custom(|n| measure(&rt, &mut dead_letter, n))
    });
    let mut idempotency = idem().layer(noop());
    group.bench_function("idempotency_memory", |b| {
        b.iter_custom(|n| measure(&rt, &mut idempotency, n))
    });
    let breaker = || CircuitBreakerLayer::new(CircuitBreakerConfig::default()).expect("config");
    // A limit far above what the bench reaches: the cost of asking, not of waiting.
    let limit = || RateLimitLayer::new(RateLimitConfig::per_second(1_000_000_000)).expect("config");
    let retry = || RetryLayer::new(RetryConfig::default()).expect("config");
    let timeout = || TimeoutLayer::new(Duration::from_secs(30)).expect("config");
    let mut cb = breaker().layer(noop());
    group.bench_function("circuit_breaker", |b| {
        b.iter_custom(|n| measure(&rt, &mut cb, n))
    });
    let mut rl = limit().layer(noop());
    group.bench_function("rate_limit", |b| {
        b.iter_custom(|n| measure(&rt, &mut rl, n))
    });
    let mut re = retry().layer(noop());
    group.bench_function("retry", |b| b.iter_custom(|n| measure(&rt, &mut re, n)));
    let mut to = timeout().layer(noop());
    group.bench_function("timeout", |b| b.iter_custom(|n| measure(&rt, &mut to, n)));
    let mut full = Stack::new()
        .trace(TraceLayer::new())
        .metrics(metrics_layer(&meter))
        .dead_letter(dlq())
        .idempotency(idem())
        .circuit_breaker(breaker())
        .rate_limit(limit())
        .retry(retry())
        .timeout(timeout())
        .service(noop());
    group.bench_function("full_stack", |b| {
        b.iter_custom(|n| measure(&rt, &mut full, n))
    });
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
