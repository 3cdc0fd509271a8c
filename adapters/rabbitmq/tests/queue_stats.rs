//! The queue stats poller against the local RabbitMQ: it reads what the broker says,
//! outlives missing queues and lost connections, and stops.

mod common;

use std::time::Duration;

use redrive_rabbitmq::lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use redrive_rabbitmq::lapin::types::FieldTable;
use redrive_rabbitmq::{QueueCounts, QueueKind, QueueStats, QueueStatus, Topology};

const INTERVAL: Duration = Duration::from_millis(100);
const WITHIN: Duration = Duration::from_secs(10);

fn stats(queues: &[&str]) -> QueueStats {
    QueueStats::builder(common::url(), queues.iter().copied())
        .interval(INTERVAL)
        .timeout(Duration::from_secs(2))
        .reconnect(redrive_rabbitmq::Reconnect::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .start()
        .expect("start the poller")
}

/// Waits until `queue`'s figures satisfy `ok`, or fails naming `what` and the last figures.
async fn wait_for(
    stats: &QueueStats,
    queue: &str,
    what: &str,
    ok: impl Fn(QueueStatus, Option<QueueCounts>) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let figures = stats.snapshot();
        let f = figures
            .iter()
            .find(|f| f.queue == queue)
            .unwrap_or_else(|| panic!("{queue} is not polled: {figures:?}"));
        if ok(f.status, f.counts) {
            return;
        }
        assert!(
            start.elapsed() < WITHIN,
            "{what}: not within {WITHIN:?}; last figures {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn counts_are(ready: u32, consumers: u32) -> impl Fn(QueueStatus, Option<QueueCounts>) -> bool {
    move |status, counts| {
        status == QueueStatus::Read
            && counts.is_some_and(|c| c.ready == ready && c.consumers == consumers)
    }
}

async fn declare_queue(queue: &str) {
    let conn = common::connection("redrive-test-stats-declare").await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(queue, QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    let _ = conn.close(200, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_ready_messages_and_no_consumer() {
    let topology = common::topology(&common::unique("stats-ready"), QueueKind::Classic);
    common::declare(&topology).await;
    common::publish_numbered(topology.queue(), 7, "m").await;
    let stats = stats(&[topology.queue()]);

    wait_for(
        &stats,
        topology.queue(),
        "7 ready, 0 consumers",
        counts_are(7, 0),
    )
    .await;
    let counts = stats.counts(topology.queue()).expect("counts");
    assert!(counts.read_at <= std::time::SystemTime::now());

    // The broker's own tool agrees.
    let list = common::rabbitmqctl(&[
        "list_queues",
        "name",
        "messages_ready",
        "consumers",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    let line = list
        .lines()
        .find(|l| l.split('\t').next() == Some(topology.queue()))
        .unwrap_or_else(|| {
            panic!(
                "{} not in rabbitmqctl list_queues:\n{list}",
                topology.queue()
            )
        });
    assert_eq!(
        line.split('\t').collect::<Vec<_>>()[1..],
        ["7", "0"],
        "{line}"
    );

    stats.stop();
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_a_consumer_attached() {
    let topology = common::topology(&common::unique("stats-consumer"), QueueKind::Quorum);
    common::declare(&topology).await;
    let stats = stats(&[topology.queue()]);
    wait_for(
        &stats,
        topology.queue(),
        "no consumer yet",
        counts_are(0, 0),
    )
    .await;

    let conn = common::connection("redrive-test-stats-consumer").await;
    let ch = conn.create_channel().await.expect("channel");
    let _consumer = ch
        .basic_consume(
            topology.queue(),
            "stats-test",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    wait_for(&stats, topology.queue(), "1 consumer", counts_are(0, 1)).await;

    let _ = conn.close(200, "done").await;
    wait_for(
        &stats,
        topology.queue(),
        "the consumer gone",
        counts_are(0, 0),
    )
    .await;
    stats.stop();
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_absent_until_declared() {
    let missing = common::unique("stats-missing");
    let present = common::topology(&common::unique("stats-present"), QueueKind::Classic);
    common::declare(&present).await;
    common::publish_numbered(present.queue(), 2, "p").await;
    // The missing queue first, so each read of the present one needs a fresh channel.
    let stats = stats(&[&missing, present.queue()]);

    wait_for(&stats, &missing, "missing", |status, counts| {
        status == QueueStatus::NotFound && counts.is_none()
    })
    .await;
    wait_for(
        &stats,
        present.queue(),
        "the other queue read",
        counts_are(2, 0),
    )
    .await;
    // Several ticks later it is still missing, and the poller still runs.
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(stats.counts(&missing), None);
    assert!(!stats.is_stopped());

    declare_queue(&missing).await;
    common::publish_numbered(&missing, 3, "m").await;
    wait_for(
        &stats,
        &missing,
        "the declared queue read",
        counts_are(3, 0),
    )
    .await;
    assert_eq!(stats.counts(present.queue()).map(|c| c.ready), Some(2));

    stats.stop();
    common::cleanup(&[present, Topology::new(missing)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_polls_its_queue_dead_letter_queue_and_delay_queues() {
    let topology = common::topology(&common::unique("stats-topology"), QueueKind::Classic)
        .with_max_delay(Duration::from_secs(1));
    common::declare(&topology).await;
    common::publish_numbered(topology.dead_letter_queue().unwrap(), 4, "d").await;
    let stats = QueueStats::for_topology(common::url(), &topology)
        .interval(INTERVAL)
        .start()
        .expect("start");

    let names: Vec<String> = stats.snapshot().into_iter().map(|f| f.queue).collect();
    let mut expected = vec![
        topology.queue().to_owned(),
        topology.dead_letter_queue().unwrap().to_owned(),
    ];
    expected.extend(topology.delay_queues());
    assert_eq!(names, expected);

    let dlq = topology.dead_letter_queue().unwrap();
    wait_for(&stats, dlq, "4 dead letters", counts_are(4, 0)).await;
    wait_for(
        &stats,
        topology.queue(),
        "the queue empty",
        counts_are(0, 0),
    )
    .await;
    // Delay queues are declared when a delay first needs one.
    wait_for(
        &stats,
        &topology.delay_queues()[0],
        "a delay queue not declared yet",
        |s, c| s == QueueStatus::NotFound && c.is_none(),
    )
    .await;

    stats.stop();
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_opened_again() {
    let topology = common::topology(&common::unique("stats-lost"), QueueKind::Classic);
    common::declare(&topology).await;
    common::publish_numbered(topology.queue(), 1, "m").await;
    let name = common::unique("stats-connection");
    let stats = QueueStats::builder(common::url(), [topology.queue()])
        .interval(INTERVAL)
        .connection_name(name.clone())
        .reconnect(redrive_rabbitmq::Reconnect::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .start()
        .expect("start");
    wait_for(&stats, topology.queue(), "1 ready", counts_are(1, 0)).await;

    let pid = connection_pid(&name)
        .await
        .expect("the poller's connection");
    common::rabbitmqctl(&["close_connection", &pid, "redrive queue stats test"]).await;
    wait_for(&stats, topology.queue(), "disconnected", |s, c| {
        s == QueueStatus::Disconnected && c.is_none()
    })
    .await;
    common::publish_numbered(topology.queue(), 1, "n").await;
    wait_for(&stats, topology.queue(), "read again", counts_are(2, 0)).await;
    assert!(!stats.is_stopped());

    // Dropping the last handle ends the poller and closes its connection.
    let clone = stats.clone();
    drop(stats);
    assert!(!clone.is_stopped(), "a clone keeps the poller");
    drop(clone);
    let start = std::time::Instant::now();
    while connection_pid(&name).await.is_some() {
        assert!(
            start.elapsed() < WITHIN,
            "the connection outlived the last handle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_the_poller_within_its_timeout() {
    let topology = common::topology(&common::unique("stats-stop"), QueueKind::Classic);
    common::declare(&topology).await;
    let stats = stats(&[topology.queue()]);
    wait_for(&stats, topology.queue(), "read", counts_are(0, 0)).await;
    stats.stop();
    tokio::time::timeout(Duration::from_secs(3), async {
        while !stats.is_stopped() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the poller ends after stop");
    // The figures stay as last read.
    assert_eq!(stats.counts(topology.queue()).map(|c| c.ready), Some(0));
    common::cleanup(&[topology]).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_disconnected_not_an_error() {
    // Nothing listens on port 1.
    let stats = QueueStats::builder("amqp://guest:guest@127.0.0.1:1/%2f", ["q"])
        .interval(INTERVAL)
        .reconnect(redrive_rabbitmq::Reconnect::new(
            Duration::from_millis(20),
            Duration::from_millis(100),
        ))
        .start()
        .expect("start");
    wait_for(&stats, "q", "disconnected", |s, c| {
        s == QueueStatus::Disconnected && c.is_none()
    })
    .await;
    assert!(!stats.is_stopped());
}

#[tokio::test]
async fn settings_that_cannot_work_are_errors() {
    let url = common::url();
    let empty: [&str; 0] = [];
    for (what, builder) in [
        ("no queue", QueueStats::builder(&url, empty)),
        (
            "zero interval",
            QueueStats::builder(&url, ["q"]).interval(Duration::ZERO),
        ),
        (
            "zero timeout",
            QueueStats::builder(&url, ["q"]).timeout(Duration::ZERO),
        ),
        (
            "bad address",
            QueueStats::builder("amqp:guest:secret@x", ["q"]),
        ),
    ] {
        let err = builder.start().expect_err(what);
        assert!(!err.to_string().contains("secret"), "{what}: {err}");
    }
}

/// The broker's pid of the connection named `name`, if it has one.
async fn connection_pid(name: &str) -> Option<String> {
    let list = common::rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    list.lines()
        .find(|line| line.contains(&format!("\"{name}\"")))
        .and_then(|line| line.split('\t').next())
        .map(str::to_owned)
}
