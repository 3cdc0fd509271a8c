//! The direct limit: [`RateLimitLayer`] and [`RateLimit`], which hold intake back
//! through `poll_ready`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use governor::RateLimiter;
use redrive_core::{BoxError, Message};
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::clock::{DirectLimiter, TokioClock, wait_until};
use super::{ConfigError, RateLimitConfig};

/// Wraps a service in [`RateLimit`]. Clones share one limiter.
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<DirectLimiter>,
    config: RateLimitConfig,
}

impl RateLimitLayer {
    /// A layer that lets messages through at `config`'s rate.
    ///
    /// # Errors
    /// [`ConfigError`] when the limit or burst is 0, or the rate is too high to
    /// represent; the message says what to change.
    pub fn new(config: RateLimitConfig) -> Result<Self, ConfigError> {
        let quota = config.quota()?;
        Ok(RateLimitLayer {
            limiter: Arc::new(RateLimiter::direct_with_clock(quota, TokioClock::new())),
            config,
        })
    }

    /// The layer's rate.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            permit: false,
            sleep: None,
        }
    }
}

/// Holds `poll_ready` back until the rate allows another message. See the
/// [module docs](super).
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<DirectLimiter>,
    /// A permit taken by `poll_ready`, for the next call.
    permit: bool,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<S: Clone> Clone for RateLimit<S> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            permit: false,
            sleep: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<S> RateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Message> for RateLimit<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while !self.permit {
            match self.limiter.check() {
                Ok(()) => self.permit = true,
                Err(not_until) => {
                    let deadline = self.limiter.clock().deadline(&not_until);
                    ready!(wait_until(&mut self.sleep, deadline, cx));
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        assert!(
            std::mem::take(&mut self.permit),
            "RateLimit::call without poll_ready returning Ready first"
        );
        ResponseFuture {
            inner: self.inner.call(msg),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`RateLimit`]: the inner call, its error boxed.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F> ResponseFuture<F> {
    #[cfg_attr(
        not(feature = "redis"),
        allow(dead_code, reason = "the Redis limit builds it")
    )]
    pub(super) fn new(inner: F) -> Self {
        ResponseFuture { inner }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, T, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map_err(Into::into)
    }
}

impl crate::StackPart for RateLimitLayer {
    fn describe(&self) -> Option<String> {
        Some(format!("rate_limit({})", self.config.describe()))
    }
}
