//! Throughput of the Worker over the in-memory broker with a no-op handler.
//!
//! `cargo bench -p redrive-core --bench worker` reports messages per second for each
//! ordering mode and execution mode. Publishing is set up outside the timed part.
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redrive_core::memory::MemoryBroker;
use redrive_core::{
    BoxError, Execution, Message, OrderingMode, OutgoingMessage, Publisher, Worker, handler_fn,
};

const N: usize = 20_000;

async fn run(mode: OrderingMode, execution: Execution, concurrency: usize) -> Duration {
    let broker = MemoryBroker::new();
    for i in 0..N {
        let msg = OutgoingMessage::new(&b"{}"[..]).with_key(format!("k{}", i % 64));
        broker.publish("bench", msg).await.expect("publish");
    }
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let b = broker.clone();
    let drained = async move {
        while b.depth("bench") + b.in_flight("bench") > 0 {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    };
    let start = std::time::Instant::now();
    let report = Worker::builder(broker.consumer("bench"))
        .service(handler)
        .concurrency(concurrency)
        .ordering(mode)
        .execution(execution)
        .build()
        .expect("config")
        .run_until(drained)
        .await;
    let took = start.elapsed();
    assert_eq!(report.processed as usize, N);
    took
}

fn worker(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("worker_memory_noop");
    group.throughput(Throughput::Elements(N as u64));
    group.sample_size(10);
    for (name, mode, execution) in [
        ("unordered", OrderingMode::Unordered, Execution::Spawned),
        ("per_key", OrderingMode::PerKey, Execution::Spawned),
        (
            "unordered_in_task",
            OrderingMode::Unordered,
            Execution::InTask,
        ),
        ("per_key_in_task", OrderingMode::PerKey, Execution::InTask),
    ] {
        group.bench_with_input(BenchmarkId::new(name, 32), &mode, |bench, &mode| {
            bench.to_async(&rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += run(mode, execution, 32).await;
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group!(benches, worker);
criterion_main!(benches);
