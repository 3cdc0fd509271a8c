//! A Worker on a Kafka topic with a dead-letter topic.
//!
//! ```text
//! source scripts/kafka-broker     # installs (once) and starts tansu on 127.0.0.1:9092
//! cargo run --example kafka --features kafka
//! ```
//!
//! The full middleware Stack runs on it: tracing, metrics, dead-lettering, idempotency,
//! a circuit breaker, in-process retries and a per-try timeout. Orders of three
//! customers share one partition; the customer is the key. One order is poison: the
//! Worker parks it (Kafka cannot hand one record back) and runs it again after a delay,
//! while the other customers' orders flow on and the poison customer's later orders
//! wait; after three attempts it goes to `<topic>-dlq` and that customer unblocks. The
//! committed offset never passes the parked record until it is settled. The run uses
//! topics of its own, removed at the end, and fails unless four orders were handled and
//! one dead-lettered.
//!
//! `KAFKA_BROKERS` overrides the broker address.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redrive::kafka::rdkafka::ClientConfig;
use redrive::kafka::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use redrive::kafka::rdkafka::client::DefaultClientContext;
use redrive::kafka::rdkafka::types::RDKafkaErrorCode;
use redrive::kafka::{KafkaConsumer, KafkaPublisher};
use redrive::middleware::Stack;
use redrive::middleware::circuit_breaker::CircuitBreakerConfig;
use redrive::middleware::dead_letter::DeadLetterConfig;
use redrive::middleware::idempotency::{IdempotencyConfig, MemoryStore};
use redrive::middleware::metrics::MetricsLayer;
use redrive::middleware::retry::{Backoff, RetryConfig};
use redrive::middleware::trace::TraceLayer;
use tokio::sync::Notify;

use redrive::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Worker, handler,
};

fn admin(brokers: &str) -> Result<AdminClient<DefaultClientContext>, BoxError> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?)
}

async fn create_topics(brokers: &str, topic: &str) -> Result<(), BoxError> {
    let admin = admin(brokers)?;
    let dlq = format!("{topic}-dlq");
    let topics = [
        NewTopic::new(topic, 1, TopicReplication::Fixed(1)),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(1)),
    ];
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = tokio::time::timeout(Duration::from_secs(15), admin.create_topics(&topics, &options))
        .await
        .map_err(|_| {
            format!("no Kafka broker answers at {brokers}; start one with `source scripts/kafka-broker`, or set KAFKA_BROKERS")
        })??;
    for result in created {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => return Err(format!("creating {topic}: {e}").into()),
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    // Topics of this run alone, removed at the end.
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let topic = format!("redrive-example-orders-{}", started.as_millis());
    create_topics(&brokers, &topic).await?;

    let publisher = KafkaPublisher::new(&brokers)?;
    for (customer, order) in [
        ("alice", "order-1"),
        ("bob", "poison"),
        ("carol", "order-2"),
        ("bob", "order-3"),
        ("alice", "order-4"),
    ] {
        publisher
            .publish(&topic, OutgoingMessage::new(order).with_key(customer))
            .await?;
    }

    let consumer = KafkaConsumer::builder(&brokers, "redrive-example", [topic.as_str()]).build()?;
    // With no OpenTelemetry provider installed the meter records nothing; the tracing
    // and metrics examples show how to install one.
    let meter = opentelemetry::global::meter("kafka-example");
    let stack = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&meter))
        .dead_letter(
            publisher.clone(),
            DeadLetterConfig::default()
                .with_max_attempts(3)
                .with_consumer_name("kafka-example"),
        )
        .idempotency(MemoryStore::new(), IdempotencyConfig::default())
        .circuit_breaker(CircuitBreakerConfig::default())
        .retry(
            RetryConfig::default()
                .with_backoff(Backoff::exponential(
                    Duration::from_millis(20),
                    Duration::from_millis(100),
                ))
                .with_max_tries(2),
        )
        .timeout(Duration::from_secs(5));
    println!("pipeline: {}", stack.describe());
    // Four good orders and the poison one's three attempts of two tries each end the run.
    let runs = Arc::new(AtomicUsize::new(0));
    let all_ran = Arc::new(Notify::new());
    let (r, done) = (runs.clone(), all_ran.clone());
    let handler = handler::handler_fn(move |msg: Message| {
        let customer = String::from_utf8_lossy(msg.key.as_deref().unwrap_or_default()).into_owned();
        let order = String::from_utf8_lossy(&msg.payload).into_owned();
        if r.fetch_add(1, Ordering::SeqCst) + 1 == 4 + 3 * 2 {
            done.notify_one();
        }
        async move {
            if order == "poison" {
                println!(
                    "attempt {} of {customer}'s poison order fails",
                    msg.attempt()
                );
                return Err::<(), BoxError>("cannot parse order".into());
            }
            println!("handled {customer}'s {order}");
            Ok(())
        }
    });

    let report = Worker::builder(consumer)
        .stack(stack)
        .handler(handler)
        .concurrency(8)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_millis(300)))
        .build()?
        // Stops once every order has run (joining the group can take seconds), after
        // 60 s, or on SIGTERM or Ctrl-C.
        .run_until(async {
            tokio::select! {
                () = async {
                    all_ran.notified().await;
                    // The dead letter's publish and the last commit.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                } => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
                () = redrive::shutdown_signal() => {}
            }
        })
        .await;
    println!("{report:?}");
    let dlq = format!("{topic}-dlq");
    let _ = admin(&brokers)?
        .delete_topics(&[&topic, &dlq], &AdminOptions::new())
        .await;
    if (report.processed, report.dead_lettered) != (4, 1) {
        return Err(format!(
            "expected 4 orders handled and 1 dead-lettered, got {} and {} ({} handler runs)",
            report.processed,
            report.dead_lettered,
            runs.load(Ordering::SeqCst)
        )
        .into());
    }
    println!("the poison order went to `{dlq}`");
    Ok(())
}
