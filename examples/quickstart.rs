//! The quickstart: a few hundred orders on the in-memory broker, some failing
//! transiently, one poison. Run with `cargo run --example quickstart`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redrive::memory::{MemoryBroker, QueueConfig};
use redrive::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Worker, classify,
    handler,
};
use serde::Deserialize;

const ORDERS: u32 = 300;

#[derive(Deserialize)]
struct Order {
    id: u32,
    customer: String,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let broker = MemoryBroker::new();
    // The broker moves a message that failed 3 deliveries to `orders.dlq`.
    broker.declare(
        "orders",
        QueueConfig::default().with_dead_letter(3, "orders.dlq"),
    );

    // Producer: 300 orders for 20 customers, and one message that is not an order.
    for id in 0..ORDERS {
        let body = format!(r#"{{"id":{id},"customer":"c{}"}}"#, id % 20);
        let msg = OutgoingMessage::new(body).with_key(format!("c{}", id % 20));
        broker.publish("orders", msg).await?;
    }
    broker
        .publish(
            "orders",
            OutgoingMessage::new("not json at all").with_key("c0"),
        )
        .await?;

    // Handler: every 25th order hits a flaky downstream on its first delivery.
    let flaky = Arc::new(AtomicU32::new(0));
    let handled = Arc::new(AtomicU32::new(0));
    let (f, h) = (flaky.clone(), handled.clone());
    let handler = handler::json(move |order: Order, msg: Message| {
        let (flaky, handled) = (f.clone(), h.clone());
        async move {
            if order.id % 25 == 0 && msg.attempt() == 1 {
                flaky.fetch_add(1, Ordering::Relaxed);
                return Err(classify::retry_after(
                    "inventory service timed out",
                    Duration::from_millis(20),
                ));
            }
            let _ = order.customer;
            handled.fetch_add(1, Ordering::Relaxed);
            Ok::<_, BoxError>(())
        }
    });

    let worker = Worker::builder(broker.consumer("orders"), handler)
        .name("quickstart")
        .concurrency(32)
        .ordering(OrderingMode::Unordered)
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
    let report = worker.run_until(idle).await;
    let dlq = broker.messages("orders.dlq");

    println!(
        "redrive quickstart: {} messages in {:?}",
        ORDERS + 1,
        started.elapsed()
    );
    println!("  deliveries received     {:>5}", report.received);
    println!("  processed and acked     {:>5}", report.processed);
    println!("  failed, nacked (redelivered later) {:>5}", report.nacked);
    println!(
        "  transient failures seen {:>5}",
        flaky.load(Ordering::Relaxed)
    );
    println!("  in the dead-letter queue {:>4}", dlq.len());
    for m in &dlq {
        println!(
            "    {:?} (key {:?})",
            String::from_utf8_lossy(&m.payload),
            m.key.as_deref().map(String::from_utf8_lossy)
        );
    }
    assert_eq!(
        handled.load(Ordering::Relaxed),
        ORDERS,
        "every order handled once"
    );
    assert_eq!(dlq.len(), 1, "the poison message is dead-lettered");
    println!(
        "every order handled exactly once; the poison message is in orders.dlq; nothing lost."
    );
    Ok(())
}
