//! A deadline for each try of the inner service; a try that runs past it fails with a
//! transient [`Elapsed`] error.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Classifier, Message};
//! use redrive_middleware::timeout::{Elapsed, TimeoutLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let service = ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(5))?)
//!     .service(handler::handler_fn(|_msg: Message| async {
//!         tokio::time::sleep(Duration::from_secs(60)).await; // a stuck downstream
//!         Ok::<_, BoxError>(())
//!     }));
//!
//! let err = service.oneshot(Message::new("x")).await.unwrap_err();
//! assert!(err.is::<Elapsed>());
//! assert!(!Classifier::default().classify(&*err).is_permanent());
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - The deadline starts when the try first waits (its first poll that returns
//!   pending, right after the call in the Worker) and covers the rest of the try; when
//!   it passes, the try's future is dropped (cancelling the handler at its next
//!   `.await`) and the call fails with [`Elapsed`]. A try that completes on its first
//!   poll never sets a timer: a synchronous handler pays nothing for its deadline.
//! - [`Elapsed`] carries no marker, so it is **transient**: the retry layer retries it
//!   and the Worker redelivers it.
//! - `poll_ready` is the inner service's: waiting for readiness is not part of the
//!   deadline.
//!
//! # Order
//! Innermost, inside [`retry`](crate::retry): each try gets its own deadline. Put it
//! outside the retry layer instead to bound a whole delivery attempt.
//!
//! tower has a `Timeout` (behind its `timeout` feature); this one exists so that the
//! duration is checked when the layer is built and the error names the deadline that
//! passed, which is what ends up in logs and dead-letter envelopes.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use redrive_core::{BoxError, Message};
use tokio::time::Sleep;
use tower::{Layer, Service};

pub use crate::error::ConfigError;

/// A try ran past its deadline. Transient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Elapsed {
    after: Duration,
}

impl Elapsed {
    /// The deadline that passed.
    pub fn after(&self) -> Duration {
        self.after
    }
}

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the handler did not finish within its {:?} timeout",
            self.after
        )
    }
}

impl StdError for Elapsed {}

/// Wraps a service in [`Timeout`].
///
/// | setting | default |
/// |---|---|
/// | `timeout` | 30 s |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl Default for TimeoutLayer {
    fn default() -> Self {
        TimeoutLayer {
            timeout: Duration::from_secs(30),
        }
    }
}

impl TimeoutLayer {
    /// A layer that gives each try `timeout`.
    ///
    /// # Errors
    /// [`ConfigError`] when `timeout` is zero (every try would fail).
    pub fn new(timeout: Duration) -> Result<Self, ConfigError> {
        if timeout.is_zero() {
            return Err(ConfigError::new(
                "timeout",
                "the timeout is 0, so every try would fail; give the handler a deadline \
                 it can meet, e.g. a few seconds",
            ));
        }
        Ok(TimeoutLayer { timeout })
    }

    /// The deadline of each try.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// Fails a try that runs longer than its deadline. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Message> for Timeout<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        ResponseFuture {
            inner: self.inner.call(msg),
            sleep: None,
            after: self.timeout,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Timeout`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Boxed, and only once the try waits: a timer is over a hundred bytes, which
        // every enclosing layer's future would otherwise carry and move, and a try that
        // completes on its first poll never needs one.
        sleep: Option<Pin<Box<Sleep>>>,
        after: Duration,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(result.map_err(Into::into));
        }
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(*this.after)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(Box::new(Elapsed { after: *this.after }))),
            Poll::Pending => Poll::Pending,
        }
    }
}
