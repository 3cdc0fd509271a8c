//! Creating a bench's topic, on the broker or on the mock cluster; shared by the Kafka
//! benches through `#[path]`.

use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::mocking::MockCluster;
use redrive_kafka::rdkafka::producer::DefaultProducerContext;

/// Creates `topic` with one partition on `mock`, else on the broker at `brokers`.
pub(crate) async fn create_topic(
    brokers: &str,
    mock: Option<&MockCluster<'static, DefaultProducerContext>>,
    topic: &str,
) {
    match mock {
        Some(cluster) => cluster.create_topic(topic, 1, 1).expect("topic"),
        None => {
            let admin: AdminClient<_> = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .create()
                .expect("admin");
            for r in admin
                .create_topics(
                    &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
                    &AdminOptions::new(),
                )
                .await
                .expect("create topic")
            {
                r.expect("topic created");
            }
        }
    }
}
