//! [`ResponseFuture`] of [`Trace`](super::Trace).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use redrive_core::{BoxError, Classifier, ErrorKind, Outcome};
use tracing::Span;

use super::correlation::Scope;
use super::{CorrelationId, MAX_RECORDED_ERROR};

pin_project_lite::pin_project! {
    /// The future of [`Trace`](super::Trace). The inner future is polled, and dropped,
    /// inside the consumer span and with the correlation id set for the task.
    pub struct ResponseFuture<F> {
        // `None` once it completed, so a drop after that has nothing to do.
        #[pin]
        pub(super) inner: Option<F>,
        // The correlation id, lent to the thread while the inner future is polled.
        pub(super) id: Option<CorrelationId>,
        pub(super) span: Span,
        pub(super) classifier: Classifier,
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
