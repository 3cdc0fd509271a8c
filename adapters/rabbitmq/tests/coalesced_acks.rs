//! Coalesced acks against the local RabbitMQ: calls that end out of order, some handed
//! back, none settled wrongly.
//!
//! A multiple ack that covered a running or handed-back delivery would either lose that
//! message (it would never come back) or, for a tag the broker does not know, close the
//! channel (a reconnect). This test fails on either, and checks that acks did share
//! frames.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::{BoxError, Consumer, Message, handler_fn};
use redrive_rabbitmq::QueueKind;
use redrive_rabbitmq::lapin::options::QueueDeclareOptions;
use redrive_rabbitmq::lapin::types::FieldTable;

async fn out_of_order_settlement(kind: QueueKind) {
    let queue = common::unique(&format!("coalesce-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let n = 3000usize;
    common::publish_numbered(&queue, n, "").await;

    // Per message: how many calls succeeded, and on which attempt.
    let done: Arc<Mutex<HashMap<usize, Vec<u32>>>> = Arc::default();
    let handled = done.clone();
    let handler = handler_fn(move |m: Message| {
        let handled = handled.clone();
        async move {
            let i: usize = std::str::from_utf8(&m.payload)?.parse()?;
            // Calls end out of order: 0 to 3 ms, by a spread of the index.
            tokio::time::sleep(Duration::from_millis((i * 7919 % 4) as u64)).await;
            // Every tenth message is handed back once (quorum: `basic.nack` with
            // requeue; classic: a republish, then an ack).
            if i % 10 == 3 && m.attempt() == 1 {
                return Err::<(), BoxError>("handed back once".into());
            }
            handled
                .lock()
                .unwrap()
                .entry(i)
                .or_default()
                .push(m.attempt());
            Ok(())
        }
    });
    let consumer = common::consumer(&topology, &common::unique("conn-coalesce"), 64).await;
    let monitor = consumer.monitor();
    let worker = common::RunningWorker::spawn(consumer, handler, 64);
    let start = std::time::Instant::now();
    while done.lock().unwrap().len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {n} messages succeeded within 60 s: a settlement went wrong ({monitor:?})",
            done.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.stop().await;
    eprintln!("{kind:?}: {report:?}, {monitor:?}");

    let done = done.lock().unwrap().clone();
    for i in 0..n {
        let want: &[u32] = if i % 10 == 3 { &[2] } else { &[1] };
        assert_eq!(
            done.get(&i).map(Vec::as_slice),
            Some(want),
            "message {i}: the attempts that succeeded"
        );
    }
    assert_eq!(
        monitor.reconnects(),
        0,
        "the channel closed: the broker refused a settlement"
    );
    assert_eq!(
        monitor.settled(),
        (n + n / 10) as u64,
        "every delivery settled once"
    );
    assert!(
        monitor.settle_frames() < monitor.settled(),
        "no two acks shared a frame: {monitor:?}"
    );

    // Nothing is left in the queue, unacked or ready.
    let conn = common::connection("redrive-test-coalesce-check").await;
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(q.message_count(), 0, "messages left in the queue");
    let _ = conn.close(200, "done").await;
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_share_frames_and_settle_nothing_wrongly_classic() {
    out_of_order_settlement(QueueKind::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_share_frames_and_settle_nothing_wrongly_quorum() {
    out_of_order_settlement(QueueKind::Quorum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_unsettled_comes_back_and_blocks_no_settlement() {
    let queue = common::unique("coalesce-dropped");
    let topology = common::topology(&queue, QueueKind::Quorum);
    common::declare(&topology).await;
    common::publish_numbered(&queue, 3, "").await;

    let mut consumer = common::consumer(&topology, &common::unique("conn-dropped"), 8).await;
    let monitor = consumer.monitor();
    let within = Duration::from_secs(10);
    let first = common::next(&mut consumer, within)
        .await
        .expect("first delivery");
    let second = common::next(&mut consumer, within)
        .await
        .expect("second delivery");
    let third = common::next(&mut consumer, within)
        .await
        .expect("third delivery");
    assert_eq!(&first.message.payload[..], b"0");
    // Its call ended without settling it (as a task that panicked does).
    drop(first);
    second.ack().await.expect("ack");
    third.ack().await.expect("ack");
    // The first is handed back with the frames of the second's ack, at once, not when
    // the channel closes.
    let again = common::next(&mut consumer, within)
        .await
        .expect("the dropped delivery comes back");
    assert_eq!(&again.message.payload[..], b"0");
    assert_eq!(again.message.attempt(), 2, "a redelivery");
    again.ack().await.expect("ack");
    assert_eq!(monitor.reconnects(), 0, "{monitor:?}");
    assert_eq!(monitor.settled(), 4, "{monitor:?}");
    consumer.close().await.expect("close");
    common::cleanup(&[topology]).await;
}
