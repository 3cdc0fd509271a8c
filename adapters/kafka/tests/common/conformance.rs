//! The real broker (tansu) as a backend of the shared conformance suite.

use std::time::Duration;

use redrive_core::testkit::{self, Backend};
use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};

/// The real broker as a conformance backend: a topic of 3 partitions per scenario, a
/// group per topic, consumers with retry topics when given.
pub struct Kafka {
    brokers: String,
    publisher: KafkaPublisher,
    /// Consumers retry through these retry topics.
    retry: Option<RetryTopics>,
}

impl Kafka {
    /// The broker at `brokers`, its consumers retrying through `retry` if given.
    pub fn new(brokers: String, retry: Option<RetryTopics>) -> Self {
        Kafka {
            publisher: super::publisher(&brokers),
            brokers,
            retry,
        }
    }
}

impl Backend for Kafka {
    type Consumer = KafkaConsumer;
    type Publisher = KafkaPublisher;

    async fn destination(&self) -> String {
        let topic = testkit::unique_name("conformance");
        super::create_topic(&self.brokers, &topic, 3).await;
        topic
    }

    async fn consumer(&self, destination: &str) -> KafkaConsumer {
        // One group per topic: consumers of a topic share its partitions.
        let group = format!("{destination}-group");
        // tansu elects a member that leaves while another's JoinGroup is held as the
        // next generation's leader, and the group never syncs again: a scenario that
        // drops a consumer and starts the next at once would wait for good. Give a
        // dropped member time to leave: its LeaveGroup goes out from a thread within
        // moments, but on a loaded machine it can be late or lost, and then the member
        // leaves when its 6 s session expires (a 6 s wait here was seen too short in a
        // full test run beside two builds). A member that stays (two consumers sharing
        // the topic) is joined after the wait, which costs that scenario 20 s.
        let _ = super::group_empties(&self.brokers, &group, Duration::from_secs(20)).await;
        let Some(retry) = &self.retry else {
            return super::consumer(&self.brokers, &group, destination);
        };
        let builder = KafkaConsumer::builder(&self.brokers, &group, [destination])
            .commit_interval(Duration::from_millis(100))
            .close_timeout(Duration::from_secs(5))
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .retry_topics(retry.clone());
        builder
            .create_retry_topics()
            .await
            .expect("create the retry topics");
        builder.build().expect("consumer")
    }

    fn publisher(&self) -> KafkaPublisher {
        self.publisher.clone()
    }

    fn settle_time(&self) -> Duration {
        // Two members joining one group: the first takes every partition, the
        // second's join rebalances them (session and heartbeat timings in `common`).
        Duration::from_secs(6)
    }
}
