//! SQS behaviour against the emulator (fauxqs): batched deletes, the visibility heartbeat,
//! FIFO order, attribute limits, metadata, cancel safety, the prefetch bound, dead
//! letters and the native redrive policy.
//!
//! Emulator gap: fauxqs accepts an invalid or outdated receipt handle without error, so
//! the mapping of SQS's `ReceiptHandleIsInvalid` / `MessageNotInflight` answers to
//! `LeaseExpired` is not exercised here.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redrive_core::{
    BoxError, Consumer, HeaderValue, LeaseKeeping, Message, OrderingMode, OutgoingMessage,
    Publisher, Redelivery, Report, Worker, classify, handler_fn,
};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_sqs::attributes::{HEADERS_ATTRIBUTE, MAX_ATTRIBUTES};
use redrive_sqs::aws_sdk_sqs::types::QueueAttributeName;
use redrive_sqs::{Error, FifoDeduplication, HeaderOverflow, Sqs, SqsConsumer};
use tokio::sync::Notify;
use tower::Layer;

async fn consumer(sqs: &Sqs, queue: &str) -> SqsConsumer {
    sqs.consumer(queue)
        .wait_time(Duration::from_secs(1))
        .build()
        .await
        .expect("consumer")
}

async fn wait_until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < within,
            "{what}: not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn body(m: &Message) -> String {
    String::from_utf8_lossy(&m.payload).into_owned()
}

/// Runs `worker` until `done` says so, then stops it and returns its report.
async fn run_until_done<C, S>(
    worker: Worker<C, S>,
    what: &str,
    within: Duration,
    done: impl AsyncFnMut() -> bool,
) -> Report
where
    C: Consumer,
    S: tower::Service<Message> + Send + 'static,
    S::Response: Into<redrive_core::Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    let stop = Arc::new(Notify::new());
    let stopper = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));
    wait_until(what, within, done).await;
    stop.notify_one();
    run.await.expect("worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_are_batched_and_every_one_is_confirmed() {
    let sqs = common::sqs().await;
    let name = common::queue_name("acks", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(2), &[]).await;
    let n = 95;
    let messages: Vec<_> = (0..n)
        .map(|i| OutgoingMessage::new(format!("m{i}")))
        .collect();
    sqs.publisher()
        .send_batch(&name, &messages)
        .await
        .expect("send batch");

    let mut c = consumer(&sqs, &name).await;
    let mut acks = tokio::task::JoinSet::new();
    let mut seen = HashSet::new();
    while seen.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), c.receive())
            .await
            .expect("receive in time")
            .expect("receive")
            .expect("a delivery");
        assert!(
            seen.insert(body(&d.message)),
            "duplicate {}",
            body(&d.message)
        );
        acks.spawn(async move { d.ack().await });
    }
    // Every ack future resolves Ok: each delete was confirmed by SQS.
    let mut confirmed = 0;
    while let Some(r) = acks.join_next().await {
        r.expect("ack task").expect("ack confirmed");
        confirmed += 1;
    }
    assert_eq!(confirmed, n);
    assert_eq!(common::counts(&sqs, &url).await, (0, 0, 0));
    // Past the visibility timeout nothing comes back.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(2), c.receive())
            .await
            .is_err(),
        "an acked message came back"
    );
    c.close().await.expect("close");
}

/// Handles 3 messages of a queue with a 2 s visibility timeout with a 5 s handler, until
/// the queue is empty or a message was handled twice; returns how often each was handled.
async fn slow_handler_calls(
    sqs: &Sqs,
    lease_keeping: LeaseKeeping,
) -> (HashMap<String, usize>, Report) {
    let name = common::queue_name("slow", false);
    let url = common::create_queue(sqs, &name, Duration::from_secs(2), &[]).await;
    for i in 0..3 {
        sqs.publisher()
            .publish(&name, OutgoingMessage::new(format!("slow-{i}")))
            .await
            .expect("publish");
    }
    let calls: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let c2 = calls.clone();
    let handler = handler_fn(move |m: Message| {
        let calls = c2.clone();
        async move {
            *calls.lock().unwrap().entry(body(&m)).or_default() += 1;
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, BoxError>(())
        }
    });
    let worker = Worker::builder(consumer(sqs, &name).await)
        .service(handler)
        .concurrency(8)
        .lease_keeping(lease_keeping)
        .redelivery(Redelivery::constant(Duration::ZERO))
        .shutdown_timeout(Duration::from_secs(1))
        .build()
        .expect("worker");
    let (sqs2, c3) = (sqs.clone(), calls.clone());
    let report = run_until_done(
        worker,
        "slow messages deleted or duplicated",
        Duration::from_secs(40),
        async || {
            c3.lock().unwrap().values().any(|&n| n > 1)
                || common::counts(&sqs2, &url).await == (0, 0, 0)
        },
    )
    .await;
    let calls = calls.lock().unwrap().clone();
    (calls, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visibility_heartbeat_keeps_a_slow_handler_from_duplicates() {
    let sqs = common::sqs().await;
    // With lease keeping (the default), the Worker extends the 2 s visibility timeout every
    // second while the 5 s handler runs: each message is handled exactly once.
    let (calls, report) = slow_handler_calls(&sqs, LeaseKeeping::Auto).await;
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.values().all(|&n| n == 1), "duplicates: {calls:?}");
    assert_eq!(report.acked, 3, "{report:?}");
    assert_eq!(report.settle_errors, 0, "{report:?}");

    // Without it, SQS hands the same messages out again while the handler still runs:
    // proof that the heartbeat is what prevents the duplicates above.
    let (calls, _) = slow_handler_calls(&sqs, LeaseKeeping::Off).await;
    assert!(
        calls.values().any(|&n| n > 1),
        "expected duplicates without lease keeping: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_keep_their_order_under_concurrency() {
    let sqs = common::sqs().await;
    let name = common::queue_name("groups", true);
    common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    let (groups, per_group) = (4, 25);
    let messages: Vec<_> = (0..groups * per_group)
        .map(|i| {
            OutgoingMessage::new(format!("{i}"))
                .with_key(format!("g{}", i % groups))
                .with_header("x-seq", i.to_string())
                .expect("header")
        })
        .collect();
    sqs.publisher()
        .send_batch(&name, &messages)
        .await
        .expect("send batch");

    let seen: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let s2 = seen.clone();
    let handler = handler_fn(move |m: Message| {
        let seen = s2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..8))).await;
            let key = String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned();
            let seq = m
                .headers
                .get_str("x-seq")
                .and_then(|s| s.parse().ok())
                .expect("x-seq");
            seen.lock().unwrap().push((key, seq));
            Ok::<_, BoxError>(())
        }
    });
    let worker = Worker::builder(consumer(&sqs, &name).await)
        .service(handler)
        .concurrency(16)
        .ordering(OrderingMode::PerKey)
        .build()
        .expect("worker");
    let s3 = seen.clone();
    run_until_done(worker, "all handled", Duration::from_secs(60), async || {
        s3.lock().unwrap().len() >= groups * per_group
    })
    .await;
    let seen = seen.lock().unwrap();
    let mut by_group: HashMap<&str, Vec<usize>> = HashMap::new();
    for (g, s) in seen.iter() {
        by_group.entry(g).or_default().push(*s);
    }
    assert_eq!(by_group.len(), groups);
    for (g, seqs) in by_group {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "order of group {g}");
        assert_eq!(seqs.len(), per_group, "group {g} handled once each");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_comes_from_system_attributes() {
    let sqs = common::sqs().await;
    let name = common::queue_name("meta", false);
    common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    let before = SystemTime::now() - Duration::from_secs(1);
    sqs.publisher()
        .publish(
            &name,
            OutgoingMessage::new("hello").with_key(vec![0xffu8, 0]),
        )
        .await
        .expect("publish");
    let mut c = consumer(&sqs, &name).await;
    assert_eq!(c.capabilities().lease, Some(Duration::from_secs(10)));
    assert_eq!(c.capabilities().ordering, redrive_core::OrderingScope::None);
    let d = c.receive().await.expect("receive").expect("delivery");
    let meta = &d.message.metadata;
    assert_eq!(meta.attempt, 1);
    assert_eq!(meta.source.system, "aws_sqs");
    assert_eq!(*meta.source.destination, *name);
    assert!(meta.message_id.is_some());
    let enqueued = meta.enqueued_at.expect("SentTimestamp");
    assert!(
        enqueued >= before && enqueued <= SystemTime::now(),
        "{enqueued:?}"
    );
    assert_eq!(
        d.message.key.as_deref(),
        Some(&[0xffu8, 0][..]),
        "binary key on a standard queue"
    );
    d.nack(Duration::ZERO).await.expect("nack");
    let d = c.receive().await.expect("receive").expect("delivery");
    assert_eq!(
        d.message.attempt(),
        2,
        "ApproximateReceiveCount after a nack"
    );
    d.ack().await.expect("ack");

    // FIFO: the key is the group id; an unkeyed message comes back unkeyed.
    let name = common::queue_name("meta", true);
    common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    let p = sqs.publisher();
    p.publish(&name, OutgoingMessage::new("keyed").with_key("user-7"))
        .await
        .expect("publish");
    p.publish(&name, OutgoingMessage::new("unkeyed"))
        .await
        .expect("publish");
    let mut c = consumer(&sqs, &name).await;
    assert_eq!(c.capabilities().ordering, redrive_core::OrderingScope::Key);
    let mut keys = HashMap::new();
    while keys.len() < 2 {
        let d = c.receive().await.expect("receive").expect("delivery");
        keys.insert(body(&d.message), d.message.key.clone());
        d.ack().await.expect("ack");
    }
    assert_eq!(keys["keyed"].as_deref(), Some(&b"user-7"[..]));
    assert_eq!(keys["unkeyed"], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_beyond_ten_attributes_are_packed_and_limits_fail_clearly() {
    let sqs = common::sqs().await;
    let name = common::queue_name("attrs", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;

    let mut msg = OutgoingMessage::new("many headers")
        .with_key("k1")
        .with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .expect("header")
        .with_header("x-correlation-id", "corr-1")
        .expect("header")
        .with_header("x-blob", vec![0u8, 1, 254, 255])
        .expect("header");
    for i in 0..20 {
        msg = msg
            .with_header(format!("x-user-{i}"), format!("value {i}"))
            .expect("header");
    }
    sqs.publisher()
        .publish(&name, msg.clone())
        .await
        .expect("publish packs");

    // As SQS holds it: at most 10 attributes, trace context and the binary value native.
    let raw = sqs
        .client()
        .receive_message()
        .queue_url(&url)
        .message_attribute_names("All")
        .visibility_timeout(0)
        .send()
        .await
        .expect("raw receive");
    let raw = &raw.messages()[0];
    let attrs = raw.message_attributes().expect("attributes");
    assert_eq!(attrs.len(), MAX_ATTRIBUTES, "{:?}", attrs.keys());
    assert!(attrs.contains_key("traceparent") && attrs.contains_key("x-correlation-id"));
    assert!(attrs.contains_key(HEADERS_ATTRIBUTE));
    assert_eq!(
        attrs["x-blob"].data_type(),
        "Binary",
        "binary values stay binary"
    );

    // As redrive reads it: every header back, with its value and kind.
    let mut c = consumer(&sqs, &name).await;
    let d = c.receive().await.expect("receive").expect("delivery");
    assert_eq!(d.message.headers.len(), msg.headers.len());
    for (n, v) in &msg.headers {
        assert_eq!(d.message.headers.get(n), Some(v), "header {n}");
    }
    assert_eq!(
        d.message.headers.get("x-blob"),
        Some(&HeaderValue::from(vec![0u8, 1, 254, 255]))
    );
    assert_eq!(d.message.key.as_deref(), Some(&b"k1"[..]));
    d.ack().await.expect("ack");

    // Packing off: an 11th header is a clear error, and nothing is sent.
    let strict = sqs.publisher().with_header_overflow(HeaderOverflow::Reject);
    let mut eleven = OutgoingMessage::new("x");
    for i in 0..11 {
        eleven = eleven.with_header(format!("h{i}"), "v").expect("header");
    }
    let err = strict.send(&name, &eleven).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooManyAttributes {
                needed: 11,
                limit: 10,
                ..
            }
        ),
        "{err}"
    );
    let core: redrive_core::Error = strict.publish(&name, eleven).await.unwrap_err();
    assert!(
        core.to_string().contains("above SQS's limit of 10"),
        "{core}"
    );

    // Too large with its attributes: a clear error before any request.
    let big = OutgoingMessage::new(vec![b'a'; 256 * 1024 - 10])
        .with_header("x-pad", "0123456789")
        .expect("header");
    let err = sqs.publisher().send(&name, &big).await.unwrap_err();
    assert!(
        matches!(err, Error::MessageTooLarge { limit: 262_144, .. }),
        "{err}"
    );

    // A key that cannot be a FIFO group id.
    let fifo = common::queue_name("attrs", true);
    common::create_queue(&sqs, &fifo, Duration::from_secs(10), &[]).await;
    let err = sqs
        .publisher()
        .send(&fifo, &OutgoingMessage::new("x").with_key("has space"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidKey(_)), "{err}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        common::counts(&sqs, &url).await,
        (0, 0, 0),
        "rejected messages were not sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_is_cancel_safe() {
    let sqs = common::sqs().await;
    let name = common::queue_name("cancel", false);
    // A long visibility timeout: a message lost by a cancelled receive would not come
    // back within this test.
    common::create_queue(&sqs, &name, Duration::from_secs(120), &[]).await;
    let messages: Vec<_> = (0..30)
        .map(|i| OutgoingMessage::new(format!("c{i}")))
        .collect();
    let mut c = consumer(&sqs, &name).await;
    let publish = {
        let sqs = sqs.clone();
        let name = name.clone();
        tokio::spawn(async move {
            for chunk in messages.chunks(5) {
                sqs.publisher()
                    .send_batch(&name, chunk)
                    .await
                    .expect("send");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let mut seen = HashSet::new();
    let start = tokio::time::Instant::now();
    while seen.len() < 30 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "only {} of 30 received",
            seen.len()
        );
        // Most of these calls are cut short mid-fetch.
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(2), c.receive()).await {
            let d = r.expect("receive").expect("delivery");
            assert_eq!(d.message.attempt(), 1, "{} came back", body(&d.message));
            assert!(seen.insert(body(&d.message)), "duplicate");
            d.ack().await.expect("ack");
        }
    }
    publish.await.expect("publisher");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_messages_past_their_age_are_released() {
    let sqs = common::sqs().await;
    let name = common::queue_name("stale", false);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    let messages: Vec<_> = (0..4)
        .map(|i| OutgoingMessage::new(format!("s{i}")))
        .collect();
    sqs.publisher()
        .send_batch(&name, &messages)
        .await
        .expect("send");
    let mut c = sqs
        .consumer(&name)
        .wait_time(Duration::from_secs(1))
        .max_buffer_age(Duration::from_millis(300))
        .build()
        .await
        .expect("consumer");
    // One batch of 4 is fetched; one is handed out, three wait in the buffer and go stale.
    let first = c.receive().await.expect("receive").expect("delivery");
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The stale ones were released (visible again at once, not after 30 s) and come back
    // still at their first attempt: SQS counted the receive that was released, but no
    // handler tried it.
    let start = tokio::time::Instant::now();
    let mut again = HashSet::new();
    while again.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(10), c.receive())
            .await
            .expect("released messages come back long before their 30 s timeout")
            .expect("receive")
            .expect("delivery");
        assert_eq!(d.message.attempt(), 1, "{}", body(&d.message));
        again.insert(body(&d.message));
        d.ack().await.expect("ack");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!again.contains(&body(&first.message)));
    first.ack().await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_untried_keeps_its_attempt_and_a_failed_one_counts() {
    let sqs = common::sqs().await;
    let name = common::queue_name("hand-back", false);
    common::create_queue(&sqs, &name, Duration::from_secs(30), &[]).await;
    sqs.publisher()
        .publish(&name, OutgoingMessage::new("m"))
        .await
        .expect("publish");
    let mut c = consumer(&sqs, &name).await;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), c.receive())
            .await
            .expect("back at once, not after its 30 s timeout")
            .expect("receive")
            .expect("delivery")
    };
    // Handed back twice without running (the Worker's shutdown, a revoke): SQS counts
    // three receives, redrive one attempt.
    for _ in 0..2 {
        let d = next().await;
        assert_eq!(d.message.attempt(), 1);
        d.hand_back().await.expect("hand back");
    }
    let d = next().await;
    assert_eq!(d.message.attempt(), 1, "handed back untried twice");
    // Tried and failed: the next delivery is the second attempt.
    d.nack(Duration::ZERO).await.expect("nack");
    let d = next().await;
    assert_eq!(d.message.attempt(), 2, "one failed try");
    d.ack().await.expect("ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_reaches_the_dlq_with_its_envelope() {
    let sqs = common::sqs().await;
    let name = common::queue_name("poison", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    // The dead-letter layer's default destination, `<queue>-dlq`: SQS's names hold no
    // dot, so the old default `<queue>.dlq` was refused.
    let dlq = format!("{name}-dlq");
    common::create_queue(&sqs, &dlq, Duration::from_secs(10), &[]).await;
    let p = sqs.publisher();
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for body in ["ok-1", "poison", "ok-2"] {
        let msg = OutgoingMessage::new(body)
            .with_header("traceparent", traceparent)
            .expect("header")
            .with_header("x-correlation-id", format!("corr-{body}"))
            .expect("header")
            .with_header("x-tenant", "acme")
            .expect("header");
        p.publish(&name, msg).await.expect("publish");
    }
    let layer = DeadLetterLayer::new(
        Arc::new(sqs.publisher()),
        DeadLetterConfig::default()
            .with_max_attempts(3)
            .with_consumer_name("billing"),
    )
    .expect("dead-letter config");
    let handler = layer.layer(handler_fn(|m: Message| async move {
        if m.payload == "poison" {
            return Err::<(), BoxError>(classify::permanent("missing field `id`"));
        }
        Ok(())
    }));
    let worker = Worker::builder(consumer(&sqs, &name).await)
        .service(handler)
        .build()
        .expect("worker");
    let stop = Arc::new(Notify::new());
    let stopper = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));
    let sqs2 = sqs.clone();
    wait_until("all three settled", Duration::from_secs(30), async || {
        common::counts(&sqs2, &url).await == (0, 0, 0)
    })
    .await;
    stop.notify_one();
    let report = run.await.expect("worker");
    assert_eq!((report.acked, report.dead_lettered), (3, 1), "{report:?}");

    let mut c = consumer(&sqs, &dlq).await;
    let d = c
        .receive()
        .await
        .expect("receive")
        .expect("the dead letter");
    let h = &d.message.headers;
    assert_eq!(d.message.payload, "poison");
    assert_eq!(h.get_str(dead_letter::ERROR_KIND), Some("permanent"));
    assert_eq!(
        h.get_str(dead_letter::ERROR_MESSAGE),
        Some("missing field `id`")
    );
    assert_eq!(h.get_str(dead_letter::ORIGINAL_SYSTEM), Some("aws_sqs"));
    assert_eq!(
        h.get_str(dead_letter::ORIGINAL_DESTINATION),
        Some(name.as_str())
    );
    assert_eq!(h.get_str(dead_letter::ATTEMPTS), Some("1"));
    assert_eq!(h.get_str(dead_letter::CONSUMER), Some("billing"));
    assert!(h.get_str(dead_letter::ORIGINAL_MESSAGE_ID).is_some());
    assert!(h.get_str(dead_letter::ORIGINAL_ENQUEUED_AT).is_some());
    assert!(h.get_str(dead_letter::FIRST_FAILURE_AT).is_some());
    assert!(h.get_str(dead_letter::LAST_FAILURE_AT).is_some());
    assert_eq!(
        h.get_str("traceparent"),
        Some(traceparent),
        "trace context kept"
    );
    assert_eq!(h.get_str("x-correlation-id"), Some("corr-poison"));
    assert_eq!(h.get_str("x-tenant"), Some("acme"));
    d.ack().await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), c.receive())
            .await
            .is_err(),
        "one dead letter only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_one_body_all_reach_a_content_deduplicated_fifo_dlq() {
    // Under ContentBasedDeduplication SQS takes a FIFO message's body hash as its
    // deduplication id and drops a second message of that body within 5 minutes, while
    // answering the send as a success. Two poison messages of one body are both
    // dead-lettered, and their originals deleted: both must be in the DLQ.
    let sqs = common::sqs().await;
    let name = common::queue_name("twins", true);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    let dlq = format!("{}-dlq.fifo", name.trim_end_matches(".fifo"));
    let content_based = [(QueueAttributeName::ContentBasedDeduplication, "true".into())];
    let dlq_url = common::create_queue(&sqs, &dlq, Duration::from_secs(10), &content_based).await;
    // Published with an id each (the default), so both are in the queue.
    for group in ["a", "b"] {
        sqs.publisher()
            .publish(&name, OutgoingMessage::new("poison").with_key(group))
            .await
            .expect("publish");
    }
    let dlq_publisher = sqs
        .publisher()
        .with_fifo_deduplication(FifoDeduplication::ContentBased);
    let layer = DeadLetterLayer::new(
        Arc::new(dlq_publisher),
        DeadLetterConfig::default().with_destination(&dlq),
    )
    .expect("dead-letter config");
    let handler = layer.layer(handler_fn(|_m: Message| async move {
        Err::<(), BoxError>(classify::permanent("missing field `id`"))
    }));
    let worker = Worker::builder(consumer(&sqs, &name).await)
        .service(handler)
        .build()
        .expect("worker");
    let sqs2 = sqs.clone();
    let report = run_until_done(
        worker,
        "both settled",
        Duration::from_secs(30),
        async || common::counts(&sqs2, &url).await == (0, 0, 0),
    )
    .await;
    assert_eq!((report.acked, report.dead_lettered), (2, 2), "{report:?}");
    assert_eq!(
        common::counts(&sqs, &dlq_url).await,
        (2, 0, 0),
        "both dead letters are in the DLQ"
    );
}

/// A queue with a native redrive policy (`maxReceiveCount` = `max_receive_count`) and
/// redrive's dead-letter layer (`max_attempts`), with a handler that always fails
/// transiently. Returns the attempts of what reached redrive's DLQ and of what reached
/// SQS's.
async fn redrive_interplay(
    sqs: &Sqs,
    max_receive_count: u32,
    max_attempts: u32,
) -> (Vec<Message>, Vec<Message>) {
    let name = common::queue_name("redrive", false);
    let sqs_dlq = format!("{name}-sqs-dlq");
    let sqs_dlq_url = common::create_queue(sqs, &sqs_dlq, Duration::from_secs(10), &[]).await;
    let arn = sqs
        .client()
        .get_queue_attributes()
        .queue_url(&sqs_dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue arn")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("arn");
    let policy =
        format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max_receive_count}"}}"#);
    let url = common::create_queue(
        sqs,
        &name,
        Duration::from_secs(10),
        &[(QueueAttributeName::RedrivePolicy, policy)],
    )
    .await;
    let redrive_dlq = format!("{name}-dlq");
    common::create_queue(sqs, &redrive_dlq, Duration::from_secs(10), &[]).await;
    sqs.publisher()
        .publish(&name, OutgoingMessage::new("always fails"))
        .await
        .expect("publish");

    let c = consumer(sqs, &name).await;
    let policy = c
        .queue()
        .redrive_policy
        .clone()
        .expect("policy read at start-up");
    assert_eq!(policy.max_receive_count, max_receive_count);
    assert_eq!(policy.dead_letter_target_arn, arn);
    assert_eq!(
        policy.backstops(max_attempts),
        max_receive_count > max_attempts
    );

    let layer = DeadLetterLayer::new(
        Arc::new(sqs.publisher()),
        DeadLetterConfig::default()
            .with_destination(&redrive_dlq)
            .with_max_attempts(max_attempts),
    )
    .expect("dead-letter config");
    let handler = layer.layer(handler_fn(|_m: Message| async move {
        Err::<(), BoxError>("downstream unavailable".into())
    }));
    let worker = Worker::builder(c)
        .service(handler)
        .redelivery(Redelivery::constant(Duration::ZERO))
        .build()
        .expect("worker");
    let (sqs2, dlq_url) = (sqs.clone(), sqs_dlq_url.clone());
    let redrive_dlq_url = sqs.queue_url(&redrive_dlq).await.expect("url");
    run_until_done(
        worker,
        "the message left the queue",
        Duration::from_secs(30),
        async || {
            common::counts(&sqs2, &url).await == (0, 0, 0)
                && (common::counts(&sqs2, &dlq_url).await.0
                    + common::counts(&sqs2, &redrive_dlq_url).await.0)
                    == 1
        },
    )
    .await;

    let mut out = Vec::new();
    for q in [&redrive_dlq, &sqs_dlq] {
        let mut c = consumer(sqs, q).await;
        let mut got = Vec::new();
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(1500), c.receive()).await {
            let d = r.expect("receive").expect("delivery");
            got.push(d.message.clone());
            d.ack().await.expect("ack");
        }
        out.push(got);
    }
    let sqs_side = out.pop().expect("two");
    let redrive_side = out.pop().expect("two");
    (redrive_side, sqs_side)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_redrive_policy_and_redrive_limit_lower_one_wins() {
    let sqs = common::sqs().await;
    // maxReceiveCount above redrive's limit (the recommended set-up): redrive's layer
    // dead-letters on attempt 3, with its envelope; SQS's policy never fires.
    let (redrive, native) = redrive_interplay(&sqs, 5, 3).await;
    assert_eq!(native.len(), 0, "SQS moved it: {native:?}");
    assert_eq!(redrive.len(), 1);
    assert_eq!(redrive[0].headers.get_str(dead_letter::ATTEMPTS), Some("3"));
    assert_eq!(
        redrive[0].headers.get_str(dead_letter::ERROR_KIND),
        Some("exhausted")
    );

    // maxReceiveCount at 2, below redrive's 5: SQS moves the message after its second
    // receive, as it is: no envelope, and redrive's layer never sees attempt 5.
    let (redrive, native) = redrive_interplay(&sqs, 2, 5).await;
    assert_eq!(redrive.len(), 0, "redrive dead-lettered it: {redrive:?}");
    assert_eq!(native.len(), 1);
    assert_eq!(native[0].payload, "always fails");
    assert!(
        native[0].headers.get(dead_letter::ERROR_KIND).is_none(),
        "no envelope"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_name_sqs_rejects_is_rejected_before_any_request() {
    let sqs = common::sqs().await;
    // The emulator creates `<name>.dlq`; SQS would not. redrive refuses it either way.
    let stem = common::queue_name("dotted", false);
    let dotted = format!("{stem}.dlq");
    let url = common::create_queue_unchecked(&sqs, &dotted, Duration::from_secs(10), &[]).await;

    let err = sqs
        .publisher()
        .publish(&dotted, OutgoingMessage::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, redrive_core::Error::Rejected(_)),
        "a deterministic rejection: {err:?}"
    );
    assert!(err.is_deterministic());
    let text = err.to_string();
    assert!(text.contains("not a valid SQS queue name"), "{text}");
    assert!(text.contains(&format!("use `{stem}-dlq`")), "{text}");

    let err = sqs
        .publisher()
        .send_batch(&dotted, &[OutgoingMessage::new("y")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidQueueName { .. }), "{err}");

    let err = sqs.consumer(&dotted).build().await.unwrap_err();
    assert!(matches!(err, Error::InvalidQueueName { .. }), "{err}");

    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(common::counts(&sqs, &url).await, (0, 0, 0), "nothing sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sqs_cannot_take_are_rejected() {
    let sqs = common::sqs().await;
    let name = common::queue_name("reject", false);
    // The smallest MaximumMessageSize SQS allows, so SQS's own size check can be reached.
    let url = common::create_queue(
        &sqs,
        &name,
        Duration::from_secs(10),
        &[(QueueAttributeName::MaximumMessageSize, "1024".into())],
    )
    .await;
    let rejected = |what: &str, err: redrive_core::Error| {
        assert!(
            matches!(err, redrive_core::Error::Rejected(_)) && err.is_deterministic(),
            "{what}: {err:?}"
        );
    };

    // Caught before any request.
    let too_large = OutgoingMessage::new(vec![b'a'; 2000]);
    let small = sqs.publisher().with_max_message_bytes(1024);
    rejected(
        "too large",
        small.publish(&name, too_large.clone()).await.unwrap_err(),
    );
    let strict = sqs.publisher().with_header_overflow(HeaderOverflow::Reject);
    let mut eleven = OutgoingMessage::new("x");
    for i in 0..11 {
        eleven = eleven.with_header(format!("h{i}"), "v").expect("header");
    }
    rejected(
        "too many attributes",
        strict.publish(&name, eleven).await.unwrap_err(),
    );
    let bad_name = OutgoingMessage::new("x")
        .with_header("AWS.reserved", "v")
        .expect("header");
    rejected(
        "attribute name",
        strict.publish(&name, bad_name).await.unwrap_err(),
    );
    let fifo = common::queue_name("reject", true);
    common::create_queue(&sqs, &fifo, Duration::from_secs(10), &[]).await;
    rejected(
        "FIFO group id",
        sqs.publisher()
            .publish(&fifo, OutgoingMessage::new("x").with_key("has space"))
            .await
            .unwrap_err(),
    );

    // Refused by SQS: the queue takes less than the publisher was told it may send.
    let err = sqs.publisher().send(&name, &too_large).await.unwrap_err();
    // `InvalidParameterValue`, with or without the `AWS.SimpleQueueService.` prefix.
    assert!(
        err.code()
            .is_some_and(|c| c.ends_with("InvalidParameterValue")),
        "{err}"
    );
    rejected("refused by SQS", err.into());
    let err = sqs
        .publisher()
        .send_batch(&name, &[too_large])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::BatchEntry {
                sender_fault: true,
                ..
            }
        ),
        "{err}"
    );
    rejected("refused by SQS in a batch", err.into());

    assert_eq!(common::counts(&sqs, &url).await, (0, 0, 0), "nothing sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_an_unknown_destination() {
    let sqs = common::sqs().await;
    let name = common::queue_name("missing", false);
    let err = sqs
        .publisher()
        .publish(&name, OutgoingMessage::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, redrive_core::Error::UnknownDestination(q) if *q == name),
        "by name: {err:?}"
    );

    // By URL: the queue existed when its URL was taken.
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    sqs.client()
        .delete_queue()
        .queue_url(&url)
        .send()
        .await
        .expect("DeleteQueue");
    let err = sqs
        .publisher()
        .publish(&url, OutgoingMessage::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, redrive_core::Error::UnknownDestination(q) if *q == url),
        "by URL: {err:?}"
    );
    assert!(err.is_deterministic());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_with_characters_sqs_refuses_travels_packed_in_text_sqs_accepts() {
    let sqs = common::sqs().await;
    let name = common::queue_name("odd-chars", false);
    let url = common::create_queue(&sqs, &name, Duration::from_secs(10), &[]).await;
    // SQS takes in a string attribute only the characters XML allows: #x9, #xA, #xD,
    // #x20 to #xD7FF, #xE000 to #xFFFD, #x10000 to #x10FFFF. The emulator takes more.
    let sqs_accepts = |s: &str| {
        s.chars().all(|c| {
            matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
        })
    };
    let msg = OutgoingMessage::new("x")
        .with_header("x-odd", "a\u{fffe}b\u{ffff}\u{1}")
        .expect("header");
    sqs.publisher()
        .publish(&name, msg.clone())
        .await
        .expect("publish");

    let raw = sqs
        .client()
        .receive_message()
        .queue_url(&url)
        .message_attribute_names("All")
        .visibility_timeout(0)
        .send()
        .await
        .expect("raw receive");
    let attrs = raw.messages()[0].message_attributes().expect("attributes");
    for (n, v) in attrs {
        let s = v.string_value().unwrap_or_default();
        assert!(
            sqs_accepts(s),
            "attribute {n} = {s:?} holds characters SQS refuses"
        );
    }

    let mut c = consumer(&sqs, &name).await;
    let d = c.receive().await.expect("receive").expect("delivery");
    assert_eq!(d.message.headers.get("x-odd"), msg.headers.get("x-odd"));
    d.ack().await.expect("ack");
}
