//! The batching publisher against the emulator (fauxqs): concurrent publishes share
//! `SendMessageBatch` calls, each publish gets its own entry's answer, calls fit SQS's
//! request size, and a FIFO group keeps its order.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::join_all;
use redrive_core::{Consumer, Message, OutgoingMessage, Publisher};
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;
use redrive_sqs::{Error, Sqs};

/// Receives `n` messages from `queue` (acking each), in the order received; fails after
/// 30 s.
async fn receive(sqs: &Sqs, queue: &str, n: usize) -> Vec<Message> {
    let mut consumer = sqs
        .consumer(queue)
        .wait_time(Duration::from_secs(1))
        .build()
        .await
        .expect("consumer");
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "received {} of {n}",
            got.len()
        );
        let Some(delivery) = tokio::time::timeout(Duration::from_secs(5), consumer.receive())
            .await
            .ok()
            .transpose()
            .expect("receive")
            .flatten()
        else {
            continue;
        };
        let (message, acker) = delivery.into_parts();
        acker.ack().await.expect("ack");
        got.push(message);
    }
    got
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

fn header(m: &Message, name: &str) -> Option<String> {
    m.headers.get_str(name).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_calls_and_keep_their_attributes() {
    let sqs = common::sqs().await;
    let name = common::queue_name("batched", false);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    sqs.queue_url(&name).await.expect("url");
    let publisher = sqs.publisher().batched(Duration::from_millis(20));
    let n = 40;
    let messages = (0..n).map(|i| {
        // Twelve headers: ten attributes, two packed beside them.
        let mut m = OutgoingMessage::new(format!("m{i}")).with_key(format!("k{i}"));
        for h in 0..12 {
            m = m
                .with_header(format!("h{h}"), format!("{i}-{h}"))
                .expect("header");
        }
        m
    });
    let sent = join_all(messages.map(|m| publisher.publish(&name, m))).await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    let requests = publisher.requests();
    assert!(
        (4..=8).contains(&requests),
        "{n} publishes in {requests} SendMessageBatch calls"
    );

    let got: HashMap<String, Message> = receive(&sqs, &name, n)
        .await
        .into_iter()
        .map(|m| (body(&m), m))
        .collect();
    assert_eq!(got.len(), n, "each message once");
    for i in 0..n {
        let m = &got[&format!("m{i}")];
        assert_eq!(m.key.as_deref(), Some(format!("k{i}").as_bytes()), "m{i}");
        for h in 0..12 {
            assert_eq!(
                header(m, &format!("h{h}")),
                Some(format!("{i}-{h}")),
                "m{i} h{h}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_sqs_refuses_fails_alone_in_its_call() {
    let sqs = common::sqs().await;
    let name = common::queue_name("batched-refused", false);
    // The queue takes less than the publisher may send: SQS refuses the large entry.
    let url = common::create_queue(
        &sqs,
        &name,
        Duration::from_secs(30),
        &[(QueueAttributeName::MaximumMessageSize, "1024".into())],
    )
    .await;
    sqs.queue_url(&name).await.expect("url");
    let publisher = sqs.publisher().batched(Duration::from_millis(50));
    let messages: Vec<_> = (0..10)
        .map(|i| match i {
            4 => OutgoingMessage::new(vec![b'a'; 2000]),
            i => OutgoingMessage::new(format!("m{i}")),
        })
        .collect();
    let sent = join_all(messages.iter().map(|m| publisher.send(&name, m))).await;
    assert_eq!(publisher.requests(), 1, "one call for all ten");
    for (i, r) in sent.into_iter().enumerate() {
        if i != 4 {
            assert!(r.is_ok_and(|id| !id.is_empty()), "m{i}");
            continue;
        }
        let err = r.unwrap_err();
        assert!(
            matches!(
                &err,
                Error::BatchEntry {
                    operation: "SendMessageBatch",
                    sender_fault: true,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = redrive_core::Error::from(err);
        assert!(
            matches!(err, redrive_core::Error::Rejected(_)) && err.is_deterministic(),
            "{err:?}"
        );
    }
    assert_eq!(common::counts(&sqs, &url).await.0, 9, "the other nine sent");

    // Checked before any call: fails alone too, without a request.
    let too_many_bytes = sqs
        .publisher()
        .with_max_message_bytes(1024)
        .batched(Duration::ZERO);
    let err = too_many_bytes
        .publish(&name, OutgoingMessage::new(vec![b'a'; 2000]))
        .await
        .unwrap_err();
    assert!(matches!(err, redrive_core::Error::Rejected(_)), "{err:?}");
    assert_eq!(too_many_bytes.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fit_the_request_size() {
    let sqs = common::sqs().await;
    let name = common::queue_name("batched-large", false);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    sqs.queue_url(&name).await.expect("url");
    let publisher = sqs.publisher().batched(Duration::from_millis(50));
    // 100 KiB each: two fit in 256 KiB, three do not.
    let messages = (0..3).map(|i| OutgoingMessage::new(vec![b'a' + i; 100 * 1024]));
    let sent = join_all(messages.map(|m| publisher.publish(&name, m))).await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    assert_eq!(publisher.requests(), 2);
    let got = receive(&sqs, &name, 3).await;
    assert!(got.iter().all(|m| m.payload.len() == 100 * 1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_group_keeps_its_order_across_calls() {
    let sqs = common::sqs().await;
    let name = common::queue_name("batched-order", true);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    sqs.queue_url(&name).await.expect("url");
    let publisher = sqs.publisher().batched(Duration::ZERO);
    let n = 45;
    // Two groups, interleaved, published at once: several calls, one at a time.
    let messages = (0..n).map(|i| {
        let group = if i % 3 == 0 { "b" } else { "a" };
        OutgoingMessage::new(format!("{group}{i}")).with_key(group)
    });
    let sent = join_all(messages.map(|m| publisher.publish(&name, m))).await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    let requests = publisher.requests();
    assert!(
        (5..n as u64).contains(&requests),
        "{n} publishes in {requests} calls"
    );

    let got = receive(&sqs, &name, n).await;
    for group in ["a", "b"] {
        let order: Vec<String> = got
            .iter()
            .filter(|m| m.key.as_deref() == Some(group.as_bytes()))
            .map(body)
            .collect();
        let expected: Vec<String> = (0..n)
            .map(|i| format!("{}{i}", if i % 3 == 0 { "b" } else { "a" }))
            .filter(|b| b.starts_with(group))
            .collect();
        assert_eq!(order, expected, "group {group}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_an_unknown_destination() {
    let sqs = common::sqs().await;
    let name = common::queue_name("batched-missing", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    sqs.client()
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("DeleteQueue");
    let publisher = sqs.publisher().batched(Duration::ZERO);
    let err = publisher
        .publish(&url, OutgoingMessage::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, redrive_core::Error::UnknownDestination(q) if *q == url),
        "{err:?}"
    );
    let err = publisher
        .publish(&name, OutgoingMessage::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, redrive_core::Error::UnknownDestination(q) if *q == name),
        "{err:?}"
    );
}
