//! Trace context and correlation ids onto outgoing messages: [`inject`] and
//! [`TracedPublisher`], and the header carriers for OpenTelemetry's propagators.

use std::sync::Arc;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use redrive_core::text::truncate;
use redrive_core::{Headers, OutgoingMessage, Publisher};
use tracing::Span;
use tracing::instrument::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::correlation::find_correlation_id;
use super::{CORRELATION_ID, CorrelationId, MAX_RECORDED_ID, TRACEPARENT};

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

pub(super) type SharedPropagator = Arc<dyn TextMapPropagator + Send + Sync>;

pub(super) fn default_propagator() -> SharedPropagator {
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
