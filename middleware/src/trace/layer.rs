//! [`TraceLayer`], which builds [`Trace`] services.

use std::fmt;
use std::sync::Arc;

use opentelemetry::propagation::TextMapPropagator;
use redrive_core::Classifier;
use tower::Layer;

use super::propagation::{SharedPropagator, default_propagator};
use super::{DefaultCorrelationId, MakeCorrelationId, Trace};

/// Builds [`Trace`] services.
///
/// | setting | default |
/// |---|---|
/// | correlation id generator | [`DefaultCorrelationId`] |
/// | extra correlation header aliases | none (besides [`CORRELATION_ID_ALIASES`]) |
/// | propagator | W3C trace context |
/// | classifier | markers only |
///
/// [`CORRELATION_ID_ALIASES`]: super::CORRELATION_ID_ALIASES
#[derive(Clone)]
pub struct TraceLayer<M = DefaultCorrelationId> {
    pub(super) make_id: M,
    pub(super) aliases: Arc<[String]>,
    pub(super) propagator: SharedPropagator,
    pub(super) classifier: Classifier,
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
