//! One message's life in one trace: produce → consume → two failed attempts → dead
//! letter → consume from the DLQ.
#![cfg(all(feature = "trace", feature = "dead-letter", feature = "retry"))]

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redrive_core::memory::MemoryBroker;
use redrive_core::{BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, handler_fn};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use redrive_middleware::retry::{Backoff, RetryConfig, RetryLayer};
use redrive_middleware::trace::{CORRELATION_ID, TraceLayer, TracedPublisher};
use tower::ServiceBuilder;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn drained(broker: &MemoryBroker, queue: &'static str) -> impl Future<Output = ()> + Send + use<> {
    let broker = broker.clone();
    async move {
        while broker.depth(queue) + broker.in_flight(queue) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

// Current-thread: the subscriber is the test thread's default, and the Worker's tasks
// must run where it is set.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_from_producer_through_retries_and_the_dlq() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let _guard = tracing::subscriber::set_default(subscriber);

    let broker = MemoryBroker::new();
    let publisher = TracedPublisher::new(broker.clone());

    // Produce inside an application span.
    async {
        publisher
            .publish("orders", OutgoingMessage::new(r#"{"id":1}"#))
            .await
            .unwrap();
    }
    .instrument(tracing::info_span!("checkout"))
    .await;
    let correlation = broker.messages("orders")[0]
        .headers
        .get_str(CORRELATION_ID)
        .map(str::to_owned);
    assert_eq!(
        correlation, None,
        "no id outside a consumer: the consumer makes one"
    );

    // Consume: every try fails; each delivery attempt makes two tries, and the third
    // attempt is dead-lettered.
    let dlq = DeadLetterLayer::new(
        Arc::new(TracedPublisher::new(broker.clone())),
        DeadLetterConfig::default().with_max_attempts(3),
    )
    .unwrap();
    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(dlq)
        .layer(
            RetryLayer::new(
                RetryConfig::default()
                    .with_backoff(Backoff::constant(Duration::from_millis(2)))
                    .with_max_tries(2)
                    .without_budget(),
            )
            .unwrap(),
        )
        .service(handler_fn(|_m: Message| async {
            Err::<(), BoxError>("payment service unavailable".into())
        }));
    let report = Worker::builder(broker.consumer("orders"))
        .service(stack)
        .redelivery(Redelivery::constant(Duration::from_millis(10)))
        .build()
        .unwrap()
        .run_until(drained(&broker, "orders"))
        .await;
    assert_eq!((report.nacked, report.dead_lettered), (2, 1), "{report:?}");

    // The DLQ copy carries the original trace context and a correlation id.
    let dead = broker.messages("orders-dlq");
    assert_eq!(dead.len(), 1);
    let dlq_correlation = dead[0].headers.get_str(CORRELATION_ID).unwrap().to_owned();
    assert_eq!(dead[0].headers.get_str(dead_letter::ATTEMPTS), Some("3"));

    // Consume from the DLQ.
    let replay = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }));
    let report = Worker::builder(broker.consumer("orders-dlq"))
        .service(replay)
        .build()
        .unwrap()
        .run_until(drained(&broker, "orders-dlq"))
        .await;
    assert_eq!(report.processed, 1);

    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let by_name =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    let checkout = by_name("checkout");
    let send_orders = by_name("send orders");
    let process_orders = by_name("process orders");
    let send_dlq = by_name("send orders-dlq");
    let tries: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name.starts_with("try "))
        .collect();
    let process_dlq = by_name("process orders-dlq");
    assert_eq!(
        (
            checkout.len(),
            send_orders.len(),
            process_orders.len(),
            send_dlq.len(),
            process_dlq.len()
        ),
        (1, 1, 3, 1, 1),
        "spans: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // One trace id throughout.
    let trace: TraceId = checkout[0].span_context.trace_id();
    for s in &spans {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "span {} left the trace",
            s.name
        );
    }
    // The producer span is the parent of every consumer span, the DLQ consumer's too:
    // the dead-lettered copy kept the producer's context.
    let producer: SpanId = send_orders[0].span_context.span_id();
    assert_eq!(
        send_orders[0].parent_span_id,
        checkout[0].span_context.span_id()
    );
    for s in process_orders.iter().chain(&process_dlq) {
        assert_eq!(s.parent_span_id, producer, "parent of {}", s.name);
        // And a link to it, as the messaging conventions ask of process spans.
        let links: Vec<SpanId> = s.links.iter().map(|l| l.span_context.span_id()).collect();
        assert_eq!(links, [producer], "links of {}", s.name);
    }
    // Two tries inside each attempt's span, tagged with both numbers.
    assert_eq!(tries.len(), 6);
    for attempt in &process_orders {
        let mine: Vec<(Option<&Value>, Option<&Value>)> = tries
            .iter()
            .filter(|t| t.parent_span_id == attempt.span_context.span_id())
            .map(|t| (attr(t, "redrive.attempt"), attr(t, "redrive.try")))
            .collect();
        let a = attr(attempt, "redrive.attempt");
        assert_eq!(
            mine,
            vec![(a, Some(&Value::I64(1))), (a, Some(&Value::I64(2)))]
        );
    }
    // The DLQ publish happened inside the last attempt's span.
    let mut attempts: Vec<&SpanData> = process_orders.clone();
    attempts.sort_by_key(|s| match attr(s, "redrive.attempt") {
        Some(Value::I64(a)) => *a,
        other => panic!("attempt attribute: {other:?}"),
    });
    assert_eq!(
        send_dlq[0].parent_span_id,
        attempts[2].span_context.span_id()
    );

    let outcome = |s: &SpanData| attr(s, "redrive.outcome").map(|v| v.as_str().into_owned());
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
    assert_eq!(outcome(process_dlq[0]).as_deref(), Some("processed"));
    assert_eq!(
        attr(process_dlq[0], "messaging.destination.name").map(|v| v.as_str().into_owned()),
        Some("orders-dlq".into())
    );

    // The message had no correlation id: each attempt derived the same one from the
    // producer's trace id, and it is on the DLQ copy and its consumer span.
    assert_eq!(dlq_correlation, trace.to_string());
    let ids: Vec<String> = attempts
        .iter()
        .chain(&process_dlq)
        .map(|s| attr(s, "correlation_id").unwrap().as_str().into_owned())
        .collect();
    assert!(
        ids.iter().all(|id| *id == dlq_correlation),
        "{ids:?} vs {dlq_correlation}"
    );
}
