//! A Worker on an SQS queue (the local emulator) with a dead-letter queue.
//!
//! ```text
//! source scripts/sqs-emulator     # installs and starts fauxqs on 127.0.0.1:9324
//! cargo run --example sqs --features sqs
//! ```
//!
//! The full middleware Stack runs on it: tracing, metrics, dead-lettering, idempotency,
//! a circuit breaker, in-process retries and a per-try timeout. A few orders are
//! published, one of them twice and one poison; the duplicate is skipped, the poison
//! message is retried in process, then through SQS (`ChangeMessageVisibility`), and
//! after three receives the dead-letter layer moves it to `redrive-example-orders-dlq`
//! with an envelope saying why. One handler is slower than the queue's visibility
//! timeout; the Worker's heartbeat keeps it from being delivered twice.
//!
//! `SQS_ENDPOINT` overrides the endpoint; region and credentials come from the AWS
//! configuration chain, with dummy ones for the emulator when none are set.

use std::time::Duration;

use redrive::middleware::Stack;
use redrive::middleware::circuit_breaker::CircuitBreakerConfig;
use redrive::middleware::dead_letter::DeadLetterConfig;
use redrive::middleware::idempotency::{IDEMPOTENCY_KEY, IdempotencyConfig, MemoryStore};
use redrive::middleware::metrics::MetricsLayer;
use redrive::middleware::retry::{Backoff, RetryConfig};
use redrive::middleware::trace::TraceLayer;
use redrive::sqs::Sqs;
use redrive::sqs::aws_config::{self, BehaviorVersion, Region};
use redrive::sqs::aws_sdk_sqs::config::Credentials;
use redrive::sqs::aws_sdk_sqs::types::QueueAttributeName;
use redrive::{BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, handler};

const QUEUE: &str = "redrive-example-orders";
const DLQ: &str = "redrive-example-orders-dlq";

async fn connect() -> Result<Sqs, BoxError> {
    let endpoint =
        std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".to_owned());
    let mut config = aws_config::defaults(BehaviorVersion::latest()).endpoint_url(&endpoint);
    if std::env::var_os("AWS_REGION").is_none() {
        config = config.region(Region::new("us-east-1"));
    }
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        config =
            config.credentials_provider(Credentials::new("test", "test", None, None, "example"));
    }
    let sqs = Sqs::from_sdk_config(&config.load().await);
    if let Err(e) = sqs.client().list_queues().max_results(1).send().await {
        return Err(format!(
            "no SQS endpoint answers at {endpoint} ({e}); start the emulator with \
             `source scripts/sqs-emulator`, or set SQS_ENDPOINT"
        )
        .into());
    }
    Ok(sqs)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sqs = connect().await?;
    for queue in [QUEUE, DLQ] {
        // A short visibility timeout, so the slow order below outlives it.
        sqs.client()
            .create_queue()
            .queue_name(queue)
            .attributes(QueueAttributeName::VisibilityTimeout, "2")
            .send()
            .await?;
    }

    let publisher = sqs.publisher();
    for order in ["order-1", "order-2", "order-2", "poison", "slow"] {
        let message = OutgoingMessage::new(order).with_header(IDEMPOTENCY_KEY, order)?;
        publisher.publish(QUEUE, message).await?;
    }

    let consumer = sqs
        .consumer(QUEUE)
        .wait_time(Duration::from_secs(1))
        .build()
        .await?;
    // With no OpenTelemetry provider installed the meter records nothing; the tracing
    // and metrics examples show how to install one.
    let meter = opentelemetry::global::meter("sqs-example");
    let stack = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&meter))
        .dead_letter(
            sqs.publisher(),
            DeadLetterConfig::default()
                .with_max_attempts(3)
                .with_destination(DLQ)
                .with_consumer_name("sqs-example"),
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
        .timeout(Duration::from_secs(10));
    println!("pipeline: {}", stack.describe());
    let handler = handler::handler_fn(|msg: Message| async move {
        match &msg.payload[..] {
            b"poison" => {
                println!("receive {} of the poison message fails", msg.attempt());
                Err::<(), BoxError>("cannot parse order".into())
            }
            b"slow" => {
                println!("the slow order takes 5 s, past the 2 s visibility timeout");
                tokio::time::sleep(Duration::from_secs(5)).await;
                println!("handled \"slow\" (receive {})", msg.attempt());
                Ok(())
            }
            body => {
                println!("handled {:?}", String::from_utf8_lossy(body));
                Ok(())
            }
        }
    });

    let report = Worker::builder(consumer)
        .stack(stack)
        .handler(handler)
        .concurrency(8)
        .redelivery(Redelivery::constant(Duration::from_secs(1)))
        .build()?
        // Stops after 8 s, or on SIGTERM or Ctrl-C.
        .run_until(async {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(8)) => {}
                () = redrive::shutdown_signal() => {}
            }
        })
        .await;
    println!("{report:?}");
    println!("the poison message is in `{DLQ}`");
    Ok(())
}
