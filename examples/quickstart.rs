//! The quickstart: a few hundred orders on the in-memory broker through the full
//! stack. Some fail transiently and are retried, one is poison and is dead-lettered
//! with its envelope, some are sent twice and skipped as duplicates.
//!
//! Run with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redrive::memory::MemoryBroker;
use redrive::middleware::Stack;
use redrive::middleware::dead_letter::{self, DeadLetterConfig};
use redrive::middleware::idempotency::{self, IdempotencyConfig, IdempotencyLayer, MemoryStore};
use redrive::middleware::retry::{Backoff, RetryConfig, RetryEvent, RetryLayer, Try};
use redrive::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Worker, classify,
    handler,
};
use serde::Deserialize;

const ORDERS: u32 = 300;
const RESENT: u32 = 12;

#[derive(Deserialize)]
struct Order {
    id: u32,
    customer: String,
}

fn order(id: u32) -> Result<OutgoingMessage, BoxError> {
    let body = format!(r#"{{"id":{id},"customer":"c{}"}}"#, id % 20);
    Ok(OutgoingMessage::new(body)
        .with_key(format!("c{}", id % 20))
        .with_header(idempotency::IDEMPOTENCY_KEY, format!("order-{id}"))?)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let broker = MemoryBroker::new();

    // Producer: 300 orders, a dozen of them sent twice, and one message that is not an order.
    for id in 0..ORDERS {
        broker.publish("orders", order(id)?).await?;
    }
    for id in (0..ORDERS).step_by((ORDERS / RESENT) as usize) {
        broker.publish("orders", order(id)?).await?;
    }
    broker
        .publish(
            "orders",
            OutgoingMessage::new("not json at all").with_key("c0"),
        )
        .await?;

    // Handler: every 25th order hits a flaky downstream on its first try, and every
    // 60th on its first delivery whatever the try (so it goes back to the broker).
    let flaky = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let (f, h) = (flaky.clone(), handled.clone());
    let handler = handler::json(move |order: Order, msg: Message| {
        let (flaky, handled) = (f.clone(), h.clone());
        async move {
            let first_try = msg.extensions.get::<Try>().is_none_or(|t| t.number == 1);
            if order.id % 25 == 0 && first_try {
                flaky.fetch_add(1, Ordering::Relaxed);
                return Err("inventory service timed out".into());
            }
            if order.id % 60 == 0 && msg.attempt() == 1 {
                flaky.fetch_add(1, Ordering::Relaxed);
                return Err(classify::retry_after(
                    "warehouse is rebalancing",
                    Duration::from_millis(20),
                ));
            }
            let _ = order.customer;
            handled.fetch_add(1, Ordering::Relaxed);
            Ok::<_, BoxError>(())
        }
    });

    let retried = Arc::new(AtomicU32::new(0));
    let r = retried.clone();
    let retry = RetryLayer::new(
        RetryConfig::default()
            .with_backoff(Backoff::exponential(
                Duration::from_millis(5),
                Duration::from_millis(50),
            ))
            .with_max_tries(3),
    )?
    .on_retry(move |e: &RetryEvent<'_>| {
        r.fetch_add(1, Ordering::Relaxed);
        let _ = e.delay;
    });
    let consumer = broker.consumer("orders");
    let idempotency =
        IdempotencyLayer::new(Arc::new(MemoryStore::new()), IdempotencyConfig::default())?;
    let stack = Stack::new()
        .dead_letter(
            broker.clone(),
            DeadLetterConfig::default()
                .with_max_attempts(4)
                .with_consumer_name("quickstart"),
        )
        .idempotency_layer(idempotency.clone())
        .retry(retry);
    println!("pipeline: {}", stack.describe());

    let worker = Worker::builder(consumer)
        .stack(stack)
        .handler(handler)
        .name("quickstart")
        .concurrency(32)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::exponential(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ))
        .build()?;

    let started = Instant::now();
    let idle = {
        let broker = broker.clone();
        async move {
            while broker.depth("orders") + broker.in_flight("orders") > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    // Stops once every order is settled, or on SIGTERM or Ctrl-C.
    let mut interrupted = false;
    let report = worker
        .run_until(async {
            tokio::select! {
                () = idle => {}
                () = redrive::shutdown_signal() => interrupted = true,
            }
        })
        .await;
    if interrupted {
        println!("stopped early: {report:?}");
        return Ok(());
    }
    let dlq = broker.messages("orders-dlq");

    println!(
        "\nredrive quickstart: {} messages in {:.0?}",
        ORDERS + RESENT + 1,
        started.elapsed()
    );
    println!("  deliveries received        {:>4}", report.received);
    println!(
        "  orders handled             {:>4}",
        handled.load(Ordering::Relaxed)
    );
    println!(
        "  transient failures         {:>4}",
        flaky.load(Ordering::Relaxed)
    );
    println!(
        "    retried in process       {:>4}  (exponential backoff with jitter, 5-50 ms)",
        retried.load(Ordering::Relaxed)
    );
    println!(
        "    parked, then redelivered {:>4}  (their customer's later orders waited)",
        report.parked
    );
    println!("  duplicates skipped         {:>4}", report.deduplicated);
    println!("  dead-lettered              {:>4}", report.dead_lettered);
    for m in &dlq {
        println!("    payload {:?}", String::from_utf8_lossy(&m.payload));
        for name in [
            dead_letter::ERROR_KIND,
            dead_letter::ERROR_MESSAGE,
            dead_letter::ATTEMPTS,
            dead_letter::ORIGINAL_DESTINATION,
            dead_letter::CONSUMER,
        ] {
            println!("    {name}: {}", m.headers.get_str(name).unwrap_or("-"));
        }
    }
    assert_eq!(
        handled.load(Ordering::Relaxed),
        ORDERS,
        "every order handled once"
    );
    assert_eq!(
        report.deduplicated,
        u64::from(RESENT),
        "every resent order skipped"
    );
    assert_eq!(dlq.len(), 1, "the poison message is dead-lettered");
    println!(
        "\nevery order handled exactly once, duplicates skipped, the poison message in orders-dlq: nothing lost."
    );
    Ok(())
}
