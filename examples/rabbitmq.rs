//! A Worker on a real RabbitMQ quorum queue with a dead-letter queue.
//!
//! ```text
//! rabbitmq-server -detached   # if it is not running
//! cargo run --example rabbitmq --features rabbitmq
//! ```
//!
//! The full middleware Stack runs on it: tracing, metrics, dead-lettering, idempotency,
//! a circuit breaker, in-process retries and a per-try timeout. A few orders are
//! published, one of them twice and one poison; the duplicate is skipped, the poison
//! message is retried in process, then through the broker with a delay, and after three
//! deliveries the dead-letter layer moves it to `redrive-example-orders-dlq` with an
//! envelope saying why.

use std::time::Duration;

use redrive::middleware::Stack;
use redrive::middleware::circuit_breaker::CircuitBreakerConfig;
use redrive::middleware::dead_letter::DeadLetterConfig;
use redrive::middleware::idempotency::{IDEMPOTENCY_KEY, IdempotencyConfig, MemoryStore};
use redrive::middleware::metrics::MetricsLayer;
use redrive::middleware::retry::{Backoff, RetryConfig};
use redrive::middleware::trace::TraceLayer;
use redrive::rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};
use redrive::{BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, handler};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| redrive::rabbitmq::DEFAULT_URL.into());
    let queue = "redrive-example-orders";
    let topology = Topology::new(queue)
        .with_kind(QueueKind::Quorum)
        .with_dead_letter_queue(format!("{queue}-dlq"));

    let consumer = RabbitConsumer::builder(&url, topology.clone())
        .prefetch(32)
        .connection_name("redrive-example")
        .connect()
        .await?;
    let monitor = consumer.monitor();
    let publisher = RabbitPublisher::connect(&url).await?;
    for order in ["order-1", "order-2", "order-2", "poison", "order-3"] {
        let message = OutgoingMessage::new(order).with_header(IDEMPOTENCY_KEY, order)?;
        publisher.publish(queue, message).await?;
    }

    // With no OpenTelemetry provider installed the meter records nothing; the tracing
    // and metrics examples show how to install one.
    let meter = opentelemetry::global::meter("rabbitmq-example");
    let stack = Stack::new()
        .trace(TraceLayer::new())
        .metrics(MetricsLayer::new(&meter))
        .dead_letter(
            publisher.clone(),
            DeadLetterConfig::default()
                .with_max_attempts(3)
                .with_consumer_name("rabbitmq-example"),
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
    let handler = handler::handler_fn(|msg: Message| async move {
        if msg.payload == "poison" {
            println!("delivery {} of the poison message fails", msg.attempt());
            return Err::<(), BoxError>("cannot parse order".into());
        }
        println!("handled {:?}", msg.payload);
        Ok(())
    });

    let worker = Worker::builder(consumer)
        .stack(stack)
        .handler(handler)
        .concurrency(8)
        .redelivery(Redelivery::constant(Duration::from_millis(500)))
        .build()?;
    let report = worker
        // Stops after 4 s, or on SIGTERM or Ctrl-C.
        .run_until(async {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(4)) => {}
                () = redrive::shutdown_signal() => {}
            }
        })
        .await;
    println!("{report:?}; reconnects: {}", monitor.reconnects());
    println!(
        "the poison message is in `{}`",
        topology.dead_letter_queue().unwrap_or_default()
    );
    Ok(())
}
