//! Trace stitching and correlation ids across the broker hop, retries and the DLQ.
//!
//! [`TraceLayer`] extracts the W3C trace context (`traceparent`, `tracestate`) from a
//! message's headers and runs the rest of the stack inside one consumer span per
//! delivery attempt, a child of the producer's span, named and attributed by the
//! OpenTelemetry messaging conventions. With `tracing-opentelemetry` installed, these
//! `tracing` spans are OpenTelemetry spans, so every attempt of a message — broker
//! redeliveries and in-process retries alike — lands in the producer's trace.
//!
//! It also gives every message a [`CorrelationId`]: taken from the message when present
//! (the [`CORRELATION_ID`] header or one of its aliases), never overwritten, otherwise
//! made by a [`MakeCorrelationId`] ([`DefaultCorrelationId`]: the producer's trace id,
//! so every attempt of a message gets the same one) and written to the canonical
//! header so it travels on (to the DLQ copy, for one). The id is a field of the span, so every log line
//! written while handling the message carries it, and [`inject`] copies it onto
//! messages the handler publishes.
//!
//! ```
//! use redrive_core::{handler_fn, BoxError, Message};
//! use redrive_middleware::trace::{CorrelationId, TraceLayer};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), BoxError> {
//! let mut svc = ServiceBuilder::new()
//!     .layer(TraceLayer::new())
//!     .service(handler_fn(|msg: Message| async move {
//!         let id = msg.extensions.get::<CorrelationId>().expect("set by the layer");
//!         tracing::info!("handling"); // carries `correlation_id` through the span
//!         assert_eq!(CorrelationId::current().as_ref(), Some(id));
//!         Ok::<_, BoxError>(())
//!     }));
//! svc.ready().await?.call(Message::new("hi")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Order
//! Outermost in the stack, so its span covers metrics, the dead-letter publish,
//! idempotency, retries and every try of the handler.
//!
//! # Guarantees
//! - An incoming trace context or correlation id is never overwritten; [`inject`] and
//!   [`TracedPublisher`] add them only where absent, so a dead-lettered copy keeps the
//!   original trace context and a DLQ consumer continues the same trace.
//! - The context propagates even when the incoming trace is not sampled.
//! - The span records `redrive.outcome`: `processed`, `dead_lettered`,
//!   `deduplicated`, `skipped`, `retried` (a transient failure the broker or the Worker
//!   will redeliver) or `failed` (a permanent error no layer took out of the queue).

mod correlation;
mod future;
mod layer;
mod propagation;

use std::fmt;
use std::task::{Context, Poll};

use opentelemetry::trace::TraceContextExt as _;
use redrive_core::text::truncate;
use redrive_core::{BoxError, Message, Outcome};
use tower::Service;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use redrive_core::names::{CORRELATION_ID, CORRELATION_ID_ALIASES, TRACEPARENT, TRACESTATE};

pub use correlation::{
    CorrelationId, DefaultCorrelationId, MakeCorrelationId, RandomCorrelationId,
};
pub use future::ResponseFuture;
pub use layer::TraceLayer;
pub use propagation::{HeaderExtractor, HeaderInjector, TracedPublisher, inject};

use correlation::find_correlation_id;

/// The most bytes of a correlation id recorded on a span (and so on every log line
/// inside it). The id a producer chose is kept whole in the message; only what is
/// recorded is cut, so a hostile header cannot bloat every log line.
const MAX_RECORDED_ID: usize = 128;

/// The most bytes of an error's text recorded as a span's status description (error
/// text can quote a payload).
const MAX_RECORDED_ERROR: usize = 1024;

/// The trace service; see the [module docs](self).
#[derive(Clone)]
pub struct Trace<S, M = DefaultCorrelationId> {
    inner: S,
    layer: TraceLayer<M>,
}

impl<S: fmt::Debug, M> fmt::Debug for Trace<S, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Opens the consumer span for one delivery attempt of `msg`.
fn consumer_span(msg: &Message, id: &CorrelationId) -> Span {
    let source = &msg.metadata.source;
    let span = tracing::info_span!(
        "redrive.process",
        otel.name = %format_args!("process {}", source.destination),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        messaging.system = source.system,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %source.destination,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
        messaging.message.id = tracing::field::Empty,
        messaging.message.conversation_id = %truncate(id.as_str(), MAX_RECORDED_ID),
        messaging.message.body.size = msg.payload.len() as i64,
        redrive.attempt = i64::from(msg.metadata.attempt),
        redrive.outcome = tracing::field::Empty,
        error.type = tracing::field::Empty,
        correlation_id = %truncate(id.as_str(), MAX_RECORDED_ID),
    );
    if span.is_disabled() {
        return span;
    }
    if let Some(p) = source.partition {
        span.record("messaging.destination.partition.id", p.to_string().as_str());
    }
    if let Some(o) = source.offset {
        span.record("messaging.kafka.offset", o);
    }
    if let Some(mid) = &msg.metadata.message_id {
        span.record("messaging.message.id", &**mid);
    }
    span
}

impl<S, M> Service<Message> for Trace<S, M>
where
    S: Service<Message>,
    S::Response: Into<Outcome>,
    S::Error: Into<BoxError>,
    M: MakeCorrelationId,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut msg: Message) -> Self::Future {
        let id = match find_correlation_id(&msg.headers, &self.layer.aliases) {
            Some(id) => id,
            None => {
                let id = self.layer.make_id.make_correlation_id(&msg);
                if let Err(e) = msg.headers.insert_static(CORRELATION_ID, id.as_str()) {
                    tracing::warn!(error = %e, "generated correlation id not added to the headers");
                }
                id
            }
        };
        let span = consumer_span(&msg, &id);
        // A span no subscriber records has no parent to link: skip reading the context.
        if !span.is_disabled() {
            let parent = self
                .layer
                .propagator
                .extract(&HeaderExtractor(&msg.headers));
            let producer = parent.span().span_context().clone();
            // Fails only if the span is already started or tracing-opentelemetry is not
            // installed; neither loses the message, and the span still carries its fields.
            let _ = span.set_parent(parent);
            // The messaging conventions ask a process span to link the message's creation
            // context too: backends that follow links find the producer either way.
            if producer.is_valid() {
                span.add_link(producer);
            }
        }
        msg.extensions.insert(id.clone());
        let inner = {
            let _entered = span.enter();
            self.inner.call(msg)
        };
        ResponseFuture {
            inner: Some(inner),
            id: Some(id),
            span,
            classifier: self.layer.classifier.clone(),
        }
    }
}
