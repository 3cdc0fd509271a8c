//! governor's limiters on tokio's clock, and waiting for the instant they name.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, RateLimiter};
use tokio::time::{Instant, Sleep};

/// governor's clock over tokio's time, so paused test time drives the limiter.
#[derive(Clone, Debug)]
pub(super) struct TokioClock {
    origin: Instant,
}

impl TokioClock {
    pub(super) fn new() -> Self {
        TokioClock {
            origin: Instant::now(),
        }
    }

    /// The tokio instant at which a denied check may succeed.
    pub(super) fn deadline(&self, not_until: &NotUntil<Nanos>) -> Instant {
        self.origin + Duration::from(not_until.earliest_possible())
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

pub(super) type DirectLimiter =
    RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;
pub(super) type KeyedLimiter =
    RateLimiter<Bytes, DashMapStateStore<Bytes>, TokioClock, NoOpMiddleware<Nanos>>;

/// Sets `sleep` for `deadline` and polls it.
pub(super) fn wait_until(
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
