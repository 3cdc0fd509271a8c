//! Messages no consumer can settle, against the local RabbitMQ: one that breaks the
//! consumer's connection (or kills its process) on every delivery reaches the
//! dead-letter queue through the quorum queue's delivery limit.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use redrive_core::{OutgoingMessage, Publisher};
use redrive_rabbitmq::lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicQosOptions};
use redrive_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use redrive_rabbitmq::{Error, QueueKind};

/// The delivery limit these tests declare: small, so the broker gives up quickly.
const LIMIT: u32 = 3;

/// A delivery that never gets a fate (its consumer's channel closes each time, as when
/// the process dies) is dead-lettered by the broker after the delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_consumer_dies_every_time_reaches_the_dlq() {
    let queue = common::unique("dies");
    let topology = common::topology(&queue, QueueKind::Quorum).with_delivery_limit(LIMIT);
    common::declare(&topology).await;
    let dlq = topology.dead_letter_queue().unwrap().to_owned();
    let p = common::publisher().await;
    p.publish(&queue, OutgoingMessage::new("kills the consumer"))
        .await
        .expect("publish");

    let conn = common::connection("redrive-test-dies").await;
    let mut deliveries = 0;
    // Each round takes the message and closes the channel unsettled; past the limit the
    // broker stops delivering it.
    for round in 0..=LIMIT + 5 {
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut stream = ch
            .basic_consume(
                &queue,
                &format!("dies-{round}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        match tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                let count = d
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-delivery-count").cloned());
                eprintln!("round {round}: delivered, x-delivery-count {count:?}");
            }
            _ => {
                eprintln!("round {round}: nothing delivered");
                let _ = ch.close(200, "done").await;
                break;
            }
        }
        let _ = ch.close(200, "dies").await;
    }
    let ch = conn.create_channel().await.expect("channel");
    let dead = ch
        .basic_get(&dlq, BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get");
    let dead = dead.expect("the message in the DLQ, dead-lettered by the broker");
    assert_eq!(&dead.delivery.data[..], b"kills the consumer");
    let reason = dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-first-death-reason").cloned());
    assert_eq!(
        reason,
        Some(AMQPValue::LongString("delivery_limit".into())),
        "{:?}",
        dead.delivery.properties
    );
    assert_eq!(
        deliveries,
        LIMIT + 1,
        "deliveries before the broker gave up"
    );
    let _ = conn.close(200, "done").await;
    common::cleanup(&[topology]).await;
}

/// A quorum queue declared before its topology had a delivery limit cannot take the
/// guard's arguments: the error names the argument and how to migrate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_without_the_guard_is_a_mismatch_that_says_how_to_migrate() {
    let queue = common::unique("unguarded");
    let old = common::topology(&queue, QueueKind::Quorum).without_delivery_limit();
    common::declare(&old).await;
    let conn = common::connection("redrive-test-unguarded").await;
    let err = common::topology(&queue, QueueKind::Quorum)
        .declare(&conn)
        .await
        .expect_err("the guard on a queue declared without it");
    match &err {
        Error::TopologyMismatch {
            queue: q, argument, ..
        } => {
            assert_eq!(q, &queue);
            assert!(argument.starts_with("x-"), "{argument}");
        }
        other => panic!("expected a topology mismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("without_delivery_limit"), "{text}");
    // The old declaration still works.
    old.declare(&conn).await.expect("declared as before");
    let _ = conn.close(200, "done").await;
    common::cleanup(&[old]).await;
}
