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
//! down when calls run in parallel. Last, the time a cache line takes to go between two
//! cores and back, read before the runs: the ratios grow with it (on one virtual
//! machine, the full Stack's went from 1.2× to 2.8× as that time went from about 100 ns
//! to about 420 ns).

use std::fmt::Debug;
use std::time::Instant;

use redrive_core::Message;
use redrive_middleware::trace::TraceLayer;
use tower::{Layer, Service, ServiceExt};

mod common;
use common::{Layers, message, noop};

#[path = "../../benches/support/cores.rs"]
mod cores;

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
                    let base = message();
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
    let n = env("BENCH_N", 200_000);
    let threads = env("BENCH_THREADS", 2);
    let layers = Layers::new();
    // How far apart the cores are decides much of what sharing costs: see
    // benches/support/cores.rs.
    let round_trip_before = cores::describe_core_round_trip();
    println!("{n} messages per thread, on the success path around a no-op handler");
    println!(
        "| service | 1 thread, ns/message | {threads} threads, ns/message per thread | {threads} threads vs 1 |"
    );
    println!("|---|---:|---:|---:|");
    row("bare handler", noop(), threads, n);
    row("trace", TraceLayer::new().layer(noop()), threads, n);
    row("metrics", layers.metrics().layer(noop()), threads, n);
    row(
        "dead_letter",
        layers.dead_letter().layer(noop()),
        threads,
        n,
    );
    row(
        "idempotency (memory)",
        layers.idempotency().layer(noop()),
        threads,
        n,
    );
    row(
        "circuit_breaker",
        layers.circuit_breaker().layer(noop()),
        threads,
        n,
    );
    row("rate_limit", layers.rate_limit().layer(noop()), threads, n);
    row("retry", layers.retry().layer(noop()), threads, n);
    row("timeout", layers.timeout().layer(noop()), threads, n);
    row("full Stack", layers.full_stack(), threads, n);
    println!(
        "cross-core round trip, read before the runs (see benches/support/cores.rs): \
         {round_trip_before}"
    );
}
