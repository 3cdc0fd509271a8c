//! A cluster-wide rate limit on Redis, held by separate processes consuming one RabbitMQ
//! queue: two Worker processes sharing one limit of `RATE` messages a second together
//! consume at `RATE`, and one process alone does too.
//!
//! Each process is this test binary run again, with `--ignored --exact worker_process`
//! and the queue, the limit's key and the run's length in `REDRIVE_RATE_WORKER`: it
//! consumes for that long and prints how many messages it handled.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redrive_core::{BoxError, Message, Worker, handler_fn};
use redrive_middleware::Stack;
use redrive_middleware::rate_limit::{RateLimitConfig, RedisRateLimitConfig, RedisRateLimitLayer};
use redrive_rabbitmq::QueueKind;

const RATE: u32 = 50;
const RUN: Duration = Duration::from_secs(30);
const ENV: &str = "REDRIVE_RATE_WORKER";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One Worker process: consumes `queue` under the limit `key` for the run's length, and
/// prints `handled N`. Run only by the test below, as a child process.
#[tokio::test]
#[ignore = "a child process of two_processes_sharing_a_redis_limit_consume_at_its_rate"]
async fn worker_process() {
    let spec = std::env::var(ENV).expect("run by the test below, with REDRIVE_RATE_WORKER set");
    let mut parts = spec.split(',');
    let (queue, key, secs) = (
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
        parts.next().unwrap().parse::<u64>().unwrap(),
    );
    // A burst of 1: the count over the run is the rate's, not the rate's plus a burst.
    let limit = RedisRateLimitLayer::from_url(
        &redis_url(),
        RedisRateLimitConfig::new(key, RateLimitConfig::per_second(RATE).with_burst(1)),
    )
    .expect("the limit's settings");
    let handled = Arc::new(AtomicU64::new(0));
    let counter = handled.clone();
    let topology = common::topology(&queue, QueueKind::Classic);
    let report = Worker::builder(common::consumer(&topology, "redrive-rate-worker", 64).await)
        .stack(Stack::new().rate_limit(limit))
        .handler(handler_fn(move |_m: Message| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, BoxError>(()) }
        }))
        .concurrency(16)
        .build()
        .expect("worker")
        .run_until(tokio::time::sleep(Duration::from_secs(secs)))
        .await;
    assert_eq!(report.acked, handled.load(Ordering::Relaxed), "{report:?}");
    println!("handled {}", report.acked);
}

/// Starts a Worker process on `queue` under `key`.
fn spawn(queue: &str, key: &str) -> std::process::Child {
    Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--ignored",
            "--exact",
            "worker_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, format!("{queue},{key},{}", RUN.as_secs()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a Worker process")
}

/// What a Worker process handled, from its output.
fn handled(child: std::process::Child) -> u64 {
    let out = child.wait_with_output().expect("the Worker process");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a Worker process failed: {text}");
    // The harness prints the test's name on the same line.
    text.lines()
        .find_map(|l| l.split("handled ").nth(1)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in a Worker process's output: {text}"))
}

#[tokio::test]
async fn two_processes_sharing_a_redis_limit_consume_at_its_rate() {
    let (shared, alone) = (common::unique("rate-shared"), common::unique("rate-alone"));
    let topologies = [
        common::topology(&shared, QueueKind::Classic),
        common::topology(&alone, QueueKind::Classic),
    ];
    // Twice what the limit allows over the run: the queues never run dry.
    let enough = 2 * RATE as usize * RUN.as_secs() as usize;
    for (t, q) in topologies.iter().zip([&shared, &alone]) {
        common::declare(t).await;
        common::publish_numbered(q, enough, "m").await;
    }
    let key = |name: &str| format!("redrive-test:rate:{name}:{:016x}", fastrand::u64(..));
    let shared_key = key("shared");
    // The pair and the lone process run at the same time, on separate queues and keys.
    let pair = [spawn(&shared, &shared_key), spawn(&shared, &shared_key)];
    let lone = spawn(&alone, &key("alone"));
    let counts = tokio::task::spawn_blocking(move || {
        let [a, b] = pair;
        (handled(a), handled(b), handled(lone))
    })
    .await
    .unwrap();
    common::cleanup(&topologies).await;

    let expected = f64::from(RATE) * RUN.as_secs_f64();
    let (a, b, lone) = counts;
    let together = (a + b) as f64;
    eprintln!("in {RUN:?} at {RATE}/s: the pair handled {a} + {b}, the lone process {lone}");
    assert!(
        (together - expected).abs() <= expected * 0.1,
        "two processes sharing {RATE}/s handled {a} + {b} = {together} in {RUN:?}, \
         expected {expected} ± 10 %"
    );
    assert!(a > 0 && b > 0, "both processes took a share: {a}, {b}");
    assert!(
        (lone as f64 - expected).abs() <= expected * 0.1,
        "one process alone handled {lone} in {RUN:?}, expected {expected} ± 10 %"
    );
}
