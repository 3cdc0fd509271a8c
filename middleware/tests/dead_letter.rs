//! The dead-letter layer, driven with a mock inner service and paused time.
#![cfg(feature = "dead-letter")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redrive_core::classify::{self, Classifier, ErrorKind};
use redrive_core::memory::MemoryBroker;
use redrive_core::{
    BoxError, Capabilities, HeaderLimits, Headers, Message, Metadata, Outcome, OutgoingMessage,
    Publisher, Source, Worker, handler,
};
use redrive_middleware::dead_letter::{
    self, DeadLetterConfig, DeadLetterError, DeadLetterEvent, DeadLetterLayer, Reason,
};
use tower::{Layer, Service, ServiceExt, service_fn};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Records what it publishes.
#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<(String, OutgoingMessage)>>,
}

impl Recorder {
    fn take(&self) -> Vec<(String, OutgoingMessage)> {
        std::mem::take(&mut *self.published.lock().unwrap())
    }
}

impl Publisher for Recorder {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.published
            .lock()
            .unwrap()
            .push((destination.to_owned(), message));
        Ok(())
    }
}

/// Never confirms a publish.
struct Down;

impl Publisher for Down {
    async fn publish(&self, _: &str, _: OutgoingMessage) -> redrive_core::Result<()> {
        Err(redrive_core::Error::broker("connection refused"))
    }
}

/// A Kafka-like message with trace context, on delivery attempt `attempt`.
fn message(attempt: u32) -> Message {
    let mut headers = Headers::new();
    headers
        .insert(dead_letter::TRACEPARENT, TRACEPARENT)
        .unwrap();
    headers
        .insert(dead_letter::TRACESTATE, "vendor=abc")
        .unwrap();
    headers
        .insert(dead_letter::CORRELATION_ID, "corr-7")
        .unwrap();
    headers.insert("content-type", "application/json").unwrap();
    let mut msg = Message::new(r#"{"id":1}"#)
        .with_key("user-1")
        .with_headers(headers);
    msg.metadata = Metadata {
        message_id: Some("m-1".into()),
        source: Source {
            system: "kafka",
            destination: "orders".into(),
            partition: Some(3),
            offset: Some(42),
            group: None,
        },
        attempt,
        enqueued_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        received_at: SystemTime::now(),
    };
    msg
}

/// An inner service that fails with `err()` and counts its calls.
fn failing(
    calls: Arc<AtomicU32>,
    err: fn() -> BoxError,
) -> impl Service<Message, Response = Outcome, Error = BoxError> + Clone {
    service_fn(move |_msg: Message| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Err::<Outcome, _>(err()) }
    })
}

fn permanent() -> BoxError {
    classify::permanent("missing field `id`")
}

fn transient() -> BoxError {
    "downstream unavailable".into()
}

fn layer<P: Publisher>(publisher: Arc<P>, config: DeadLetterConfig) -> DeadLetterLayer<P> {
    DeadLetterLayer::new(publisher, config).unwrap()
}

fn config() -> DeadLetterConfig {
    DeadLetterConfig::default()
        .with_max_attempts(3)
        .with_consumer_name("billing-7")
}

#[tokio::test(start_paused = true)]
async fn permanent_error_is_dead_lettered_with_a_complete_envelope() {
    let dlq = Arc::new(Recorder::default());
    let calls = Arc::new(AtomicU32::new(0));
    let svc = layer(dlq.clone(), config()).layer(failing(calls.clone(), permanent));

    let before = SystemTime::now();
    let outcome = svc.oneshot(message(1)).await.unwrap();
    assert_eq!(outcome, Outcome::DeadLettered);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let mut published = dlq.take();
    assert_eq!(published.len(), 1);
    let (destination, out) = published.remove(0);
    assert_eq!(destination, "orders-dlq");
    assert_eq!(&out.payload[..], br#"{"id":1}"#);
    assert_eq!(out.key.as_deref(), Some(&b"user-1"[..]));

    let h = &out.headers;
    let get = |name| {
        h.get_str(name)
            .unwrap_or_else(|| panic!("{name} missing: {h:?}"))
    };
    assert_eq!(get(dead_letter::ORIGINAL_SYSTEM), "kafka");
    assert_eq!(get(dead_letter::ORIGINAL_DESTINATION), "orders");
    assert_eq!(get(dead_letter::ORIGINAL_PARTITION), "3");
    assert_eq!(get(dead_letter::ORIGINAL_OFFSET), "42");
    assert_eq!(get(dead_letter::ORIGINAL_MESSAGE_ID), "m-1");
    assert_eq!(
        get(dead_letter::ORIGINAL_ENQUEUED_AT),
        "2023-11-14T22:13:20.123Z"
    );
    assert_eq!(get(dead_letter::ATTEMPTS), "1");
    assert_eq!(get(dead_letter::ERROR_KIND), "permanent");
    assert_eq!(get(dead_letter::ERROR_MESSAGE), "missing field `id`");
    assert_eq!(get(dead_letter::CONSUMER), "billing-7");
    // No earlier envelope: the first failure known is this one.
    let last = get(dead_letter::LAST_FAILURE_AT);
    assert_eq!(get(dead_letter::FIRST_FAILURE_AT), last);
    assert_eq!(last.len(), "2024-02-29T12:34:56.789Z".len(), "{last}");
    assert!(last.ends_with('Z') && &last[..4] >= "2024", "{last}");
    let year_now = 1970 + before.duration_since(UNIX_EPOCH).unwrap().as_secs() / 31_556_952;
    assert!(last.starts_with(&year_now.to_string()), "{last}");

    // Trace context and other headers exactly as they came in.
    assert_eq!(get(dead_letter::TRACEPARENT), TRACEPARENT);
    assert_eq!(get(dead_letter::TRACESTATE), "vendor=abc");
    assert_eq!(get(dead_letter::CORRELATION_ID), "corr-7");
    assert_eq!(get("content-type"), "application/json");
    // Every envelope header but the one only a trimmed dead letter carries.
    assert_eq!(h.len(), 4 + dead_letter::ENVELOPE_HEADERS.len() - 1);
    assert!(h.get_str(dead_letter::DROPPED_HEADERS).is_none());
}

#[tokio::test(start_paused = true)]
async fn transient_errors_go_up_unchanged_until_the_last_attempt() {
    let dlq = Arc::new(Recorder::default());
    let calls = Arc::new(AtomicU32::new(0));
    let layer = layer(dlq.clone(), config());
    for attempt in 1..3 {
        let err = layer
            .layer(failing(calls.clone(), transient))
            .oneshot(message(attempt))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "downstream unavailable");
        assert!(err.downcast_ref::<DeadLetterError>().is_none());
    }
    assert!(
        dlq.take().is_empty(),
        "nothing dead-lettered before the limit"
    );

    {
        let attempt = 3;
        let outcome = layer
            .layer(failing(calls.clone(), transient))
            .oneshot(message(attempt))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::DeadLettered);
        let published = dlq.take();
        assert_eq!(published.len(), 1, "attempt {attempt}");
        let h = &published[0].1.headers;
        assert_eq!(h.get_str(dead_letter::ERROR_KIND), Some("exhausted"));
        assert_eq!(
            h.get_str(dead_letter::ATTEMPTS),
            Some(attempt.to_string().as_str())
        );
        assert_eq!(
            h.get_str(dead_letter::ERROR_MESSAGE),
            Some("downstream unavailable")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn success_passes_through_untouched() {
    let dlq = Arc::new(Recorder::default());
    let svc = layer(dlq.clone(), config()).layer(service_fn(|_m: Message| async {
        Ok::<_, BoxError>(Outcome::Skipped)
    }));
    assert_eq!(svc.oneshot(message(3)).await.unwrap(), Outcome::Skipped);
    let svc = layer(dlq.clone(), config()).layer(handler::handler_fn(|_m: Message| async {
        Ok::<_, BoxError>(())
    }));
    assert_eq!(svc.oneshot(message(3)).await.unwrap(), Outcome::Processed);
    assert!(dlq.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_earlier_envelope_is_replaced_not_piled_up() {
    let dlq = Arc::new(Recorder::default());
    let mut msg = message(1);
    // Redriven from the DLQ back to `orders` after an earlier dead-lettering that knew
    // a partition; this time the source has none.
    msg.metadata.source.partition = None;
    msg.metadata.source.offset = None;
    for (name, value) in [
        (dead_letter::ORIGINAL_DESTINATION, "payments"),
        (dead_letter::ORIGINAL_PARTITION, "9"),
        (dead_letter::ATTEMPTS, "5"),
        (dead_letter::FIRST_FAILURE_AT, "2020-01-02T03:04:05.678Z"),
        (dead_letter::LAST_FAILURE_AT, "2020-01-03T00:00:00.000Z"),
        (dead_letter::CONSUMER, "old-consumer"),
        (dead_letter::ERROR_MESSAGE, "old error"),
    ] {
        msg.headers.insert(name, value).unwrap();
    }
    // A differently cased duplicate, as some brokers hand headers back.
    msg.headers
        .append("X-Redrive-Error-Kind", "exhausted")
        .unwrap();

    let svc = layer(dlq.clone(), config()).layer(failing(Arc::default(), permanent));
    assert_eq!(svc.oneshot(msg).await.unwrap(), Outcome::DeadLettered);
    let (_, out) = dlq.take().remove(0);
    let h = &out.headers;
    for name in dead_letter::ENVELOPE_HEADERS {
        assert!(h.get_all(name).count() <= 1, "{name} piled up: {h:?}");
    }
    assert_eq!(h.get_str(dead_letter::ORIGINAL_DESTINATION), Some("orders"));
    assert!(
        !h.contains(dead_letter::ORIGINAL_PARTITION),
        "stale partition kept: {h:?}"
    );
    assert!(!h.contains(dead_letter::ORIGINAL_OFFSET));
    assert_eq!(h.get_str(dead_letter::ATTEMPTS), Some("1"));
    assert_eq!(h.get_str(dead_letter::ERROR_KIND), Some("permanent"));
    assert_eq!(h.get_str(dead_letter::CONSUMER), Some("billing-7"));
    assert_eq!(
        h.get_str(dead_letter::ERROR_MESSAGE),
        Some("missing field `id`")
    );
    // The earliest known failure survives the hop.
    assert_eq!(
        h.get_str(dead_letter::FIRST_FAILURE_AT),
        Some("2020-01-02T03:04:05.678Z")
    );
    assert_ne!(
        h.get_str(dead_letter::LAST_FAILURE_AT),
        Some("2020-01-03T00:00:00.000Z")
    );
    assert_eq!(h.len(), 4 + dead_letter::ENVELOPE_HEADERS.len() - 3);
}

#[tokio::test(start_paused = true)]
async fn a_first_failure_in_the_future_or_unreadable_is_ignored() {
    for bad in ["2999-01-01T00:00:00.000Z", "last tuesday"] {
        let dlq = Arc::new(Recorder::default());
        let mut msg = message(1);
        msg.headers
            .insert(dead_letter::FIRST_FAILURE_AT, bad)
            .unwrap();
        let svc = layer(dlq.clone(), config()).layer(failing(Arc::default(), permanent));
        svc.oneshot(msg).await.unwrap();
        let (_, out) = dlq.take().remove(0);
        let h = &out.headers;
        assert_eq!(
            h.get_str(dead_letter::FIRST_FAILURE_AT),
            h.get_str(dead_letter::LAST_FAILURE_AT),
            "{bad}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn failed_publish_is_a_transient_error_and_nothing_is_acked() {
    let svc = layer(Arc::new(Down), config()).layer(failing(Arc::default(), permanent));
    let err = svc.oneshot(message(1)).await.unwrap_err();
    let dl = err
        .downcast_ref::<DeadLetterError>()
        .unwrap_or_else(|| panic!("not a DeadLetterError: {err}"));
    assert!(dl.is_publish());
    assert_eq!(dl.destination(), "orders-dlq");
    assert_eq!(dl.handler_error(), "missing field `id`");
    let text = err.to_string();
    assert!(
        text.contains("orders-dlq") && text.contains("missing field `id`"),
        "{text}"
    );
    // Transient, so the Worker nacks with backoff, although the handler's error was permanent.
    assert_eq!(
        Classifier::default().classify(&*err).kind,
        ErrorKind::Transient
    );
}

#[tokio::test(start_paused = true)]
async fn an_envelope_over_the_header_limits_is_trimmed_to_fit() {
    // Kafka-like limits, nearly filled by the producer's own headers: the full envelope
    // cannot fit, so the dead letter keeps the trace context, the correlation and
    // message ids and the envelope, and says how many headers it dropped.
    let dlq = Arc::new(Recorder::default());
    let mut msg = message(1);
    let mut headers = Headers::with_limits(HeaderLimits {
        max_count: 16,
        max_bytes: 4096,
    });
    for (n, v) in msg.headers.iter() {
        headers.insert(n, v.clone()).unwrap();
    }
    for i in 0..12 {
        headers.insert(format!("app-{i}"), "v").unwrap();
    }
    msg.headers = headers;
    let svc = layer(dlq.clone(), config()).layer(failing(Arc::default(), permanent));
    assert_eq!(svc.oneshot(msg).await.unwrap(), Outcome::DeadLettered);
    let (to, out) = dlq.take().remove(0);
    assert_eq!(to, "orders-dlq");
    let h = &out.headers;
    assert_eq!(h.get_str(dead_letter::TRACEPARENT), Some(TRACEPARENT));
    assert_eq!(h.get_str(dead_letter::CORRELATION_ID), Some("corr-7"));
    assert_eq!(h.get_str(dead_letter::ERROR_KIND), Some("permanent"));
    assert_eq!(h.get_str(dead_letter::ORIGINAL_DESTINATION), Some("orders"));
    assert_eq!(h.get_str(dead_letter::ORIGINAL_MESSAGE_ID), Some("m-1"));
    assert_eq!(h.get_str(dead_letter::DROPPED_HEADERS), Some("13"));
    assert!(h.get_str("app-0").is_none());
}

/// Refuses every publish for good, as a broker refuses an invalid name or a message too
/// large; counts what it was offered.
#[derive(Default)]
struct Refusing {
    offered: Mutex<Vec<OutgoingMessage>>,
}

impl Publisher for Refusing {
    async fn publish(&self, _: &str, message: OutgoingMessage) -> redrive_core::Result<()> {
        self.offered.lock().unwrap().push(message);
        Err(redrive_core::Error::rejected("message too large"))
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_the_broker_refuses_is_trimmed_then_delayed_loudly() {
    let dlq = Arc::new(Refusing::default());
    let svc = layer(dlq.clone(), config()).layer(failing(Arc::default(), permanent));
    let err = svc.oneshot(message(1)).await.unwrap_err();
    // Offered once whole, once trimmed.
    let offered = dlq.offered.lock().unwrap();
    assert_eq!(offered.len(), 2);
    assert!(offered[1].headers.get_str("content-type").is_none());
    // Not lost, not retried at the Worker's pace: redelivered after a long delay.
    let class = Classifier::default().classify(&*err);
    assert_eq!(class.kind, ErrorKind::Transient);
    assert_eq!(class.retry_after, Some(Duration::from_secs(600)));
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    let mut found = None;
    while let Some(e) = source {
        if let Some(dl) = e.downcast_ref::<DeadLetterError>() {
            found = Some(dl);
        }
        source = e.source();
    }
    let dl = found.expect("a DeadLetterError in the chain");
    assert!(dl.is_rejected(), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_message_past_its_attempt_limit_is_dead_lettered_without_running() {
    // Delivery 6 of a message whose limit is 3, past the margin of 2: earlier
    // deliveries ended without a result (the process died), so running it again would
    // only die again. Deliveries 4 and 5 still run: a filter may have declined their
    // errors, or a dead-letter publish failed.
    for attempt in [4, 5] {
        let dlq = Arc::new(Recorder::default());
        let calls = Arc::new(AtomicU32::new(0));
        let svc = layer(dlq.clone(), config()).layer(failing(calls.clone(), transient));
        assert_eq!(
            svc.oneshot(message(attempt)).await.unwrap(),
            Outcome::DeadLettered
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "attempt {attempt} runs");
        assert_eq!(
            dlq.take()[0].1.headers.get_str(dead_letter::ERROR_KIND),
            Some("exhausted")
        );
    }
    let dlq = Arc::new(Recorder::default());
    let calls = Arc::new(AtomicU32::new(0));
    let svc = layer(dlq.clone(), config()).layer(failing(calls.clone(), transient));
    assert_eq!(
        svc.oneshot(message(6)).await.unwrap(),
        Outcome::DeadLettered
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler must not run");
    let (_, out) = dlq.take().remove(0);
    assert_eq!(
        out.headers.get_str(dead_letter::ERROR_KIND),
        Some("abandoned")
    );
    assert_eq!(out.headers.get_str(dead_letter::ATTEMPTS), Some("6"));
    let text = out.headers.get_str(dead_letter::ERROR_MESSAGE).unwrap();
    assert!(text.contains("without a result"), "{text}");
}

#[test]
fn the_default_destination_is_a_name_every_broker_accepts() {
    assert_eq!(dead_letter::default_destination("orders"), "orders-dlq");
    assert_eq!(
        dead_letter::default_destination("orders.fifo"),
        "orders-dlq.fifo"
    );
}

#[tokio::test(start_paused = true)]
async fn in_a_worker_a_handler_that_always_panics_is_dead_lettered() {
    let broker = MemoryBroker::new();
    broker
        .publish("jobs", OutgoingMessage::new("explosive"))
        .await
        .unwrap();
    let handler = handler::handler_fn(|_m: Message| async {
        if true {
            panic!("index out of bounds");
        }
        Ok::<(), BoxError>(())
    });
    let service = layer(Arc::new(broker.clone()), config().with_max_attempts(3)).layer(handler);
    let report = Worker::builder(broker.consumer("jobs"))
        .service(service)
        .redelivery(redrive_core::Redelivery::constant(Duration::from_millis(
            10,
        )))
        .build()
        .unwrap()
        .run_until(tokio::time::sleep(Duration::from_secs(5)))
        .await;
    assert_eq!(
        (report.dead_lettered, report.panicked, report.nacked),
        (1, 2, 2),
        "{report:?}"
    );
    let dead = broker.messages("jobs-dlq");
    assert_eq!(dead.len(), 1);
    let text = dead[0].headers.get_str(dead_letter::ERROR_MESSAGE).unwrap();
    assert!(text.contains("index out of bounds"), "{text}");
    assert_eq!(dead[0].headers.get_str(dead_letter::ATTEMPTS), Some("3"));
}

#[tokio::test(start_paused = true)]
async fn the_error_message_is_truncated_on_a_char_boundary() {
    let dlq = Arc::new(Recorder::default());
    let svc = layer(dlq.clone(), config().with_max_error_len(12))
        .layer(failing(Arc::default(), || {
            classify::permanent("éééééééééé")
        }));
    svc.oneshot(message(1)).await.unwrap();
    let (_, out) = dlq.take().remove(0);
    // 12 bytes: 4 × "é" (8 bytes) would leave 4 for "…" (3); 4 × "é" + "…" = 11.
    assert_eq!(
        out.headers.get_str(dead_letter::ERROR_MESSAGE),
        Some("éééé…")
    );
}

#[tokio::test(start_paused = true)]
async fn destination_is_configurable_and_required() {
    let dlq = Arc::new(Recorder::default());
    let svc = layer(dlq.clone(), config().with_destination("graveyard"))
        .layer(failing(Arc::default(), permanent));
    svc.oneshot(message(1)).await.unwrap();
    assert_eq!(dlq.take()[0].0, "graveyard");

    let mut msg = message(1);
    msg.metadata.source.destination = "".into();
    let svc = layer(dlq.clone(), config()).layer(failing(Arc::default(), permanent));
    let err = svc.oneshot(msg).await.unwrap_err();
    assert!(err.to_string().contains("with_destination"), "{err}");
    assert!(dlq.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_filter_decides_which_errors_are_dead_lettered() {
    #[derive(Debug, thiserror::Error)]
    #[error("schema v1 is retired")]
    struct RetiredSchema;

    fn is_retired(err: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(err);
        while let Some(e) = next {
            if e.is::<RetiredSchema>() {
                return true;
            }
            next = e.source();
        }
        false
    }

    let dlq = Arc::new(Recorder::default());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in_filter = seen.clone();
    let config = config().with_filter(move |err, class| {
        seen_in_filter.lock().unwrap().push(class.kind);
        // Errors carrying `RetiredSchema` stay out of the DLQ; others go in.
        !is_retired(err)
    });
    let layer = layer(dlq.clone(), config);

    let err = layer
        .layer(failing(Arc::default(), || {
            classify::permanent(RetiredSchema)
        }))
        .oneshot(message(1))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "schema v1 is retired");
    assert!(dlq.take().is_empty());

    let outcome = layer
        .layer(failing(Arc::default(), permanent))
        .oneshot(message(1))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::DeadLettered);
    assert_eq!(dlq.take().len(), 1);

    // Transient errors before the limit never reach the filter.
    layer
        .layer(failing(Arc::default(), transient))
        .oneshot(message(1))
        .await
        .unwrap_err();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![ErrorKind::Permanent, ErrorKind::Permanent]
    );
}

#[tokio::test(start_paused = true)]
async fn the_hook_sees_each_confirmed_dead_letter() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let recorded = events.clone();
    let hook = move |e: &DeadLetterEvent<'_>| {
        recorded.lock().unwrap().push((
            e.destination.to_owned(),
            e.reason,
            e.error.to_string(),
            e.metadata.attempt,
            e.message
                .headers
                .get_str(dead_letter::ERROR_KIND)
                .map(str::to_owned),
        ));
    };
    let svc = layer(Arc::new(Recorder::default()), config())
        .on_dead_letter(hook.clone())
        .layer(failing(Arc::default(), transient));
    svc.oneshot(message(3)).await.unwrap();
    assert_eq!(
        *events.lock().unwrap(),
        vec![(
            "orders-dlq".to_owned(),
            Reason::Exhausted,
            "downstream unavailable".to_owned(),
            3,
            Some("exhausted".to_owned())
        )]
    );

    // Not called when the publish was not confirmed.
    let svc = layer(Arc::new(Down), config())
        .on_dead_letter(hook)
        .layer(failing(Arc::default(), permanent));
    svc.oneshot(message(1)).await.unwrap_err();
    assert_eq!(events.lock().unwrap().len(), 1);
}

#[test]
fn configuration_is_checked() {
    let publisher = Arc::new(Recorder::default());
    let err = DeadLetterLayer::new(
        publisher.clone(),
        DeadLetterConfig::default().with_max_attempts(0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_attempts"), "{err}");
    let err = DeadLetterLayer::new(
        publisher.clone(),
        DeadLetterConfig::default().with_destination(""),
    )
    .unwrap_err();
    assert!(err.to_string().contains("destination is empty"), "{err}");
    let counting = Capabilities::new().with_delivery_count(true);
    let not_counting = Capabilities::new();
    assert!(DeadLetterConfig::default().check(&counting).is_ok());
    assert!(DeadLetterConfig::default().check(&not_counting).is_ok());
    assert!(
        DeadLetterConfig::default()
            .with_max_attempts(0)
            .check(&counting)
            .is_err()
    );
}

#[tokio::test(start_paused = true)]
async fn in_a_worker_a_poison_message_ends_in_the_dlq_and_the_original_is_acked() {
    let broker = MemoryBroker::new();
    broker
        .publish("jobs", OutgoingMessage::new("poison"))
        .await
        .unwrap();
    let service =
        layer(Arc::new(broker.clone()), config()).layer(handler::handler_fn(|_m: Message| async {
            Err::<(), BoxError>(permanent())
        }));
    let worker = Worker::builder(broker.consumer("jobs"))
        .service(service)
        .build()
        .unwrap();
    let report = worker
        .run_until(tokio::time::sleep(Duration::from_secs(1)))
        .await;
    assert_eq!(
        (report.dead_lettered, report.acked, report.nacked),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(broker.depth("jobs") + broker.in_flight("jobs"), 0);
    let dead = broker.messages("jobs-dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].payload[..], b"poison");
    assert_eq!(
        dead[0].headers.get_str(dead_letter::ORIGINAL_SYSTEM),
        Some("memory")
    );
    assert_eq!(
        dead[0].headers.get_str(dead_letter::ORIGINAL_DESTINATION),
        Some("jobs")
    );
    assert!(
        dead[0]
            .headers
            .get_str(dead_letter::ORIGINAL_MESSAGE_ID)
            .is_some()
    );
}

#[tokio::test(start_paused = true)]
async fn in_a_worker_a_failed_dlq_publish_leads_to_a_nack_and_the_message_stays() {
    let broker = MemoryBroker::new();
    broker
        .publish("jobs", OutgoingMessage::new("poison"))
        .await
        .unwrap();
    let service = layer(Arc::new(Down), config()).layer(handler::handler_fn(|_m: Message| async {
        Err::<(), BoxError>(permanent())
    }));
    let worker = Worker::builder(broker.consumer("jobs"))
        .service(service)
        .build()
        .unwrap();
    let report = worker
        .run_until(tokio::time::sleep(Duration::from_millis(500)))
        .await;
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert!(report.nacked >= 1, "{report:?}");
    assert_eq!(report.acked, 0, "{report:?}");
    assert_eq!(broker.messages("jobs").len(), 1, "the message was lost");
    assert!(broker.messages("jobs-dlq").is_empty());
}

/// Accepts only names without a dot, as SQS does.
struct Picky;

impl Publisher for Picky {
    async fn publish(&self, _: &str, _: OutgoingMessage) -> redrive_core::Result<()> {
        Ok(())
    }

    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        if destination.contains('.') {
            return Err(redrive_core::Error::config("no dots in queue names"));
        }
        Ok(())
    }
}

#[test]
fn a_destination_the_broker_refuses_by_name_is_an_error_at_start_up() {
    let Err(err) = DeadLetterLayer::new(
        Arc::new(Picky),
        DeadLetterConfig::default().with_destination("orders.dlq"),
    ) else {
        panic!("a destination the broker refuses was accepted at start-up");
    };
    let text = err.to_string();
    assert!(
        text.contains("orders.dlq") && text.contains("no dots"),
        "{text}"
    );
    DeadLetterLayer::new(
        Arc::new(Picky),
        DeadLetterConfig::default().with_destination("orders-dlq"),
    )
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn in_a_worker_a_message_that_kills_its_consumer_reaches_the_dlq_on_the_next_start() {
    // The handler never returns for this message: each "process" dies holding it (its
    // Worker is dropped mid-call), so no layer ever sees a failure. The broker counts
    // the deliveries; after three, the next start dead-letters it without running it.
    let broker = MemoryBroker::new();
    broker.declare(
        "jobs",
        redrive_core::memory::QueueConfig::default().with_lease(Duration::from_secs(1)),
    );
    broker
        .publish("jobs", OutgoingMessage::new("deadly"))
        .await
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let worker = |broker: &MemoryBroker| {
        let runs = runs.clone();
        let handler = handler::handler_fn(move |_m: Message| {
            runs.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<Result<(), BoxError>>()
        });
        let service = layer(Arc::new(broker.clone()), config()).layer(handler);
        Worker::builder(broker.consumer("jobs"))
            .service(service)
            .execution(redrive_core::Execution::InTask)
            .build()
            .unwrap()
    };
    // max_attempts 3 and the default margin of 2: five deaths, then the guard.
    for _ in 0..5 {
        // Dropped after 100 ms with its call in flight, as a killed process would be.
        let run = worker(&broker).run();
        let _ = tokio::time::timeout(Duration::from_millis(100), run).await;
        tokio::time::sleep(Duration::from_secs(2)).await; // the lease runs out
    }
    assert_eq!(runs.load(Ordering::SeqCst), 5);
    let report = worker(&broker)
        .run_until(tokio::time::sleep(Duration::from_millis(500)))
        .await;
    assert_eq!(runs.load(Ordering::SeqCst), 5, "not run a sixth time");
    assert_eq!((report.dead_lettered, report.acked), (1, 1), "{report:?}");
    let dead = broker.messages("jobs-dlq");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].headers.get_str(dead_letter::ERROR_KIND),
        Some("abandoned")
    );
    assert_eq!(dead[0].headers.get_str(dead_letter::ATTEMPTS), Some("6"));
}

#[cfg(feature = "idempotency")]
mod commit_failed {
    use super::*;
    use redrive_middleware::idempotency::{
        CommitStatus, IdempotencyConfig, IdempotencyLayer, IdempotencyStore, MemoryStore,
        Reservation, StoreError, StoreFuture, Token,
    };

    /// The in-memory store, but every commit fails as if the store had gone away.
    #[derive(Default)]
    struct CommitsFail(MemoryStore);

    impl IdempotencyStore for CommitsFail {
        fn reserve<'a>(&'a self, key: &'a str, lease: Duration) -> StoreFuture<'a, Reservation> {
            self.0.reserve(key, lease)
        }

        fn commit<'a>(
            &'a self,
            _: &'a str,
            _: &'a Token,
            _: Duration,
        ) -> StoreFuture<'a, CommitStatus> {
            Box::pin(async { Err(StoreError::backend("connection reset by peer")) })
        }

        fn release<'a>(&'a self, key: &'a str, token: &'a Token) -> StoreFuture<'a, ()> {
            self.0.release(key, token)
        }

        fn extend<'a>(
            &'a self,
            key: &'a str,
            token: &'a Token,
            lease: Duration,
        ) -> StoreFuture<'a, ()> {
            self.0.extend(key, token, lease)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_whose_commit_fails_on_its_last_attempt_is_acked_not_dead_lettered() {
        let dlq = Arc::new(Recorder::default());
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let handler = service_fn(move |_m: Message| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Outcome::Processed) }
        });
        let idempotency = IdempotencyLayer::new(
            Arc::new(CommitsFail::default()),
            IdempotencyConfig::default(),
        )
        .unwrap();
        let svc = layer(dlq.clone(), config()).layer(idempotency.layer(handler));
        // The last attempt: the handler succeeds, the commit fails. The effect
        // happened, so the message is processed: no dead letter to replay it from.
        assert_eq!(svc.oneshot(message(3)).await.unwrap(), Outcome::Processed);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(dlq.take().is_empty());
        assert_eq!(idempotency.stats().commit_failures, 1);
    }
}
