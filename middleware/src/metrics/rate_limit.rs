//! The cluster-wide rate limit's state as instruments:
//! [`MetricsLayer::observe_rate_limit`].

use opentelemetry::KeyValue;

use super::MetricsLayer;
use crate::rate_limit::RedisRateLimitLayer;

/// `redrive.rate_limit.key`, on the rate limit's instruments: the Redis key the
/// replicas share.
pub const ATTR_RATE_LIMIT_KEY: &str = "redrive.rate_limit.key";

/// One counter of the limit's: name, unit, description, and its figure.
type Counter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&RedisRateLimitLayer) -> u64,
);

impl MetricsLayer {
    /// Reports a [`RedisRateLimitLayer`] with `redrive.rate_limit.key`:
    /// `redrive.rate_limit.degraded` (1 while Redis is unreachable and the limit fails
    /// closed or open, else 0), and the counters `redrive.rate_limit.outages` (outages
    /// begun), `redrive.rate_limit.degraded_permits` (messages let through without
    /// Redis, failing open) and `redrive.rate_limit.redis_calls` (calls of the limit's
    /// script). A [`Stack`](crate::Stack) with a metrics layer does this for the
    /// limit in its rate-limit place, once per limit, when a Worker is built with it.
    ///
    /// The series are by key: two limits on one key in one process (two Workers, each
    /// with a limit of its own, on one downstream) report as one, the last reading
    /// winning. Share one limit between them instead (the layer is cheap to clone).
    pub fn observe_rate_limit(&self, limit: &RedisRateLimitLayer) {
        let attrs = [KeyValue::new(
            ATTR_RATE_LIMIT_KEY,
            limit.config().key().to_owned(),
        )];
        let (l, a) = (limit.clone(), attrs.clone());
        // The meter provider keeps each callback registered for its own lifetime.
        let _gauge = self
            .meter
            .u64_observable_gauge("redrive.rate_limit.degraded")
            .with_unit("1")
            .with_description(
                "1 while Redis is unreachable and the cluster-wide rate limit fails closed \
                 or open, else 0",
            )
            .with_callback(move |observer| observer.observe(u64::from(l.is_degraded()), &a))
            .build();
        let counters: [Counter; 3] = [
            (
                "redrive.rate_limit.outages",
                "{outage}",
                "Outages of the cluster-wide rate limit's Redis begun",
                RedisRateLimitLayer::outages,
            ),
            (
                "redrive.rate_limit.degraded_permits",
                "{message}",
                "Messages the cluster-wide rate limit let through without Redis (failing open)",
                RedisRateLimitLayer::degraded_permits,
            ),
            (
                "redrive.rate_limit.redis_calls",
                "{call}",
                "Calls of the cluster-wide rate limit's Redis script, answered or not",
                RedisRateLimitLayer::redis_calls,
            ),
        ];
        for (name, unit, description, figure) in counters {
            let (l, a) = (limit.clone(), attrs.clone());
            let _counter = self
                .meter
                .u64_observable_counter(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| observer.observe(figure(&l), &a))
                .build();
        }
    }
}
