//! What the scenarios share: publishing numbered messages, receiving with a deadline,
//! and running a Worker whose handler records what it saw.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::{
    BoxError, Consumer, Delivery, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery,
    Worker, handler_fn,
};

/// Whether `c` can hand back one message; logs the skip of `scenario` when it cannot
/// (Kafka: the Worker parks failures instead, which
/// [`worker_retries_failures`](super::worker_retries_failures) checks).
pub(super) fn can_nack<C: Consumer>(c: &C, scenario: &str) -> bool {
    let can = c.capabilities().can_nack;
    if !can {
        eprintln!(
            "conformance: {scenario} skipped: the broker cannot nack one message (capabilities: can_nack = false)"
        );
    }
    can
}

pub(super) async fn publish_n<P: Publisher>(
    p: &P,
    dest: &str,
    n: usize,
    keys: usize,
) -> Vec<String> {
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

pub(super) async fn next<C: Consumer>(c: &mut C, within: Duration) -> Option<Delivery> {
    match tokio::time::timeout(within, c.receive()).await {
        Ok(r) => r.expect("receive failed"),
        Err(_) => None,
    }
}

pub(super) async fn expect_next<C: Consumer>(c: &mut C, what: &str) -> Delivery {
    next(c, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{what}: nothing received within 30 s"))
}

pub(super) fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

pub(super) type Seen = Arc<Mutex<Vec<(String, usize)>>>;

/// Runs a Worker with a recording handler until `done` returns true or the consumer stops.
pub(super) async fn run_worker<C: Consumer>(
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

pub(super) async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: not reached within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(super) fn distinct(seen: &Seen) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(_, s)| *s)
        .collect::<HashSet<_>>()
        .len()
}
