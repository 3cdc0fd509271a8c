//! The keyed limit: [`KeyedRateLimitLayer`] and [`KeyedRateLimit`], which delay only
//! the messages of a busy key.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use governor::RateLimiter;
use redrive_core::{BoxError, Message};
use tokio::time::Sleep;
use tower::{Layer, Service};

use super::clock::{KeyedLimiter, TokioClock};
use super::{ConfigError, RateLimitConfig};

type KeyFn = dyn Fn(&Message) -> Option<Bytes> + Send + Sync;

/// How many calls pass between two sweeps of keys that are back to a fresh state.
const SWEEP_EVERY: u64 = 4096;

struct KeyedShared {
    limiter: KeyedLimiter,
    key: Box<KeyFn>,
    config: RateLimitConfig,
    calls: AtomicU64,
}

/// Wraps a service in [`KeyedRateLimit`]. Clones share one limiter.
#[derive(Clone)]
pub struct KeyedRateLimitLayer {
    shared: Arc<KeyedShared>,
}

impl KeyedRateLimitLayer {
    /// A layer that limits each key that `key` returns to `config`'s rate; messages
    /// for which it returns `None` are not limited.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use redrive_middleware::rate_limit::{KeyedRateLimitLayer, RateLimitConfig};
    ///
    /// // Per destination queue.
    /// let layer = KeyedRateLimitLayer::new(RateLimitConfig::per_second(20), |msg| {
    ///     Some(Bytes::copy_from_slice(msg.metadata.source.destination.as_bytes()))
    /// })?;
    /// # let _ = layer;
    /// # Ok::<(), redrive_middleware::rate_limit::ConfigError>(())
    /// ```
    ///
    /// # Errors
    /// The same as [`RateLimitLayer::new`](super::RateLimitLayer::new).
    pub fn new<F>(config: RateLimitConfig, key: F) -> Result<Self, ConfigError>
    where
        F: Fn(&Message) -> Option<Bytes> + Send + Sync + 'static,
    {
        let quota = config.quota()?;
        Ok(KeyedRateLimitLayer {
            shared: Arc::new(KeyedShared {
                limiter: RateLimiter::dashmap_with_clock(quota, TokioClock::new()),
                key: Box::new(key),
                config,
                calls: AtomicU64::new(0),
            }),
        })
    }

    /// Limits per value of the header `name` (say, a tenant id).
    ///
    /// # Errors
    /// The same as [`RateLimitLayer::new`](super::RateLimitLayer::new).
    pub fn by_header(
        name: impl Into<String>,
        config: RateLimitConfig,
    ) -> Result<Self, ConfigError> {
        let name = name.into();
        Self::new(config, move |msg| {
            msg.headers
                .get(&name)
                .map(|v| Bytes::copy_from_slice(v.as_bytes()))
        })
    }

    /// Limits per ordering [`key`](redrive_core::Message::key) of the message.
    ///
    /// # Errors
    /// The same as [`RateLimitLayer::new`](super::RateLimitLayer::new).
    pub fn by_message_key(config: RateLimitConfig) -> Result<Self, ConfigError> {
        Self::new(config, |msg| msg.key.clone())
    }

    /// The layer's rate, per key.
    pub fn config(&self) -> &RateLimitConfig {
        &self.shared.config
    }
}

impl fmt::Debug for KeyedRateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimitLayer")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for KeyedRateLimitLayer {
    type Service = KeyedRateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyedRateLimit {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Delays the messages of a key that is over its rate. See the [module docs](super).
pub struct KeyedRateLimit<S> {
    inner: S,
    shared: Arc<KeyedShared>,
}

impl<S: Clone> Clone for KeyedRateLimit<S> {
    fn clone(&self) -> Self {
        KeyedRateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for KeyedRateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedRateLimit")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S> KeyedRateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Message> for KeyedRateLimit<S>
where
    S: Service<Message> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = KeyedResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let shared = &self.shared;
        if shared.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            shared.limiter.retain_recent();
        }
        let Some(key) = (shared.key)(&msg) else {
            return KeyedResponseFuture::calling(self.inner.call(msg));
        };
        match shared.limiter.check_key(&key) {
            Ok(()) => KeyedResponseFuture::calling(self.inner.call(msg)),
            Err(not_until) => {
                // Wait with a clone that has not been made ready; `self.inner` stays
                // ready for the next call.
                let deadline = shared.limiter.clock().deadline(&not_until);
                KeyedResponseFuture {
                    state: KeyedState::Waiting {
                        sleep: Box::pin(tokio::time::sleep_until(deadline)),
                    },
                    wait: Some(Wait {
                        service: self.inner.clone(),
                        message: msg,
                        key,
                        shared: shared.clone(),
                    }),
                }
            }
        }
    }
}

/// What a waiting keyed call holds.
struct Wait<S> {
    service: S,
    message: Message,
    key: Bytes,
    shared: Arc<KeyedShared>,
}

pin_project_lite::pin_project! {
    #[project = KeyedStateProj]
    enum KeyedState<F> {
        Waiting { sleep: Pin<Box<Sleep>> },
        Readying,
        Calling { #[pin] future: F },
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`KeyedRateLimit`]: waits until the message's key is under its
    /// rate, then calls the inner service.
    pub struct KeyedResponseFuture<S>
    where
        S: Service<Message>,
    {
        #[pin]
        state: KeyedState<S::Future>,
        wait: Option<Wait<S>>,
    }
}

impl<S: Service<Message>> KeyedResponseFuture<S> {
    fn calling(future: S::Future) -> Self {
        KeyedResponseFuture {
            state: KeyedState::Calling { future },
            wait: None,
        }
    }
}

impl<S: Service<Message>> fmt::Debug for KeyedResponseFuture<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedResponseFuture")
            .field("waiting", &self.wait.is_some())
            .finish_non_exhaustive()
    }
}

impl<S> Future for KeyedResponseFuture<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                KeyedStateProj::Waiting { sleep } => {
                    ready!(sleep.as_mut().poll(cx));
                    let wait = this.wait.as_ref().expect("waiting holds its message");
                    match wait.shared.limiter.check_key(&wait.key) {
                        Ok(()) => this.state.set(KeyedState::Readying),
                        // Another message of the key took the permit first.
                        Err(not_until) => {
                            let deadline = wait.shared.limiter.clock().deadline(&not_until);
                            sleep.as_mut().reset(deadline);
                        }
                    }
                }
                KeyedStateProj::Readying => {
                    let wait = this.wait.as_mut().expect("readying holds its message");
                    ready!(wait.service.poll_ready(cx)).map_err(Into::into)?;
                    let mut wait = this.wait.take().expect("checked above");
                    let future = wait.service.call(wait.message);
                    this.state.set(KeyedState::Calling { future });
                }
                KeyedStateProj::Calling { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
            }
        }
    }
}

impl crate::StackPart for KeyedRateLimitLayer {
    fn describe(&self) -> Option<String> {
        Some(format!("rate_limit(per key, {})", self.config().describe()))
    }
}
