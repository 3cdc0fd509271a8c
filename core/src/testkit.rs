//! The conformance suite every adapter runs against its real broker.
//!
//! An adapter implements [`Backend`] (fresh destinations, consumers, a publisher) and
//! calls [`run_all`], or runs the scenarios one by one as separate tests. Scenarios use
//! real time, bounded by [`SCENARIO_TIMEOUT`], and unique payloads per scenario.
//!
//! ```no_run
//! use redrive_core::memory::{MemoryBroker, MemoryConsumer};
//! use redrive_core::testkit::{self, Backend};
//!
//! struct Memory(MemoryBroker);
//!
//! impl Backend for Memory {
//!     type Consumer = MemoryConsumer;
//!     type Publisher = MemoryBroker;
//!     async fn destination(&self) -> String {
//!         testkit::unique_name("conformance")
//!     }
//!     async fn consumer(&self, destination: &str) -> MemoryConsumer {
//!         self.0.consumer(destination)
//!     }
//!     fn publisher(&self) -> MemoryBroker {
//!         self.0.clone()
//!     }
//! }
//!
//! # async fn f() {
//! testkit::run_all(&Memory(MemoryBroker::new())).await;
//! # }
//! ```
//!
//! # Scenarios
//! | scenario | checks |
//! |---|---|
//! | [`round_trip`] | every message published is received with payload, headers and key intact; ack removes |
//! | [`nack_redelivers`] | a nacked message comes back with `attempt` + 1 (brokers that can nack) |
//! | [`nack_delay_honoured`] | a delayed nack is not redelivered early (brokers that can nack) |
//! | [`unacked_comes_back`] | an unsettled message returns after its lease, or when its consumer goes away |
//! | [`worker_retries_failures`] | a failed message is run again by the Worker (nacked or parked) as the next attempt |
//! | [`per_key_order`] | `PerKey` order holds under concurrency 16 |
//! | [`two_workers_share`] | two Workers on one destination share the work and lose nothing |
//! | [`restart_loses_nothing`] | a Worker stopped mid-stream and a new one lose nothing |
//! | [`shutdown_drains`] | shutdown lets in-flight work finish and acks it |

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Notify;

use crate::{
    BoxError, Consumer, Delivery, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery,
    Worker, handler_fn,
};

/// The longest one scenario may take before it fails.
pub const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

/// How long a scenario waits to be sure nothing more arrives.
pub const QUIET_PERIOD: Duration = Duration::from_millis(1500);

/// What an adapter provides to the suite.
pub trait Backend: Send + Sync + 'static {
    /// The adapter's consumer.
    type Consumer: Consumer;
    /// The adapter's publisher.
    type Publisher: Publisher + Clone;

    /// A fresh, empty, uniquely named destination, declared if the broker needs that.
    fn destination(&self) -> impl Future<Output = String> + Send;

    /// A new consumer of `destination`, on its own connection or channel where the
    /// broker has them.
    fn consumer(&self, destination: &str) -> impl Future<Output = Self::Consumer> + Send;

    /// A publisher whose messages reach `destination`'s consumers.
    fn publisher(&self) -> Self::Publisher;

    /// How long new consumers of one destination take to share it (a consumer group's
    /// rebalance, for Kafka). Scenarios that check sharing start their consumers, wait
    /// this long, then publish. Zero by default.
    fn settle_time(&self) -> Duration {
        Duration::ZERO
    }
}

/// A name unique within this process and across runs: `prefix-<pid>-<time>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() % 1_000_000_000_000);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether `c` can hand back one message; logs the skip of `scenario` when it cannot
/// (Kafka: the Worker parks failures instead, which [`worker_retries_failures`] checks).
fn can_nack<C: Consumer>(c: &C, scenario: &str) -> bool {
    let can = c.capabilities().can_nack;
    if !can {
        eprintln!(
            "conformance: {scenario} skipped: the broker cannot nack one message (capabilities: can_nack = false)"
        );
    }
    can
}

/// Runs every scenario, one after another; panics naming each that failed.
pub async fn run_all<B: Backend>(backend: &B) {
    let mut failed = Vec::new();
    macro_rules! scenario {
        ($name:ident) => {
            let r = tokio::time::timeout(
                SCENARIO_TIMEOUT,
                AssertUnwindSafe($name(backend)).catch_unwind(),
            )
            .await;
            match r {
                Ok(Ok(())) => eprintln!("conformance: {} ... ok", stringify!($name)),
                Ok(Err(panic)) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    eprintln!("conformance: {} ... FAILED: {why}", stringify!($name));
                    failed.push(stringify!($name));
                }
                Err(_) => {
                    eprintln!("conformance: {} ... TIMED OUT", stringify!($name));
                    failed.push(stringify!($name));
                }
            }
        };
    }
    scenario!(round_trip);
    scenario!(nack_redelivers);
    scenario!(nack_delay_honoured);
    scenario!(unacked_comes_back);
    scenario!(worker_retries_failures);
    scenario!(per_key_order);
    scenario!(two_workers_share);
    scenario!(restart_loses_nothing);
    scenario!(shutdown_drains);
    assert!(
        failed.is_empty(),
        "conformance scenarios failed: {failed:?}"
    );
}

async fn publish_n<P: Publisher>(p: &P, dest: &str, n: usize, keys: usize) -> Vec<String> {
    let mut bodies = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("m{i}");
        let mut msg = OutgoingMessage::new(body.clone())
            .with_header("x-seq", i.to_string())
            .expect("header fits");
        if keys > 0 {
            msg = msg.with_key(format!("k{}", i % keys));
        }
        p.publish(dest, msg).await.expect("publish");
        bodies.push(body);
    }
    bodies
}

async fn next<C: Consumer>(c: &mut C, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, c.receive()).await {
        Ok(r) => r.expect("receive failed"),
        Err(_) => None,
    }
}

async fn expect_next<C: Consumer>(c: &mut C, what: &str) -> Delivery {
    next(c, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{what}: nothing received within 30 s"))
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// Every message published is received with payload, headers and key intact; an ack
/// removes it for good.
pub async fn round_trip<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let p = b.publisher();
    let mut sent = HashMap::new();
    for i in 0..20 {
        let msg = OutgoingMessage::new(format!("payload-{i}"))
            .with_key(format!("key-{}", i % 3))
            .with_header("x-text", format!("value {i}"))
            .expect("header")
            .with_header("X-Mixed-Case", "Kept")
            .expect("header");
        sent.insert(format!("payload-{i}"), msg.clone());
        p.publish(&dest, msg).await.expect("publish");
    }
    let mut c = b.consumer(&dest).await;
    for _ in 0..20 {
        let d = expect_next(&mut c, "round_trip").await;
        let m = &d.message;
        let want = sent
            .remove(&body(m))
            .unwrap_or_else(|| panic!("unexpected or duplicate message {:?}", body(m)));
        assert_eq!(m.key, want.key, "key of {}", body(m));
        for (name, value) in &want.headers {
            assert_eq!(
                m.headers.get(name).and_then(|v| v.as_str()),
                value.as_str(),
                "header {name} of {}",
                body(m)
            );
        }
        assert_eq!(m.metadata.attempt, 1, "first delivery of {}", body(m));
        assert_eq!(*m.metadata.source.destination, *dest);
        d.ack().await.expect("ack");
    }
    assert!(sent.is_empty(), "never received: {:?}", sent.keys());
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "an acked message came back"
    );
    drop(c);
    let mut c = b.consumer(&dest).await;
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "an acked message came back to a new consumer"
    );
}

/// A nacked message comes back with `attempt` + 1.
pub async fn nack_redelivers<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let mut c = b.consumer(&dest).await;
    if !can_nack(&c, "nack_redelivers") {
        return;
    }
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let first = expect_next(&mut c, "first delivery").await;
    let attempt = first.message.attempt();
    first.nack(Duration::ZERO).await.expect("nack");
    let second = expect_next(&mut c, "redelivery after nack").await;
    assert_eq!(body(&second.message), "m0");
    assert_eq!(
        second.message.attempt(),
        attempt + 1,
        "attempt after one nack"
    );
    second.nack(Duration::ZERO).await.expect("nack");
    let third = expect_next(&mut c, "second redelivery").await;
    assert_eq!(
        third.message.attempt(),
        attempt + 2,
        "attempt after two nacks"
    );
    third.ack().await.expect("ack");
}

/// A nack with a delay is not redelivered before the delay.
pub async fn nack_delay_honoured<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let mut c = b.consumer(&dest).await;
    if !can_nack(&c, "nack_delay_honoured") {
        return;
    }
    let delay = Duration::from_secs(2);
    assert!(
        c.capabilities().max_nack_delay >= delay,
        "the backend declares a max nack delay below 2 s"
    );
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let first = expect_next(&mut c, "first delivery").await;
    let nacked_at = tokio::time::Instant::now();
    first.nack(delay).await.expect("nack");
    let early = next(&mut c, delay - Duration::from_millis(300)).await;
    assert!(early.is_none(), "redelivered before its delay");
    let d = expect_next(&mut c, "delayed redelivery").await;
    assert!(
        nacked_at.elapsed() >= delay,
        "redelivered after {:?}",
        nacked_at.elapsed()
    );
    assert_eq!(d.message.attempt(), first.message.attempt() + 1);
    d.ack().await.expect("ack");
}

/// A message left unsettled comes back: after its lease where the broker has one,
/// else when its consumer goes away.
pub async fn unacked_comes_back<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let mut c = b.consumer(&dest).await;
    let lease = c.capabilities().lease;
    let counted = c.capabilities().delivery_count;
    let first = expect_next(&mut c, "first delivery").await;
    let again = match lease {
        Some(lease) if lease <= Duration::from_secs(20) => {
            let d = next(&mut c, lease + Duration::from_secs(10))
                .await
                .expect("the message did not come back after its lease");
            drop(first);
            d
        }
        _ => {
            drop(first);
            drop(c);
            c = b.consumer(&dest).await;
            expect_next(&mut c, "redelivery to a new consumer").await
        }
    };
    assert_eq!(body(&again.message), "m0");
    // A broker that keeps no delivery count cannot tell a new consumer about the
    // earlier delivery (the count lived in the old consumer's memory).
    if counted {
        assert!(
            again.message.attempt() >= 2,
            "attempt {}",
            again.message.attempt()
        );
    }
    again.ack().await.expect("ack");
}

/// A message whose handler fails is run again by the Worker, as the next attempt:
/// through a nack where the broker can take one back, else parked by the Worker.
pub async fn worker_retries_failures<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 1, 0).await;
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(Notify::new());
    let (a, d) = (attempts.clone(), done.clone());
    let handler = handler_fn(move |m: Message| {
        let (a, d) = (a.clone(), d.clone());
        async move {
            let mut seen = a.lock().unwrap();
            seen.push(m.attempt());
            if seen.len() == 1 {
                return Err::<(), BoxError>("fails the first time".into());
            }
            d.notify_one();
            Ok(())
        }
    });
    let report = Worker::builder(b.consumer(&dest).await)
        .service(handler)
        .redelivery(Redelivery::constant(Duration::from_millis(200)))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker config")
        .run_until(async move { done.notified().await })
        .await;
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 2, "handler calls: {attempts:?}");
    assert_eq!(attempts[1], attempts[0] + 1, "attempts: {attempts:?}");
    assert_eq!(report.processed, 1, "{report:?}");
    assert_eq!(report.nacked + report.parked, 1, "{report:?}");
}

type Seen = Arc<Mutex<Vec<(String, usize)>>>;

/// Runs a Worker with a recording handler until `done` returns true or the consumer stops.
async fn run_worker<C: Consumer>(
    consumer: C,
    ordering: OrderingMode,
    concurrency: usize,
    seen: Seen,
    delay: Duration,
    stop: Arc<Notify>,
) -> crate::Report {
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        async move {
            if !delay.is_zero() {
                // A random handler latency over 0 ..= delay to shuffle completions, not a backoff.
                let jitter = delay.mul_f64(fastrand::f64());
                tokio::time::sleep(jitter).await;
            }
            let key = m
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let seq: usize = m
                .headers
                .get_str("x-seq")
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            seen.lock().unwrap().push((key, seq));
            Ok::<_, BoxError>(())
        }
    });
    Worker::builder(consumer)
        .service(handler)
        .concurrency(concurrency)
        .ordering(ordering)
        .redelivery(Redelivery::constant(Duration::ZERO))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker config")
        .run_until(async move { stop.notified().await })
        .await
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: not reached within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn distinct(seen: &Seen) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, s)| *s)
        .collect::<HashSet<_>>()
        .len()
}

/// With `PerKey` ordering and concurrency 16, each key's messages are handled in order.
pub async fn per_key_order<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 200;
    publish_n(&b.publisher(), &dest, n, 8).await;
    let seen: Seen = Arc::default();
    let stop = Arc::new(Notify::new());
    let worker = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::PerKey,
        16,
        seen.clone(),
        Duration::from_millis(3),
        stop.clone(),
    ));
    wait_until("per_key_order: all handled", || {
        seen.lock().unwrap().len() >= n
    })
    .await;
    stop.notify_one();
    worker.await.expect("worker");
    let seen = seen.lock().unwrap();
    let mut per_key: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, s) in seen.iter() {
        per_key.entry(k).or_default().push(*s);
    }
    assert_eq!(per_key.len(), 8, "keys seen");
    for (k, seqs) in per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "order of key {k}");
    }
}

/// Two Workers on one destination share the work and lose nothing.
pub async fn two_workers_share<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 200;
    let (seen_a, seen_b): (Seen, Seen) = (Arc::default(), Arc::default());
    let stop = Arc::new(Notify::new());
    let d = Duration::from_millis(5);
    let a = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        4,
        seen_a.clone(),
        d,
        stop.clone(),
    ));
    let bw = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        4,
        seen_b.clone(),
        d,
        stop.clone(),
    ));
    // Both consumers are up and sharing the destination before anything arrives.
    tokio::time::sleep(b.settle_time()).await;
    publish_n(&b.publisher(), &dest, n, 0).await;
    let all = |a: &Seen, b: &Seen| -> HashSet<usize> {
        let mut s: HashSet<usize> = a.lock().unwrap().iter().map(|x| x.1).collect();
        s.extend(b.lock().unwrap().iter().map(|x| x.1));
        s
    };
    wait_until("two_workers_share: all handled", || {
        all(&seen_a, &seen_b).len() >= n
    })
    .await;
    stop.notify_waiters();
    a.await.expect("worker a");
    bw.await.expect("worker b");
    let (na, nb) = (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len());
    assert!(na > 0 && nb > 0, "work not shared: {na} and {nb}");
    assert_eq!(all(&seen_a, &seen_b).len(), n);
}

/// A Worker stopped mid-stream and a new one started after it lose nothing
/// (duplicates allowed).
pub async fn restart_loses_nothing<B: Backend>(b: &B) {
    let dest = b.destination().await;
    let n = 100;
    publish_n(&b.publisher(), &dest, n, 0).await;
    let seen: Seen = Arc::default();
    let stop = Arc::new(Notify::new());
    let first = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        8,
        seen.clone(),
        Duration::from_millis(5),
        stop.clone(),
    ));
    wait_until("restart: first worker handled some", || {
        seen.lock().unwrap().len() >= 30
    })
    .await;
    stop.notify_one();
    let report = first.await.expect("first worker");
    assert!(report.acked >= 30, "{report:?}");
    let stop = Arc::new(Notify::new());
    let second = tokio::spawn(run_worker(
        b.consumer(&dest).await,
        OrderingMode::Unordered,
        8,
        seen.clone(),
        Duration::ZERO,
        stop.clone(),
    ));
    wait_until("restart: all handled", || distinct(&seen) >= n).await;
    stop.notify_one();
    second.await.expect("second worker");
    assert_eq!(distinct(&seen), n);
}

/// Shutdown lets in-flight messages finish and acks them; none come back.
pub async fn shutdown_drains<B: Backend>(b: &B) {
    let dest = b.destination().await;
    publish_n(&b.publisher(), &dest, 5, 0).await;
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let handler = handler_fn(move |_m: Message| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(500)).await;
            Ok::<_, BoxError>(())
        }
    });
    let stop = Arc::new(Notify::new());
    let stopper = stop.clone();
    let worker = Worker::builder(b.consumer(&dest).await)
        .service(handler)
        .concurrency(5)
        // Nothing fails here; a zero redelivery delay fits every broker's nack limit.
        .redelivery(Redelivery::constant(Duration::ZERO))
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker");
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));
    wait_until("shutdown_drains: all started", || {
        started.load(Ordering::SeqCst) == 5
    })
    .await;
    stop.notify_one();
    let report = run.await.expect("worker");
    assert_eq!(report.acked, 5, "{report:?}");
    assert_eq!(report.in_flight_at_deadline, 0, "{report:?}");
    let mut c = b.consumer(&dest).await;
    assert!(
        next(&mut c, QUIET_PERIOD).await.is_none(),
        "a drained message came back"
    );
}
