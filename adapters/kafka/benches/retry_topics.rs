//! Retries with and without retry topics, at a 1 % failure rate: N records of one
//! partition, every hundredth failing its first attempt, read by a Worker (`Unordered`,
//! a no-op handler, a 100 ms redelivery delay) that parks the failed records in the
//! process (the default, and without the pause at 128 runs of completed records, see
//! `pause_when_metadata_full`), and by one that sends them through a retry topic. Prints records/s to the
//! last first attempt and to the last success, per round and the medians.
//!
//! ```text
//! source scripts/kafka-broker                          # tansu on 127.0.0.1:9092
//! cargo bench -p redrive-kafka --bench retry_topics    # KAFKA_BROKERS, default 127.0.0.1:9092
//! BENCH_N=200000 BENCH_ROUNDS=3 cargo bench -p redrive-kafka --bench retry_topics
//! BENCH_MOCK=1 BENCH_N=50000 cargo bench -p redrive-kafka --bench retry_topics
//! ```
//!
//! The retry topic's records are published one per batch (`batch.num.messages=1`):
//! tansu 0.6.0 as released (the `cargo install` fallback) answers a fetch from inside a
//! batch of several records at the next batch, and a retry topic's partition is paused
//! and resumed at its records.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redrive_core::{BoxError, Message, OrderingMode, Redelivery, Worker, handler_fn};
use redrive_kafka::rdkafka::mocking::MockCluster;
use redrive_kafka::rdkafka::producer::DefaultProducerContext;
use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};
use tokio::sync::Notify;

#[path = "support/topic.rs"]
mod topic;
use topic::create_topic;
#[path = "../../../benches/support/rounds.rs"]
#[allow(dead_code, reason = "this bench takes the median alone")]
mod rounds;
use rounds::median;

/// Every this many records, one fails its first attempt.
const FAIL_EVERY: usize = 100;
const DELAY: Duration = Duration::from_millis(100);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where failed records wait.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retries {
    /// Parked by the Worker (the default).
    Parked,
    /// Parked, the partition not paused when its completed records make more runs than
    /// the commit metadata keeps.
    ParkedUnbounded,
    /// In a retry topic.
    Topic,
}

/// Seconds from the first record handled to the last first attempt, and to the last
/// success.
async fn run(
    brokers: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
    n: usize,
    retries: Retries,
) -> (Duration, Duration) {
    let topic = redrive_core::testkit::unique_name("bench-rt");
    let group = redrive_core::testkit::unique_name("g");
    create_topic(brokers, mock, &topic).await;
    let mut builder = KafkaConsumer::builder(brokers, &group, [topic.as_str()])
        .pause_when_metadata_full(retries != Retries::ParkedUnbounded);
    if retries == Retries::Topic {
        let publisher = KafkaPublisher::builder(brokers)
            .set("batch.num.messages", "1")
            .build()
            .expect("publisher");
        let retries = RetryTopics::new(publisher, [DELAY]);
        for t in retries.topics(&topic, &group) {
            create_topic(brokers, mock, &t).await;
        }
        builder = builder.retry_topics(retries);
    }
    // 64 bytes, numbered, over 256 keys.
    topic::fill(brokers, &topic, n, 256, |i| format!("{i:064}").into_bytes()).await;
    let consumer = builder.build().expect("consumer");

    let first = Arc::new(AtomicUsize::new(0));
    let succeeded = Arc::new(AtomicUsize::new(0));
    let marks: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let done = Arc::new(Notify::new());
    let (f, s, m, d) = (
        first.clone(),
        succeeded.clone(),
        marks.clone(),
        done.clone(),
    );
    let start: Arc<Mutex<Option<Instant>>> = Arc::default();
    let st = start.clone();
    let handler = handler_fn(move |msg: Message| {
        let (f, s, m, d, st) = (f.clone(), s.clone(), m.clone(), d.clone(), st.clone());
        async move {
            st.lock().unwrap().get_or_insert_with(Instant::now);
            if msg.attempt() == 1 && f.fetch_add(1, Ordering::Relaxed) + 1 == n {
                m.lock().unwrap().0 = Some(Instant::now());
            }
            let i: usize = std::str::from_utf8(&msg.payload)
                .ok()
                .and_then(|b| b.parse().ok())
                .expect("a numbered record");
            if msg.attempt() == 1 && i % FAIL_EVERY == 0 {
                return Err::<(), BoxError>("fails once".into());
            }
            if s.fetch_add(1, Ordering::Relaxed) + 1 == n {
                m.lock().unwrap().1 = Some(Instant::now());
                d.notify_one();
            }
            Ok(())
        }
    });
    let report = Worker::builder(consumer)
        .service(handler)
        .ordering(OrderingMode::Unordered)
        .concurrency(64)
        .max_parked(n)
        .redelivery(Redelivery::constant(DELAY))
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(300)) => panic!("not done within 300 s"),
            }
        })
        .await;
    assert_eq!(report.processed, n as u64, "{report:?}");
    let begun = start.lock().unwrap().expect("a record was handled");
    let (to_first, to_last) = *marks.lock().unwrap();
    (
        to_first.expect("every first attempt") - begun,
        to_last.expect("every success") - begun,
    )
}

fn main() {
    let n = env("BENCH_N", 200_000);
    let rounds = env("BENCH_ROUNDS", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mock = (std::env::var("BENCH_MOCK").as_deref() == Ok("1"))
        .then(|| MockCluster::new(1).expect("mock cluster"));
    let brokers = match &mock {
        Some(cluster) => cluster.bootstrap_servers(),
        None => std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into()),
    };
    let broker = if mock.is_some() {
        "mock cluster"
    } else {
        "tansu"
    };
    println!(
        "{n} records, 1 partition, every {FAIL_EVERY}th failing once, {DELAY:?} delay, {broker}, {rounds} rounds"
    );
    println!(
        "| retries | round | to the last first attempt (records/s) | to the last success (records/s) |"
    );
    println!("|---|---|---:|---:|");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    for (name, retries) in [
        ("parked in the process", Retries::Parked),
        (
            "parked, `pause_when_metadata_full(false)`",
            Retries::ParkedUnbounded,
        ),
        ("retry topic", Retries::Topic),
    ] {
        let mut firsts = Vec::new();
        let mut lasts = Vec::new();
        for round in 1..=rounds {
            let (first, last) = runtime.block_on(run(&brokers, mock.as_ref(), n, retries));
            println!(
                "| {name} | {round} | {:.0} | {:.0} |",
                rate(first),
                rate(last)
            );
            firsts.push(rate(first));
            lasts.push(rate(last));
        }
        println!(
            "| {name} | median | {:.0} | {:.0} |",
            median(firsts),
            median(lasts)
        );
    }
}
