//! [`RedisRateLimit`]: holds `poll_ready` back until the cluster-wide rate allows.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use redrive_core::{BoxError, Message};
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::config::OnUnreachable;
use super::shared::{Fetch, Grant, Shared};
use crate::rate_limit::direct::ResponseFuture;

pub(super) enum State {
    /// Nothing in progress.
    Idle,
    /// A script call in flight.
    Fetching(Fetch),
    /// Sleeping until `granted` reserved permits conform (or, with 0, until Redis may
    /// be asked again, or the fallback limiter has a permit).
    Waiting {
        sleep: Pin<Box<Sleep>>,
        granted: u32,
    },
}

/// Holds `poll_ready` back until the cluster-wide rate allows another message. See
/// [`RedisRateLimitLayer`](super::RedisRateLimitLayer) and the [module
/// docs](crate::rate_limit).
pub struct RedisRateLimit<S> {
    pub(super) inner: S,
    pub(super) shared: Arc<Shared>,
    /// A permit taken by `poll_ready`, for the next call.
    pub(super) permit: bool,
    pub(super) state: State,
}

impl<S: Clone> Clone for RedisRateLimit<S> {
    fn clone(&self) -> Self {
        RedisRateLimit {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            permit: false,
            state: State::Idle,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for RedisRateLimit<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("permit", &self.permit)
            .finish_non_exhaustive()
    }
}

impl<S> RedisRateLimit<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Takes `granted` permits: one for the next call, the rest into the pool.
    fn take(&mut self, granted: u32) {
        if granted > 0 {
            self.permit = true;
            self.shared.pool.fetch_add(granted - 1, Ordering::AcqRel);
        }
    }

    /// Moves on from `Idle` without Redis, during an outage, until `due`.
    fn degraded(&mut self, due: Instant, now: Instant) {
        let shared = &self.shared;
        let wait_until = match shared.config.on_unreachable {
            OnUnreachable::FailClosed => due,
            OnUnreachable::FailOpen { .. } => match &shared.fallback {
                None => {
                    shared.degraded_permits.fetch_add(1, Ordering::Relaxed);
                    self.permit = true;
                    return;
                }
                Some(limiter) => match limiter.check() {
                    Ok(()) => {
                        shared.degraded_permits.fetch_add(1, Ordering::Relaxed);
                        self.permit = true;
                        return;
                    }
                    Err(not_until) => limiter.clock().deadline(&not_until).min(due),
                },
            },
        };
        self.state = State::Waiting {
            sleep: Box::pin(tokio::time::sleep_until(wait_until.max(now))),
            granted: 0,
        };
    }
}

impl<S> Service<Message> for RedisRateLimit<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        while !self.permit {
            match &mut self.state {
                State::Idle => {
                    if self.shared.take_pooled() {
                        self.permit = true;
                        continue;
                    }
                    let now = Instant::now();
                    if let Some(due) = self.shared.degraded_until(now) {
                        self.degraded(due, now);
                        continue;
                    }
                    self.state = State::Fetching(Box::pin(self.shared.clone().fetch()));
                }
                State::Fetching(fetch) => {
                    let result = ready!(fetch.as_mut().poll(cx));
                    self.state = State::Idle;
                    match result {
                        Ok(Grant { granted, wait }) if wait.is_zero() => {
                            self.shared.answered();
                            self.take(granted);
                        }
                        Ok(Grant { granted, wait }) => {
                            self.shared.answered();
                            self.state = State::Waiting {
                                sleep: Box::pin(tokio::time::sleep(wait)),
                                granted,
                            };
                        }
                        Err(error) => self.shared.failed(&error),
                    }
                }
                State::Waiting { sleep, granted } => {
                    ready!(sleep.as_mut().poll(cx));
                    let granted = *granted;
                    self.state = State::Idle;
                    self.take(granted);
                }
            }
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        assert!(
            std::mem::take(&mut self.permit),
            "RedisRateLimit::call without poll_ready returning Ready first"
        );
        ResponseFuture::new(self.inner.call(msg))
    }
}
