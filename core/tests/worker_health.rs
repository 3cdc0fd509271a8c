//! `Worker::health`: what a liveness or readiness probe reads while the Worker runs.
#![cfg(feature = "memory")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redrive_core::memory::MemoryBroker;
use redrive_core::worker::Phase;
use redrive_core::{
    BoxError, Capabilities, Consumer, Delivery, Health, HealthReport, Message, OrderingMode,
    OutgoingMessage, Publisher, Redelivery, Result, Worker, handler_fn,
};
use tokio::sync::Semaphore;

/// Polls `health` until `check` holds, for at most 10 s; returns the last report.
async fn until(health: &Health, what: &str, check: impl Fn(&HealthReport) -> bool) -> HealthReport {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let report = health.report();
        if check(&report) {
            return report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen within 10 s; last {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn health_follows_the_worker_from_build_to_stop() {
    let broker = MemoryBroker::new();
    // Key "a": two messages, the first held in its handler, so the second waits behind
    // it. Key "b": fails, and is parked (per-key ordering parks failures).
    for (key, body) in [("a", "hold"), ("a", "behind"), ("b", "fail")] {
        broker
            .publish("orders", OutgoingMessage::new(body).with_key(key))
            .await
            .unwrap();
    }
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let handler = handler_fn(move |m: Message| {
        let gate = g.clone();
        async move {
            match &m.payload[..] {
                b"hold" => drop(gate.acquire().await?),
                b"fail" => return Err::<(), BoxError>("downstream down".into()),
                _ => {}
            }
            Ok(())
        }
    });
    let worker = Worker::builder(broker.consumer("orders"))
        .handler(handler)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_secs(3600)))
        .shutdown_timeout(Duration::from_millis(100))
        .name("orders-worker")
        .build()
        .unwrap();
    let health = worker.health();
    assert_eq!(health.worker_name(), "orders-worker");
    let before = health.report();
    assert_eq!(
        (before.phase, before.received, before.since_last_received),
        (Phase::NotStarted, 0, None)
    );
    assert!(health.is_live(), "a Worker not yet started is live");
    assert!(!health.is_ready(), "a Worker not yet started takes nothing");

    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { s.notified().await }));

    let during = until(&health, "one running, one waiting, one parked", |r| {
        (r.in_flight, r.waiting, r.parked) == (1, 1, 1)
    })
    .await;
    assert_eq!((during.phase, during.received), (Phase::Consuming, 3));
    let since = during.since_last_received.expect("three were received");
    assert!(since < Duration::from_secs(5), "received {since:?} ago");
    assert_eq!(during.receive_failures, 0);
    assert!(health.is_live() && health.is_ready(), "{during:?}");

    gate.add_permits(1);
    until(&health, "the held and the waiting one done", |r| {
        (r.in_flight, r.waiting) == (0, 0)
    })
    .await;

    stop.notify_one();
    let report = run.await.unwrap();
    assert_eq!((report.processed, report.handed_back), (2, 1), "{report:?}");
    let after = health.report();
    assert_eq!(
        (after.phase, after.in_flight, after.parked, after.waiting),
        (Phase::Stopped, 0, 0, 0),
        "{after:?}"
    );
    assert!(!health.is_live() && !health.is_ready());
}

/// Fails every receive while `down` is set; otherwise hands out one message at a time.
struct Flaky {
    down: Arc<AtomicBool>,
    inner: redrive_core::memory::MemoryConsumer,
}

impl Consumer for Flaky {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        if self.down.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return Err(redrive_core::Error::broker("connection refused"));
        }
        self.inner.receive().await
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[tokio::test]
async fn failing_receives_make_the_worker_unready_until_one_succeeds() {
    let broker = MemoryBroker::new();
    let down = Arc::new(AtomicBool::new(true));
    let consumer = Flaky {
        down: down.clone(),
        inner: broker.consumer("orders"),
    };
    let worker = Worker::builder(consumer)
        .handler(handler_fn(|_: Message| async { Ok::<_, BoxError>(()) }))
        .build()
        .unwrap();
    let health = worker.health();
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { s.notified().await }));

    let failing = until(&health, "two receives failed in a row", |r| {
        r.receive_failures >= 2
    })
    .await;
    assert_eq!(failing.phase, Phase::Consuming);
    assert!(health.is_live(), "a Worker retrying its receives is live");
    assert!(!health.is_ready(), "but not ready: {failing:?}");

    down.store(false, Ordering::SeqCst);
    broker
        .publish("orders", OutgoingMessage::new("back"))
        .await
        .unwrap();
    let back = until(&health, "a receive succeeded", |r| r.received == 1).await;
    assert_eq!(back.receive_failures, 0, "{back:?}");
    assert!(health.is_ready(), "{back:?}");

    stop.notify_one();
    run.await.unwrap();
}

#[tokio::test]
async fn a_dropped_worker_future_reads_stopped() {
    let broker = MemoryBroker::new();
    let worker = Worker::builder(broker.consumer("orders"))
        .handler(handler_fn(|_: Message| async { Ok::<_, BoxError>(()) }))
        .build()
        .unwrap();
    let health = worker.health();
    let run = tokio::spawn(worker.run());
    until(&health, "consuming", |r| r.phase == Phase::Consuming).await;
    run.abort();
    let _ = run.await;
    assert_eq!(health.report().phase, Phase::Stopped);
    assert!(!health.is_live());
}
