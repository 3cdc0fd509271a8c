//! What each layer costs per message when several threads call it at once, against one
//! thread alone: the shared state a layer touches per message (counters, locks,
//! reference counts) moves between cores and slows every call.
//!
//! ```text
//! cargo bench -p redrive-middleware --bench parallel
//! BENCH_N=500000 BENCH_THREADS=4 cargo bench -p redrive-middleware --bench parallel
//! ```
//!
//! Each thread runs its own current-thread runtime and calls its own clone of one
//! service (so the clones share the layer's state, as the calls of one Worker do),
//! `BENCH_N` messages (default 200,000) on the success path around a no-op handler.
//! Prints wall-clock nanoseconds per message per thread with one thread and with
//! `BENCH_THREADS` (default 2), and their ratio: 1.0× is a layer that does not slow
//! down when calls run in parallel.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Message, handler_fn};
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

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Nanoseconds per message per thread, `n` messages on each of `threads` threads.
fn per_message<S>(svc: &S, threads: usize, n: usize) -> f64
where
    S: Service<Message> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let start = Instant::now();
    let running: Vec<_> = (0..threads)
        .map(|thread| {
            let mut svc = svc.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let mut base = Message::new(&b"{\"id\":1}"[..]);
                    base.metadata.source.system = "memory";
                    base.metadata.source.destination = "bench".into();
                    for i in 0..n {
                        let mut m = base.clone();
                        // A fresh idempotency key per message and thread.
                        m.metadata.message_id = Some(format!("{thread}-{i}").into());
                        let ready = svc.ready().await.expect("ready");
                        ready.call(m).await.expect("call");
                    }
                });
            })
        })
        .collect();
    for thread in running {
        thread.join().expect("bench thread");
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn row<S>(name: &str, svc: S, threads: usize, n: usize)
where
    S: Service<Message> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
{
    let alone = per_message(&svc, 1, n);
    let together = per_message(&svc, threads, n);
    println!(
        "| {name} | {alone:.0} | {together:.0} | {:.1}× |",
        together / alone
    );
}

fn main() {
    use opentelemetry::metrics::MeterProvider as _;
    let n = env("BENCH_N", 200_000);
    let threads = env("BENCH_THREADS", 2);
    // Instruments aggregate as in production; the exporter keeps what it is given.
    let provider = opentelemetry_sdk::metrics::SdkMeterProvider::builder()
        .with_periodic_exporter(opentelemetry_sdk::metrics::InMemoryMetricExporter::default())
        .build();
    let meter = provider.meter("bench");
    let broker = Arc::new(MemoryBroker::new());
    let store = Arc::new(MemoryStore::new());
    let idempotency = || {
        IdempotencyLayer::new(
            store.clone(),
            IdempotencyConfig::default().with_ttl(Duration::from_millis(1)),
        )
        .expect("config")
    };
    let dead_letter =
        || DeadLetterLayer::new(broker.clone(), DeadLetterConfig::default()).expect("config");
    let breaker = || CircuitBreakerLayer::new(CircuitBreakerConfig::default()).expect("config");
    // A limit far above what the bench reaches: the cost of asking, not of waiting.
    let limit = || RateLimitLayer::new(RateLimitConfig::per_second(1_000_000_000)).expect("config");
    let retry = || RetryLayer::new(RetryConfig::default()).expect("config");
    let timeout = || TimeoutLayer::new(Duration::from_secs(30)).expect("config");

    println!("{n} messages per thread, on the success path around a no-op handler");
    println!(
        "| service | 1 thread, ns/message | {threads} threads, ns/message per thread | {threads} threads vs 1 |"
    );
    println!("|---|---:|---:|---:|");
    row("bare handler", noop(), threads, n);
    row("trace", TraceLayer::new().layer(noop()), threads, n);
    row(
        "metrics",
        MetricsLayer::new(&meter).layer(noop()),
        threads,
        n,
    );
    row("dead_letter", dead_letter().layer(noop()), threads, n);
    row(
        "idempotency (memory)",
        idempotency().layer(noop()),
        threads,
        n,
    );
    row("circuit_breaker", breaker().layer(noop()), threads, n);
    row("rate_limit", limit().layer(noop()), threads, n);
    row("retry", retry().layer(noop()), threads, n);
    row("timeout", timeout().layer(noop()), threads, n);
    let full = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&meter))
        .dead_letter(dead_letter())
        .idempotency(idempotency())
        .circuit_breaker(breaker())
        .rate_limit(limit())
        .retry(retry())
        .timeout(timeout())
        .service(noop());
    row("full Stack", full, threads, n);
}
