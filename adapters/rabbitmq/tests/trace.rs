//! One message's life in one trace on the local RabbitMQ: produce → three failed
//! attempts, the first two delayed through the topology's delay queues → dead letter →
//! consume from the DLQ. `middleware/tests/trace_dlq.rs` checks the same on the
//! in-memory broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redrive_core::{
    BoxError, Message, OutgoingMessage, Publisher, Redelivery, Report, Worker, handler_fn,
};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::trace::{CORRELATION_ID, TRACEPARENT, TraceLayer, TracedPublisher};
use redrive_rabbitmq::{QueueKind, Topology};
use tokio::sync::watch;
use tower::ServiceBuilder;
use tracing::Instrument;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;

/// The Worker's redelivery delay: a delay queue of its own (the 256 ms bucket), short
/// enough for a quick test.
const DELAY: Duration = Duration::from_millis(200);

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

async fn one_trace_through_delay_queues_and_the_dlq(kind: QueueKind) {
    let (exporter, provider, _guard) = record_spans();
    let queue = common::unique(&format!("trace-{}", kind.as_str()));
    let topology = common::topology(&queue, kind);
    common::declare(&topology).await;
    let dlq = topology.dead_letter_queue().expect("a DLQ").to_owned();
    let dlq_topology = Topology::new(&dlq).with_kind(kind);

    // Produce inside an application span.
    let publisher = TracedPublisher::new(common::publisher().await);
    async {
        publisher
            .publish(&queue, OutgoingMessage::new(r#"{"id":1}"#))
            .await
            .expect("publish");
    }
    .instrument(tracing::info_span!("checkout"))
    .await;

    // Consume: every attempt fails; the first two go back through a delay queue, the
    // third is dead-lettered. A second Worker consumes the DLQ; its handler ends both.
    let dead_letters = DeadLetterLayer::new(
        Arc::new(TracedPublisher::new(common::publisher().await)),
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
    let worker = Worker::builder(common::consumer(&topology, "redrive-test-trace", 8).await)
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
    let dlq_worker =
        Worker::builder(common::consumer(&dlq_topology, "redrive-test-trace-dlq", 8).await)
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
    let (report, dlq_report): (Report, Report) = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("the message reaches the DLQ and its consumer within 20 s");
    assert_eq!((report.nacked, report.dead_lettered), (2, 1), "{report:?}");
    assert_eq!(dlq_report.processed, 1, "{dlq_report:?}");
    assert_eq!(
        common::ready(&topology.delay_queue(DELAY)).await,
        Some(0),
        "the retries went through the delay queue, which is empty again"
    );
    common::cleanup(&[topology, dlq_topology]).await;
    let dead = stopped.borrow().clone().expect("the dead letter");

    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    check_one_trace(&spans, &queue, &dlq, redrive_rabbitmq::SYSTEM, &dead, DELAY);
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

// Current-thread: the subscriber is the test thread's default, and the Workers' tasks
// must run where it is set.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_producer_through_delay_queues_and_the_dlq_classic() {
    one_trace_through_delay_queues_and_the_dlq(QueueKind::Classic).await;
}

#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_producer_through_delay_queues_and_the_dlq_quorum() {
    one_trace_through_delay_queues_and_the_dlq(QueueKind::Quorum).await;
}
