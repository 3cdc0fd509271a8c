//! Consumes the same N small messages, with the same prefetch, with a bare lapin consumer
//! and with redrive's Worker over the adapter, and prints both rates and their ratio.
//!
//! ```text
//! cargo bench -p redrive-rabbitmq --bench throughput
//! BENCH_N=200000 BENCH_PREFETCH=500 AMQP_URL=amqp://… cargo bench -p redrive-rabbitmq --bench throughput
//! BENCH_ROUNDS=5 BENCH_ONLY="full Stack" cargo bench -p redrive-rabbitmq --bench throughput
//! ```
//!
//! Two bare lapin consumers set the pace. The first acks each delivery with its own
//! `basic.ack`, as a consumer written straight on lapin does. The second is hand-tuned
//! for this bench: it acks once per 64 deliveries with `basic.ack(multiple)`, which only
//! a consumer that handles deliveries in order and never fails one can do. redrive
//! coalesces acks too, safely for any completion order (see the crate docs).
//!
//! Each run is timed until its last ack is written: the bare consumer's channel close and
//! the Worker's shutdown (and its connection's close) come after and are not counted.
//!
//! The broker runs on the same machine and its pace drifts from run to run, so the bench
//! runs `BENCH_ROUNDS` rounds (3 by default), each the bare runs and then every redrive
//! row, and prints each row's ratio to the bare runs of the same round, and the medians.
//!
//! Each row prints how many deliveries one ack frame settled on average, and the CPU
//! time spent per message, by this process and by the whole machine (the broker
//! included): on a machine this small the rate is bounded by CPU, so the time a row
//! costs shows where its rate went.
//!
//! The redrive side runs the full middleware Stack (trace, metrics into an SDK meter
//! provider, dead letter, idempotency with the in-memory store, circuit breaker, rate
//! limit far above the rate reached, retry, timeout) around a no-op handler. Every
//! message carries a message id, so the idempotency layer reserves and commits a key
//! for each.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redrive_core::{BoxError, Execution, Message, Worker, handler_fn};
use redrive_rabbitmq::lapin::Connection;
use redrive_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions,
};
use redrive_rabbitmq::lapin::types::FieldTable;
use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};
use tokio::sync::Notify;
use tower::util::BoxService;

#[path = "../../../benches/support/cores.rs"]
mod cores;
#[path = "../../../benches/support/cpu.rs"]
mod cpu;
#[path = "support/fill.rs"]
mod fill;
#[path = "../../../benches/support/rounds.rs"]
mod rounds;
#[path = "../../../benches/support/full_stack.rs"]
mod support;
use cpu::{CpuTimes, CpuUsed};
use fill::fill;
use rounds::{median, per_round, ratios};
use support::full_stack;

type AckFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = redrive_rabbitmq::lapin::Result<bool>> + Send>,
>;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One row of the table.
#[derive(Clone, Copy)]
enum Row {
    Bare(BareAcks),
    /// The Worker, with the full Stack or not, in an execution mode.
    Redrive(bool, Execution),
}

/// How the bare lapin consumer acks.
#[derive(Clone, Copy)]
enum BareAcks {
    /// Each delivery with its own `basic.ack`, concurrently: what a consumer written
    /// straight on lapin does.
    EachConcurrently,
    /// One `basic.ack(multiple)` per 64 deliveries, in order: a consumer hand-tuned for
    /// this bench (it handles deliveries in order and never fails one).
    MultiplePer64,
}

/// Consumes `n` messages; returns the time until the last ack completed and how many
/// deliveries an ack frame settled on average.
async fn bare_lapin(
    conn: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
    acks: BareAcks,
) -> (Duration, f64) {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue,
            "bench-bare",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Acks run concurrently (up to the prefetch), as the Worker's do.
    let start = Instant::now();
    let mut pending: FuturesUnordered<AckFuture> = FuturesUnordered::new();
    let mut got = 0;
    let mut frames = 0usize;
    while got < n {
        tokio::select! {
            Some(r) = pending.next(), if !pending.is_empty() => {
                r.expect("ack");
            }
            d = consumer.next() => {
                let d = d.expect("stream open").expect("delivery");
                got += 1;
                match acks {
                    BareAcks::EachConcurrently => pending.push(Box::pin(async move {
                        d.acker.ack(BasicAckOptions::default()).await
                    })),
                    BareAcks::MultiplePer64 if got % 64 == 0 || got == n => {
                        let ch = ch.clone();
                        pending.push(Box::pin(async move {
                            ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                                .await
                                .map(|()| true)
                        }));
                    }
                    BareAcks::MultiplePer64 => continue,
                }
                frames += 1;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("ack");
    }
    let took = start.elapsed();
    drop(consumer);
    let _ = ch.close(200, "done").await;
    (took, n as f64 / frames.max(1) as f64)
}

async fn redrive(
    url: &str,
    queue: &str,
    n: usize,
    prefetch: u16,
    full: bool,
    execution: Execution,
) -> (Duration, f64) {
    let consumer = RabbitConsumer::builder(url, Topology::new(queue).with_kind(QueueKind::Classic))
        .connection_name("redrive-bench")
        .prefetch(prefetch)
        .connect()
        .await
        .expect("consumer");
    let monitor = consumer.monitor();
    let dead_letters = RabbitPublisher::connect(url).await.expect("publisher");
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let counted = tower::ServiceBuilder::new()
        .map_request(move |m: Message| {
            if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            m
        })
        .service(if full {
            BoxService::new(full_stack(
                dead_letters,
                handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }),
            ))
        } else {
            BoxService::new(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }))
        });
    let worker = Worker::builder(consumer)
        .service(counted)
        .concurrency(usize::from(prefetch))
        .execution(execution)
        .build()
        .expect("worker");
    let start = Instant::now();
    // Counted until the last ack is written, as the bare consumer counts until its last
    // ack completes; the Worker's shutdown and the connection's close come after.
    let ended = Arc::new(std::sync::OnceLock::new());
    let (end, acked) = (ended.clone(), monitor.clone());
    let all_acked = async move {
        done.notified().await;
        while acked.settled() < n as u64 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        end.get_or_init(Instant::now);
    };
    // On the runtime, as an application runs it, not on the bench's main thread.
    let report = tokio::spawn(worker.run_until(all_acked))
        .await
        .expect("worker task");
    let took = *ended.get().expect("every message acked") - start;
    assert!(report.acked as usize >= n, "{report:?}");
    let acks_per_frame = monitor.settled() as f64 / monitor.settle_frames().max(1) as f64;
    (took, acks_per_frame)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env("BENCH_THREADS", 2))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let url =
            std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.into());
        let n = env("BENCH_N", 100_000);
        let prefetch = u16::try_from(env("BENCH_PREFETCH", 256)).expect("prefetch fits u16");
        let conn = redrive_rabbitmq::connect(&url, "redrive-bench-setup")
            .await
            .unwrap_or_else(|e| panic!("start RabbitMQ with `rabbitmq-server -detached`: {e}"));
        let queue = redrive_core::testkit::unique_name("redrive-bench");
        Topology::new(&queue).declare(&conn).await.expect("declare");

        let rounds = env("BENCH_ROUNDS", 3).max(1);
        let rows = [
            (
                "bare lapin (each delivery acked, concurrently)",
                Row::Bare(BareAcks::EachConcurrently),
            ),
            (
                "bare lapin, hand-tuned (one multiple ack per 64)",
                Row::Bare(BareAcks::MultiplePer64),
            ),
            (
                "redrive Worker (spawned) + no-op handler",
                Row::Redrive(false, Execution::Spawned),
            ),
            (
                "redrive Worker (in task) + no-op handler",
                Row::Redrive(false, Execution::InTask),
            ),
            (
                "redrive Worker (spawned) + full Stack + no-op handler",
                Row::Redrive(true, Execution::Spawned),
            ),
            (
                "redrive Worker (in task) + full Stack + no-op handler",
                Row::Redrive(true, Execution::InTask),
            ),
        ];
        // BENCH_ONLY=<text> runs only the rows whose name holds the text (and the two
        // bare rows).
        let only = std::env::var("BENCH_ONLY").ok();
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|(what, run)| {
                matches!(run, Row::Bare(_))
                    || only.as_deref().is_none_or(|only| what.contains(only))
            })
            .collect();
        // Each round runs every row once, bare first, so a row is compared with the bare
        // run of its own round: the broker shares this machine, and its speed drifts.
        let round_trip_before = cores::describe_core_round_trip();
        let mut results: Vec<Vec<(Duration, CpuUsed)>> = vec![Vec::new(); rows.len()];
        let mut acks_per_frame_of: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
        for round in 1..=rounds {
            eprintln!("round {round} of {rounds}");
            for (i, (_, run)) in rows.iter().enumerate() {
                fill(&conn, &queue, n, |i| format!("m{i}")).await;
                // Lets the broker finish with the fill (its writes, its collections)
                // before the clock starts.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let cpu = CpuTimes::now();
                let (took, acks_per_frame) = match *run {
                    Row::Bare(acks) => bare_lapin(&conn, &queue, n, prefetch, acks).await,
                    Row::Redrive(full, execution) => {
                        redrive(&url, &queue, n, prefetch, full, execution).await
                    }
                };
                results[i].push((took, cpu.since()));
                acks_per_frame_of[i].push(acks_per_frame);
            }
        }

        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        println!();
        println!(
            "cross-core round trip, read before the runs (see benches/support/cores.rs): \
             {round_trip_before}"
        );
        println!(
            "{n} messages of 64 bytes, prefetch {prefetch}, RabbitMQ at {}; \
             medians of {rounds} rounds",
            url.split('@').next_back().unwrap_or("")
        );
        println!(
            "| consumer | messages/s | vs bare lapin (per round) | vs bare lapin, median | \
             vs hand-tuned bare lapin, median | acks per frame | CPU µs/msg, this process | \
             CPU µs/msg, whole machine |"
        );
        println!("|---|---:|---|---:|---:|---:|---:|---:|");
        let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        for (((what, _), runs), acks_per_frame) in rows.iter().zip(&results).zip(acks_per_frame_of)
        {
            let tuned = median(ratios(runs, &results[1]));
            let vs_bare = ratios(runs, &results[0]);
            println!(
                "| {what} | {:.0} | {} | {:.1} % | {tuned:.1} % | {:.1} | {:.1} | {:.1} |",
                median(runs.iter().map(|(took, _)| rate(*took)).collect()),
                per_round(&vs_bare),
                median(vs_bare),
                median(acks_per_frame),
                median(runs.iter().map(|(_, cpu)| per_msg(cpu.process)).collect()),
                median(runs.iter().map(|(_, cpu)| per_msg(cpu.machine)).collect()),
            );
        }

        let ch = conn.create_channel().await.expect("channel");
        let _ = ch.queue_delete(&queue, QueueDeleteOptions::default()).await;
        let _ = conn.close(200, "bench done").await;
    });
}
