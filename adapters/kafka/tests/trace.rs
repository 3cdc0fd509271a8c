//! One message's life in one trace on the real Kafka broker (tansu, through
//! `KAFKA_BROKERS`): produce → three failed attempts, the first two parked by the Worker
//! and dispatched again after their delay → dead letter → consume from the DLQ.
//! `middleware/tests/trace_dlq.rs` checks the same on the in-memory broker. And one
//! record failing twice through retry topics, succeeding on attempt 3, in one trace.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Env;
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redrive_core::testkit::unique_name;
use redrive_core::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Report, Worker,
    handler_fn,
};
use redrive_kafka::RetryTopics;
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::trace::{CORRELATION_ID, TRACEPARENT, TraceLayer, TracedPublisher};
use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::Instrument;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;

/// The Worker's redelivery delay: Kafka cannot nack one record, so the Worker parks a
/// failed one and dispatches it again after this delay.
const DELAY: Duration = Duration::from_millis(100);

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

/// Records the spans of redrive's layers and of this test (not the broker client's own)
/// in an in-memory exporter, for the calling thread.
fn record_spans() -> (
    InMemorySpanExporter,
    SdkTracerProvider,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let ours = filter_fn(|m| m.target().starts_with("redrive") || m.target() == module_path!());
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("test"))
            .with_filter(ours),
    );
    let guard = tracing::subscriber::set_default(subscriber);
    (exporter, provider, guard)
}

// Current-thread: the subscriber is the test thread's default, and the Workers' tasks
// must run where it is set.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_producer_through_parked_retries_and_the_dlq() {
    let (exporter, provider, _guard) = record_spans();
    let env = Env::real();
    let brokers = env.brokers.clone();
    let topic = unique_name("trace");
    let dlq = format!("{topic}-dlq");
    env.create_topic(&topic, 1).await;
    env.create_topic(&dlq, 1).await;

    // Produce inside an application span: one record, so a batch of its own (tansu
    // answers a fetch from inside a batch of several records with nothing).
    let publisher = TracedPublisher::new(common::publisher(&brokers));
    async {
        publisher
            .publish(
                &topic,
                OutgoingMessage::new(r#"{"id":1}"#).with_key("order-1"),
            )
            .await
            .expect("publish");
    }
    .instrument(tracing::info_span!("checkout"))
    .await;

    // Consume: every attempt fails; the Worker parks the first two and dispatches them
    // again, the third is dead-lettered. A second Worker, in a group of its own, consumes
    // the DLQ; its handler ends both.
    let dead_letters = DeadLetterLayer::new(
        Arc::new(TracedPublisher::new(common::publisher(&brokers))),
        DeadLetterConfig::default()
            .with_max_attempts(3)
            .with_destination(&dlq),
    )
    .expect("dead-letter config");
    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(dead_letters)
        .service(handler_fn(|_m: Message| async {
            Err::<(), BoxError>("payment service unavailable".into())
        }));
    let worker = Worker::builder(common::consumer(&brokers, &unique_name("g"), &topic))
        .service(stack)
        .redelivery(Redelivery::constant(DELAY))
        .build()
        .expect("worker");
    let (done, stopped) = watch::channel(None::<Message>);
    let replay = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(handler_fn(move |m: Message| {
            let done = done.clone();
            async move {
                let _ = done.send(Some(m));
                Ok::<_, BoxError>(())
            }
        }));
    let dlq_worker = Worker::builder(common::consumer(&brokers, &unique_name("dlq"), &dlq))
        .service(replay)
        .build()
        .expect("DLQ worker");
    let until_done = |mut rx: watch::Receiver<Option<Message>>| async move {
        let _ = rx.wait_for(Option::is_some).await;
    };
    let run = async {
        tokio::join!(
            worker.run_until(until_done(stopped.clone())),
            dlq_worker.run_until(until_done(stopped.clone())),
        )
    };
    // Joining a group on tansu takes a few seconds.
    let (report, dlq_report): (Report, Report) = tokio::time::timeout(Duration::from_secs(25), run)
        .await
        .expect("the record reaches the DLQ and its consumer within 25 s");
    assert_eq!((report.parked, report.dead_lettered), (2, 1), "{report:?}");
    assert_eq!(dlq_report.processed, 1, "{dlq_report:?}");
    let dead = stopped.borrow().clone().expect("the dead letter");

    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    check_one_trace(&spans, &topic, &dlq, redrive_kafka::SYSTEM, &dead, DELAY);
}

/// A record failing twice goes through the retry topics and succeeds on its third
/// attempt: one trace, each attempt a child of the producer's span, each retry after
/// its delay.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_through_the_retry_topics_to_success_on_attempt_3() {
    let (exporter, provider, _guard) = record_spans();
    let env = Env::real();
    let brokers = env.brokers.clone();
    let (topic, group) = (unique_name("trace-rt"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    // One record per batch in the delay topic too (tansu 0.6.0 as released answers a
    // fetch from inside a batch of several records at the next batch).
    let retry_publisher = redrive_kafka::KafkaPublisher::builder(&brokers)
        .set("batch.num.messages", "1")
        .build()
        .expect("publisher");
    let retries = RetryTopics::new(retry_publisher, [DELAY, Duration::from_secs(5)]);
    for t in retries.topics(&topic, &group) {
        env.create_topic(&t, 1).await;
    }
    let publisher = TracedPublisher::new(common::publisher(&brokers));
    async {
        publisher
            .publish(&topic, OutgoingMessage::new("pay").with_key("order-1"))
            .await
            .expect("publish");
    }
    .instrument(tracing::info_span!("checkout"))
    .await;

    let (done, mut succeeded) = watch::channel(false);
    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(handler_fn(move |m: Message| {
            let done = done.clone();
            async move {
                if m.attempt() < 3 {
                    return Err::<(), BoxError>("payment service unavailable".into());
                }
                let _ = done.send(true);
                Ok(())
            }
        }));
    let consumer = redrive_kafka::KafkaConsumer::builder(&brokers, &group, [topic.as_str()])
        .commit_interval(Duration::from_millis(100))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .retry_topics(retries)
        .build()
        .expect("consumer");
    let worker = Worker::builder(consumer)
        .service(stack)
        .ordering(OrderingMode::Unordered)
        .redelivery(Redelivery::constant(DELAY))
        .build()
        .expect("worker");
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        worker.run_until(async move {
            let _ = succeeded.wait_for(|s| *s).await;
        }),
    )
    .await
    .expect("attempt 3 succeeds within 30 s");
    assert_eq!(
        (report.processed, report.nacked, report.parked),
        (1, 2, 0),
        "two nacks through the retry topics, no parking: {report:?}"
    );

    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let names: Vec<&str> = spans.iter().map(|s| &*s.name).collect();
    let checkout: Vec<&SpanData> = spans.iter().filter(|s| s.name == "checkout").collect();
    let send: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("send {topic}"))
        .collect();
    let mut attempts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == format!("process {topic}"))
        .collect();
    assert_eq!(
        (checkout.len(), send.len(), attempts.len(), spans.len()),
        (1, 1, 3, 5),
        "every attempt is a span of the origin topic, and no other spans: {names:?}"
    );
    let trace = checkout[0].span_context.trace_id();
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace),
        "one trace: {spans:?}"
    );
    let producer = send[0].span_context.span_id();
    attempts.sort_by_key(|s| match attr(s, "redrive.attempt") {
        Some(Value::I64(a)) => *a,
        other => panic!("attempt attribute: {other:?}"),
    });
    let got: Vec<(Option<&Value>, Option<String>, SpanId)> = attempts
        .iter()
        .map(|s| {
            (
                attr(s, "redrive.attempt"),
                text(s, "redrive.outcome"),
                s.parent_span_id,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(&Value::I64(1)), Some("retried".into()), producer),
            (Some(&Value::I64(2)), Some("retried".into()), producer),
            (Some(&Value::I64(3)), Some("processed".into()), producer),
        ]
    );
    let ids: Vec<Option<String>> = attempts
        .iter()
        .map(|s| text(s, "messaging.message.id"))
        .collect();
    assert!(
        ids[0].is_some() && ids.iter().all(|id| *id == ids[0]),
        "one message id: {ids:?}"
    );
    for pair in attempts.windows(2) {
        let gap = pair[1]
            .start_time
            .duration_since(pair[0].end_time)
            .unwrap_or_default();
        assert!(gap >= DELAY, "retried after {gap:?}, before its delay");
    }
}

/// The spans of one message: one trace id, every attempt a consumer span child of the
/// producer's, numbered 1 to 3, the DLQ publish inside the last, the DLQ consumer's a
/// child of the producer's too (the dead letter kept its trace context), each
/// redelivery at least `delay` after the attempt before it.
fn check_one_trace(
    spans: &[SpanData],
    queue: &str,
    dlq: &str,
    system: &str,
    dead: &Message,
    delay: Duration,
) {
    let names: Vec<&str> = spans.iter().map(|s| &*s.name).collect();
    let by_name =
        |name: String| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    let checkout = by_name("checkout".into());
    let send = by_name(format!("send {queue}"));
    let mut attempts = by_name(format!("process {queue}"));
    let send_dlq = by_name(format!("send {dlq}"));
    let process_dlq = by_name(format!("process {dlq}"));
    assert_eq!(
        (
            checkout.len(),
            send.len(),
            attempts.len(),
            send_dlq.len(),
            process_dlq.len()
        ),
        (1, 1, 3, 1, 1),
        "spans: {names:?}"
    );
    assert_eq!(spans.len(), 7, "no other spans: {names:?}");

    // One trace id throughout.
    let trace: TraceId = checkout[0].span_context.trace_id();
    for s in spans {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "span {} left the trace",
            s.name
        );
    }
    // The producer span is the parent of every attempt's span and of the DLQ
    // consumer's: each redelivery and the dead-lettered copy kept its context.
    let producer: SpanId = send[0].span_context.span_id();
    assert_eq!(send[0].parent_span_id, checkout[0].span_context.span_id());
    for s in send.iter().chain(&send_dlq) {
        assert_eq!(s.span_kind, SpanKind::Producer, "kind of {}", s.name);
    }
    for s in attempts.iter().chain(&process_dlq) {
        assert_eq!(s.parent_span_id, producer, "parent of {}", s.name);
        assert_eq!(s.span_kind, SpanKind::Consumer, "kind of {}", s.name);
        assert_eq!(text(s, "messaging.system").as_deref(), Some(system));
    }
    attempts.sort_by_key(|s| match attr(s, "redrive.attempt") {
        Some(Value::I64(a)) => *a,
        other => panic!("attempt attribute: {other:?}"),
    });
    let outcome = |s: &SpanData| text(s, "redrive.outcome");
    let got: Vec<(Option<&Value>, Option<String>)> = attempts
        .iter()
        .map(|s| (attr(s, "redrive.attempt"), outcome(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some(&Value::I64(1)), Some("retried".into())),
            (Some(&Value::I64(2)), Some("retried".into())),
            (Some(&Value::I64(3)), Some("dead_lettered".into())),
        ]
    );
    // Each redelivery waited its delay: it went the broker's (or the Worker's) way.
    for pair in attempts.windows(2) {
        let gap = pair[1]
            .start_time
            .duration_since(pair[0].end_time)
            .unwrap_or_default();
        assert!(
            gap >= delay,
            "attempt redelivered after {gap:?}, before its delay"
        );
    }
    // The same message every time.
    let ids: Vec<Option<String>> = attempts
        .iter()
        .map(|s| text(s, "messaging.message.id"))
        .collect();
    assert!(ids[0].is_some(), "{ids:?}");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    // The DLQ publish happened inside the last attempt's span.
    assert_eq!(
        send_dlq[0].parent_span_id,
        attempts[2].span_context.span_id()
    );
    assert_eq!(outcome(process_dlq[0]).as_deref(), Some("processed"));

    // No correlation id was sent: each attempt derived the same one from the trace id.
    let correlation: Vec<Option<String>> = attempts
        .iter()
        .chain(&process_dlq)
        .map(|s| text(s, "correlation_id"))
        .collect();
    assert!(
        correlation
            .iter()
            .all(|c| c.as_deref() == Some(&*trace.to_string())),
        "{correlation:?} vs {trace}"
    );

    // The dead letter carries the producer's trace context and that correlation id.
    let h = &dead.headers;
    assert_eq!(h.get_str(dead_letter::ATTEMPTS), Some("3"), "{h:?}");
    assert_eq!(
        h.get_str(TRACEPARENT),
        Some(&*format!("00-{trace}-{producer}-01")),
        "{h:?}"
    );
    assert_eq!(
        h.get_str(CORRELATION_ID),
        Some(&*trace.to_string()),
        "{h:?}"
    );
}
