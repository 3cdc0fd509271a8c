//! Consumer throughput on Kafka: the same N records read by a bare rdkafka consumer and
//! by redrive's Worker with the full Stack around a no-op handler; then, with a handler
//! that waits 1 ms, a sequential consumer of one partition against the Worker running
//! that partition's keys in parallel (`PerKey`). Prints every rate and ratio.
//!
//! ```text
//! source scripts/kafka-broker                       # tansu on 127.0.0.1:9092
//! cargo bench -p redrive-kafka --bench throughput   # KAFKA_BROKERS, default 127.0.0.1:9092
//! BENCH_N=200000 BENCH_QUEUED_N=50000 BENCH_SLOW_N=10000 cargo bench -p redrive-kafka --bench throughput
//! BENCH_MOCK=1 BENCH_N=50000 BENCH_QUEUED_N=50000 cargo bench -p redrive-kafka --bench throughput
//! BENCH_ONLY="InTask) + no-op" BENCH_SLOW_N=100 cargo bench -p redrive-kafka --bench throughput
//! BENCH_THREADS=1 cargo bench -p redrive-kafka --bench throughput  # runtime threads, default 2
//! BENCH_ROUNDS=5 cargo bench -p redrive-kafka --bench throughput   # rounds, default 3
//! ```
//!
//! Every run reads one topic of one partition from the start, as a fresh group. The
//! no-op rows run `BENCH_ROUNDS` rounds, each the bare consumer first, and print each
//! row's ratio to the bare run of the same round and the medians, and the CPU time spent
//! per record, by this process and by the whole machine (the broker included), counted
//! over the whole run. They are measured twice:
//!
//! - **As the broker delivers** (`BENCH_N` records, default 1,000,000): counted from the
//!   first record handled to the last. A consumer that keeps up reads at the rate the
//!   broker serves. tansu serves a fetch of up to about 70,000 of these records every
//!   quarter of a second or so, so a run of 100,000 records is one such wait plus the
//!   time to handle the last fetch; a million records make that end a small part of the
//!   run. Neither the bare consumer's close nor the Worker's shutdown is counted.
//! - **From librdkafka's queue** (`BENCH_QUEUED_N` records, default 100,000): counted
//!   from [`QUEUE_FILL`] after the first record arrives, by when the whole topic is in
//!   the client's queue, so the rate is what the consumer itself can do. The Worker's
//!   first calls wait for that moment. librdkafka fetches ahead up to its
//!   `queued.min.messages` (100,000 by default); records past that are fetched while
//!   the run counts, so keep `BENCH_QUEUED_N` at or under it.
//!
//! `BENCH_MOCK=1` uses librdkafka's mock cluster instead of a broker; there a bare
//! consumer stalled past about 50,000 records in one partition, so keep `BENCH_N` and
//! `BENCH_QUEUED_N` at or under that with it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Execution, Message, OrderingMode, Worker, handler_fn};
use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
use redrive_kafka::rdkafka::mocking::MockCluster;
use redrive_kafka::rdkafka::producer::DefaultProducerContext;
use redrive_kafka::{KafkaConsumer, KafkaPublisher};
use tokio::sync::Notify;
use tower::util::BoxService;

#[path = "../../../benches/support/cores.rs"]
mod cores;
#[path = "../../../benches/support/cpu.rs"]
mod cpu;
#[path = "../../../benches/support/rounds.rs"]
mod rounds;
#[path = "../../../benches/support/full_stack.rs"]
mod support;
#[path = "support/topic.rs"]
mod topic;
use cpu::{CpuTimes, CpuUsed};
use rounds::{median, per_round, ratios};
use support::full_stack;
use topic::create_topic;

const KEYS: usize = 256;

/// How long after the first record a run from librdkafka's queue starts counting: time
/// for the client to fetch the whole topic ahead (tansu takes about a quarter of a second
/// per 70,000 records here).
const QUEUE_FILL: Duration = Duration::from_secs(2);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unique(prefix: &str) -> String {
    redrive_core::testkit::unique_name(prefix)
}

/// A topic of one partition holding `n` records of 64 bytes over [`KEYS`] keys.
async fn fill(
    brokers: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
    n: usize,
) -> String {
    let topic = unique("bench");
    create_topic(brokers, mock, &topic).await;
    topic::fill(brokers, &topic, n, KEYS, |_| vec![b'x'; 64]).await;
    topic
}

fn stream_consumer(brokers: &str, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("bare"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    c
}

/// A bare consumer: receive, optionally wait, count; commit once at the end. Counts
/// from `gate` after the first record.
async fn bare(brokers: &str, topic: &str, n: usize, wait: Duration, gate: Duration) -> Duration {
    let c = stream_consumer(brokers, topic);
    let first = c.recv().await.expect("first record");
    drop(first);
    tokio::time::sleep(gate).await;
    let start = Instant::now();
    for _ in 1..n {
        let _record = c.recv().await.expect("record");
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
    c.commit_consumer_state(redrive_kafka::rdkafka::consumer::CommitMode::Async)
        .expect("commit");
    start.elapsed()
}

/// The Worker's concurrency in every run (`PerKey` ordering).
const CONCURRENCY: usize = 64;

/// What a Worker run puts around the no-op handler and how it runs calls.
#[derive(Clone, Copy)]
struct Setup {
    /// The full Stack, or the handler alone.
    full: bool,
    execution: Execution,
}

/// What the bench handler records: how many records it handled, and when the count
/// began and ended. One `Arc` per call, cloned into the handler's future.
struct Progress {
    n: usize,
    wait: Duration,
    /// How long the first calls wait before anything is counted.
    gate: Duration,
    /// Set once the gate has passed, so later calls skip the clock.
    open: AtomicBool,
    count: AtomicUsize,
    started: OnceLock<Instant>,
    ended: OnceLock<Instant>,
    done: Notify,
}

impl Progress {
    async fn handle(&self) {
        if !self.open.load(Ordering::Relaxed) {
            let start = *self.started.get_or_init(|| Instant::now() + self.gate);
            tokio::time::sleep_until(start.into()).await;
            self.open.store(true, Ordering::Relaxed);
        }
        if !self.wait.is_zero() {
            tokio::time::sleep(self.wait).await;
        }
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
            self.ended.get_or_init(Instant::now);
            self.done.notify_one();
        }
    }
}

/// The Worker over the adapter until `n` records were handled: the time from the first
/// record handled (or `gate` after it) to the last, as the bare consumer counts it. The
/// Worker's shutdown (the final commit, leaving the group) comes after and is not
/// counted, as the bare consumer's is not.
async fn redrive(
    brokers: &str,
    topic: &str,
    n: usize,
    wait: Duration,
    gate: Duration,
    setup: Setup,
) -> Duration {
    let Setup { full, execution } = setup;
    let progress = Arc::new(Progress {
        n,
        wait,
        gate,
        open: AtomicBool::new(false),
        count: AtomicUsize::new(0),
        started: OnceLock::new(),
        ended: OnceLock::new(),
        done: Notify::new(),
    });
    let p = progress.clone();
    let handler = handler_fn(move |_m: Message| {
        let p = p.clone();
        async move {
            p.handle().await;
            Ok::<_, BoxError>(())
        }
    });
    let service = if full {
        let publisher = KafkaPublisher::new(brokers).expect("publisher");
        BoxService::new(full_stack(publisher, handler))
    } else {
        BoxService::new(handler)
    };
    let consumer = KafkaConsumer::builder(brokers, &unique("redrive"), [topic])
        .buffer(
            std::env::var("BENCH_BUFFER")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1024),
        )
        .build()
        .expect("consumer");
    let worker = Worker::builder(consumer)
        .service(service)
        .concurrency(CONCURRENCY)
        .ordering(OrderingMode::PerKey)
        .execution(execution)
        .build()
        .expect("worker");
    // On the runtime, as an application runs it, not on the bench's main thread.
    let p = progress.clone();
    let report = tokio::spawn(worker.run_until(async move { p.done.notified().await }))
        .await
        .expect("worker task");
    assert!(report.processed as usize >= n, "{report:?}");
    let started = *progress.started.get().expect("a record was handled");
    *progress.ended.get().expect("the last record was handled") - started
}

/// Runs every row `rounds` times over `n` records, bare first in each round, counting
/// from `gate` after the first record: each row's time and CPU per round.
async fn measure(
    brokers: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
    rows: &[(String, Option<Setup>)],
    n: usize,
    gate: Duration,
    rounds: usize,
) -> Vec<Vec<(Duration, CpuUsed)>> {
    eprintln!("filling a topic with {n} records");
    let topic = fill(brokers, mock, n).await;
    // Each round reads the topic once per row, bare first, so a row is compared with the
    // bare run of its own round: the broker shares this machine.
    let mut results: Vec<Vec<(Duration, CpuUsed)>> = vec![Vec::new(); rows.len()];
    for round in 1..=rounds {
        eprintln!(
            "round {round} of {rounds} ({n} records): bare consumer, then the Worker alone and \
             with the full Stack, spawned and in task"
        );
        for (i, (_, setup)) in rows.iter().enumerate() {
            let cpu = CpuTimes::now();
            let took = match *setup {
                None => bare(brokers, &topic, n, Duration::ZERO, gate).await,
                Some(setup) => redrive(brokers, &topic, n, Duration::ZERO, gate, setup).await,
            };
            results[i].push((took, cpu.since()));
        }
    }
    results
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// Prints one table of [`measure`]'s results: rates, ratios to bare, CPU per record.
fn print_table(rows: &[(String, Option<Setup>)], results: &[Vec<(Duration, CpuUsed)>], n: usize) {
    println!(
        "| consumer, no-op handler | records/s | vs bare (per round) | vs bare, median | \
         CPU µs/record, this process | CPU µs/record, whole machine |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    let per_record = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    for ((what, _), runs) in rows.iter().zip(results) {
        let vs_bare = ratios(runs, &results[0]);
        println!(
            "| {what} | {:.0} | {} | {:.1} % | {:.2} | {:.2} |",
            median(runs.iter().map(|(took, _)| rate(n, *took)).collect()),
            per_round(&vs_bare),
            median(vs_bare),
            median(
                runs.iter()
                    .map(|(_, cpu)| per_record(cpu.process))
                    .collect()
            ),
            median(
                runs.iter()
                    .map(|(_, cpu)| per_record(cpu.machine))
                    .collect()
            ),
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env("BENCH_THREADS", 2))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n = env("BENCH_N", 1_000_000);
        let queued_n = env("BENCH_QUEUED_N", 100_000);
        let slow_n = env("BENCH_SLOW_N", 5_000);
        let (mock, brokers) = if std::env::var_os("BENCH_MOCK").is_some() {
            let cluster = MockCluster::new(1).expect("mock cluster");
            let brokers = cluster.bootstrap_servers();
            (Some(cluster), brokers)
        } else {
            let brokers =
                std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
            let probe: StreamConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .expect("client");
            if let Err(e) = probe.fetch_metadata(None, Duration::from_secs(10)) {
                panic!(
                    "no Kafka broker answers at {brokers} ({e}); start one with \
                     `source scripts/kafka-broker`, set KAFKA_BROKERS, or use BENCH_MOCK=1"
                );
            }
            (None, brokers)
        };
        let on = if mock.is_some() {
            "librdkafka's mock cluster".to_owned()
        } else {
            brokers.clone()
        };

        let round_trip_before = cores::describe_core_round_trip();
        // BENCH_ONLY=<text> runs only the Worker rows whose name holds the text (and bare).
        let only = std::env::var("BENCH_ONLY").ok();
        let mut rows: Vec<(String, Option<Setup>)> =
            vec![("bare rdkafka StreamConsumer".to_owned(), None)];
        for execution in [Execution::Spawned, Execution::InTask] {
            for full in [false, true] {
                let stack = if full { " + full Stack" } else { "" };
                let what =
                    format!("redrive Worker (PerKey, 64, {execution:?}){stack} + no-op handler");
                if only.as_deref().is_none_or(|only| what.contains(only)) {
                    rows.push((what, Some(Setup { full, execution })));
                }
            }
        }
        let rounds = env("BENCH_ROUNDS", 3).max(1);
        let delivered = measure(&brokers, mock.as_ref(), &rows, n, Duration::ZERO, rounds).await;
        let queued = measure(&brokers, mock.as_ref(), &rows, queued_n, QUEUE_FILL, rounds).await;

        println!();
        println!(
            "cross-core round trip, read before the runs (see benches/support/cores.rs): \
             {round_trip_before}"
        );
        println!();
        println!(
            "As the broker delivers: {n} records of 64 bytes, {KEYS} keys, one partition, on \
             {on}, from the first record handled to the last; medians of {rounds} rounds"
        );
        print_table(&rows, &delivered, n);
        println!();
        println!(
            "From librdkafka's queue: {queued_n} records, counted from {QUEUE_FILL:?} after the \
             first arrived; medians of {rounds} rounds"
        );
        print_table(&rows, &queued, queued_n);

        let wait = Duration::from_millis(1);
        let topic = fill(&brokers, mock.as_ref(), slow_n).await;
        let sequential = bare(&brokers, &topic, slow_n, wait, Duration::ZERO).await;
        let setup = Setup {
            full: true,
            execution: Execution::Spawned,
        };
        let parallel = redrive(&brokers, &topic, slow_n, wait, Duration::ZERO, setup).await;
        println!();
        println!("{slow_n} records, a handler that waits 1 ms, {KEYS} keys, one partition");
        println!("| consumer | seconds | records/s | vs sequential |");
        println!("|---|---:|---:|---:|");
        for (what, took) in [
            ("sequential rdkafka consumer", sequential),
            ("redrive Worker (PerKey, 64) + full Stack", parallel),
        ] {
            println!(
                "| {what} | {:.2} | {:.0} | {:.1}× |",
                took.as_secs_f64(),
                rate(slow_n, took),
                rate(slow_n, took) / rate(slow_n, sequential)
            );
        }
        drop(mock);
    });
}
