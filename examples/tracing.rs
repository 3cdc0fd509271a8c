//! One message's life as a trace tree: produced, failing on every try (two tries per
//! delivery attempt), dead-lettered on the third attempt, then consumed from the DLQ —
//! all in one trace.
//!
//! Run with `cargo run --example tracing`. Spans are exported to memory and printed to
//! stdout as a tree when the run ends. Log lines go to stderr as JSON, one object per
//! line: each about a message carries its `message_id` and `correlation_id`, the
//! Worker's as fields and the handler's through the consumer span it runs in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use redrive::memory::MemoryBroker;
use redrive::middleware::dead_letter::{DeadLetterConfig, DeadLetterLayer};
use redrive::middleware::retry::{Backoff, RetryConfig, RetryLayer};
use redrive::middleware::trace::{TraceLayer, TracedPublisher};
use redrive::{BoxError, Message, OutgoingMessage, Publisher, Redelivery, Worker, handler_fn};
use tower::ServiceBuilder;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing::subscriber::set_global_default(
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("redrive-example")))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            ),
    )?;

    let broker = MemoryBroker::new();
    let publisher = TracedPublisher::new(broker.clone());
    publisher
        .publish(
            "payments",
            OutgoingMessage::new(r#"{"order":7,"amount":1250}"#),
        )
        .instrument(tracing::info_span!("checkout"))
        .await?;

    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(DeadLetterLayer::new(
            Arc::new(TracedPublisher::new(broker.clone())),
            DeadLetterConfig::default()
                .with_max_attempts(3)
                .with_consumer_name("payments-worker"),
        )?)
        .layer(RetryLayer::new(
            RetryConfig::default()
                .with_backoff(Backoff::constant(Duration::from_millis(5)))
                .with_max_tries(2),
        )?)
        .service(handler_fn(|_m: Message| async {
            tracing::warn!("card processor timed out");
            Err::<(), BoxError>("card processor timed out".into())
        }));
    Worker::builder(broker.consumer("payments"))
        .service(stack)
        .redelivery(Redelivery::constant(Duration::from_millis(20)))
        .build()?
        .run_until(until_empty(&broker, "payments"))
        .await;

    let replay = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(handler_fn(|_m: Message| async { Ok::<_, BoxError>(()) }));
    Worker::builder(broker.consumer("payments-dlq"))
        .service(replay)
        .build()?
        .run_until(until_empty(&broker, "payments-dlq"))
        .await;

    provider.force_flush()?;
    print_tree(&exporter.get_finished_spans()?);
    Ok(())
}

/// Completes once `queue` is empty, or on SIGTERM or Ctrl-C.
fn until_empty(broker: &MemoryBroker, queue: &'static str) -> impl Future<Output = ()> + use<> {
    let broker = broker.clone();
    async move {
        let empty = async {
            while broker.depth(queue) + broker.in_flight(queue) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::select! {
            () = empty => {}
            () = redrive::shutdown_signal() => {}
        }
    }
}

fn print_tree(spans: &[SpanData]) {
    let ids: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let mut children: HashMap<SpanId, Vec<&SpanData>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        if ids.contains_key(&s.parent_span_id) {
            children.entry(s.parent_span_id).or_default().push(s);
        } else {
            roots.push(s);
        }
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| s.start_time);
    }
    roots.sort_by_key(|s| s.start_time);
    let start = roots.first().map(|s| s.start_time);
    if let Some(root) = roots.first() {
        println!("trace {}", root.span_context.trace_id());
    }
    for root in roots {
        print_span(root, &children, 0, start.unwrap());
    }
}

fn print_span(
    s: &SpanData,
    children: &HashMap<SpanId, Vec<&SpanData>>,
    depth: usize,
    t0: std::time::SystemTime,
) {
    let at = s.start_time.duration_since(t0).unwrap_or_default();
    let took = s.end_time.duration_since(s.start_time).unwrap_or_default();
    let wanted = [
        "redrive.attempt",
        "redrive.try",
        "redrive.outcome",
        "correlation_id",
        "error.type",
    ];
    let attrs: Vec<String> = wanted
        .iter()
        .filter_map(|k| {
            s.attributes
                .iter()
                .find(|kv| kv.key.as_str() == *k)
                .map(|kv| format!("{}={}", k.trim_start_matches("redrive."), kv.value))
        })
        .collect();
    let events: Vec<String> = s
        .events
        .iter()
        .map(|e| format!("  \"{}\"", e.name))
        .collect();
    println!(
        "{:indent$}{} [+{:.1} ms, {:.2} ms] {}{}",
        "",
        s.name,
        at.as_secs_f64() * 1e3,
        took.as_secs_f64() * 1e3,
        attrs.join(" "),
        events.join(""),
        indent = depth * 2
    );
    for child in children
        .get(&s.span_context.span_id())
        .into_iter()
        .flatten()
    {
        print_span(child, children, depth + 1, t0);
    }
}
