//! The adapter against the local RabbitMQ: header mapping, delays, dead-lettering,
//! topology mismatches, unroutable publishes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use redrive_core::{
    BoxError, Error as CoreError, HeaderValue, Message, OrderingMode, OutgoingMessage, Publisher,
    Redelivery, Worker, handler_fn,
};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_rabbitmq::lapin::BasicProperties;
use redrive_rabbitmq::lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable};
use redrive_rabbitmq::mapping;
use redrive_rabbitmq::{AmqpDelivery, Error, QueueKind, RabbitConsumer, Topology};

fn amqp(m: &Message) -> &AmqpDelivery {
    m.extensions
        .get::<AmqpDelivery>()
        .expect("AmqpDelivery extension")
}

fn every_field_type() -> (FieldTable, Vec<(&'static str, HeaderValue)>) {
    let mut inner = FieldTable::default();
    let mut nested = FieldTable::default();
    nested.insert("k".into(), AMQPValue::Boolean(false));
    let entries: Vec<(&'static str, AMQPValue, HeaderValue)> = vec![
        ("t-bool", AMQPValue::Boolean(true), "true".into()),
        ("t-i8", AMQPValue::ShortShortInt(-5), "-5".into()),
        ("t-u8", AMQPValue::ShortShortUInt(200), "200".into()),
        ("t-i16", AMQPValue::ShortInt(-1000), "-1000".into()),
        ("t-u16", AMQPValue::ShortUInt(60000), "60000".into()),
        ("t-i32", AMQPValue::LongInt(-100_000), "-100000".into()),
        (
            "t-u32",
            AMQPValue::LongUInt(4_000_000_000),
            "4000000000".into(),
        ),
        (
            "t-i64",
            AMQPValue::LongLongInt(-5_000_000_000_000),
            "-5000000000000".into(),
        ),
        ("t-f32", AMQPValue::Float(1.25), "1.25".into()),
        ("t-f64", AMQPValue::Double(-0.1), "-0.1".into()),
        (
            "t-decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
            "123.45".into(),
        ),
        (
            "t-str",
            AMQPValue::LongString("héllo".into()),
            "héllo".into(),
        ),
        (
            "t-not-utf8",
            AMQPValue::LongString(vec![0xff, 0x00, 0xfe].into()),
            HeaderValue::Bytes(vec![0xff, 0x00, 0xfe].into()),
        ),
        (
            "t-bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            HeaderValue::Bytes(vec![1u8, 2, 3].into()),
        ),
        (
            "t-timestamp",
            AMQPValue::Timestamp(1_700_000_000),
            "1700000000".into(),
        ),
        ("t-void", AMQPValue::Void, "".into()),
        (
            "t-array",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("a".into()),
                AMQPValue::LongString(vec![0xff].into()),
            ])),
            r#"[1,"a",[255]]"#.into(),
        ),
        (
            "t-table",
            AMQPValue::FieldTable(nested),
            r#"{"k":false}"#.into(),
        ),
    ];
    let mut want = Vec::new();
    for (name, value, text) in entries {
        inner.insert(name.into(), value);
        want.push((name, text));
    }
    (inner, want)
}

fn same_fields(got: &FieldTable, sent: &FieldTable) {
    for (name, value) in sent.inner() {
        assert_eq!(
            got.inner().get(name),
            Some(value),
            "typed header {name} after the round trip"
        );
    }
}

async fn header_round_trip(kind: QueueKind) {
    let queue = common::unique(&format!("headers-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let (table, want) = every_field_type();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id("corr-1".into())
        .with_reply_to("replies".into())
        .with_expiration("600000".into())
        .with_message_id("mid-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("redrive-tests".into())
        .with_headers(table.clone());
    common::publisher()
        .await
        .publish_raw("", &queue, b"payload", props.clone())
        .await
        .expect("publish");

    let mut c = common::consumer(&topology, "redrive-test-headers", 8).await;
    let d = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("delivery");
    let m = &d.message;
    for (name, text) in &want {
        assert_eq!(m.headers.get(name), Some(text), "header {name}");
    }
    let property_headers = [
        (mapping::CONTENT_TYPE, "application/json"),
        (mapping::CONTENT_ENCODING, "identity"),
        (mapping::DELIVERY_MODE, "2"),
        (mapping::PRIORITY, "5"),
        (mapping::CORRELATION_ID, "corr-1"),
        (mapping::REPLY_TO, "replies"),
        (mapping::EXPIRATION, "600000"),
        (mapping::MESSAGE_ID, "mid-1"),
        (mapping::TIMESTAMP, "1700000000"),
        (mapping::TYPE, "order.created"),
        (mapping::USER_ID, "guest"),
        (mapping::APP_ID, "redrive-tests"),
    ];
    for (name, value) in property_headers {
        assert_eq!(
            m.headers.get_str(name),
            Some(value),
            "property header {name}"
        );
    }
    assert_eq!(m.metadata.message_id.as_deref(), Some("mid-1"));
    assert_eq!(
        m.metadata.enqueued_at,
        Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
    );
    assert_eq!(m.metadata.source.system, "rabbitmq");
    assert_eq!(*m.metadata.source.destination, *queue);
    assert_eq!(m.attempt(), 1);
    assert_eq!(&m.payload[..], b"payload");
    let got = amqp(m).properties().headers().clone().expect("table");
    assert_eq!(got, table, "the typed table as sent");
    assert_eq!(amqp(m).properties(), &props);

    // The adapter's republish (a classic queue's redelivery, or a delay) keeps every
    // property and typed value.
    d.nack(Duration::ZERO).await.expect("nack");
    let d = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("redelivery");
    assert_eq!(d.message.attempt(), 2);
    let again = amqp(&d.message).properties();
    same_fields(again.headers().as_ref().expect("table"), &table);
    assert_eq!(again.priority(), props.priority());
    assert_eq!(again.correlation_id(), props.correlation_id());
    assert_eq!(again.message_id(), props.message_id());
    assert_eq!(again.timestamp(), props.timestamp());
    assert_eq!(again.kind(), props.kind());
    assert_eq!(again.app_id(), props.app_id());
    d.nack(Duration::from_millis(300))
        .await
        .expect("delayed nack");
    let d = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("delayed redelivery");
    assert_eq!(d.message.attempt(), 3);
    let again = amqp(&d.message).properties();
    same_fields(again.headers().as_ref().expect("table"), &table);
    assert_eq!(again.content_type(), props.content_type());
    assert_eq!(again.correlation_id(), props.correlation_id());
    for (name, text) in &want {
        assert_eq!(
            d.message.headers.get(name),
            Some(text),
            "header {name} after a delay"
        );
    }
    d.ack().await.expect("ack");
    drop(c);
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_every_amqp_type_round_trip_classic() {
    header_round_trip(QueueKind::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_every_amqp_type_round_trip_quorum() {
    header_round_trip(QueueKind::Quorum).await;
}

async fn delayed_retry(kind: QueueKind) {
    let queue = common::unique(&format!("delay-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let p = common::publisher().await;
    for body in ["long", "short"] {
        p.publish(&queue, OutgoingMessage::new(body))
            .await
            .expect("publish");
    }
    let mut c = common::consumer(&topology, "redrive-test-delay", 8).await;
    let long = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("first");
    let short = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("second");
    assert_eq!(&long.message.payload[..], b"long");
    let start = Instant::now();
    long.nack(Duration::from_secs(6)).await.expect("nack 6 s");
    short.nack(Duration::from_secs(1)).await.expect("nack 1 s");

    // The short delay is not held behind the long one: they sit in different buckets.
    let d = common::next(&mut c, Duration::from_secs(4))
        .await
        .expect("the 1 s retry");
    let at = start.elapsed();
    assert_eq!(&d.message.payload[..], b"short");
    assert!(
        at >= Duration::from_secs(1),
        "redelivered after {at:?}, before its delay"
    );
    assert_eq!(d.message.attempt(), 2);
    d.ack().await.expect("ack");

    let early = common::next(
        &mut c,
        Duration::from_secs(6).saturating_sub(start.elapsed()) - Duration::from_millis(200),
    )
    .await;
    assert!(
        early.is_none(),
        "the 6 s retry came back early, after {:?}",
        start.elapsed()
    );
    let d = common::next(&mut c, Duration::from_secs(10))
        .await
        .expect("the 6 s retry");
    let at = start.elapsed();
    assert_eq!(&d.message.payload[..], b"long");
    assert!(
        at >= Duration::from_secs(6),
        "redelivered after {at:?}, before its delay"
    );
    assert_eq!(d.message.attempt(), 2);
    d.ack().await.expect("ack");
    drop(c);
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retry_is_not_redelivered_before_its_delay_classic() {
    delayed_retry(QueueKind::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retry_is_not_redelivered_before_its_delay_quorum() {
    delayed_retry(QueueKind::Quorum).await;
}

async fn poison_to_dlq(kind: QueueKind, redelivery: Duration) {
    let queue = common::unique(&format!("poison-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let dlq = topology.dead_letter_queue().unwrap().to_owned();
    let publisher = common::publisher().await;
    let sent = OutgoingMessage::new("poison")
        .with_key("user-7")
        .with_header("x-custom", "kept")
        .unwrap()
        .with_header(mapping::CORRELATION_ID, "corr-poison")
        .unwrap()
        .with_header(mapping::MESSAGE_ID, "poison-1")
        .unwrap();
    publisher.publish(&queue, sent).await.expect("publish");

    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let handler = handler_fn(move |m: Message| {
        let seen = seen.clone();
        async move {
            let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
            assert_eq!(m.attempt(), n, "attempt of call {n}");
            Err::<(), BoxError>("downstream says no".into())
        }
    });
    let layer = DeadLetterLayer::new(
        Arc::new(publisher.clone()),
        DeadLetterConfig::default()
            .with_max_attempts(3)
            .with_destination(dlq.clone())
            .with_consumer_name("poison-test"),
    )
    .expect("dead-letter config");
    let service = tower::ServiceBuilder::new().layer(layer).service(handler);
    let consumer = common::consumer(&topology, "redrive-test-poison", 8).await;
    let worker = Worker::builder(consumer)
        .service(service)
        .redelivery(Redelivery::constant(redelivery))
        .build()
        .expect("worker");
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopper = stop.clone();
    let run = tokio::spawn(worker.run_until(async move { stopper.notified().await }));

    let mut c = common::consumer(
        &Topology::new(&dlq).with_kind(kind),
        "redrive-test-poison-dlq",
        8,
    )
    .await;
    let d = common::next(&mut c, Duration::from_secs(30))
        .await
        .expect("the poison message in the DLQ");
    stop.notify_one();
    let report = run.await.expect("worker");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "handler calls");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(report.nacked, 2, "{report:?}");

    let m = &d.message;
    assert_eq!(&m.payload[..], b"poison");
    assert_eq!(m.key.as_deref(), Some(&b"user-7"[..]));
    let h = &m.headers;
    assert_eq!(h.get_str("x-custom"), Some("kept"));
    assert_eq!(h.get_str(mapping::CORRELATION_ID), Some("corr-poison"));
    assert_eq!(h.get_str(dead_letter::ATTEMPTS), Some("3"));
    assert_eq!(h.get_str(dead_letter::ERROR_KIND), Some("exhausted"));
    assert_eq!(h.get_str(dead_letter::ORIGINAL_SYSTEM), Some("rabbitmq"));
    assert_eq!(
        h.get_str(dead_letter::ORIGINAL_DESTINATION),
        Some(queue.as_str())
    );
    assert_eq!(
        h.get_str(dead_letter::ORIGINAL_MESSAGE_ID),
        Some("poison-1")
    );
    assert_eq!(h.get_str(dead_letter::CONSUMER), Some("poison-test"));
    assert!(
        h.get_str(dead_letter::ERROR_MESSAGE)
            .is_some_and(|e| e.contains("downstream says no")),
        "{h:?}"
    );
    for name in [
        dead_letter::FIRST_FAILURE_AT,
        dead_letter::LAST_FAILURE_AT,
        dead_letter::ORIGINAL_ENQUEUED_AT,
    ] {
        assert!(
            h.get_str(name).is_some_and(|v| !v.is_empty()),
            "{name}: {h:?}"
        );
    }
    assert_eq!(m.attempt(), 1, "the DLQ copy starts its own count");
    d.ack().await.expect("ack");
    assert!(
        common::next(&mut c, Duration::from_secs(1)).await.is_none(),
        "one DLQ message"
    );
    drop(c);
    common::cleanup(&[topology, Topology::new(dlq)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_lands_in_the_dlq_with_its_envelope_classic() {
    poison_to_dlq(QueueKind::Classic, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_lands_in_the_dlq_with_its_envelope_quorum() {
    poison_to_dlq(QueueKind::Quorum, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_lands_in_the_dlq_after_delayed_retries() {
    poison_to_dlq(QueueKind::Classic, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_differently_is_an_error_naming_the_argument() {
    let queue = common::unique("mismatch");
    let classic = common::topology(&queue, QueueKind::Classic);
    common::declare(&classic).await;
    let err = RabbitConsumer::builder(common::url(), classic.clone().with_kind(QueueKind::Quorum))
        .connect()
        .await
        .expect_err("a quorum declare of a classic queue");
    match &err {
        Error::TopologyMismatch {
            queue: q, argument, ..
        } => {
            assert_eq!(q, &queue);
            assert_eq!(argument, "x-queue-type");
        }
        other => panic!("expected a topology mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains("x-queue-type"), "{err}");
    common::cleanup(&[classic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_is_an_error() {
    let p = common::publisher().await;
    let missing = common::unique("missing");
    let err = p
        .publish(&missing, OutgoingMessage::new("lost?"))
        .await
        .expect_err("no such queue");
    assert!(
        matches!(&err, CoreError::UnknownDestination(q) if q == &missing),
        "{err:?}"
    );
    let err = p
        .publish_to("amq.direct", &missing, &OutgoingMessage::new("lost?"))
        .await
        .expect_err("no binding");
    assert!(matches!(err, Error::Unroutable { .. }), "{err:?}");
    // The publisher still works afterwards.
    let queue = common::unique("routable");
    let t = common::topology(&queue, QueueKind::Classic);
    common::declare(&t).await;
    p.publish(&queue, OutgoingMessage::new("fine"))
        .await
        .expect("publish");
    common::cleanup(&[t]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_says_how_to_start_it() {
    let err = RabbitConsumer::builder(
        "amqp://guest:secret@127.0.0.1:1/%2f",
        Topology::new("nowhere"),
    )
    .connect()
    .await
    .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(text.contains("rabbitmq-server -detached"), "{text}");
    assert!(!text.contains("secret"), "the password leaked: {text}");
}

/// Messages the Worker hands back at shutdown without running them come back with the
/// attempt they had: a hand-back is not a delivery attempt. The one the Worker ran and
/// aborted at its deadline counts.
async fn hand_back_at_shutdown(kind: QueueKind) {
    let queue = common::unique(&format!("handback-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let p = common::publisher().await;
    // All of one key: the first runs, the others wait behind it.
    for body in ["running", "w1", "w2"] {
        p.publish(&queue, OutgoingMessage::new(body).with_key("k"))
            .await
            .expect("publish");
    }
    // One already on its third attempt.
    let mut table = FieldTable::default();
    table.insert(mapping::ATTEMPT.into(), AMQPValue::LongLongInt(3));
    table.insert(mapping::KEY.into(), AMQPValue::LongString("k".into()));
    p.publish_raw(
        "",
        &queue,
        b"third",
        BasicProperties::default().with_headers(table),
    )
    .await
    .expect("publish");
    p.close().await;

    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let handler = handler_fn(move |m: Message| {
        counted.fetch_add(1, Ordering::SeqCst);
        assert_eq!(&m.payload[..], b"running", "only the first of the key runs");
        std::future::pending::<Result<(), BoxError>>()
    });
    let consumer = common::consumer(&topology, "redrive-test-handback", 8).await;
    let worker = Worker::builder(consumer)
        .service(handler)
        .ordering(OrderingMode::PerKey)
        .concurrency(4)
        .shutdown_timeout(Duration::from_millis(500))
        .build()
        .expect("worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    while calls.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other three arrive and wait behind the running one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(()).expect("stop");
    let report = run.await.expect("worker");
    assert_eq!(report.handed_back, 3, "{report:?}");
    assert_eq!(report.in_flight_at_deadline, 1, "{report:?}");

    let mut c = common::consumer(&topology, "redrive-test-handback-after", 8).await;
    let mut attempts = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let d = common::next(&mut c, Duration::from_secs(10))
            .await
            .expect("every message back");
        attempts.insert(
            String::from_utf8_lossy(&d.message.payload).into_owned(),
            d.message.attempt(),
        );
        d.ack().await.expect("ack");
    }
    // A quorum queue counts a requeue as a delivery (RabbitMQ 3.x): one more, not two
    // (it does not come back to the consumer that handed it back).
    let extra = u32::from(kind == QueueKind::Quorum);
    let want: std::collections::BTreeMap<String, u32> = [
        ("running", 2),
        ("w1", 1 + extra),
        ("w2", 1 + extra),
        ("third", 3 + extra),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(attempts, want, "attempts after the hand-back");
    drop(c);
    common::cleanup(&[topology]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_at_shutdown_keeps_the_attempt_classic() {
    hand_back_at_shutdown(QueueKind::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_at_shutdown_counts_once_on_quorum() {
    hand_back_at_shutdown(QueueKind::Quorum).await;
}

/// Deliveries the broker sent into the consumer's prefetch window that the Worker never
/// took are handed back at close with the attempt they had: on a classic queue, closing
/// the connection would return them marked redelivered, one attempt more although no
/// handler ever saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_never_taken_keep_their_attempt_at_close_classic() {
    let queue = common::unique("close-buffered");
    let topology = common::topology(&queue, QueueKind::Classic);
    common::declare(&topology).await;
    common::publish_numbered(&queue, 10, "m").await;

    let ran = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let runs = ran.clone();
    let handler = handler_fn(move |m: Message| {
        let runs = runs.clone();
        async move {
            runs.lock()
                .expect("runs")
                .push(String::from_utf8_lossy(&m.payload).into_owned());
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<(), BoxError>(())
        }
    });
    let consumer = common::consumer(&topology, "redrive-test-close-buffered", 10).await;
    let worker = Worker::builder(consumer)
        .service(handler)
        .concurrency(1)
        .shutdown_timeout(Duration::from_secs(10))
        .build()
        .expect("worker");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(worker.run_until(async move {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    while ran.lock().expect("runs").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "nothing ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The broker sends the other nine into the prefetch window; the Worker, busy with
    // the first, takes none of them.
    while common::ready(&queue).await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the prefetch window never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).expect("stop");
    let report = run.await.expect("worker");
    let ran = ran.lock().expect("runs").clone();
    assert_eq!(ran.len(), 1, "only the first ran: {ran:?}");
    assert_eq!(report.acked, 1, "{report:?}");

    let mut c = common::consumer(&topology, "redrive-test-close-buffered-after", 10).await;
    let mut attempts = std::collections::BTreeMap::new();
    for _ in 0..9 {
        let d = common::next(&mut c, Duration::from_secs(10))
            .await
            .expect("every message that did not run is back");
        attempts.insert(
            String::from_utf8_lossy(&d.message.payload).into_owned(),
            d.message.attempt(),
        );
        d.ack().await.expect("ack");
    }
    assert!(
        common::next(&mut c, Duration::from_millis(500))
            .await
            .is_none(),
        "a message came twice"
    );
    let want: std::collections::BTreeMap<String, u32> = (0..10)
        .map(|i| format!("m{i}"))
        .filter(|m| *m != ran[0])
        .map(|m| (m, 1))
        .collect();
    assert_eq!(attempts, want, "attempts of the messages that never ran");
    drop(c);
    common::cleanup(&[topology]).await;
}

/// A message published without a message id gets one, unique per publish, so the
/// idempotency layer's default key works on the default path; one given is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_sets_a_message_id_when_none_is_given() {
    let queue = common::unique("message-id");
    let topology = common::topology(&queue, QueueKind::Classic);
    common::declare(&topology).await;
    let p = common::publisher().await;
    for _ in 0..2 {
        p.publish(&queue, OutgoingMessage::new("no headers"))
            .await
            .expect("publish");
    }
    p.publish(
        &queue,
        OutgoingMessage::new("given")
            .with_header(mapping::MESSAGE_ID, "order-7")
            .expect("header"),
    )
    .await
    .expect("publish");
    p.close().await;

    let mut c = common::consumer(&topology, "redrive-test-message-id", 8).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = common::next(&mut c, Duration::from_secs(10))
            .await
            .expect("delivery");
        let id = d.message.metadata.message_id.clone().expect("a message id");
        assert_eq!(d.message.headers.get_str(mapping::MESSAGE_ID), Some(&*id));
        ids.push(id.to_string());
        d.ack().await.expect("ack");
    }
    assert_eq!(ids[2], "order-7", "a given id is kept");
    assert_ne!(ids[0], ids[1], "two publishes, two ids");
    for id in &ids[..2] {
        assert_eq!(id.len(), 36, "a UUID: {id}");
    }
    drop(c);
    common::cleanup(&[topology]).await;
}
