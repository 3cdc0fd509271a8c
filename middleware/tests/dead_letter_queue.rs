//! `DeadLetterQueue`: reading a DLQ the dead-letter layer filled, replaying a selection
//! to its origin, the loop guard, purging; on the in-memory broker (each adapter's tests
//! run the same against its broker).
#![cfg(feature = "dead-letter")]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redrive_core::memory::MemoryBroker;
use redrive_core::{
    BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, classify, handler_fn,
};
use redrive_middleware::dead_letter::{
    DeadLetterConfig, DeadLetterLayer, DeadLetterQueue, Letter, REPLAYS, Replay, Selection,
};
use tower::ServiceBuilder;

/// Runs `orders` through the dead-letter layer until it is empty: payloads starting
/// with `bad` fail permanently, `slow` ones transiently on every attempt (exhausted
/// after 2), the rest succeed.
async fn consume(broker: &MemoryBroker) {
    let stack = ServiceBuilder::new()
        .layer(
            DeadLetterLayer::new(
                Arc::new(broker.clone()),
                DeadLetterConfig::default()
                    .with_max_attempts(2)
                    .with_consumer_name("orders-worker"),
            )
            .unwrap(),
        )
        .service(handler_fn(|m: Message| async move {
            match &m.payload[..] {
                p if p.starts_with(b"bad") => {
                    Err(classify::permanent("invalid order: no customer"))
                }
                p if p.starts_with(b"slow") => Err::<(), BoxError>("warehouse timed out".into()),
                _ => Ok(()),
            }
        }));
    let b = broker.clone();
    Worker::builder(broker.consumer("orders"))
        .service(stack)
        .redelivery(Redelivery::constant(Duration::from_millis(1)))
        .build()
        .unwrap()
        .run_until(async move {
            while b.depth("orders") + b.in_flight("orders") > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
}

/// A broker whose `orders-dlq` holds 3 permanent and 2 exhausted dead letters.
async fn filled() -> MemoryBroker {
    let broker = MemoryBroker::new();
    for body in [
        "bad-1", "ok-1", "slow-1", "bad-2", "slow-2", "bad-3", "ok-2",
    ] {
        let msg = OutgoingMessage::new(body)
            .with_header("message-id", format!("id-{body}"))
            .unwrap();
        broker.publish("orders", msg).await.unwrap();
    }
    consume(&broker).await;
    assert_eq!(broker.depth("orders-dlq"), 5);
    broker
}

fn dlq(broker: &MemoryBroker) -> DeadLetterQueue<redrive_core::memory::MemoryConsumer> {
    DeadLetterQueue::new(broker.consumer("orders-dlq")).with_idle(Duration::from_millis(100))
}

fn bodies(broker: &MemoryBroker, queue: &str) -> Vec<String> {
    let mut v: Vec<String> = broker
        .messages(queue)
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_scan_decodes_every_envelope_and_removes_nothing() {
    let broker = filled().await;
    let mut letters: Vec<Letter> = Vec::new();
    let progress = dlq(&broker)
        .scan(&Selection::all(), None, |l| letters.push(l.clone()))
        .await
        .unwrap();
    assert_eq!((progress.read, progress.selected), (5, 5));
    assert_eq!(broker.depth("orders-dlq"), 5, "a scan removes nothing");

    letters.sort_by_key(|l| l.id().map(str::to_owned));
    let bad = &letters[0];
    assert_eq!(bad.id(), Some("id-bad-1"));
    assert_eq!(bad.kind.as_deref(), Some("permanent"));
    assert_eq!(bad.origin.as_deref(), Some("orders"));
    assert_eq!(bad.origin_system.as_deref(), Some("memory"));
    assert_eq!(bad.attempts, Some(1));
    assert_eq!(bad.consumer.as_deref(), Some("orders-worker"));
    assert!(bad.error.as_deref().unwrap().contains("no customer"));
    let age = bad.age(SystemTime::now()).expect("a failure time");
    assert!(age < Duration::from_secs(60), "{age:?}");
    let slow = letters
        .iter()
        .find(|l| l.id() == Some("id-slow-1"))
        .unwrap();
    assert_eq!(
        (slow.kind.as_deref(), slow.attempts),
        (Some("exhausted"), Some(2))
    );

    let mut timeouts = 0;
    dlq(&broker)
        .scan(
            &Selection::all().with_error_containing("timed out"),
            None,
            |_| timeouts += 1,
        )
        .await
        .unwrap();
    assert_eq!(timeouts, 2);
}

#[tokio::test]
async fn a_filtered_replay_moves_exactly_the_selection_and_the_worker_handles_it() {
    let broker = filled().await;
    let selection = Selection::all().with_kind("exhausted");

    // A dry run replays nothing.
    let dry = dlq(&broker)
        .replay(
            &broker,
            &selection,
            &Replay::default().dry_run(),
            |_| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((dry.read, dry.selected, dry.done), (5, 2, 2));
    assert_eq!((broker.depth("orders"), broker.depth("orders-dlq")), (0, 5));

    let mut seen = Vec::new();
    let done = dlq(&broker)
        .replay(
            &broker,
            &selection,
            &Replay::default(),
            |p| seen.push(p.done),
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((done.selected, done.done, done.failed), (2, 2, 0));
    assert_eq!(seen, [1, 2], "progress after each replayed letter");
    assert_eq!(bodies(&broker, "orders"), ["slow-1", "slow-2"]);
    assert_eq!(
        bodies(&broker, "orders-dlq"),
        ["bad-1", "bad-2", "bad-3"],
        "what was not selected stays"
    );
    // The copy is clean: no envelope, a replay count, its own id and headers.
    let copy = &broker.messages("orders")[0];
    assert_eq!(copy.headers.get_str(REPLAYS), Some("1"));
    assert!(copy.headers.get_str("x-redrive-error-kind").is_none());
    assert!(
        copy.headers
            .get_str("message-id")
            .unwrap()
            .starts_with("id-slow-")
    );

    // The bug is fixed: the Worker now handles the replayed messages.
    let fixed = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let b = broker.clone();
    let report = Worker::builder(broker.consumer("orders"))
        .handler(fixed)
        .build()
        .unwrap()
        .run_until(async move {
            while b.depth("orders") + b.in_flight("orders") > 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
    assert_eq!(report.acked, 2, "{report:?}");
}

#[tokio::test]
async fn the_loop_guard_keeps_a_letter_that_keeps_failing() {
    let broker = filled().await;
    let selection = Selection::all().with_id("id-slow-1");
    let guard = Replay::default().with_max_replays(1);
    let first = dlq(&broker)
        .replay(&broker, &selection, &guard, |_| {}, std::future::pending())
        .await
        .unwrap();
    assert_eq!(first.done, 1);
    // Still broken: it fails again and comes back, carrying its replay count.
    consume(&broker).await;
    let back = broker
        .messages("orders-dlq")
        .into_iter()
        .find(|m| &m.payload[..] == b"slow-1")
        .expect("dead-lettered again");
    assert_eq!(back.headers.get_str(REPLAYS), Some("1"));

    let refused = dlq(&broker)
        .replay(&broker, &selection, &guard, |_| {}, std::future::pending())
        .await
        .unwrap();
    assert_eq!((refused.selected, refused.refused, refused.done), (1, 1, 0));
    assert_eq!(broker.depth("orders-dlq"), 5, "the refused letter stays");

    let forced = dlq(&broker)
        .replay(
            &broker,
            &selection,
            &guard.forced(),
            |_| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!(forced.done, 1);
    assert_eq!(
        broker.messages("orders")[0].headers.get_str(REPLAYS),
        Some("2")
    );
}

#[tokio::test]
async fn a_replay_holds_its_rate_and_stops_when_asked() {
    let broker = MemoryBroker::new();
    for i in 0..30 {
        let mut msg = OutgoingMessage::new(format!("bad-{i}"));
        msg.headers
            .insert_static("x-redrive-error-kind", "permanent")
            .unwrap();
        msg.headers
            .insert_static("x-redrive-original-destination", "orders")
            .unwrap();
        broker.publish("orders-dlq", msg).await.unwrap();
    }
    let started = Instant::now();
    let paced = dlq(&broker)
        .replay(
            &broker,
            &Selection::all(),
            &Replay::default().with_rate(100.0).with_limit(20),
            |_| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(paced.done, 20, "the limit");
    // 20 at 100/s: the first at once, the last 190 ms later.
    assert!(
        took >= Duration::from_millis(190),
        "20 letters at 100/s took {took:?}"
    );

    let stop = tokio::time::sleep(Duration::from_millis(50));
    let stopped = dlq(&broker)
        .replay(
            &broker,
            &Selection::all(),
            &Replay::default().with_rate(100.0),
            |_| {},
            stop,
        )
        .await
        .unwrap();
    assert!(
        (1..10).contains(&stopped.done),
        "stopped after about 5: {stopped:?}"
    );
    assert_eq!(
        broker.depth("orders") + broker.depth("orders-dlq"),
        30,
        "every letter is in one place or the other"
    );
}

#[tokio::test]
async fn a_purge_removes_the_selection_only() {
    let broker = filled().await;
    let purged = dlq(&broker)
        .purge(
            &Selection::all().with_kind("permanent"),
            None,
            |_| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((purged.selected, purged.done), (3, 3));
    assert_eq!(bodies(&broker, "orders-dlq"), ["slow-1", "slow-2"]);
}

/// Settles through the consumer's own handle; each ack takes 20 ms, and the most acks
/// running at once is recorded.
struct SlowAck {
    inner: redrive_core::Settle,
    running: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

impl redrive_core::Acker for SlowAck {
    fn ack(&self) -> redrive_core::delivery::SettleFuture<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        redrive_core::delivery::SettleFuture::new(async move {
            let now = self.running.fetch_add(1, SeqCst) + 1;
            self.most.fetch_max(now, SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.running.fetch_sub(1, SeqCst);
            self.inner.ack().await
        })
    }

    fn nack(&self, delay: Duration) -> redrive_core::delivery::SettleFuture<'_> {
        redrive_core::delivery::SettleFuture::new(self.inner.nack(delay))
    }

    fn extend(&self, lease: Duration) -> redrive_core::delivery::SettleFuture<'_> {
        redrive_core::delivery::SettleFuture::new(self.inner.extend(lease))
    }

    fn hand_back(&self) -> redrive_core::delivery::SettleFuture<'_> {
        redrive_core::delivery::SettleFuture::new(self.inner.hand_back())
    }
}

/// The in-memory DLQ, its acks [`SlowAck`]s.
struct SlowAcks {
    inner: redrive_core::memory::MemoryConsumer,
    running: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
}

impl redrive_core::Consumer for SlowAcks {
    async fn receive(&mut self) -> redrive_core::Result<Option<redrive_core::Delivery>> {
        Ok(self.inner.receive().await?.map(|d| {
            let (message, settle) = d.into_parts();
            redrive_core::Delivery::new(
                message,
                SlowAck {
                    inner: settle,
                    running: self.running.clone(),
                    most: self.most.clone(),
                },
            )
        }))
    }

    fn capabilities(&self) -> redrive_core::Capabilities {
        self.inner.capabilities()
    }
}

#[tokio::test]
async fn replayed_letters_leave_the_dlq_side_by_side() {
    let broker = MemoryBroker::new();
    for i in 0..32 {
        let msg = OutgoingMessage::new(format!("bad-{i}"))
            .with_header("message-id", format!("id-{i}"))
            .unwrap();
        broker.publish("orders", msg).await.unwrap();
    }
    consume(&broker).await;
    assert_eq!(broker.depth("orders-dlq"), 32);
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let consumer = SlowAcks {
        inner: broker.consumer("orders-dlq"),
        running: Arc::default(),
        most: most.clone(),
    };
    let mut dlq = DeadLetterQueue::new(consumer).with_idle(Duration::from_millis(100));
    let done = dlq
        .replay(
            &broker,
            &Selection::all(),
            &Replay::default().with_in_flight(8),
            |_| {},
            std::future::pending(),
        )
        .await
        .unwrap();
    assert_eq!((done.done, done.failed), (32, 0));
    assert_eq!(broker.depth("orders-dlq"), 0);
    let most = most.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=8).contains(&most),
        "{most} removals at once, with 8 replays in flight"
    );
}
