//! The shared conformance suite against a real Kafka-protocol broker (tansu, started by
//! `scripts/kafka-broker`). Kafka cannot nack one record without retry topics, so the
//! two raw-nack scenarios are skipped (logged) and the Worker's parking is checked
//! instead; `retry_conformance.rs` runs them with retry topics.

mod common;

use common::conformance::Kafka;
use redrive_core::testkit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_a_real_broker() {
    let brokers = common::brokers();
    common::require_broker(&brokers);
    testkit::run_all(&Kafka::new(brokers, None)).await;
}
