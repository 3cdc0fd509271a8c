//! The Redis rate limit's settings: [`RedisRateLimitConfig`] and [`OnUnreachable`].

use std::time::Duration;

use governor::RateLimiter;

use crate::rate_limit::clock::{DirectLimiter, TokioClock};
use crate::rate_limit::{ConfigError, RateLimitConfig};

/// What a [`RedisRateLimitLayer`](super::RedisRateLimitLayer) does while Redis cannot be reached (a failed
/// connection, an error, or no answer within the timeout).
///
/// Either way the layer logs one warning when an outage begins and one line when
/// Redis answers again, reports [`is_degraded`](super::RedisRateLimitLayer::is_degraded)
/// meanwhile, and asks Redis again every
/// [`retry_interval`](RedisRateLimitConfig::with_retry_interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnreachable {
    /// Stop intake: `poll_ready` stays pending until Redis answers again, and messages
    /// wait in the broker. The downstream never sees more than the limit. The default.
    FailClosed,
    /// Let messages through without Redis: at `fallback`'s rate, per process, when
    /// one is given, or unlimited. Every message let through this way is counted in
    /// [`degraded_permits`](super::RedisRateLimitLayer::degraded_permits).
    FailOpen {
        /// A per-process limit to apply meanwhile (say the cluster limit divided by
        /// the number of replicas), or `None` for none.
        fallback: Option<RateLimitConfig>,
    },
}

impl OnUnreachable {
    /// [`FailOpen`](Self::FailOpen) with no limit at all while Redis is away.
    pub fn fail_open() -> Self {
        OnUnreachable::FailOpen { fallback: None }
    }

    /// [`FailOpen`](Self::FailOpen) at `fallback`'s rate, per process, while Redis is
    /// away.
    pub fn fail_open_at(fallback: RateLimitConfig) -> Self {
        OnUnreachable::FailOpen {
            fallback: Some(fallback),
        }
    }
}

/// The settings of a [`RedisRateLimitLayer`](super::RedisRateLimitLayer).
///
/// | setting | default |
/// |---|---|
/// | `key` | (required) the Redis key that holds the limit |
/// | `rate` | (required) the cluster-wide [`RateLimitConfig`] |
/// | `prefetch` | 1 (one Redis call per message) |
/// | `on_unreachable` | [`OnUnreachable::FailClosed`] |
/// | `timeout` | [`DEFAULT_TIMEOUT`](Self::DEFAULT_TIMEOUT) (1 s) |
/// | `retry_interval` | [`DEFAULT_RETRY_INTERVAL`](Self::DEFAULT_RETRY_INTERVAL) (1 s) |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisRateLimitConfig {
    pub(super) key: String,
    pub(super) rate: RateLimitConfig,
    pub(super) prefetch: u32,
    pub(super) on_unreachable: OnUnreachable,
    pub(super) timeout: Duration,
    pub(super) retry_interval: Duration,
}

impl RedisRateLimitConfig {
    /// How long one Redis call may take by default, connecting included.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// How often Redis is asked again during an outage, by default.
    pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

    /// `rate`, shared by every layer, in any process, that uses the Redis key `key`
    /// on the same server. Name the key after what is limited
    /// (`"redrive:rate:billing-api"`), and give every layer on it the same rate and
    /// burst: the key holds a time computed with each caller's own settings.
    pub fn new(key: impl Into<String>, rate: RateLimitConfig) -> Self {
        RedisRateLimitConfig {
            key: key.into(),
            rate,
            prefetch: 1,
            on_unreachable: OnUnreachable::FailClosed,
            timeout: Self::DEFAULT_TIMEOUT,
            retry_interval: Self::DEFAULT_RETRY_INTERVAL,
        }
    }

    /// Takes up to `n` permits per Redis call and spends them locally, so a replica
    /// busy at the limit asks Redis once per `n` messages instead of once per message.
    ///
    /// The cost is burstiness: Redis counts the permits when it hands them out, so
    /// the cluster never takes more than the rate from Redis, but a replica may spend
    /// a batch at once, and keeps the `n - 1` it did not spend for as long as it has
    /// no messages. Over any window the cluster lets through at most what the limit
    /// allows (burst included) plus the permits replicas held unspent when the window
    /// began: up to `n - 1` per batch fetched and not yet spent, so about one batch
    /// per replica. Under load a replica waits for a whole batch of `n` (Redis
    /// reserves it and names the wait), one Redis call per `n` messages; permits
    /// fetched by a service that is dropped before spending them are lost, which
    /// only lowers the rate. `n` must be at least 1 and at most the burst.
    #[must_use]
    pub fn with_prefetch(mut self, n: u32) -> Self {
        self.prefetch = n;
        self
    }

    /// What to do while Redis cannot be reached (default: fail closed).
    #[must_use]
    pub fn with_on_unreachable(mut self, on_unreachable: OnUnreachable) -> Self {
        self.on_unreachable = on_unreachable;
        self
    }

    /// Bounds each Redis call, connecting included, to `timeout`; past it Redis counts
    /// as unreachable.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How often to ask Redis again during an outage.
    #[must_use]
    pub fn with_retry_interval(mut self, retry_interval: Duration) -> Self {
        self.retry_interval = retry_interval;
        self
    }

    /// The Redis key that holds the limit.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The cluster-wide rate.
    pub fn rate(&self) -> &RateLimitConfig {
        &self.rate
    }

    /// Permits taken per Redis call.
    pub fn prefetch(&self) -> u32 {
        self.prefetch
    }

    /// What happens while Redis cannot be reached.
    pub fn on_unreachable(&self) -> OnUnreachable {
        self.on_unreachable
    }

    pub(super) fn invalid(message: impl Into<String>) -> ConfigError {
        ConfigError::new("rate limit", message)
    }

    /// Checks every setting; returns the interval and the burst tolerance in µs, and
    /// the fallback limiter.
    pub(super) fn check(&self) -> Result<(u64, u64, Option<DirectLimiter>), ConfigError> {
        self.rate.quota()?;
        if self.key.is_empty() {
            return Err(Self::invalid(
                "the Redis key is empty; name the limit, e.g. \"redrive:rate:billing-api\"",
            ));
        }
        let interval = u64::try_from(self.rate.emission_interval().as_micros()).unwrap_or(0);
        if interval == 0 {
            return Err(Self::invalid(format!(
                "{} leaves less than a microsecond between two messages, finer than the \
                 Redis limit counts; lower the limit or lengthen the period",
                self.rate.describe()
            )));
        }
        let burst = self.rate.burst();
        if self.prefetch == 0 || self.prefetch > burst {
            return Err(Self::invalid(format!(
                "a prefetch of {} cannot work with a burst of {burst}; set the prefetch \
                 between 1 and the burst, or raise the burst",
                self.prefetch
            )));
        }
        if self.timeout.is_zero() {
            return Err(Self::invalid(
                "the Redis timeout is 0; give it 1 ms or more",
            ));
        }
        if self.retry_interval.is_zero() {
            return Err(Self::invalid(
                "the retry interval is 0, which would ask an unreachable Redis in a loop; \
                 give it 1 ms or more",
            ));
        }
        let fallback = match self.on_unreachable {
            OnUnreachable::FailOpen {
                fallback: Some(fallback),
            } => Some(RateLimiter::direct_with_clock(
                fallback.quota()?,
                TokioClock::new(),
            )),
            _ => None,
        };
        Ok((
            interval,
            interval.saturating_mul(u64::from(burst)),
            fallback,
        ))
    }
}
