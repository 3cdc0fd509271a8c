//! The shared conformance suite against a real Kafka-protocol broker (tansu, started by
//! `scripts/kafka-broker`). Without retry topics Kafka cannot nack one record, so the
//! two raw-nack scenarios are skipped (logged) and the Worker's parking is checked
//! instead; with retry topics they run, on consumers of their own.

mod common;

use std::time::Duration;

use redrive_core::testkit::{self, Backend};
use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};

struct Kafka {
    brokers: String,
    publisher: KafkaPublisher,
    /// Consumers retry through these retry topics.
    retry: Option<RetryTopics>,
}

impl Backend for Kafka {
    type Consumer = KafkaConsumer;
    type Publisher = KafkaPublisher;

    async fn destination(&self) -> String {
        let topic = testkit::unique_name("conformance");
        common::create_topic(&self.brokers, &topic, 3).await;
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
        let _ = common::group_empties(&self.brokers, &group, Duration::from_secs(20)).await;
        let Some(retry) = &self.retry else {
            return common::consumer(&self.brokers, &group, destination);
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

/// The two tests of this file, one at a time: tansu serves one group's rebalance
/// slowly while another's runs (a consumer dropped and started again in one scenario got
/// nothing within 30 s while the other test ran).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_real_broker() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let brokers = common::brokers();
    common::require_broker(&brokers);
    let backend = Kafka {
        publisher: common::publisher(&brokers),
        brokers,
        retry: None,
    };
    testkit::run_all(&backend).await;
}

/// The nack scenarios, which the suite above skips, on consumers with retry topics; and
/// the Worker's retry, which nacks with them (with `Unordered` ordering; it parks
/// otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_scenarios_with_retry_topics() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let brokers = common::brokers();
    common::require_broker(&brokers);
    // One record per batch in the delay topics: tansu 0.6.0 as released answers a fetch
    // from inside a batch of several records at the next batch.
    let retry_publisher = KafkaPublisher::builder(&brokers)
        .set("batch.num.messages", "1")
        .build()
        .expect("publisher");
    let backend = Kafka {
        publisher: common::publisher(&brokers),
        retry: Some(RetryTopics::new(
            retry_publisher,
            [Duration::from_millis(200), Duration::from_secs(2)],
        )),
        brokers,
    };
    testkit::nack_redelivers(&backend).await;
    testkit::nack_delay_honoured(&backend).await;
    testkit::worker_retries_failures(&backend).await;
}
