//! The queue stats poller against the SQS emulator: it reads what SQS says (visible, in
//! flight, delayed), finds a queue's dead-letter queue from its redrive policy, outlives
//! missing queues and an unreachable endpoint, and stops. The figures reach the
//! `redrive.queue.*` gauges.

mod common;

use std::time::Duration;

use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, SdkMeterProvider};
use redrive_middleware::metrics::{MetricsLayer, QueueReading};
use redrive_sqs::aws_config::{self, BehaviorVersion, Region};
use redrive_sqs::aws_sdk_sqs::config::Credentials;
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;
use redrive_sqs::{QueueCounts, QueueStats, QueueStatus, Sqs};

const INTERVAL: Duration = Duration::from_millis(100);
const WITHIN: Duration = Duration::from_secs(10);

fn stats(sqs: &Sqs, queues: &[&str]) -> QueueStats {
    QueueStats::builder(sqs.clone(), queues.iter().copied())
        .interval(INTERVAL)
        .timeout(Duration::from_secs(2))
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

fn counts_are(
    visible: u64,
    in_flight: u64,
    delayed: u64,
) -> impl Fn(QueueStatus, Option<QueueCounts>) -> bool {
    move |status, counts| {
        status == QueueStatus::Read
            && counts.is_some_and(|c| {
                (c.visible, c.in_flight, c.delayed) == (visible, in_flight, delayed)
            })
    }
}

fn absent(status: QueueStatus) -> impl Fn(QueueStatus, Option<QueueCounts>) -> bool {
    move |s, c| s == status && c.is_none()
}

async fn send(sqs: &Sqs, url: &str, n: usize, delay: Option<i32>) {
    for i in 0..n {
        sqs.client()
            .send_message()
            .queue_url(url)
            .message_body(format!("m{i}"))
            .set_delay_seconds(delay)
            .send()
            .await
            .expect("SendMessage");
    }
}

/// Receives `n` messages and leaves them in flight (never deleted).
async fn receive_unsettled(sqs: &Sqs, url: &str, n: usize) {
    let mut got = 0;
    let start = std::time::Instant::now();
    while got < n {
        let out = sqs
            .client()
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(i32::try_from(n - got).unwrap())
            .wait_time_seconds(1)
            .send()
            .await
            .expect("ReceiveMessage");
        got += out.messages().len();
        assert!(start.elapsed() < WITHIN, "received {got} of {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_visible_in_flight_and_delayed_as_sqs_does() {
    let sqs = common::sqs().await;
    let name = common::queue_name("stats-counts", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(60), &[]).await;
    send(&sqs, &url, 5, None).await;
    send(&sqs, &url, 1, Some(120)).await;
    receive_unsettled(&sqs, &url, 2).await;

    let stats = stats(&sqs, &[&name]);
    wait_for(
        &stats,
        &name,
        "3 visible, 2 in flight, 1 delayed",
        counts_are(3, 2, 1),
    )
    .await;
    let counts = stats.counts(&name).expect("counts");
    assert!(counts.read_at <= std::time::SystemTime::now());
    // SQS's own figures agree.
    assert_eq!(common::counts(&sqs, &url).await, (3, 2, 1));

    // A queue named by its URL is read too, under that URL.
    let by_url = self::stats(&sqs, &[&url]);
    wait_for(&by_url, &url, "by URL", counts_are(3, 2, 1)).await;

    stats.stop();
    by_url.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn for_queue_also_polls_the_dead_letter_queue_of_its_redrive_policy() {
    let sqs = common::sqs().await;
    let dlq = common::queue_name("stats-dlq", false);
    let dlq_url = common::create_queue(&sqs, &dlq, Duration::from_secs(30), &[]).await;
    let dlq_arn = sqs
        .queue_info(&dlq)
        .await
        .expect("dlq info")
        .arn
        .expect("arn");
    let name = common::queue_name("stats-guarded", false);
    let policy = format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"10"}}"#);
    common::create_queue(
        &sqs,
        &name,
        Duration::from_secs(30),
        &[(QueueAttributeName::RedrivePolicy, policy)],
    )
    .await;
    send(&sqs, &dlq_url, 4, None).await;

    let info = sqs.queue_info(&name).await.expect("queue info");
    let stats = QueueStats::for_queue(sqs.clone(), &info)
        .interval(INTERVAL)
        .start()
        .expect("start");
    let names: Vec<String> = stats.snapshot().into_iter().map(|f| f.queue).collect();
    assert_eq!(names, [name.clone(), dlq.clone()]);
    wait_for(&stats, &dlq, "4 dead letters", counts_are(4, 0, 0)).await;
    wait_for(&stats, &name, "the queue empty", counts_are(0, 0, 0)).await;

    // A queue without a redrive policy: the queue alone.
    let plain = sqs.queue_info(&dlq).await.expect("dlq info");
    let alone = QueueStats::for_queue(sqs.clone(), &plain)
        .start()
        .expect("start");
    let names: Vec<String> = alone.snapshot().into_iter().map(|f| f.queue).collect();
    assert_eq!(names, [dlq]);
    stats.stop();
    alone.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_absent_until_created_and_after_deleted() {
    let sqs = common::sqs().await;
    let missing = common::queue_name("stats-missing", false);
    let present = common::queue_name("stats-present", false);
    let present_url = common::create_queue(&sqs, &present, Duration::from_secs(30), &[]).await;
    send(&sqs, &present_url, 2, None).await;
    let stats = stats(&sqs, &[&missing, &present]);

    wait_for(&stats, &missing, "missing", absent(QueueStatus::NotFound)).await;
    wait_for(&stats, &present, "the other queue", counts_are(2, 0, 0)).await;
    tokio::time::sleep(INTERVAL * 5).await;
    assert_eq!(stats.counts(&missing), None);
    assert!(!stats.is_stopped());

    let url = common::create_queue(&sqs, &missing, Duration::from_secs(30), &[]).await;
    send(&sqs, &url, 3, None).await;
    wait_for(&stats, &missing, "created", counts_are(3, 0, 0)).await;

    // Deleted: its last figures are dropped, not kept as if current.
    sqs.client()
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("DeleteQueue");
    wait_for(&stats, &missing, "deleted", absent(QueueStatus::NotFound)).await;
    assert_eq!(stats.counts(&present).map(|c| c.visible), Some(2));
    stats.stop();
}

/// A handle on an endpoint where nothing listens.
async fn unreachable() -> Sqs {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "redrive-tests",
        ))
        .endpoint_url("http://127.0.0.1:1")
        .load()
        .await;
    Sqs::from_sdk_config(&config)
}

#[tokio::test]
async fn an_unreachable_endpoint_is_unavailable_not_an_error() {
    let sqs = unreachable().await;
    let stats = QueueStats::builder(sqs, ["orders"])
        .interval(INTERVAL)
        .timeout(Duration::from_secs(1))
        .start()
        .expect("start");
    wait_for(
        &stats,
        "orders",
        "unavailable",
        absent(QueueStatus::Unavailable),
    )
    .await;
    assert!(!stats.is_stopped());
}

/// A TCP relay to the emulator that can be cut: SQS going away under a running poller.
struct Relay {
    address: String,
    tasks: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(to: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("address"));
        let tasks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = to.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                held.lock().unwrap().push(relay);
            }
        });
        tasks.lock().unwrap().push(accept);
        Relay { address, tasks }
    }

    /// Closes the listener and every relayed connection.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_are_dropped_when_sqs_goes_away() {
    let sqs = common::sqs().await;
    let name = common::queue_name("stats-away", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    send(&sqs, &url, 3, None).await;

    let emulator = common::endpoint().trim_start_matches("http://").to_owned();
    let relay = Relay::start(emulator).await;
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "redrive-tests",
        ))
        .endpoint_url(&relay.address)
        .load()
        .await;
    let through = Sqs::from_sdk_config(&config);
    let stats = QueueStats::builder(through, [&url])
        .interval(INTERVAL)
        .timeout(Duration::from_secs(1))
        .start()
        .expect("start");
    wait_for(&stats, &url, "read through the relay", counts_are(3, 0, 0)).await;

    relay.cut();
    wait_for(&stats, &url, "SQS gone", absent(QueueStatus::Unavailable)).await;
    assert_eq!(stats.counts(&url), None);
    assert!(!stats.is_stopped());
    stats.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_or_the_last_handle_dropped_ends_the_poller() {
    let sqs = common::sqs().await;
    let name = common::queue_name("stats-stop", false);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    let stats = stats(&sqs, &[&name]);
    wait_for(&stats, &name, "read", counts_are(0, 0, 0)).await;
    let clone = stats.clone();
    stats.stop();
    tokio::time::timeout(Duration::from_secs(3), async {
        while !clone.is_stopped() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the poller ends after stop");
    // The figures stay as last read.
    assert_eq!(clone.counts(&name).map(|c| c.visible), Some(0));

    let other = self::stats(&sqs, &[&name]);
    let watcher = other.clone();
    drop(other);
    assert!(!watcher.is_stopped(), "a clone keeps the poller");
    drop(watcher);
}

#[tokio::test]
async fn settings_that_cannot_work_are_errors() {
    let sqs = unreachable().await;
    let empty: [&str; 0] = [];
    for (what, builder) in [
        ("no queue", QueueStats::builder(sqs.clone(), empty)),
        (
            "zero interval",
            QueueStats::builder(sqs.clone(), ["q"]).interval(Duration::ZERO),
        ),
        (
            "zero timeout",
            QueueStats::builder(sqs.clone(), ["q"]).timeout(Duration::ZERO),
        ),
        (
            "a name SQS refuses",
            QueueStats::builder(sqs.clone(), ["orders.dlq"]),
        ),
    ] {
        builder.start().expect_err(what);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_figures_reach_the_queue_gauges() {
    let sqs = common::sqs().await;
    let name = common::queue_name("stats-gauges", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(60), &[]).await;
    send(&sqs, &url, 4, None).await;
    send(&sqs, &url, 2, Some(120)).await;
    receive_unsettled(&sqs, &url, 1).await;
    let stats = stats(&sqs, &[&name]);
    wait_for(&stats, &name, "read", counts_are(3, 1, 2)).await;

    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_periodic_exporter(exporter.clone())
        .build();
    let metrics = MetricsLayer::new(&provider.meter("test"));
    let (s, q) = (stats.clone(), name.clone());
    metrics.observe_queue(redrive_sqs::SYSTEM, name.clone(), move || {
        let c = s.counts(&q)?;
        Some(
            QueueReading::new(c.visible)
                .with_in_flight(c.in_flight)
                .with_delayed(c.delayed),
        )
    });
    provider.force_flush().expect("flush");
    let mut seen = Vec::new();
    for rm in exporter.get_finished_metrics().expect("metrics") {
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                if let AggregatedMetrics::U64(MetricData::Gauge(g)) = m.data() {
                    for p in g.data_points() {
                        seen.push((m.name().to_owned(), p.value()));
                    }
                }
            }
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("redrive.queue.delayed".to_owned(), 2),
            ("redrive.queue.depth".to_owned(), 3),
            ("redrive.queue.in_flight".to_owned(), 1),
        ]
    );
    stats.stop();
}
