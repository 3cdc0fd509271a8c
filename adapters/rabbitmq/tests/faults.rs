//! Fault tests against the local RabbitMQ: the broker restarted and a connection killed
//! from the broker side, during consumption. They stop and start the broker's
//! application, so they run one at a time (a file-level lock), and a guard restarts the
//! application even when a test fails.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{
    BoxError, Consumer, Error as CoreError, Message, OrderingMode, OutgoingMessage, Publisher,
    Worker, classify::retry_after, handler_fn,
};
use redrive_rabbitmq::lapin::BasicProperties;
use redrive_rabbitmq::{ConnectionMonitor, QueueKind, RabbitConsumer};

/// One fault test at a time: they stop the broker or kill its connections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts the broker's application again when dropped, so a failing test leaves the
/// broker running.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// A memory alarm on the broker: RabbitMQ blocks every connection that publishes while
/// it lasts. Lifted when dropped, also when the test fails.
struct MemoryAlarm {
    /// The watermark to set back: `[fraction]` or `["absolute", bytes]`.
    restore: Vec<String>,
}

impl MemoryAlarm {
    async fn raise() -> Self {
        let now =
            common::rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
                .await;
        let now = now.trim();
        let restore = if now.parse::<f64>().is_ok() {
            vec![now.to_owned()]
        } else if let Some(bytes) = now
            .strip_prefix("{absolute,")
            .and_then(|r| r.strip_suffix('}'))
        {
            vec!["absolute".to_owned(), bytes.to_owned()]
        } else {
            panic!("cannot read the memory watermark to restore it later: {now}");
        };
        let alarm = MemoryAlarm { restore };
        common::rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]).await;
        let start = std::time::Instant::now();
        while !common::rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."])
            .await
            .contains("memory")
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the memory alarm did not go on"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        alarm
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("set_vm_memory_high_watermark")
            .args(&self.restore)
            .output();
    }
}

/// The messages in `queue`, ready and unacked, as the broker counts them (`rabbitmqctl`
/// answers during a resource alarm).
async fn messages(queue: &str) -> Option<u64> {
    let list = common::rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    list.lines().find_map(|line| {
        let (name, n) = line.split_once('\t')?;
        (name == queue).then(|| n.trim().parse().ok()).flatten()
    })
}

type Seen = Arc<Mutex<HashSet<String>>>;

/// Publishes `n` messages, then runs a Worker over them until `fault` has run and every
/// message was handled at least once.
async fn survives<F, Fut>(kind: QueueKind, what: &str, fault: F)
where
    F: FnOnce(String, ConnectionMonitor) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let queue = common::unique(&format!("{what}-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let n = 300;
    common::publish_numbered(&queue, n, "m").await;

    // After 50 calls the handler waits until the fault happened, so the fault always
    // comes mid-stream, with deliveries in flight.
    let seen: Seen = Arc::default();
    let handled = seen.clone();
    let started = Arc::new(AtomicUsize::new(0));
    let calls = started.clone();
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let handler = handler_fn(move |m: Message| {
        let handled = handled.clone();
        let mut gate = gate.clone();
        let call = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if call >= 50 {
                let _ = gate.wait_for(|open| *open).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            handled
                .lock()
                .unwrap()
                .insert(String::from_utf8_lossy(&m.payload).into_owned());
            Ok::<_, BoxError>(())
        }
    });
    let name = common::unique(&format!("conn-{what}"));
    let consumer = common::consumer(&topology, &name, 16).await;
    let monitor = consumer.monitor();
    let worker = common::RunningWorker::spawn(consumer, handler, 8);

    wait_until(
        "50 messages handled and 8 waiting",
        Duration::from_secs(30),
        || seen.lock().unwrap().len() >= 50 && started.load(Ordering::SeqCst) >= 58,
    )
    .await;
    fault(name, monitor.clone()).await;
    open_gate.send_replace(true);
    wait_until(
        "every message handled after the fault",
        Duration::from_secs(90),
        || seen.lock().unwrap().len() >= n,
    )
    .await;
    assert!(
        monitor.reconnects() >= 1,
        "no reconnect counted: {monitor:?}"
    );
    assert!(monitor.is_connected(), "{monitor:?}");
    let report = worker.stop().await;
    let handled: HashSet<String> = seen.lock().unwrap().clone();
    for i in 0..n {
        assert!(handled.contains(&format!("m{i}")), "m{i} was never handled");
    }
    eprintln!("{what} ({kind:?}): {report:?}, {monitor:?}");
    common::cleanup(&[topology]).await;
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn restart_broker(_name: String, _monitor: ConnectionMonitor) {
    let guard = RestartOnDrop;
    common::rabbitmqctl(&["stop_app"]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    common::rabbitmqctl(&["start_app"]).await;
    drop(guard);
    common::wait_for_broker().await;
}

/// Closes the connection named `name` (in its client properties) from the broker side:
/// `rabbitmqctl list_connections pid client_properties`, then `close_connection <pid>`.
async fn kill_connection(name: String, monitor: ConnectionMonitor) {
    let mut killed = false;
    for _ in 0..50 {
        let list = common::rabbitmqctl(&[
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let pid = list
            .lines()
            .find(|line| line.contains(&format!("\"{name}\"")))
            .and_then(|line| line.split('\t').next())
            .map(str::to_owned);
        if let Some(pid) = pid {
            common::rabbitmqctl(&["close_connection", &pid, "redrive fault test"]).await;
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        killed,
        "connection {name} not found in rabbitmqctl list_connections"
    );
    wait_until("the reconnect", Duration::from_secs(30), || {
        monitor.reconnects() >= 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_consumption_loses_nothing() {
    let _serial = SERIAL.lock().await;
    for kind in [QueueKind::Classic, QueueKind::Quorum] {
        survives(kind, "restart", restart_broker).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_killed_by_the_broker_loses_nothing() {
    let _serial = SERIAL.lock().await;
    for kind in [QueueKind::Classic, QueueKind::Quorum] {
        survives(kind, "kill", kill_connection).await;
    }
}

/// A delivery from a connection that died cannot be acked on the new one: its acker
/// fails with a clear error and the message comes back as a redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_from_a_dead_connection_cannot_be_acked_and_comes_back() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique("stale");
    let topology = common::topology(&queue, QueueKind::Classic);
    common::declare(&topology).await;
    let p = common::publisher().await;
    p.publish(&queue, OutgoingMessage::new("once"))
        .await
        .expect("publish");
    let name = common::unique("conn-stale");
    let mut c: RabbitConsumer = common::consumer(&topology, &name, 4).await;
    let first = c.receive().await.expect("receive").expect("delivery");
    assert_eq!(first.message.attempt(), 1);
    kill_connection(name, c.monitor()).await;
    let err = first.ack().await.expect_err("ack on a dead channel");
    assert!(
        matches!(&err, CoreError::Broker(e) if e.to_string().contains("channel this delivery came on is closed")),
        "{err}"
    );
    let again = tokio::time::timeout(Duration::from_secs(30), c.receive())
        .await
        .expect("redelivered within 30 s")
        .expect("receive")
        .expect("delivery");
    assert_eq!(&again.message.payload[..], b"once");
    assert_eq!(
        again.message.attempt(),
        2,
        "a redelivery counts as an attempt"
    );
    again.ack().await.expect("ack on the new connection");
    drop(c);
    common::cleanup(&[topology]).await;
}

/// A delayed retry's copy is as safe as the message it copies: a message published
/// transient to a quorum queue (which keeps every message on disk) fails once with a
/// delay, and the broker restarts while the copy waits in the delay queue. The copy comes
/// back and is handled, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_survives_a_broker_restart_quorum() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique("delay-restart");
    let topology = common::topology(&queue, QueueKind::Quorum);
    common::declare(&topology).await;
    let p = common::publisher().await;
    // No delivery_mode: transient, as a producer that is not redrive may send it.
    p.publish_raw("", &queue, b"transient", BasicProperties::default())
        .await
        .expect("publish");
    p.close().await;

    let delay = Duration::from_secs(8);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let handler = handler_fn(move |_: Message| {
        let call = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            if call == 0 {
                Err(retry_after(std::io::Error::other("fails once"), delay))
            } else {
                Ok(())
            }
        }
    });
    let name = common::unique("conn-delay-restart");
    let consumer = common::consumer(&topology, &name, 4).await;
    let monitor = consumer.monitor();
    let worker = common::RunningWorker::spawn(consumer, handler, 2);

    let delay_queue = topology.delay_queue(delay);
    let start = std::time::Instant::now();
    while common::ready(&delay_queue).await != Some(1) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the retry copy never reached {delay_queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    restart_broker(name, monitor.clone()).await;
    let restarted = start.elapsed();

    wait_until(
        "the delayed retry handled after the restart",
        Duration::from_secs(45),
        || calls.load(Ordering::SeqCst) >= 2,
    )
    .await;
    // Handled once: nothing else comes back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "handled more than once");
    let report = worker.stop().await;
    assert_eq!(report.acked, 1, "{report:?}");
    assert!(monitor.reconnects() >= 1, "{monitor:?}");
    eprintln!("broker back after {restarted:?}; {report:?}");
    assert_eq!(common::ready(&queue).await, Some(0));
    assert_eq!(common::ready(&delay_queue).await, Some(0));
    common::cleanup(&[topology]).await;
}

/// A resource alarm blocks connections that publish. A delayed retry's republish blocked
/// by one must not block the acks of the other messages: they reach the broker while
/// the alarm lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_the_broker_while_a_resource_alarm_blocks_a_republish() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique("alarm-acks");
    let topology = common::topology(&queue, QueueKind::Quorum);
    common::declare(&topology).await;
    let n = 10;
    common::publish_numbered(&queue, n, "m").await;

    // m0 fails with a delay once the alarm is on; the others finish once its republish
    // was sent (and blocked).
    let (alarm_on, alarm_gate) = tokio::sync::watch::channel(false);
    let (blocked, blocked_gate) = tokio::sync::watch::channel(false);
    let seen: Seen = Arc::default();
    let handled = seen.clone();
    let failed = Arc::new(AtomicUsize::new(0));
    let fails = failed.clone();
    let handler = handler_fn(move |m: Message| {
        let body = String::from_utf8_lossy(&m.payload).into_owned();
        let (mut alarm_gate, mut blocked_gate) = (alarm_gate.clone(), blocked_gate.clone());
        let (handled, fails) = (handled.clone(), fails.clone());
        async move {
            if body == "m0" && fails.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = alarm_gate.wait_for(|on| *on).await;
                return Err(retry_after(
                    std::io::Error::other("fails once"),
                    Duration::from_millis(500),
                ));
            }
            let _ = blocked_gate.wait_for(|b| *b).await;
            handled.lock().unwrap().insert(body);
            Ok::<_, BoxError>(())
        }
    });
    let consumer = common::consumer(&topology, &common::unique("conn-alarm"), 16).await;
    let worker = common::RunningWorker::spawn(consumer, handler, 16);
    wait_until("every message delivered", Duration::from_secs(20), || {
        failed.load(Ordering::SeqCst) >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let alarm = MemoryAlarm::raise().await;
    alarm_on.send_replace(true);
    // The republish of m0 is written and blocked; then the others finish and are acked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocked.send_replace(true);
    let start = std::time::Instant::now();
    let mut left = messages(&queue).await;
    // Under 10 s: then the blocked republish would time out and requeue m0. `messages`
    // asks rabbitmqctl, which is slow on a loaded machine.
    while left != Some(1) && start.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = messages(&queue).await;
    }
    let copied = messages(&topology.delay_queue(Duration::from_millis(500))).await;
    drop(alarm);
    assert_eq!(
        copied.unwrap_or(0),
        0,
        "the alarm did not block the republish"
    );
    assert!(!seen.lock().unwrap().contains("m0"));
    assert_eq!(
        left,
        Some(1),
        "the acks of the other {} messages did not reach the broker during the alarm \
         (only m0, whose republish is blocked, should be left)",
        n - 1
    );

    wait_until(
        "m0 handled after the alarm",
        Duration::from_secs(30),
        || seen.lock().unwrap().len() >= n,
    )
    .await;
    let report = worker.stop().await;
    assert_eq!(report.acked, n as u64, "{report:?}");
    common::cleanup(&[topology]).await;
}

/// A shutdown whose hand-backs the broker blocks (a resource alarm) still ends: the
/// republishes and the close of the connections are bounded. Nothing is lost: every
/// message is in the queue once the alarm ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_while_a_resource_alarm_blocks_its_hand_backs() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique("alarm-shutdown");
    let topology = common::topology(&queue, QueueKind::Classic);
    common::declare(&topology).await;
    let p = common::publisher().await;
    // One key: the first runs (and never ends), the others wait behind it.
    for body in ["running", "w1", "w2"] {
        p.publish(&queue, OutgoingMessage::new(body).with_key("k"))
            .await
            .expect("publish");
    }
    p.close().await;

    let started = Arc::new(AtomicUsize::new(0));
    let starts = started.clone();
    let handler = handler_fn(move |_: Message| {
        starts.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<(), BoxError>>()
    });
    let consumer = RabbitConsumer::builder(common::url(), topology.clone())
        .connection_name(common::unique("conn-alarm-shutdown"))
        .prefetch(8)
        .publish_timeout(Duration::from_secs(1))
        .close_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("consumer");
    let worker = Worker::builder(consumer)
        .service(handler)
        .ordering(OrderingMode::PerKey)
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .expect("worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut run = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    wait_until("the first message running", Duration::from_secs(10), || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let alarm = MemoryAlarm::raise().await;
    let start = std::time::Instant::now();
    stop.send(()).expect("stop");
    let report = tokio::time::timeout(Duration::from_secs(10), &mut run).await;
    let took = start.elapsed();
    drop(alarm);
    let report = report
        .unwrap_or_else(|_| {
            panic!("the Worker did not stop within 10 s while the broker blocked its hand-backs")
        })
        .expect("worker");
    eprintln!("stopped in {took:?}: {report:?}");
    assert_eq!(report.handed_back, 2, "{report:?}");

    // The hand-backs fell back to basic.nack: every message is back in the queue (the
    // blocked copies may land too, once the alarm ends: a duplicate, never a loss).
    let mut c = common::consumer(&topology, "redrive-test-alarm-shutdown-after", 8).await;
    let mut bodies = HashSet::new();
    while let Some(d) = common::next(&mut c, Duration::from_secs(3)).await {
        bodies.insert(String::from_utf8_lossy(&d.message.payload).into_owned());
        d.ack().await.expect("ack");
    }
    for body in ["running", "w1", "w2"] {
        assert!(bodies.contains(body), "{body} was lost: {bodies:?}");
    }
    drop(c);
    common::cleanup(&[topology]).await;
}

/// A republish and a close the broker blocks fail after their timeouts, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_republish_and_close_fail_in_time_saying_why() {
    let _serial = SERIAL.lock().await;
    let queue = common::unique("alarm-errors");
    let topology = common::topology(&queue, QueueKind::Quorum);
    common::declare(&topology).await;
    common::publish_numbered(&queue, 1, "m").await;
    let mut c = RabbitConsumer::builder(common::url(), topology.clone())
        .connection_name(common::unique("conn-alarm-errors"))
        .publish_timeout(Duration::from_secs(1))
        .close_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("consumer");
    let d = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("delivery");

    let alarm = MemoryAlarm::raise().await;
    let start = std::time::Instant::now();
    let nacked = d.nack(Duration::from_secs(1)).await;
    let nack_took = start.elapsed();
    let start = std::time::Instant::now();
    let closed = c.close().await;
    let close_took = start.elapsed();
    drop(alarm);

    let err = nacked.expect_err("a blocked republish fails").to_string();
    eprintln!("{err}");
    assert!(
        err.contains("did not finish within 1s") && err.contains("resource alarm"),
        "{err}"
    );
    assert!(nack_took < Duration::from_secs(3), "{nack_took:?}");
    let err = closed.expect_err("a blocked close fails").to_string();
    assert!(
        err.contains("closing the connections") && err.contains("resource alarm"),
        "{err}"
    );
    assert!(close_took < Duration::from_secs(3), "{close_took:?}");
    eprintln!("nack failed in {nack_took:?}, close in {close_took:?}: {err}");
    drop(c);
    // The message was handed back with basic.nack; the blocked copy may land as well.
    wait_until_ready(&queue).await;
    common::cleanup(&[topology]).await;
}

/// Waits until `queue` holds a message again (up to 20 s).
async fn wait_until_ready(queue: &str) {
    let start = std::time::Instant::now();
    while common::ready(queue).await.unwrap_or(0) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{queue} stayed empty: the message was lost"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
