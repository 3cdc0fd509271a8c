// Worker behaviour, deterministic under paused tokio time; included by `worker.rs` and
// `worker_in_task.rs`, once for each `Execution`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use redrive_core::delivery::SettleFuture;
use redrive_core::memory::{MemoryBroker, QueueConfig};
use redrive_core::{
    Acker, BoxError, Capabilities, Consumer, Delivery, LeaseKeeping, Message, OrderingMode,
    OutgoingMessage, Publisher, Redelivery, Result, Worker, WorkerBuilder, classify, handler_fn,
};
use tokio::time::Instant;

/// What happened to one delivery, as its acker saw it.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Ack,
    Nack(Duration),
    Extend(Duration),
    /// Recorded for messages named `tracked…` only.
    Running(bool),
    /// Handed back untried, through [`Acker::hand_back`] (recorded by [`Owned`] only).
    HandBack,
}

type Log = Arc<Mutex<HashMap<String, Vec<Event>>>>;

struct Recording {
    id: String,
    log: Log,
}

impl Recording {
    fn push(&self, e: Event) -> SettleFuture<'_> {
        self.log
            .lock()
            .unwrap()
            .entry(self.id.clone())
            .or_default()
            .push(e.clone());
        // Messages named `refused…` have their acks refused, like a broker whose
        // channel closed under them.
        let refuse = e == Event::Ack && self.id.starts_with("refused");
        // Messages named `exploding…` panic in their ack, like an adapter with a bug.
        assert!(
            !(e == Event::Ack && self.id.starts_with("exploding")),
            "the ack of {} exploded",
            self.id
        );
        SettleFuture::new(async move {
            if refuse {
                Err(redrive_core::Error::broker("channel closed"))
            } else {
                Ok(())
            }
        })
    }
}

/// Set by the test that revokes messages named `revocable…` while they are parked.
static REVOKED: AtomicBool = AtomicBool::new(false);

impl Acker for Recording {
    fn is_current(&self) -> bool {
        !(self.id.starts_with("revocable") && REVOKED.load(Ordering::SeqCst))
    }

    fn ack(&self) -> SettleFuture<'_> {
        self.push(Event::Ack)
    }
    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        self.push(Event::Nack(delay))
    }
    fn extend(&self, lease: Duration) -> SettleFuture<'_> {
        self.push(Event::Extend(lease))
    }
    fn running(&self, running: bool) {
        if self.id.starts_with("tracked") {
            drop(self.push(Event::Running(running)));
        }
    }
}

/// Hands out a fixed list of messages, then waits forever.
struct Scripted {
    queue: VecDeque<Message>,
    caps: Capabilities,
    log: Log,
}

impl Scripted {
    fn new(bodies: &[&str], caps: Capabilities) -> (Self, Log) {
        let log = Log::default();
        let queue = bodies
            .iter()
            .map(|b| {
                let mut m = Message::new(b.to_string());
                m.metadata.message_id = Some((*b).into());
                m
            })
            .collect();
        (
            Scripted {
                queue,
                caps,
                log: log.clone(),
            },
            log,
        )
    }
}

impl Consumer for Scripted {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        match self.queue.pop_front() {
            Some(m) => {
                let id = m.metadata.message_id.as_deref().unwrap().to_owned();
                Ok(Some(Delivery::new(
                    m,
                    Recording {
                        id,
                        log: self.log.clone(),
                    },
                )))
            }
            None => std::future::pending().await,
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }
}

/// A Worker builder in the execution mode under test.
fn builder<C, S>(consumer: C, service: S) -> WorkerBuilder<C, S>
where
    C: Consumer,
    S: tower::Service<Message> + Send + 'static,
    S::Response: Into<redrive_core::Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    Worker::builder(consumer).service(service).execution(EXECUTION)
}

fn caps() -> Capabilities {
    Capabilities::new()
        .with_max_nack_delay(Duration::from_secs(3600))
        .with_delivery_count(true)
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

async fn publish(broker: &MemoryBroker, queue: &str, body: &str, key: Option<&str>) {
    let mut msg = OutgoingMessage::new(body.to_owned());
    if let Some(k) = key {
        msg = msg.with_key(k.to_owned());
    }
    broker.publish(queue, msg).await.unwrap();
}

/// Completes once the queue is empty and nothing is in flight.
fn drained(broker: &MemoryBroker, queue: &'static str) -> impl Future<Output = ()> + Send + use<> {
    let broker = broker.clone();
    async move {
        while broker.depth(queue) + broker.in_flight(queue) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn concurrency_never_exceeds_the_bound() {
    let broker = MemoryBroker::new();
    for i in 0..50 {
        publish(&broker, "q", &format!("m{i}"), None).await;
    }
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n, m) = (now.clone(), max.clone());
    let handler = handler_fn(move |_msg: Message| {
        let (now, max) = (n.clone(), m.clone());
        async move {
            let c = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(())
        }
    });
    let report = builder(broker.consumer("q"), handler)
        .concurrency(4)
        .build()
        .unwrap()
        .run_until(drained(&broker, "q"))
        .await;
    assert_eq!(report.processed, 50);
    assert_eq!(
        max.load(Ordering::SeqCst),
        4,
        "the bound is reached and never passed"
    );
}

#[tokio::test(start_paused = true)]
async fn per_key_parks_a_failed_key_while_other_keys_flow() {
    let broker = MemoryBroker::new();
    for (b, k) in [
        ("a1", "a"),
        ("a2", "a"),
        ("b1", "b"),
        ("a3", "a"),
        ("b2", "b"),
    ] {
        publish(&broker, "q", b, Some(k)).await;
    }
    let events: Arc<Mutex<Vec<(String, u32, Duration)>>> = Arc::default();
    let start = Instant::now();
    let ev = events.clone();
    let handler = handler_fn(move |m: Message| {
        let ev = ev.clone();
        async move {
            ev.lock()
                .unwrap()
                .push((body(&m), m.attempt(), start.elapsed()));
            tokio::time::sleep(Duration::from_millis(1)).await;
            if body(&m) == "a1" && m.attempt() < 3 {
                return Err(classify::retry_after(
                    "downstream busy",
                    Duration::from_secs(10),
                ));
            }
            Ok(())
        }
    });
    let report = builder(broker.consumer("q"), handler)
        .concurrency(16)
        .ordering(OrderingMode::PerKey)
        .build()
        .unwrap()
        .run_until(drained(&broker, "q"))
        .await;
    let events = events.lock().unwrap().clone();
    let order: Vec<(&str, u32)> = events.iter().map(|(b, a, _)| (b.as_str(), *a)).collect();
    // Key b flows at once; key a waits for a1's two parked retries, 10 s apart.
    assert_eq!(
        order,
        vec![
            ("a1", 1),
            ("b1", 1),
            ("b2", 1),
            ("a1", 2),
            ("a1", 3),
            ("a2", 1),
            ("a3", 1)
        ]
    );
    let at = |b: &str, a: u32| events.iter().find(|e| e.0 == b && e.1 == a).unwrap().2;
    assert!(at("b2", 1) < Duration::from_secs(1));
    assert!(at("a1", 2) >= Duration::from_secs(10) && at("a1", 3) >= Duration::from_secs(20));
    assert!(at("a2", 1) >= at("a1", 3));
    assert_eq!(report.parked, 2);
    assert_eq!(report.nacked, 0, "parked messages are not nacked");
    assert_eq!(report.processed, 5);
}

#[tokio::test(start_paused = true)]
async fn unordered_failure_is_nacked_with_the_backoff_or_retry_after() {
    let (consumer, log) = Scripted::new(&["plain", "hinted"], caps());
    let handler = handler_fn(|m: Message| async move {
        match body(&m).as_str() {
            "hinted" => Err(classify::retry_after("slow down", Duration::from_secs(7))),
            _ => Err::<(), BoxError>("boom".into()),
        }
    });
    let report = builder(consumer, handler)
        .redelivery(
            Redelivery::exponential(Duration::from_secs(2), Duration::from_secs(60))
                .with_jitter(false),
        )
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    let log = log.lock().unwrap();
    assert_eq!(log["plain"], vec![Event::Nack(Duration::from_secs(2))]);
    assert_eq!(log["hinted"], vec![Event::Nack(Duration::from_secs(7))]);
    assert_eq!(report.nacked, 2);
}

#[tokio::test(start_paused = true)]
async fn slow_handler_keeps_its_lease() {
    for keeping in [LeaseKeeping::Auto, LeaseKeeping::Off] {
        let broker = MemoryBroker::new();
        broker.declare(
            "q",
            QueueConfig::default().with_lease(Duration::from_secs(10)),
        );
        publish(&broker, "q", "slow", None).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let handler = handler_fn(move |_m: Message| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(35)).await;
                Ok::<_, BoxError>(())
            }
        });
        let report = builder(broker.consumer("q"), handler)
            .concurrency(1)
            .lease_keeping(keeping)
            .build()
            .unwrap()
            .run_until(tokio::time::sleep(Duration::from_secs(36)))
            .await;
        if keeping == LeaseKeeping::Auto {
            assert_eq!(
                calls.load(Ordering::SeqCst),
                1,
                "never redelivered while running"
            );
            assert_eq!((report.acked, report.settle_errors), (1, 0), "{report:?}");
        } else {
            // Without lease keeping the lease ran out mid-handler: the message was
            // delivered a second time and the first ack was refused.
            assert_eq!(calls.load(Ordering::SeqCst), 2, "{report:?}");
            assert!(report.settle_errors >= 1, "{report:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn lease_extension_interval_follows_the_lease() {
    let caps = caps().with_lease(Some(Duration::from_secs(10)), true);
    let (consumer, log) = Scripted::new(&["slow"], caps);
    let handler = handler_fn(|_m: Message| async {
        tokio::time::sleep(Duration::from_secs(23)).await;
        Ok::<_, BoxError>(())
    });
    builder(consumer, handler)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(24)))
        .await;
    let ten = Duration::from_secs(10);
    assert_eq!(
        log.lock().unwrap()["slow"],
        vec![
            Event::Extend(ten),
            Event::Extend(ten),
            Event::Extend(ten),
            Event::Extend(ten),
            Event::Ack
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_contained_and_the_message_redelivered() {
    let broker = MemoryBroker::new();
    for b in ["ok1", "boom", "ok2"] {
        publish(&broker, "q", b, None).await;
    }
    let handler = handler_fn(|m: Message| async move {
        if body(&m) == "boom" && m.attempt() == 1 {
            panic!("handler bug");
        }
        Ok::<_, BoxError>(())
    });
    let report = builder(broker.consumer("q"), handler)
        .redelivery(Redelivery::constant(Duration::from_millis(100)))
        .build()
        .unwrap()
        .run_until(drained(&broker, "q"))
        .await;
    assert_eq!(report.panicked, 1);
    assert_eq!(report.nacked, 1);
    assert_eq!(report.processed, 3);
}

#[tokio::test(start_paused = true)]
async fn every_delivery_is_settled_exactly_once() {
    let bodies: Vec<String> = (0..60).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    let (consumer, log) = Scripted::new(&refs, caps());
    let handler = handler_fn(|m: Message| async move {
        let i: u32 = body(&m)[1..].parse().unwrap();
        tokio::time::sleep(Duration::from_millis(u64::from(i % 7))).await;
        match i % 3 {
            0 => Ok(()),
            1 => Err::<(), BoxError>("fail".into()),
            _ => panic!("panic {i}"),
        }
    });
    let report = builder(consumer, handler)
        .concurrency(8)
        .redelivery(Redelivery::constant(Duration::from_secs(1)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(5)))
        .await;
    let log = log.lock().unwrap();
    assert_eq!(log.len(), 60);
    for (id, events) in log.iter() {
        let settles = events
            .iter()
            .filter(|e| !matches!(e, Event::Extend(_)))
            .count();
        assert_eq!(settles, 1, "{id}: {events:?}");
    }
    assert_eq!((report.acked, report.nacked, report.panicked), (20, 40, 20));
}

#[tokio::test(start_paused = true)]
async fn a_refused_ack_is_counted_as_a_settle_error_not_an_ack() {
    let (consumer, log) = Scripted::new(&["ok-1", "refused-1", "ok-2"], caps());
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let report = builder(consumer, handler)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    assert_eq!(log.lock().unwrap().len(), 3, "every message was settled");
    assert_eq!(
        (report.processed, report.acked, report.settle_errors),
        (3, 2, 1),
        "{report:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_delivery_given_to_another_consumer_is_handed_back_unrun() {
    // revocable-1 fails and is parked; while it waits its partition is revoked, so
    // neither it nor revocable-2 (waiting behind the same key) runs again. The other
    // key is untouched.
    let mut bodies: Vec<Message> = ["revocable-1", "revocable-2", "other-1"]
        .iter()
        .map(|b| {
            let mut m = Message::new(b.to_string());
            m.metadata.message_id = Some((*b).into());
            m.key = Some(b.split('-').next().unwrap().to_owned().into());
            m
        })
        .collect();
    let (mut consumer, log) = Scripted::new(&[], caps());
    consumer.queue.extend(bodies.drain(..));
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let handler = handler_fn(move |m: Message| {
        let r = r.clone();
        async move {
            let id = m.metadata.message_id.as_deref().unwrap().to_owned();
            r.lock().unwrap().push(id.clone());
            if id == "revocable-1" {
                REVOKED.store(true, Ordering::SeqCst);
                return Err::<(), BoxError>("fails, then its partition is revoked".into());
            }
            Ok(())
        }
    });
    let report = builder(consumer, handler)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_millis(100)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(2)))
        .await;
    let mut runs = runs.lock().unwrap().clone();
    runs.sort();
    assert_eq!(
        runs,
        ["other-1", "revocable-1"],
        "nothing revoked ran again"
    );
    assert_eq!(
        (report.parked, report.handed_back, report.processed),
        (1, 2, 1),
        "{report:?}"
    );
    let log = log.lock().unwrap();
    assert_eq!(log["revocable-1"], [Event::Nack(Duration::ZERO)]);
    assert_eq!(log["revocable-2"], [Event::Nack(Duration::ZERO)]);
    assert_eq!(log["other-1"], [Event::Ack]);
}

/// An acker whose consumer may lose the message (a Kafka partition revoked in a
/// rebalance): current while `owned` holds.
struct Owned {
    recording: Recording,
    owned: Arc<AtomicBool>,
}

impl Acker for Owned {
    fn is_current(&self) -> bool {
        self.owned.load(Ordering::SeqCst)
    }

    fn ack(&self) -> SettleFuture<'_> {
        self.recording.push(Event::Ack)
    }
    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        self.recording.push(Event::Nack(delay))
    }
    fn extend(&self, lease: Duration) -> SettleFuture<'_> {
        self.recording.push(Event::Extend(lease))
    }
    fn hand_back(&self) -> SettleFuture<'_> {
        self.recording.push(Event::HandBack)
    }
}

/// Hands out what the test sends it, as it comes.
struct Fed(tokio::sync::mpsc::UnboundedReceiver<Delivery>);

impl Consumer for Fed {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        Ok(self.0.recv().await)
    }

    fn capabilities(&self) -> Capabilities {
        caps().with_can_nack(false)
    }
}

#[tokio::test(start_paused = true)]
async fn a_parked_delivery_no_longer_current_leaves_at_once_and_frees_its_partition() {
    // x fails and is parked for 60 s. Its partition is then revoked and assigned again
    // (a rebalance): the new assignment delivers x and y again. The parked x goes back
    // untried without waiting out its delay, so the partition's records run at once.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let log = Log::default();
    let deliver = |id: &str, assignment: &Arc<AtomicBool>, n: u32| {
        let mut m = Message::new(id.to_owned());
        m.metadata.message_id = Some(id.into());
        m.metadata.source.destination = "t".into();
        m.metadata.source.partition = Some(0);
        let owned = Owned {
            recording: Recording {
                id: format!("{id}#{n}"),
                log: log.clone(),
            },
            owned: assignment.clone(),
        };
        tx.send(Delivery::new(m, owned)).unwrap();
    };
    let (first, second) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(true)));
    deliver("x", &first, 1);
    let runs = Arc::new(Mutex::new(Vec::new()));
    let r = runs.clone();
    let handler = handler_fn(move |m: Message| {
        let r = r.clone();
        async move {
            let id = m.metadata.message_id.as_deref().unwrap().to_owned();
            let mut runs = r.lock().unwrap();
            runs.push((id.clone(), Instant::now()));
            if runs.len() == 1 {
                return Err::<(), BoxError>("fails once".into());
            }
            Ok(())
        }
    });
    let worker = builder(Fed(rx), handler)
        .ordering(OrderingMode::PerPartition)
        .redelivery(Redelivery::constant(Duration::from_secs(60)))
        .build()
        .unwrap();
    let run = tokio::spawn(worker.run_until(tokio::time::sleep(Duration::from_secs(10))));
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.store(false, Ordering::SeqCst);
    let revoked = Instant::now();
    deliver("x", &second, 2);
    deliver("y", &second, 2);
    let report = run.await.unwrap();

    let runs = runs.lock().unwrap().clone();
    let ids: Vec<&str> = runs.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["x", "x", "y"], "{report:?}");
    let y_after = runs[2].1 - revoked;
    assert!(
        y_after <= Duration::from_secs(1),
        "y ran {y_after:?} after the revoke; the parked x held its partition"
    );
    assert_eq!(
        (report.parked, report.handed_back, report.processed),
        (1, 1, 2),
        "{report:?}"
    );
    let log = log.lock().unwrap();
    assert_eq!(log["x#1"], [Event::HandBack], "handed back once, untried");
    assert_eq!(log["x#2"], [Event::Ack]);
    assert_eq!(log["y#2"], [Event::Ack]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_within_its_deadline_and_hands_back_in_flight_work() {
    let broker = MemoryBroker::new();
    for i in 0..6 {
        publish(&broker, "q", &format!("m{i}"), None).await;
    }
    let handler = handler_fn(|m: Message| async move {
        if body(&m) == "m0" {
            return Ok::<_, BoxError>(());
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(())
    });
    let start = Instant::now();
    let report = builder(broker.consumer("q"), handler)
        .concurrency(3)
        .shutdown_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(7),
        "{took:?}"
    );
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(report.in_flight_at_deadline, 3, "{report:?}");
    assert_eq!(report.received, 4, "{report:?}");
    // Handed back, not lost: m1..m5 are all waiting again.
    assert_eq!(broker.depth("q"), 5);
    assert_eq!(broker.in_flight("q"), 0);
}

#[tokio::test(start_paused = true)]
async fn shutdown_hands_back_parked_and_waiting_messages_at_once() {
    let broker = MemoryBroker::new();
    for b in ["a1", "a2", "a3"] {
        publish(&broker, "q", b, Some("a")).await;
    }
    let handler = handler_fn(|_m: Message| async { Err::<(), BoxError>("down".into()) });
    let start = Instant::now();
    let report = builder(broker.consumer("q"), handler)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_secs(60)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!((report.parked, report.handed_back), (1, 3), "{report:?}");
    assert_eq!(broker.depth("q"), 3);
}

/// A service that is not ready until told.
#[derive(Clone)]
struct Gate(Arc<AtomicBool>, Arc<AtomicUsize>);

impl tower::Service<Message> for Gate {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<std::result::Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), BoxError>> {
        if self.0.load(Ordering::SeqCst) {
            Poll::Ready(Ok(()))
        } else {
            // A real service registers a waker; the test polls again on a timer.
            let waker = cx.waker().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                waker.wake();
            });
            Poll::Pending
        }
    }

    fn call(&mut self, _m: Message) -> Self::Future {
        self.1.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn intake_waits_for_the_service_to_be_ready() {
    let broker = MemoryBroker::new();
    for i in 0..3 {
        publish(&broker, "q", &format!("m{i}"), None).await;
    }
    let open = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let worker = builder(broker.consumer("q"), Gate(open.clone(), calls.clone()))
        .build()
        .unwrap();
    let run = tokio::spawn(worker.run_until(drained(&broker, "q")));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        broker.depth("q"),
        3,
        "nothing taken while the service is not ready"
    );
    assert_eq!(broker.in_flight("q"), 0);
    open.store(true, Ordering::SeqCst);
    let report = run.await.unwrap();
    assert_eq!((report.processed, calls.load(Ordering::SeqCst)), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_cannot_nack_gets_its_failures_parked() {
    let (consumer, log) = Scripted::new(&["x"], caps().with_can_nack(false));
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    let handler = handler_fn(move |m: Message| {
        let t = t.clone();
        async move {
            t.fetch_add(1, Ordering::SeqCst);
            if m.attempt() < 3 {
                Err::<(), BoxError>("again".into())
            } else {
                Ok(())
            }
        }
    });
    let report = builder(consumer, handler)
        .redelivery(Redelivery::constant(Duration::from_secs(1)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(10)))
        .await;
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    assert_eq!(log.lock().unwrap()["x"], vec![Event::Ack]);
    assert_eq!((report.parked, report.nacked, report.acked), (2, 0, 1));
}

#[test]
fn configuration_the_broker_cannot_honour_fails_at_build() {
    let handler = || handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let small = caps().with_max_nack_delay(Duration::from_secs(60));
    let (c, _) = Scripted::new(&[], small);
    let err = builder(c, handler()).build().unwrap_err().to_string();
    assert!(
        err.contains("at most 60s") && err.contains("lower the redelivery maximum"),
        "{err}"
    );

    let leased = caps().with_lease(Some(Duration::from_secs(30)), true);
    let (c, _) = Scripted::new(&[], leased);
    let err = builder(c, handler())
        .lease_keeping(LeaseKeeping::Every(Duration::from_secs(30)))
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("extend more often than the lease"), "{err}");

    let fixed = caps().with_lease(Some(Duration::from_secs(30)), false);
    let (c, _) = Scripted::new(&[], fixed);
    let err = builder(c, handler())
        .ordering(OrderingMode::PerKey)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("lease cannot be kept"), "{err}");

    let (c, _) = Scripted::new(&[], caps());
    let err = builder(c, handler())
        .concurrency(0)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("concurrency must be at least 1"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_acker_hears_when_a_delivery_runs_and_when_it_is_parked() {
    // Kept in order behind its key, so its failure is parked, not nacked.
    let (mut consumer, log) = Scripted::new(&["tracked-1"], caps());
    consumer.queue[0].key = Some("k".into());
    let tries = Arc::new(AtomicUsize::new(0));
    let t = tries.clone();
    let handler = handler_fn(move |_m: Message| {
        let t = t.clone();
        async move {
            if t.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err::<(), BoxError>("fails once".into());
            }
            Ok(())
        }
    });
    let report = builder(consumer, handler)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_secs(1)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(5)))
        .await;
    assert_eq!((report.parked, report.processed), (1, 1), "{report:?}");
    let log = log.lock().unwrap();
    let events: Vec<&Event> = log["tracked-1"]
        .iter()
        .filter(|e| !matches!(e, Event::Extend(_)))
        .collect();
    assert_eq!(
        events,
        [
            &Event::Running(true),
            &Event::Running(false),
            &Event::Running(true),
            &Event::Ack
        ],
        "runs, is parked (not running), runs again and is acked"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_worker_ends_its_calls() {
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let broker = MemoryBroker::new();
    publish(&broker, "q", "stuck", None).await;
    let (started, dropped) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (s, d) = (started.clone(), dropped.clone());
    let handler = handler_fn(move |_m: Message| {
        s.store(true, Ordering::SeqCst);
        let flag = Flag(d.clone());
        async move {
            let _flag = flag;
            std::future::pending::<()>().await;
            Ok::<_, BoxError>(())
        }
    });
    let worker = builder(broker.consumer("q"), handler).build().unwrap();
    // The timeout drops the Worker's future while the call hangs.
    let ran = tokio::time::timeout(Duration::from_millis(100), worker.run()).await;
    assert!(ran.is_err(), "the Worker was still running");
    assert!(started.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the handler's future went with the Worker"
    );
    if EXECUTION == redrive_core::Execution::Spawned {
        // A spawned call ends like one at the shutdown deadline: handed back.
        assert_eq!(broker.depth("q"), 1, "the message is back in the queue");
        assert_eq!(broker.in_flight("q"), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_that_panics_outside_the_handler_frees_its_slot_and_its_key() {
    // One partition, one slot: a call whose ack panics (an adapter bug) must neither
    // unwind the Worker (in its task) nor keep the partition's key (spawned).
    let (consumer, log) = Scripted::new(&["exploding-1", "ok-1", "ok-2"], caps());
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let report = builder(consumer, handler)
        .concurrency(1)
        .ordering(OrderingMode::PerPartition)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    let log = log.lock().unwrap();
    assert_eq!(
        (log.get("ok-1"), log.get("ok-2")),
        (Some(&vec![Event::Ack]), Some(&vec![Event::Ack])),
        "with its one slot freed, the Worker went on: {log:?}"
    );
    assert_eq!((report.processed, report.acked), (2, 2), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_classifier_that_panics_still_gives_the_message_a_fate() {
    // The user's classifier panics on one error: the message is still nacked (as a
    // transient failure), and the Worker goes on.
    let (consumer, log) = Scripted::new(&["bad-1", "ok-1", "ok-2"], caps());
    let handler = handler_fn(|m: Message| async move {
        if body(&m) == "bad-1" {
            return Err::<(), BoxError>("classify me".into());
        }
        Ok(())
    });
    let classifier = classify::Classifier::new().with_hook(|e| {
        assert!(e.to_string() != "classify me", "classifier bug");
        None
    });
    let report = builder(consumer, handler)
        .concurrency(1)
        .redelivery(Redelivery::constant(Duration::from_secs(30)))
        .classifier(classifier)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    let log = log.lock().unwrap();
    assert_eq!(
        log.get("bad-1").map(Vec::as_slice),
        Some(&[Event::Nack(Duration::from_secs(30))][..]),
        "the failed message was nacked with its redelivery delay: {log:?}"
    );
    assert_eq!(
        (log.get("ok-1"), log.get("ok-2")),
        (Some(&vec![Event::Ack]), Some(&vec![Event::Ack])),
        "the Worker went on: {log:?}"
    );
    assert_eq!((report.processed, report.nacked), (2, 1), "{report:?}");
}

/// Hands out one message, then fails every receive.
struct Failing {
    first: Option<Message>,
    log: Log,
}

impl Consumer for Failing {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        match self.first.take() {
            Some(m) => Ok(Some(Delivery::new(
                m,
                Recording {
                    id: "first".into(),
                    log: self.log.clone(),
                },
            ))),
            None => Err(redrive_core::Error::broker("connection refused")),
        }
    }

    fn capabilities(&self) -> Capabilities {
        caps()
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_receive_backs_off_without_stopping_calls_or_shutdown() {
    let log = Log::default();
    let consumer = Failing {
        first: Some(Message::new("first")),
        log: log.clone(),
    };
    let acked_at = Arc::new(Mutex::new(None));
    let at = acked_at.clone();
    let start = Instant::now();
    let handler = handler_fn(move |_m: Message| {
        let at = at.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(4000)).await;
            *at.lock().unwrap() = Some(Instant::now());
            Ok::<_, BoxError>(())
        }
    });
    let report = builder(consumer, handler)
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(10)))
        .await;
    let stopped = start.elapsed();
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(log.lock().unwrap().get("first"), Some(&vec![Event::Ack]));
    // The receive back-off reaches 6.4 s; neither the call nor shutdown waits for it.
    let done = acked_at.lock().unwrap().unwrap() - start;
    assert!(done < Duration::from_millis(4100), "the call ended at {done:?}");
    assert!(
        stopped < Duration::from_millis(10_100),
        "shutdown asked at 10 s, the Worker stopped at {stopped:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn parked_messages_are_bounded_and_intake_waits_at_the_bound() {
    // A broker that cannot nack one message: every failure parks. With a bound of 4,
    // intake stops once 4 are parked (plus what was running), and the rest stay in
    // the broker.
    let bodies: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    let (consumer, log) = Scripted::new(&refs, caps().with_can_nack(false));
    let handler = handler_fn(|_m: Message| async { Err::<(), BoxError>("downstream down".into()) });
    let report = builder(consumer, handler)
        .concurrency(2)
        .max_parked(4)
        .redelivery(Redelivery::constant(Duration::from_secs(3600)))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    assert!(
        (4..=6).contains(&report.received),
        "intake went on past the bound: {report:?}"
    );
    assert_eq!(report.parked, report.received, "{report:?}");
    assert_eq!(log.lock().unwrap().len() as u64, report.received);
}

/// An acker on a broker that has stopped answering (a connection it blocks): no settle
/// ever completes.
struct Unanswered;

impl Acker for Unanswered {
    fn ack(&self) -> SettleFuture<'_> {
        SettleFuture::new(std::future::pending())
    }
    fn nack(&self, _: Duration) -> SettleFuture<'_> {
        SettleFuture::new(std::future::pending())
    }
    fn extend(&self, _: Duration) -> SettleFuture<'_> {
        SettleFuture::new(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_stops_answering_settles_cannot_hold_shutdown() {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for body in ["quick", "slow-1", "slow-2"] {
        tx.send(Delivery::new(Message::new(body), Unanswered)).unwrap();
    }
    let handler = handler_fn(|m: Message| async move {
        if body(&m) != "quick" {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok::<_, BoxError>(())
    });
    let start = Instant::now();
    let run = builder(Fed(rx), handler)
        .concurrency(3)
        .shutdown_timeout(Duration::from_secs(5))
        .settle_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(1)));
    let report = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .expect("shutdown waited on the broker for ten minutes");
    let took = start.elapsed();
    // The ack of `quick` is given up at 2 s; shutdown begins at 1 s, the two slow calls
    // are aborted at 6 s, and their nacks given up at 8 s.
    assert!(took < Duration::from_secs(9), "{took:?}");
    assert_eq!(report.settle_errors, 3, "{report:?}");
    drop(tx);
}

#[test]
fn a_settle_timeout_of_zero_fails_at_build() {
    let broker = MemoryBroker::new();
    let handler = handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) });
    let Err(err) = Worker::builder(broker.consumer("q")).service(handler)
        .settle_timeout(Duration::ZERO)
        .build()
    else {
        panic!("a zero settle timeout was accepted");
    };
    let err = err.to_string();
    assert!(err.contains("settle_timeout"), "{err}");
}
