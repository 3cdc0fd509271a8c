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

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use redrive_core::{Message, Outcome};
use redrive_middleware::trace::TraceLayer;
use tower::{Layer, Service, ServiceExt};

mod common;
use common::{Layers, message, noop};

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

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("layer_overhead_per_message");
    let layers = Layers::new();

    let mut bare = noop();
    group.bench_function("bare", |b| b.iter_custom(|n| measure(&rt, &mut bare, n)));
    let mut trace = TraceLayer::new().layer(noop());
    group.bench_function("trace", |b| b.iter_custom(|n| measure(&rt, &mut trace, n)));
    let mut metrics = layers.metrics().layer(noop());
    group.bench_function("metrics", |b| {
        b.iter_custom(|n| measure(&rt, &mut metrics, n))
    });
    let mut dead_letter = layers.dead_letter().layer(noop());
    group.bench_function("dead_letter", |b| {
        b.iter_custom(|n| measure(&rt, &mut dead_letter, n))
    });
    let mut idempotency = layers.idempotency().layer(noop());
    group.bench_function("idempotency_memory", |b| {
        b.iter_custom(|n| measure(&rt, &mut idempotency, n))
    });
    let mut cb = layers.circuit_breaker().layer(noop());
    group.bench_function("circuit_breaker", |b| {
        b.iter_custom(|n| measure(&rt, &mut cb, n))
    });
    let mut rl = layers.rate_limit().layer(noop());
    group.bench_function("rate_limit", |b| {
        b.iter_custom(|n| measure(&rt, &mut rl, n))
    });
    let mut re = layers.retry().layer(noop());
    group.bench_function("retry", |b| b.iter_custom(|n| measure(&rt, &mut re, n)));
    let mut to = layers.timeout().layer(noop());
    group.bench_function("timeout", |b| b.iter_custom(|n| measure(&rt, &mut to, n)));
    let mut full = layers.full_stack();
    group.bench_function("full_stack", |b| {
        b.iter_custom(|n| measure(&rt, &mut full, n))
    });
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
