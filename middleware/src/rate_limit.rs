//! Rate limits with [`governor`]: a direct limit that holds intake back through
//! `poll_ready`, and a keyed limit (per header value, say per tenant) that delays only
//! the messages of a busy key.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message};
//! use redrive_middleware::rate_limit::{KeyedRateLimitLayer, RateLimitConfig, RateLimitLayer};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let service = ServiceBuilder::new()
//!     // At most 100 messages a second overall, in bursts of at most 10…
//!     .layer(RateLimitLayer::new(RateLimitConfig::per_second(100).with_burst(10))?)
//!     // …and 5 a second per tenant.
//!     .layer(KeyedRateLimitLayer::by_header("x-tenant", RateLimitConfig::per_second(5))?)
//!     .service(handler::handler_fn(|_msg: Message| async { Ok::<_, BoxError>(()) }));
//!
//! service.oneshot(Message::new("x")).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Direct** ([`RateLimitLayer`]): `poll_ready` takes a permit from the limiter
//!   before it asks the inner service; while none is available it is pending, with a
//!   timer set for the instant the limiter names (no polling loop). The Worker stops
//!   taking deliveries meanwhile, so messages wait in the broker. A permit taken by
//!   `poll_ready` is used by the next `call`; a service dropped in between wastes it.
//! - **Keyed** ([`KeyedRateLimitLayer`]): the key is known only once the message is
//!   there, so the wait happens inside the call's future, not in `poll_ready`
//!   (which would stop every key). While it waits, the future holds only the message
//!   and a fresh clone of the inner service that has not been asked to be ready:
//!   no concurrency permit or other readiness is held, and other keys flow on. The
//!   Worker's own concurrency slot stays taken during the wait; size concurrency with
//!   that in mind, or use `OrderingMode::PerKey` so a busy key queues its messages.
//!   A message without a key (the key function returns `None`) is not limited.
//! - Limits are per layer: every service a layer builds, and every clone, shares its
//!   limiter. They are per process; several consumers each get the full rate.
//! - Time is tokio's, so tests can pause and advance it.
//!
//! # Order
//! Inside the circuit breaker, outside retries: each delivery attempt takes one
//! permit, however many tries it makes.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use redrive_core::{BoxError, Message};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

pub use crate::error::ConfigError;

/// A rate: `limit` messages per `per`, in bursts of at most `burst`.
///
/// | setting | default |
/// |---|---|
/// | `limit` | 100 |
/// | `per` | 1 s |
/// | `burst` | `limit` |
///
/// Permits come back evenly (one every `per / limit`), as governor's GCRA does; a
/// limiter that has been idle lets a burst of up to `burst` through at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitConfig {
    limit: u32,
    per: Duration,
    burst: Option<u32>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            limit: 100,
            per: Duration::from_secs(1),
            burst: None,
        }
    }
}

impl RateLimitConfig {
    /// `limit` messages per `per`.
    pub fn new(limit: u32, per: Duration) -> Self {
        RateLimitConfig {
            limit,
            per,
            burst: None,
        }
    }

    /// `limit` messages a second.
    pub fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// Sets the largest burst (at least 1; default: `limit`).
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    fn quota(&self) -> Result<Quota, ConfigError> {
        let limit = NonZeroU32::new(self.limit).ok_or_else(|| {
            ConfigError::new(
                "rate limit",
                "the limit is 0, so no message could ever pass; set it to 1 or more",
            )
        })?;
        let burst = NonZeroU32::new(self.burst.unwrap_or(self.limit)).ok_or_else(|| {
            ConfigError::new(
                "rate limit",
                "the burst is 0, so no message could ever pass; set it to 1 or more",
            )
        })?;
        let period = self.per / limit.get();
        let quota = Quota::with_period(period).ok_or_else(|| {
            ConfigError::new(
                "rate limit",
                format!(
                    "{} messages per {:?} leaves less than a nanosecond between two; \
                 lower the limit or lengthen the period",
                    self.limit, self.per
                ),
            )
        })?;
        Ok(quota.allow_burst(burst))
    }
}

/// governor's clock over tokio's time, so paused test time drives the limiter.
#[derive(Clone, Debug)]
struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    fn new() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }

    /// The tokio instant at which a denied check may succeed.
    fn deadline(&self, not_until: &NotUntil<Nanos>) -> Instant {
        self.origin + Duration::from(not_until.earliest_possible())
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

type DirectLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = RateLimiter<Bytes, DashMapStateStore<Bytes>, TokioClock, NoOpMiddleware<Nanos>>;

/// Sets `sleep` for `deadline` and polls it.
fn wait_until(
    sleep: &mut Option<Pin<Box<Sleep>>>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let sleep = sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep.as_mut().poll(cx)
}

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
/// [module docs](self).
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
    /// The same as [`RateLimitLayer::new`].
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
    /// The same as [`RateLimitLayer::new`].
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
    /// The same as [`RateLimitLayer::new`].
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

/// Delays the messages of a key that is over its rate. See the [module docs](self).
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

impl RateLimitConfig {
    fn describe(&self) -> String {
        format!("{}/{}", self.limit, crate::stack::secs(self.per))
    }
}

impl crate::StackPart for RateLimitLayer {
    fn describe(&self) -> Option<String> {
        Some(format!("rate_limit({})", self.config.describe()))
    }
}

impl crate::StackPart for KeyedRateLimitLayer {
    fn describe(&self) -> Option<String> {
        Some(format!("rate_limit(per key, {})", self.config().describe()))
    }
}
