//! Helpers shared by the tests against the local RabbitMQ.
#![allow(dead_code, unreachable_pub)]

pub mod raw;

use std::sync::Arc;
use std::time::Duration;

use redrive_core::{
    BoxError, Consumer, Delivery, Message, Outcome, OutgoingMessage, Publisher, Redelivery, Report,
    Worker,
};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use redrive_rabbitmq::lapin::Connection;
use redrive_rabbitmq::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use redrive_rabbitmq::lapin::types::FieldTable;
use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};

/// The broker's address: `AMQP_URL`, else the local default.
pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.to_owned())
}

const HOW_TO_START: &str = "RabbitMQ is not reachable: start it with `rabbitmq-server -detached` \
     (then wait for `rabbitmqctl await_startup`), or point AMQP_URL at a running broker";

/// A lapin connection, or a failure that says how to start the broker.
pub async fn connection(name: &str) -> Connection {
    redrive_rabbitmq::connect(&url(), name)
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

/// A publisher, or a failure that says how to start the broker.
pub async fn publisher() -> RabbitPublisher {
    RabbitPublisher::connect(url())
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

/// Publishes `n` messages to `queue`, bodies `{prefix}0` to `{prefix}{n-1}`, each
/// confirmed, and closes the publisher.
pub async fn publish_numbered(queue: &str, n: usize, prefix: &str) {
    let p = publisher().await;
    for i in 0..n {
        p.publish(queue, OutgoingMessage::new(format!("{prefix}{i}")))
            .await
            .expect("publish");
    }
    p.close().await;
}

/// A unique queue name for one test.
pub fn unique(prefix: &str) -> String {
    redrive_core::testkit::unique_name(&format!("redrive-rmq-{prefix}"))
}

/// The topology tests use: ten minutes: above the Worker's default redelivery maximum, and few delay buckets.
pub fn topology(queue: &str, kind: QueueKind) -> Topology {
    Topology::new(queue)
        .with_kind(kind)
        .with_dead_letter_queue(format!("{queue}-dlq"))
        .with_max_delay(Duration::from_secs(600))
}

/// Declares `topology` (queue and DLQ).
pub async fn declare(topology: &Topology) {
    let conn = connection("redrive-test-declare").await;
    topology.declare(&conn).await.expect("declare topology");
    let _ = conn.close(200, "done").await;
}

/// A consumer of `topology` named `name`.
pub async fn consumer(topology: &Topology, name: &str, prefetch: u16) -> RabbitConsumer {
    RabbitConsumer::builder(url(), topology.clone())
        .connection_name(name)
        .prefetch(prefetch)
        .reconnect(redrive_rabbitmq::Reconnect::new(
            Duration::from_millis(200),
            Duration::from_secs(2),
        ))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

/// Deletes the queues of these topologies (queue, DLQ, delay queues).
pub async fn cleanup(topologies: &[Topology]) {
    let conn = connection("redrive-test-cleanup").await;
    let ch = conn.create_channel().await.expect("channel");
    for t in topologies {
        let mut names = vec![t.queue().to_owned()];
        names.extend(t.dead_letter_queue().map(str::to_owned));
        names.extend(t.delay_queues());
        for q in names {
            let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
        }
    }
    let _ = conn.close(200, "done").await;
}

/// The number of ready messages in `queue`, or `None` when it does not exist.
pub async fn ready(queue: &str) -> Option<u32> {
    let conn = connection("redrive-test-depth").await;
    let ch = conn.create_channel().await.expect("channel");
    let declared = ch
        .queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "done").await;
    declared.ok().map(|q| q.message_count())
}

/// Runs `rabbitmqctl args…`, returning its stdout; panics with its stderr on failure.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the broker accepts connections again (up to 60 s).
pub async fn wait_for_broker() {
    let start = std::time::Instant::now();
    loop {
        match redrive_rabbitmq::connect(&url(), "redrive-test-probe").await {
            Ok(c) => {
                let _ = c.close(200, "probe").await;
                return;
            }
            Err(e) if start.elapsed() > Duration::from_secs(60) => {
                panic!("{HOW_TO_START}: not back within 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The consumer's next delivery, or `None` if none comes `within`.
pub async fn next(c: &mut RabbitConsumer, within: Duration) -> Option<Delivery> {
    tokio::time::timeout(within, c.receive())
        .await
        .ok()
        .map(|r| r.expect("receive").expect("consumer open"))
}

/// A Worker running `handler` over `consumer` on its own task, with `concurrency` calls
/// and failed messages nacked for redelivery at once.
pub struct RunningWorker {
    stop: Arc<Notify>,
    run: JoinHandle<Report>,
}

impl RunningWorker {
    pub fn spawn<S>(consumer: RabbitConsumer, handler: S, concurrency: usize) -> Self
    where
        S: tower::Service<Message> + Send + 'static,
        S::Response: Into<Outcome> + Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let worker = Worker::builder(consumer)
            .service(handler)
            .concurrency(concurrency)
            .redelivery(Redelivery::constant(Duration::ZERO))
            .build()
            .expect("worker");
        let stop = Arc::new(Notify::new());
        let stopper = stop.clone();
        let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));
        RunningWorker { stop, run }
    }

    /// Stops the Worker and returns its report.
    pub async fn stop(self) -> Report {
        self.stop.notify_one();
        self.run.await.expect("worker task")
    }
}
