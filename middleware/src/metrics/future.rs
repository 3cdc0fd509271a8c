//! [`ResponseFuture`] of [`Metrics`](super::Metrics).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use redrive_core::{BoxError, Outcome};

use super::instruments::{Count, Destination};

/// Takes a delivery out of `in_flight` and records its duration, even if its future
/// is dropped (at a shutdown deadline, say).
pub(super) struct InFlight {
    pub(super) dest: Arc<Destination>,
    pub(super) start: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dest.counts.add_in_flight(-1);
        self.dest
            .duration
            .record(self.start.elapsed().as_secs_f64(), &self.dest.attrs);
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Metrics`](super::Metrics).
    pub struct ResponseFuture<F> {
        #[pin]
        pub(super) inner: F,
        pub(super) guard: InFlight,
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
        let this = self.project();
        let result = match this.inner.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r,
        };
        let dest = &this.guard.dest;
        Poll::Ready(match result {
            Ok(r) => {
                let outcome = r.into();
                dest.add(Count::Acked);
                match outcome {
                    Outcome::DeadLettered => dest.add(Count::DeadLettered),
                    Outcome::Deduplicated => dest.add(Count::Deduplicated),
                    _ => {}
                }
                Ok(outcome)
            }
            Err(e) => {
                dest.add(Count::Nacked);
                Err(e.into())
            }
        })
    }
}
