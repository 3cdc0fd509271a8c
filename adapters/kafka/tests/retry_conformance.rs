//! The conformance suite's nack scenarios, which `conformance.rs` skips on Kafka, on
//! consumers with retry topics (tansu, started by `scripts/kafka-broker`); and the
//! Worker's retry.
//!
//! A test binary of its own, run after `conformance.rs`: tansu 0.6 gets slower to hand a
//! partition to a group's next member as it holds more topics, and with the retry
//! topics of these scenarios created first, `unacked_comes_back` there got nothing
//! within 30 s (as it did after 12 other topics of 3 partitions were created).

mod common;

use std::time::Duration;

use common::conformance::Kafka;
use redrive_core::testkit;
use redrive_kafka::{KafkaPublisher, RetryTopics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_scenarios_with_retry_topics() {
    let brokers = common::brokers();
    common::require_broker(&brokers);
    // One record per batch in the delay topics: tansu 0.6.0 as released answers a fetch
    // from inside a batch of several records at the next batch.
    let retry_publisher = KafkaPublisher::builder(&brokers)
        .set("batch.num.messages", "1")
        .build()
        .expect("publisher");
    let retries = RetryTopics::new(
        retry_publisher,
        [Duration::from_millis(200), Duration::from_secs(2)],
    );
    let backend = Kafka::new(brokers, Some(retries));
    testkit::nack_redelivers(&backend).await;
    testkit::nack_delay_honoured(&backend).await;
    testkit::worker_retries_failures(&backend).await;
}
