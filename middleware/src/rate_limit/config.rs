//! [`RateLimitConfig`]: a rate, checked into a governor [`Quota`].

use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;

use super::ConfigError;

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

    pub(super) fn quota(&self) -> Result<Quota, ConfigError> {
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

impl RateLimitConfig {
    /// The time one permit takes to come back: `per / limit` (`per` for a limit of 0,
    /// which [`quota`](Self::quota) rejects).
    #[cfg_attr(
        not(feature = "redis"),
        allow(dead_code, reason = "the Redis limit reads it")
    )]
    pub(super) fn emission_interval(&self) -> std::time::Duration {
        self.per / self.limit.max(1)
    }

    /// The largest burst: `burst`, or `limit` when unset.
    #[cfg_attr(
        not(feature = "redis"),
        allow(dead_code, reason = "the Redis limit reads it")
    )]
    pub(super) fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit)
    }

    pub(super) fn describe(&self) -> String {
        format!("{}/{}", self.limit, crate::stack::secs(self.per))
    }
}
