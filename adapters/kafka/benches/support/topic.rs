//! Creating a bench's topic, on the broker or on the mock cluster, and filling it;
//! shared by the Kafka benches through `#[path]`.

use std::time::Duration;

use redrive_kafka::rdkafka::ClientConfig;
use redrive_kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive_kafka::rdkafka::mocking::MockCluster;
use redrive_kafka::rdkafka::producer::{
    DefaultProducerContext, FutureProducer, FutureRecord, Producer as _,
};

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

/// Publishes `n` records to `topic`, record `i` with payload `body(i)` and key
/// `k<i % keys>`, and waits until the broker has them all.
pub(crate) async fn fill(
    brokers: &str,
    topic: &str,
    n: usize,
    keys: usize,
    body: impl Fn(usize) -> Vec<u8>,
) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let payload = body(i);
        let key = format!("k{}", i % keys);
        let record = FutureRecord::to(topic).payload(&payload).key(&key);
        pending.push(producer.send_result(record).expect("queue the record"));
        if pending.len() == 10_000 {
            for p in pending.drain(..) {
                p.await.expect("delivery report").expect("delivered");
            }
        }
    }
    for p in pending {
        p.await.expect("delivery report").expect("delivered");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}
