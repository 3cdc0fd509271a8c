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

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use redrive_core::text::truncate;
use redrive_core::{
    BoxError, Classifier, ErrorKind, Headers, Message, Outcome, OutgoingMessage, Publisher,
};
use tower::{Layer, Service};
use tracing::Span;
use tracing::instrument::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use redrive_core::names::{CORRELATION_ID, CORRELATION_ID_ALIASES, TRACEPARENT, TRACESTATE};

thread_local! {
    /// The correlation id of the call being polled on this thread: set by
    /// [`ResponseFuture`] around each poll of its inner future (and its drop), and put
    /// back as it was afterwards, so it follows the call from thread to thread the way
    /// a task-local does.
    static CURRENT: RefCell<Option<CorrelationId>> = const { RefCell::new(None) };
}

/// Makes `id` the current correlation id until dropped, then restores the one before.
struct Scope<'a> {
    slot: &'a mut Option<CorrelationId>,
}

impl<'a> Scope<'a> {
    /// `None` if the thread's locals are gone (the thread is exiting) or the current id
    /// is being read: then the call runs without one rather than panicking.
    fn enter(slot: &'a mut Option<CorrelationId>) -> Option<Self> {
        CURRENT
            .try_with(|current| {
                current
                    .try_borrow_mut()
                    .map(|mut current| std::mem::swap(slot, &mut *current))
                    .is_ok()
            })
            .ok()
            .filter(|swapped| *swapped)
            .map(|_| Scope { slot })
    }
}

impl Drop for Scope<'_> {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|current| {
            if let Ok(mut current) = current.try_borrow_mut() {
                std::mem::swap(self.slot, &mut *current);
            }
        });
    }
}

/// The most bytes of a correlation id recorded on a span (and so on every log line
/// inside it). The id a producer chose is kept whole in the message; only what is
/// recorded is cut, so a hostile header cannot bloat every log line.
const MAX_RECORDED_ID: usize = 128;

/// The most bytes of an error's text recorded as a span's status description (error
/// text can quote a payload).
const MAX_RECORDED_ERROR: usize = 1024;

/// A message's correlation id, in its [`extensions`](Message::extensions) and, while
/// the handler runs, in [`CorrelationId::current`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(Arc<str>);

impl CorrelationId {
    /// A correlation id with this value.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        CorrelationId(id.into())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of the message being handled by the current task, if any.
    pub fn current() -> Option<CorrelationId> {
        CURRENT
            .try_with(|current| current.try_borrow().ok().and_then(|c| c.clone()))
            .ok()
            .flatten()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Makes a correlation id for a message that has none.
pub trait MakeCorrelationId: Clone + Send + Sync + 'static {
    /// The id for `msg`.
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId;
}

/// The default: stable across redeliveries where the message allows it.
///
/// 1. the trace id of the message's `traceparent`, if it has a valid one (the same on
///    every delivery attempt of a message, and already the key SREs search by);
/// 2. else the broker's message id;
/// 3. else 128 random bits as 32 lowercase hex digits ([`RandomCorrelationId`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultCorrelationId;

impl MakeCorrelationId for DefaultCorrelationId {
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId {
        if let Some(trace_id) = msg
            .headers
            .get_str(TRACEPARENT)
            .and_then(traceparent_trace_id)
        {
            return CorrelationId::new(trace_id);
        }
        if let Some(id) = msg.metadata.message_id.as_ref().filter(|id| !id.is_empty()) {
            // Shares the message id's allocation.
            return CorrelationId(id.clone());
        }
        RandomCorrelationId.make_correlation_id(msg)
    }
}

/// The trace id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if valid and
/// not all zeros.
fn traceparent_trace_id(value: &str) -> Option<&str> {
    let mut parts = value.trim().split('-');
    let (_version, trace_id) = (parts.next()?, parts.next()?);
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    valid.then_some(trace_id)
}

/// 128 random bits as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomCorrelationId;

impl MakeCorrelationId for RandomCorrelationId {
    fn make_correlation_id(&self, _msg: &Message) -> CorrelationId {
        CorrelationId::new(format!("{:032x}", fastrand::u128(..)))
    }
}

impl<F> MakeCorrelationId for F
where
    F: Fn(&Message) -> CorrelationId + Clone + Send + Sync + 'static,
{
    fn make_correlation_id(&self, msg: &Message) -> CorrelationId {
        self(msg)
    }
}

/// Reads trace context from [`Headers`].
#[derive(Debug)]
pub struct HeaderExtractor<'a>(pub &'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get_str(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k).collect()
    }
}

/// Writes trace context into [`Headers`], never over a value already there.
#[derive(Debug)]
pub struct HeaderInjector<'a>(pub &'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if self.0.contains(key) {
            return;
        }
        if let Err(e) = self.0.insert(key, value) {
            tracing::warn!(header = key, error = %e, "trace context not propagated");
        }
    }
}

type SharedPropagator = Arc<dyn TextMapPropagator + Send + Sync>;

fn default_propagator() -> SharedPropagator {
    Arc::new(TraceContextPropagator::new())
}

/// Adds the current span's trace context and the current correlation id to `headers`,
/// leaving any already present untouched. Publishers call this on outgoing messages.
pub fn inject(headers: &mut Headers) {
    inject_with(&TraceContextPropagator::new(), headers);
}

fn inject_with(propagator: &dyn TextMapPropagator, headers: &mut Headers) {
    if !headers.contains(TRACEPARENT) {
        let cx = Span::current().context();
        propagator.inject_context(&cx, &mut HeaderInjector(headers));
    }
    if find_correlation_id(headers, &[]).is_none() {
        if let Some(id) = CorrelationId::current() {
            if let Err(e) = headers.insert_static(CORRELATION_ID, id.as_str()) {
                tracing::warn!(error = %e, "correlation id not propagated");
            }
        }
    }
}

fn find_correlation_id(headers: &Headers, extra: &[String]) -> Option<CorrelationId> {
    std::iter::once(CORRELATION_ID)
        .chain(CORRELATION_ID_ALIASES.iter().copied())
        .chain(extra.iter().map(String::as_str))
        .find_map(|name| headers.get_str(name).filter(|v| !v.is_empty()))
        .map(CorrelationId::new)
}

/// A [`Publisher`] that opens a producer span per publish and injects its trace
/// context and the current correlation id into the message (where absent).
#[derive(Clone, Debug)]
pub struct TracedPublisher<P> {
    inner: P,
}

impl<P> TracedPublisher<P> {
    /// Wraps `inner`.
    pub fn new(inner: P) -> Self {
        TracedPublisher { inner }
    }

    /// The wrapped publisher.
    pub fn into_inner(self) -> P {
        self.inner
    }
}

impl<P: Publisher> Publisher for TracedPublisher<P> {
    async fn publish(
        &self,
        destination: &str,
        mut message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        let span = tracing::info_span!(
            "redrive.publish",
            otel.name = %format_args!("send {destination}"),
            otel.kind = "producer",
            messaging.operation.type = "send",
            messaging.destination.name = %destination,
            correlation_id = tracing::field::Empty,
        );
        {
            let _entered = span.enter();
            inject(&mut message.headers);
            if let Some(id) = find_correlation_id(&message.headers, &[]) {
                span.record("correlation_id", &*truncate(id.as_str(), MAX_RECORDED_ID));
            }
        }
        self.inner
            .publish(destination, message)
            .instrument(span)
            .await
    }

    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        self.inner.check_destination(destination)
    }
}

/// Builds [`Trace`] services.
///
/// | setting | default |
/// |---|---|
/// | correlation id generator | [`DefaultCorrelationId`] |
/// | extra correlation header aliases | none (besides [`CORRELATION_ID_ALIASES`]) |
/// | propagator | W3C trace context |
/// | classifier | markers only |
#[derive(Clone)]
pub struct TraceLayer<M = DefaultCorrelationId> {
    make_id: M,
    aliases: Arc<[String]>,
    propagator: SharedPropagator,
    classifier: Classifier,
}

impl Default for TraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TraceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceLayer")
            .field("aliases", &self.aliases)
            .finish_non_exhaustive()
    }
}

impl TraceLayer {
    /// The defaults (see the table).
    pub fn new() -> Self {
        TraceLayer {
            make_id: DefaultCorrelationId,
            aliases: Arc::from(Vec::new()),
            propagator: default_propagator(),
            classifier: Classifier::default(),
        }
    }
}

impl<M> TraceLayer<M> {
    /// Uses `make_id` for messages that carry no correlation id.
    #[must_use]
    pub fn with_make_correlation_id<M2: MakeCorrelationId>(self, make_id: M2) -> TraceLayer<M2> {
        TraceLayer {
            make_id,
            aliases: self.aliases,
            propagator: self.propagator,
            classifier: self.classifier,
        }
    }

    /// Also reads the correlation id from these header names.
    #[must_use]
    pub fn with_correlation_aliases<I, S>(mut self, aliases: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.aliases = aliases.into_iter().map(Into::into).collect();
        self
    }

    /// Uses another propagator (B3, Jaeger, a composite) instead of W3C trace context.
    #[must_use]
    pub fn with_propagator(mut self, p: impl TextMapPropagator + Send + Sync + 'static) -> Self {
        self.propagator = Arc::new(p);
        self
    }

    /// The classifier that tells `retried` from `failed`.
    #[must_use]
    pub fn with_classifier(mut self, c: Classifier) -> Self {
        self.classifier = c;
        self
    }
}

impl<S, M: Clone> Layer<S> for TraceLayer<M> {
    type Service = Trace<S, M>;

    fn layer(&self, inner: S) -> Trace<S, M> {
        Trace {
            inner,
            layer: self.clone(),
        }
    }
}

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
            // Fails only if the span is already started or tracing-opentelemetry is not
            // installed; neither loses the message, and the span still carries its fields.
            let _ = span.set_parent(parent);
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

pin_project_lite::pin_project! {
    /// The future of [`Trace`]. The inner future is polled, and dropped, inside the
    /// consumer span and with the correlation id set for the task.
    pub struct ResponseFuture<F> {
        // `None` once it completed, so a drop after that has nothing to do.
        #[pin]
        inner: Option<F>,
        // The correlation id, lent to the thread while the inner future is polled.
        id: Option<CorrelationId>,
        span: Span,
        classifier: Classifier,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if this.inner.is_some() {
                // A call dropped before it completed (a shutdown deadline, an outer
                // timeout): what its destructors log belongs to the delivery's span.
                let _entered = this.span.enter();
                let _scope = Scope::enter(this.id);
                let mut inner = this.inner;
                inner.set(None);
            }
        }
    }
}

impl<F, R, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let span = &*this.span;
        let result = {
            let _entered = span.enter();
            let scope = Scope::enter(this.id);
            let inner = this
                .inner
                .as_mut()
                .as_pin_mut()
                .expect("trace ResponseFuture polled after it completed");
            let result = std::task::ready!(inner.poll(cx));
            this.inner.set(None);
            drop(scope);
            result
        };
        Poll::Ready(match result {
            Ok(r) => {
                let outcome = r.into();
                span.record("redrive.outcome", outcome.as_str());
                span.record("otel.status_code", "OK");
                Ok(outcome)
            }
            Err(e) => {
                let e = e.into();
                let kind = this.classifier.classify(&*e).kind;
                let outcome = match kind {
                    ErrorKind::Transient => "retried",
                    ErrorKind::Permanent => "failed",
                };
                span.record("redrive.outcome", outcome);
                span.record("error.type", kind.as_str());
                span.record("otel.status_code", "ERROR");
                span.record(
                    "otel.status_description",
                    redrive_core::text::bounded(&e, MAX_RECORDED_ERROR)
                        .to_string()
                        .as_str(),
                );
                Err(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_correlation_id_prefers_the_trace_id_then_the_message_id() {
        let mut msg = Message::new("x");
        msg.headers
            .insert(
                TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .unwrap();
        msg.metadata.message_id = Some("m-1".into());
        let id = DefaultCorrelationId.make_correlation_id(&msg);
        assert_eq!(id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        msg.headers
            .insert(
                TRACEPARENT,
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )
            .unwrap();
        assert_eq!(
            DefaultCorrelationId.make_correlation_id(&msg).as_str(),
            "m-1"
        );
        msg.metadata.message_id = None;
        let random = DefaultCorrelationId.make_correlation_id(&msg);
        assert_eq!(random.as_str().len(), 32);
        assert_ne!(random, DefaultCorrelationId.make_correlation_id(&msg));
    }
}
