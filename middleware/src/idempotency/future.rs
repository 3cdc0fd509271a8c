//! [`ResponseFuture`] of [`Idempotency`](super::Idempotency).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use redrive_core::delivery::BoxFuture;
use redrive_core::{BoxError, Outcome};

/// The future of [`Idempotency`](super::Idempotency): reserve, call, commit or release.
///
/// Boxed: every step but the call awaits the store.
pub struct ResponseFuture {
    inner: BoxFuture<'static, Result<Outcome, BoxError>>,
}

impl ResponseFuture {
    pub(crate) fn new(
        fut: impl Future<Output = Result<Outcome, BoxError>> + Send + 'static,
    ) -> Self {
        ResponseFuture {
            inner: Box::pin(fut),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Outcome, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
