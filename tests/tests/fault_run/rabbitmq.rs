//! The fault run's RabbitMQ side: a quorum or classic queue on the broker at
//! `AMQP_URL` (default `amqp://127.0.0.1:5672`), with `rabbitmqctl` on the PATH. Cuts
//! close the consumers' connections from the broker side (`rabbitmqctl
//! close_connection`); the restart stops and starts the broker's application, with a
//! guard that starts it again even when a run fails.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use redrive_fault_run::Broker;
use redrive_rabbitmq::lapin::options::{BasicGetOptions, QueueDeleteOptions};
use redrive_rabbitmq::lapin::types::AMQPValue;
use redrive_rabbitmq::{QueueKind, RabbitPublisher, Topology};
use tokio::process::Command;

use super::{DeadLetter, Depths, Target};

const HOW_TO_START: &str = "RabbitMQ is not reachable: start it with `rabbitmq-server -detached` \
     (then wait for `rabbitmqctl await_startup`), or point AMQP_URL at a running broker";

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.to_owned())
}

/// A RabbitMQ queue of one run.
pub(crate) struct Rabbit {
    topology: Topology,
}

impl Rabbit {
    /// Declares a fresh queue of `kind`, its dead-letter queue and its delay queues.
    pub(crate) async fn new(kind: QueueKind) -> Self {
        let queue = format!("redrive-fault-{}-{}", kind.as_str(), super::tag());
        let topology = Topology::new(&queue)
            .with_kind(kind)
            .with_dead_letter_queue(format!("{queue}-dlq"))
            .with_max_delay(Duration::from_secs(600));
        let conn = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-declare")
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
        topology.declare(&conn).await.expect("declare the topology");
        let _ = conn.close(200, "declared").await;
        Rabbit { topology }
    }
}

/// Starts the broker's application again when dropped, so a failing run leaves the
/// broker running.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .arg("start_app")
            .output();
    }
}

/// Runs `rabbitmqctl args…`, returning its stdout; panics with its stderr on failure.
async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("rabbitmqctl").args(args).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not finish within 60 s"))
    .unwrap_or_else(|e| panic!("cannot run rabbitmqctl {args:?}: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the broker accepts connections again (up to 60 s).
async fn wait_for_broker() {
    let start = Instant::now();
    loop {
        match redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-probe").await {
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

/// Messages in each queue whose name starts with `prefix` (ready and unacked), as the
/// broker counts them.
async fn queue_depths(prefix: &str) -> BTreeMap<String, u64> {
    let list = rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "--quiet",
        "--no-table-headers",
    ])
    .await;
    list.lines()
        .filter_map(|line| {
            let (name, n) = line.split_once('\t')?;
            let n = n.trim().parse().ok()?;
            name.starts_with(prefix).then(|| (name.to_owned(), n))
        })
        .collect()
}

/// The value of an AMQP header as text.
fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

impl Target for Rabbit {
    type Producer = RabbitPublisher;

    fn broker(&self) -> Broker {
        match self.topology.kind() {
            QueueKind::Quorum => Broker::RabbitQuorum,
            _ => Broker::RabbitClassic,
        }
    }

    fn url(&self) -> String {
        amqp_url()
    }

    fn queue(&self) -> &str {
        self.topology.queue()
    }

    async fn producer(&self) -> RabbitPublisher {
        RabbitPublisher::connect_named(amqp_url(), "redrive-fault-producer")
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
    }

    async fn depths(&self) -> Depths {
        let depths = queue_depths(self.queue()).await;
        let dlq = self.topology.dead_letter_queue().unwrap_or_default();
        Depths {
            pending: depths
                .iter()
                .filter(|(name, _)| **name != dlq)
                .map(|(_, n)| n)
                .sum(),
            dead: depths.get(dlq).copied().unwrap_or(0),
        }
    }

    async fn dead_letters(&self, _expected: usize) -> Vec<DeadLetter> {
        let queue = self.topology.dead_letter_queue().unwrap_or_default();
        let conn = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-drain")
            .await
            .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"));
        let ch = conn.create_channel().await.expect("channel");
        let mut out = Vec::new();
        while let Some(msg) = ch
            .basic_get(queue, BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let props = &msg.delivery.properties;
            let headers = props
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .filter_map(|(k, v)| Some((k.as_str().to_owned(), text(v)?)))
                        .collect()
                })
                .unwrap_or_default();
            let id = props
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            out.push(DeadLetter { id, headers });
        }
        let _ = conn.close(200, "drained").await;
        out
    }

    async fn cut(&self, prefix: &str) -> usize {
        let list = rabbitmqctl(&[
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .await;
        let pids: Vec<String> = list
            .lines()
            .filter(|line| line.contains(&format!("\"{prefix}")))
            .filter_map(|line| line.split('\t').next().map(str::to_owned))
            .collect();
        // All at once: one rabbitmqctl takes about a second to start.
        let mut closing = tokio::task::JoinSet::new();
        for pid in pids.clone() {
            closing.spawn(async move {
                rabbitmqctl(&[
                    "close_connection",
                    &pid,
                    "redrive fault run: connection cut",
                ])
                .await
            });
        }
        while let Some(done) = closing.join_next().await {
            done.expect("close_connection");
        }
        pids.len()
    }

    fn can_restart(&self) -> bool {
        true
    }

    async fn restart(&self) {
        let guard = RestartOnDrop;
        rabbitmqctl(&["stop_app"]).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        rabbitmqctl(&["start_app"]).await;
        std::mem::forget(guard);
        wait_for_broker().await;
    }

    async fn cleanup(&self) {
        let Ok(conn) = redrive_rabbitmq::connect(&amqp_url(), "redrive-fault-cleanup").await else {
            return;
        };
        if let Ok(ch) = conn.create_channel().await {
            let mut names = vec![self.topology.queue().to_owned()];
            names.extend(self.topology.dead_letter_queue().map(str::to_owned));
            names.extend(self.topology.delay_queues());
            for q in names {
                let _ = ch.queue_delete(&q, QueueDeleteOptions::default()).await;
            }
        }
        let _ = conn.close(200, "done").await;
    }
}
