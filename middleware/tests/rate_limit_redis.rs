//! The cluster-wide rate limit on the real local Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`), in real time: each limiter is a layer with its own
//! connection, as a replica would have. Fails, saying how to start Redis, when it is
//! not running.
#![cfg(all(feature = "rate-limit", feature = "redis"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redrive_core::{BoxError, Message};
use redrive_middleware::rate_limit::{
    OnUnreachable, RateLimitConfig, RedisRateLimitConfig, RedisRateLimitLayer,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt, service_fn};

const RATE: u32 = 50;
const WINDOW: Duration = Duration::from_secs(3);
/// What `RATE` allows over `WINDOW`.
const EXPECTED: u64 = 150;
/// A port nothing listens on.
const CLOSED: &str = "redis://127.0.0.1:1";

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Fails the test, saying how to start Redis, when it does not answer.
async fn require_redis() {
    let url = url();
    let ping = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!(
            "cannot reach Redis at {url} ({e}); start it with `redis-server --daemonize yes` \
             or set REDIS_URL"
        ),
        Err(_) => panic!(
            "Redis at {url} did not answer within 5 s; start it with \
             `redis-server --daemonize yes` or set REDIS_URL"
        ),
    }
}

fn key(test: &str) -> String {
    format!("redrive-test:rate:{test}:{:016x}", fastrand::u64(..))
}

/// `RATE` a second with a burst of 1, so the count over a window is the rate's.
fn rate() -> RateLimitConfig {
    RateLimitConfig::per_second(RATE).with_burst(1)
}

/// A layer with its own connection (a replica).
fn replica(config: RedisRateLimitConfig) -> RedisRateLimitLayer {
    RedisRateLimitLayer::from_url(&url(), config).unwrap()
}

/// Sends messages through `layer` as fast as it lets them, for `window`; returns how
/// many went through.
async fn drive(layer: RedisRateLimitLayer, window: Duration) -> u64 {
    let passed = Arc::new(AtomicU64::new(0));
    let counter = passed.clone();
    let mut svc = layer.layer(service_fn(move |_msg: Message| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, BoxError>(()) }
    }));
    let deadline = Instant::now() + window;
    // The deadline is checked by hand too: a limit that never holds back (failing
    // open) would otherwise keep the loop from ever yielding to the timer.
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, svc.ready()).await {
            Ok(ready) => ready.unwrap().call(Message::new("x")).await.unwrap(),
            Err(_) => break,
        }
    }
    passed.load(Ordering::Relaxed)
}

fn assert_within(passed: u64, low: u64, high: u64, what: &str) {
    eprintln!("{what}: {passed} messages passed ({low}..={high} expected)");
    assert!(
        (low..=high).contains(&passed),
        "{what}: {passed} messages passed, expected {low}..={high}"
    );
}

#[tokio::test]
async fn one_limiter_lets_the_rate_through() {
    require_redis().await;
    let layer = replica(RedisRateLimitConfig::new(key("one"), rate()));
    let passed = drive(layer.clone(), WINDOW).await;
    assert_within(passed, EXPECTED * 9 / 10, EXPECTED * 11 / 10, "one limiter");
    assert!(!layer.is_degraded());
    // The last call may have reserved a permit the window closed on.
    assert!(
        (passed..=passed + 1).contains(&layer.redis_calls()),
        "one Redis call per message: {} calls for {passed}",
        layer.redis_calls()
    );
}

#[tokio::test]
async fn two_replicas_on_one_key_share_the_rate() {
    require_redis().await;
    let key = key("two");
    let a = replica(RedisRateLimitConfig::new(key.clone(), rate()));
    let b = replica(RedisRateLimitConfig::new(key, rate()));
    let (passed_a, passed_b) = tokio::join!(drive(a, WINDOW), drive(b, WINDOW));
    assert_within(
        passed_a + passed_b,
        EXPECTED * 9 / 10,
        EXPECTED * 11 / 10,
        "two replicas together",
    );
    assert!(
        passed_a > EXPECTED / 4 && passed_b > EXPECTED / 4,
        "both replicas get a share: {passed_a} and {passed_b}"
    );
}

#[tokio::test]
async fn prefetching_asks_redis_once_per_batch() {
    const BATCH: u32 = 10;
    require_redis().await;
    let key = key("prefetch");
    let config =
        RedisRateLimitConfig::new(key, RateLimitConfig::per_second(RATE).with_burst(BATCH))
            .with_prefetch(BATCH);
    let a = replica(config.clone());
    let b = replica(config);
    let (passed_a, passed_b) = tokio::join!(drive(a.clone(), WINDOW), drive(b.clone(), WINDOW));
    let passed = passed_a + passed_b;
    // The rate, plus the first burst, plus one batch per replica.
    assert_within(
        passed,
        EXPECTED * 9 / 10,
        EXPECTED * 11 / 10 + u64::from(BATCH) * 3,
        "two prefetching replicas together",
    );
    let calls = a.redis_calls() + b.redis_calls();
    let batches = passed / u64::from(BATCH);
    eprintln!("{calls} Redis calls for {passed} messages");
    assert!(
        (batches..=batches + 4).contains(&calls),
        "{calls} Redis calls for {passed} messages, expected about one per {BATCH}"
    );
}

#[tokio::test]
async fn a_partly_refilled_limit_grants_what_it_has_at_once() {
    const BATCH: u32 = 10;
    require_redis().await;
    let layer = replica(
        RedisRateLimitConfig::new(
            key("partial"),
            RateLimitConfig::per_second(RATE).with_burst(BATCH),
        )
        .with_prefetch(BATCH),
    );
    let mut svc = layer.layer(service_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
    for _ in 0..BATCH {
        svc.ready()
            .await
            .unwrap()
            .call(Message::new("x"))
            .await
            .unwrap();
    }
    assert_eq!(layer.redis_calls(), 1, "the first batch in one call");
    // About 5 permits come back in 110 ms; a whole batch only after 200 ms.
    tokio::time::sleep(Duration::from_millis(110)).await;
    let asked = Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(Message::new("x"))
        .await
        .unwrap();
    assert!(
        asked.elapsed() < Duration::from_millis(40),
        "the permits already back are granted at once, not after a whole batch: \
         waited {:?}",
        asked.elapsed()
    );
    assert_eq!(layer.redis_calls(), 2);
}

#[tokio::test]
async fn an_outage_ends_when_redis_answers_again() {
    require_redis().await;
    let key = key("outage");
    // A Redis error (here: the key holds a hash) counts as Redis being away.
    let client = redis::Client::open(url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("HSET")
        .arg(&key)
        .arg("not")
        .arg("a limit")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let layer = replica(
        RedisRateLimitConfig::new(key.clone(), rate())
            .with_retry_interval(Duration::from_millis(100)),
    );
    let run = tokio::spawn(drive(layer.clone(), Duration::from_millis(1500)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(layer.is_degraded(), "an error from Redis starts an outage");
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let passed = run.await.unwrap();
    // Nothing for 0.5 s (failing closed), then 50/s for about 1 s.
    assert_within(passed, 40, 55, "after the outage");
    assert!(!layer.is_degraded(), "the outage ended");
    assert_eq!(layer.outages(), 1);
}

#[tokio::test]
async fn failing_closed_lets_nothing_through_while_redis_is_away() {
    let layer = RedisRateLimitLayer::from_url(
        CLOSED,
        RedisRateLimitConfig::new(key("closed"), rate())
            .with_timeout(Duration::from_millis(200))
            .with_retry_interval(Duration::from_millis(100)),
    )
    .unwrap();
    let passed = drive(layer.clone(), Duration::from_secs(1)).await;
    assert_eq!(passed, 0, "fail closed: nothing passes");
    assert!(layer.is_degraded());
    assert_eq!(layer.outages(), 1, "one outage, however many retries");
    assert!(
        (3..=12).contains(&layer.redis_calls()),
        "asked again every retry interval, not in a loop: {} calls",
        layer.redis_calls()
    );
    assert_eq!(layer.degraded_permits(), 0);
}

#[tokio::test]
async fn failing_open_lets_messages_through_and_says_so() {
    let layer = RedisRateLimitLayer::from_url(
        CLOSED,
        RedisRateLimitConfig::new(key("open"), rate())
            .with_on_unreachable(OnUnreachable::fail_open())
            .with_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    let passed = drive(layer.clone(), Duration::from_millis(500)).await;
    assert!(
        passed > 1000,
        "fail open without a fallback: unlimited, got {passed}"
    );
    assert!(layer.is_degraded());
    assert_eq!(layer.degraded_permits(), passed);
    assert_eq!(layer.outages(), 1);
    assert!(layer.redis_calls() <= 2, "{} calls", layer.redis_calls());
}

#[tokio::test]
async fn failing_open_with_a_fallback_keeps_to_its_rate() {
    let layer = RedisRateLimitLayer::from_url(
        CLOSED,
        RedisRateLimitConfig::new(key("fallback"), rate())
            .with_on_unreachable(OnUnreachable::fail_open_at(
                RateLimitConfig::per_second(20).with_burst(1),
            ))
            .with_timeout(Duration::from_millis(200))
            .with_retry_interval(Duration::from_millis(300)),
    )
    .unwrap();
    let passed = drive(layer.clone(), Duration::from_secs(2)).await;
    // 20/s over 2 s, less the first failed call (connection refused: quick).
    assert_within(passed, 34, 42, "the fallback rate");
    assert!(layer.is_degraded());
    assert_eq!(layer.degraded_permits(), passed);
}

#[test]
fn settings_that_cannot_work_are_refused() {
    let cases = [
        (
            RedisRateLimitConfig::new("k", rate()).with_prefetch(2),
            "a prefetch of 2 cannot work with a burst of 1",
        ),
        (
            RedisRateLimitConfig::new("k", rate()).with_prefetch(0),
            "a prefetch of 0",
        ),
        (
            RedisRateLimitConfig::new("", rate()),
            "the Redis key is empty",
        ),
        (
            RedisRateLimitConfig::new("k", RateLimitConfig::per_second(0)),
            "the limit is 0",
        ),
        (
            RedisRateLimitConfig::new("k", RateLimitConfig::per_second(2_000_000)),
            "less than a microsecond",
        ),
        (
            RedisRateLimitConfig::new("k", rate()).with_timeout(Duration::ZERO),
            "timeout is 0",
        ),
    ];
    for (config, want) in cases {
        let err = RedisRateLimitLayer::from_url(CLOSED, config)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{err:?} should contain {want:?}");
    }
    let err = RedisRateLimitLayer::from_url("nope://", RedisRateLimitConfig::new("k", rate()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid Redis URL"), "{err}");
}

/// The done-when, shortened and in one process: two Workers on one queue of
/// the in-memory broker, each with its own Redis connection, sharing one limit; then
/// one Worker alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_sharing_a_limit_consume_at_the_rate() {
    use redrive_core::memory::MemoryBroker;
    use redrive_core::{OutgoingMessage, Publisher, Worker};

    const RUN: Duration = Duration::from_secs(4);
    require_redis().await;

    async fn run(broker: &MemoryBroker, queue: &str, layers: Vec<RedisRateLimitLayer>) -> u64 {
        let handled = Arc::new(AtomicU64::new(0));
        let mut runs = Vec::new();
        for layer in layers {
            let counter = handled.clone();
            let handler = service_fn(move |_msg: Message| {
                counter.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, BoxError>(()) }
            });
            let worker = Worker::builder(broker.consumer(queue))
                .service(layer.layer(handler))
                .concurrency(8)
                .build()
                .unwrap();
            runs.push(tokio::spawn(worker.run_until(tokio::time::sleep(RUN))));
        }
        for run in runs {
            run.await.unwrap();
        }
        handled.load(Ordering::Relaxed)
    }

    let broker = MemoryBroker::new();
    for queue in ["shared", "alone"] {
        for i in 0..1000 {
            broker
                .publish(queue, OutgoingMessage::new(format!("{i}")))
                .await
                .unwrap();
        }
    }
    let expected = u64::from(RATE) * RUN.as_secs();
    let shared = key("workers");
    let two = run(
        &broker,
        "shared",
        vec![
            replica(RedisRateLimitConfig::new(shared.clone(), rate())),
            replica(RedisRateLimitConfig::new(shared, rate())),
        ],
    )
    .await;
    assert_within(
        two,
        expected * 9 / 10,
        expected * 11 / 10,
        "two Workers together",
    );
    let one = run(
        &broker,
        "alone",
        vec![replica(RedisRateLimitConfig::new(key("alone"), rate()))],
    )
    .await;
    assert_within(
        one,
        expected * 9 / 10,
        expected * 11 / 10,
        "one Worker alone",
    );
}
