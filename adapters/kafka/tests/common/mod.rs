//! Shared helpers: the real broker (tansu) and librdkafka's mock cluster.
#![allow(dead_code, unreachable_pub)]

pub mod child;
pub mod conformance;
pub mod raw;

use std::time::Duration;

use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::client::DefaultClientContext;
use redrive_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
use redrive_kafka::rdkafka::mocking::MockCluster;
use redrive_kafka::rdkafka::producer::DefaultProducerContext;
use redrive_kafka::{KafkaConsumer, KafkaPublisher};

/// The real broker's address: `KAFKA_BROKERS`, else tansu's default.
pub fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Fails with how to start the broker when it does not answer a metadata request.
pub fn require_broker(brokers: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("client");
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "the Kafka broker at {brokers} did not answer ({e}); start it with \
             `source scripts/kafka-broker` (or run `scripts/test`), or set KAFKA_BROKERS"
        );
    }
}

/// The broker's metadata of every topic.
pub fn metadata(brokers: &str) -> redrive_kafka::rdkafka::metadata::Metadata {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("client");
    client
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata")
}

/// Creates `topic` with `partitions` on the real broker.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Waits until `group` has no members (the broker answers DescribeGroups with none),
/// for at most `within`; returns whether it got there, and the last answer.
pub async fn group_empties(brokers: &str, group: &str, within: Duration) -> (bool, String) {
    let (brokers, group) = (brokers.to_owned(), group.to_owned());
    tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("client");
        let deadline = std::time::Instant::now() + within;
        loop {
            let members = client
                .fetch_group_list(Some(&group), Duration::from_secs(5))
                .map(|list| {
                    list.groups()
                        .iter()
                        .map(|g| g.members().len())
                        .sum::<usize>()
                });
            if let Ok(0) = members {
                return (true, "no members".to_owned());
            }
            if std::time::Instant::now() >= deadline {
                return (false, format!("{members:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("wait for the group")
}

/// A one-broker mock cluster.
pub fn mock() -> MockCluster<'static, DefaultProducerContext> {
    MockCluster::new(1).expect("mock cluster")
}

/// A consumer with a fast commit interval and group timings for tests.
pub fn consumer(brokers: &str, group: &str, topic: &str) -> KafkaConsumer {
    KafkaConsumer::builder(brokers, group, [topic])
        .commit_interval(Duration::from_millis(100))
        .close_timeout(Duration::from_secs(5))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .build()
        .expect("consumer")
}

pub fn publisher(brokers: &str) -> KafkaPublisher {
    KafkaPublisher::new(brokers)
        .expect("publisher")
        .with_timeout(Duration::from_secs(10))
}

/// Where a scenario runs: the mock cluster (kept alive here) or the real broker.
pub struct Env {
    pub brokers: String,
    pub mock: Option<
        redrive_kafka::rdkafka::mocking::MockCluster<
            'static,
            redrive_kafka::rdkafka::producer::DefaultProducerContext,
        >,
    >,
}

impl Env {
    pub fn mock() -> Self {
        let cluster = mock();
        Env {
            brokers: cluster.bootstrap_servers(),
            mock: Some(cluster),
        }
    }

    pub fn real() -> Self {
        let brokers = brokers();
        require_broker(&brokers);
        Env {
            brokers,
            mock: None,
        }
    }

    /// Waits until the members of `group` that closed have left it (at most 30 s).
    ///
    /// tansu elects a member that leaves while another's JoinGroup is held as the
    /// leader of the next generation, and the group then never completes a sync: a test
    /// that starts a member right after another closes waits for the leave first. The
    /// mock cluster has no DescribeGroups, and handles such a leave.
    pub async fn wait_until_group_empty(&self, group: &str) {
        if self.mock.is_none() {
            let (empty, last) = group_empties(&self.brokers, group, Duration::from_secs(30)).await;
            assert!(empty, "group {group} still has members after 30 s: {last}");
        }
    }

    pub async fn create_topic(&self, topic: &str, partitions: i32) {
        match &self.mock {
            // The mock cluster has no CreateTopics API; it has its own call.
            Some(cluster) => cluster.create_topic(topic, partitions, 1).expect("topic"),
            None => create_topic(&self.brokers, topic, partitions).await,
        }
    }
}

/// Runs each scenario on the mock cluster and on the real broker.
#[allow(unused_macros)]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod mock {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::mock()).await;
                }
            )*
        }
        mod tansu {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Env::real()).await;
                }
            )*
        }
    };
}
