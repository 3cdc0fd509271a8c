//! The full Stack with each idempotency store: the in-memory store, Redis and
//! PostgreSQL, on RabbitMQ and on the in-memory broker, with 64 handler calls at once;
//! prints messages/s and CPU per message side by side, and each shared store's rate
//! against the in-memory store's.
//!
//! ```text
//! cargo bench -p redrive-rabbitmq --bench stores
//! BENCH_N=50000 BENCH_ROUNDS=5 cargo bench -p redrive-rabbitmq --bench stores
//! BENCH_ONLY=PostgreSQL cargo bench -p redrive-rabbitmq --bench stores
//! ```
//!
//! `BENCH_ONLY=<text>` runs the rows whose store's name holds the text, and the
//! in-memory store's (the base).
//!
//! RabbitMQ at `AMQP_URL`, Redis at `REDIS_URL`, PostgreSQL at `DATABASE_URL` (the local
//! defaults otherwise). Every message carries a message id of its own, so the
//! idempotency layer reserves a key for each, and commits it after the no-op handler:
//! what a message costs the store, and nothing else.
//!
//! Each round runs every row once, the in-memory store first, so a row is compared with
//! the in-memory store of its own round (the brokers and the stores share this machine,
//! and their pace drifts); the table shows medians.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redrive_core::handler_fn;
use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Consumer, Execution, Message, OutgoingMessage, Publisher, Worker};
use redrive_middleware::idempotency::{IdempotencyStore, MemoryStore, PostgresStore, RedisStore};
use redrive_rabbitmq::lapin::options::QueueDeleteOptions;
use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};
use tokio::sync::Notify;

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
use support::full_stack_on;

/// Handler calls at once.
const CONCURRENCY: usize = 64;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, PartialEq)]
enum Store {
    Memory,
    Redis,
    Postgres,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Memory => "in-memory",
            Store::Redis => "Redis",
            Store::Postgres => "PostgreSQL",
        }
    }

    /// A store of this kind, its keys apart from every other run's; PostgreSQL's in
    /// `table`, which the bench drops at its end (a table grown by earlier runs would
    /// slow the later ones).
    async fn open(self, run: &str, table: &str) -> Arc<dyn IdempotencyStore> {
        match self {
            Store::Memory => Arc::new(MemoryStore::new()),
            Store::Redis => {
                let url =
                    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
                let store = RedisStore::connect(&url).await.unwrap_or_else(|e| {
                    panic!("Redis at {url}: {e}; start it with `redis-server --daemonize yes`")
                });
                Arc::new(store.with_prefix(format!("redrive:bench:{run}:")))
            }
            Store::Postgres => {
                let params = std::env::var("DATABASE_URL")
                    .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
                let store = PostgresStore::connect(&params)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at {params}: {e}; start it with `pg_ctlcluster 15 main start`")
                    })
                    .with_table(table)
                    .expect("table name");
                store.migrate().await.expect("migrate");
                Arc::new(store)
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    RabbitMq,
    Memory,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::RabbitMq => "RabbitMQ",
            Broker::Memory => "in-memory broker",
        }
    }
}

async fn fill_memory(broker: &MemoryBroker, queue: &str, run: &str, n: usize) {
    for i in 0..n {
        let m = OutgoingMessage::new(vec![b'x'; 64])
            .with_header("message-id", format!("{run}-{i}"))
            .expect("header");
        broker.publish(queue, m).await.expect("publish");
    }
}

/// Runs the Worker with the full Stack on `store` until it handled `n` messages and
/// acked them; the time that took.
async fn consume<C: Consumer, P: Publisher>(
    consumer: C,
    dead_letters: P,
    store: Arc<dyn IdempotencyStore>,
    n: usize,
    acked: impl Fn() -> u64 + Send + 'static,
) -> Duration {
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let (c, d) = (count.clone(), done.clone());
    let handler = handler_fn(move |_m: Message| {
        let (c, d) = (c.clone(), d.clone());
        async move {
            if c.fetch_add(1, Ordering::Relaxed) + 1 == n {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let worker = Worker::builder(consumer)
        .service(full_stack_on(dead_letters, store, handler))
        .concurrency(CONCURRENCY)
        .execution(Execution::Spawned)
        .build()
        .expect("worker");
    let start = Instant::now();
    let ended = Arc::new(std::sync::OnceLock::new());
    let end = ended.clone();
    let all_acked = async move {
        done.notified().await;
        while acked() < n as u64 {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        end.get_or_init(Instant::now);
    };
    let report = tokio::spawn(worker.run_until(all_acked))
        .await
        .expect("worker task");
    assert!(report.acked as usize >= n, "{report:?}");
    *ended.get().expect("every message acked") - start
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
        let n = env("BENCH_N", 20_000);
        let rounds = env("BENCH_ROUNDS", 3).max(1);
        let conn = redrive_rabbitmq::connect(&url, "redrive-bench-setup")
            .await
            .unwrap_or_else(|e| panic!("start RabbitMQ with `rabbitmq-server -detached`: {e}"));
        let queue = redrive_core::testkit::unique_name("redrive-bench-stores");
        let topology = Topology::new(&queue).with_kind(QueueKind::Classic);
        topology.declare(&conn).await.expect("declare");

        let only = std::env::var("BENCH_ONLY").ok();
        let stores: Vec<Store> = [Store::Memory, Store::Redis, Store::Postgres]
            .into_iter()
            .filter(|s| *s == Store::Memory || only.as_deref().is_none_or(|o| s.name().contains(o)))
            .collect();
        let rows: Vec<(Broker, Store)> = [Broker::RabbitMq, Broker::Memory]
            .into_iter()
            .flat_map(|b| stores.iter().map(move |s| (b, *s)))
            .collect();
        let table = format!("redrive_bench_idempotency_{}", std::process::id());
        let mut results: Vec<Vec<(Duration, CpuUsed)>> = vec![Vec::new(); rows.len()];
        for round in 1..=rounds {
            eprintln!("round {round} of {rounds}");
            for (i, (broker, store)) in rows.iter().enumerate() {
                let run = redrive_core::testkit::unique_name("r");
                let store_now = store.open(&run, &table).await;
                let (took, cpu) = match broker {
                    Broker::RabbitMq => {
                        fill(&conn, &queue, n, |i| format!("{run}-{i}")).await;
                        // Lets the broker finish with the fill before the clock starts.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let consumer = RabbitConsumer::builder(&url, topology.clone())
                            .connection_name("redrive-bench")
                            .prefetch(u16::try_from(CONCURRENCY * 4).expect("fits"))
                            .connect()
                            .await
                            .expect("consumer");
                        let monitor = consumer.monitor();
                        let dead_letters = RabbitPublisher::connect(&url).await.expect("publisher");
                        let cpu = CpuTimes::now();
                        let took = consume(consumer, dead_letters, store_now, n, move || {
                            monitor.settled()
                        })
                        .await;
                        (took, cpu.since())
                    }
                    Broker::Memory => {
                        let broker = MemoryBroker::new();
                        fill_memory(&broker, "orders", &run, n).await;
                        let consumer = broker.consumer("orders");
                        let b = broker.clone();
                        let cpu = CpuTimes::now();
                        let took = consume(consumer, broker.clone(), store_now, n, move || {
                            (n - b.depth("orders") - b.in_flight("orders")) as u64
                        })
                        .await;
                        (took, cpu.since())
                    }
                };
                results[i].push((took, cpu));
            }
        }

        let rate = |d: Duration| n as f64 / d.as_secs_f64();
        let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!();
        println!(
            "{n} messages of 64 bytes, each with its own message id; Worker with {CONCURRENCY} \
             calls at once (spawned), the full Stack, a no-op handler; medians of {rounds} rounds"
        );
        println!(
            "| broker | idempotency store | messages/s | vs in-memory store (per round) | \
             vs in-memory store, median | CPU µs/msg, this process | CPU µs/msg, whole machine |"
        );
        println!("|---|---|---:|---|---:|---:|---:|");
        for (i, ((broker, store), runs)) in rows.iter().zip(&results).enumerate() {
            // The in-memory store's row of the same broker, first of each broker's rows.
            let vs_memory = ratios(runs, &results[i - i % stores.len()]);
            println!(
                "| {} | {} | {:.0} | {} | {:.1} % | {:.1} | {:.1} |",
                broker.name(),
                store.name(),
                median(runs.iter().map(|(took, _)| rate(*took)).collect()),
                per_round(&vs_memory),
                median(vs_memory),
                median(runs.iter().map(|(_, cpu)| per_msg(cpu.process)).collect()),
                median(runs.iter().map(|(_, cpu)| per_msg(cpu.machine)).collect()),
            );
        }

        if stores.contains(&Store::Postgres) {
            let params = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
            let store = PostgresStore::connect(&params).await.expect("PostgreSQL");
            let client = store.pool().get().await.expect("connection");
            let _ = client
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await;
        }
        let ch = conn.create_channel().await.expect("channel");
        let _ = ch.queue_delete(&queue, QueueDeleteOptions::default()).await;
        let _ = conn.close(200, "bench done").await;
    });
}
