//! The settings' schema: one struct per section, every key optional (absent keys keep
//! the layer's defaults), and how each section becomes its layer's configuration.

use std::time::Duration;

use redrive_core::Redelivery;
use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, FailureRate};
use redrive_middleware::dead_letter::{DeadLetterConfig, Replay};
use redrive_middleware::idempotency::{CommitMode, IdempotencyConfig, Unkeyed};
use redrive_middleware::rate_limit::RateLimitConfig;
use redrive_middleware::retry::{Backoff, Budget, RetryConfig};
use serde::Deserialize;

use super::values::{
    CommitModeName, Described, ExecutionName, Human, JitterSetting, LeaseKeepingSetting, OrOff,
    OrderingName, UnkeyedName,
};

/// Which keys of a section to apply: all of them, or, to find the key a rejected
/// section owes its error to, one alone or all but one.
#[derive(Clone, Copy, Debug)]
pub(super) enum Only {
    All,
    Key(&'static str),
    Except(&'static str),
}

impl Only {
    fn has(self, key: &str) -> bool {
        match self {
            Only::All => true,
            Only::Key(k) => k == key,
            Only::Except(k) => k != key,
        }
    }
}

/// `Redelivery::default()`'s first delay, which `Redelivery` does not expose (a unit
/// test checks the two agree).
pub(super) const DEFAULT_REDELIVERY_INITIAL: Duration = Duration::from_secs(1);
/// `RateLimitConfig::default()`'s limit, likewise.
const DEFAULT_RATE_LIMIT: u32 = 100;

/// `[worker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkerSection {
    pub(super) name: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) execution: Option<ExecutionName>,
    pub(super) ordering: Option<OrderingName>,
    pub(super) max_waiting: Option<usize>,
    pub(super) max_parked: Option<usize>,
    pub(super) redelivery: Option<RedeliverySection>,
    pub(super) lease_keeping: Option<LeaseKeepingSetting>,
    #[serde(default, with = "humantime_serde")]
    pub(super) shutdown_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) settle_timeout: Option<Duration>,
}

/// `[worker.redelivery]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedeliverySection {
    #[serde(default, with = "humantime_serde")]
    pub(super) initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(super) max: Option<Duration>,
    pub(super) multiplier: Option<f64>,
    pub(super) jitter: Option<bool>,
}

impl RedeliverySection {
    /// The first delay and the largest, defaults filled in.
    pub(super) fn bounds(&self) -> (Duration, Duration) {
        (
            self.initial.unwrap_or(DEFAULT_REDELIVERY_INITIAL),
            self.max.unwrap_or(Redelivery::default().max()),
        )
    }

    pub(super) fn redelivery(&self) -> Redelivery {
        let (initial, max) = self.bounds();
        let mut r = Redelivery::exponential(initial, max);
        if let Some(m) = self.multiplier {
            r = r.with_multiplier(m);
        }
        if let Some(j) = self.jitter {
            r = r.with_jitter(j);
        }
        r
    }
}

/// `[retry]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetrySection {
    max_tries: Option<u32>,
    max_elapsed: Option<OrOff<Human>>,
    backoff: Option<BackoffSection>,
    budget: Option<OrOff<BudgetSection>>,
}

impl RetrySection {
    pub(super) const KEYS: &'static [&'static str] =
        &["max_tries", "max_elapsed", "backoff", "budget"];

    pub(super) fn config(&self, only: Only) -> RetryConfig {
        let mut c = RetryConfig::default();
        if let (true, Some(n)) = (only.has("max_tries"), self.max_tries) {
            c = c.with_max_tries(n);
        }
        if let (true, Some(d)) = (only.has("max_elapsed"), self.max_elapsed) {
            c = c.with_max_elapsed(match d {
                OrOff::Off => Duration::MAX,
                OrOff::On(Human(d)) => d,
            });
        }
        if let (true, Some(b)) = (only.has("backoff"), &self.backoff) {
            c = c.with_backoff(b.backoff());
        }
        match (only.has("budget"), &self.budget) {
            (true, Some(OrOff::Off)) => c = c.without_budget(),
            (true, Some(OrOff::On(b))) => c = c.with_budget(b.budget()),
            _ => {}
        }
        c
    }
}

/// `[retry.backoff]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackoffSection {
    #[serde(default, with = "humantime_serde")]
    initial: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    max: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<JitterSetting>,
}

impl BackoffSection {
    fn backoff(&self) -> Backoff {
        let d = Backoff::default();
        Backoff::exponential(self.initial.unwrap_or(d.min()), self.max.unwrap_or(d.max()))
            .with_multiplier(self.multiplier.unwrap_or(d.multiplier()))
            .with_jitter(self.jitter.map_or(d.jitter(), |j| j.0))
    }
}

/// `[retry.budget]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetSection {
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    ratio: Option<f64>,
    min_per_second: Option<u32>,
}

impl BudgetSection {
    fn budget(&self) -> Budget {
        let mut b = Budget::default();
        if let Some(w) = self.window {
            b = b.with_window(w);
        }
        if let Some(r) = self.ratio {
            b = b.with_ratio(r);
        }
        if let Some(n) = self.min_per_second {
            b = b.with_min_per_second(n);
        }
        b
    }
}

impl Described for BudgetSection {
    const WHAT: &'static str = "a table of `window`, `ratio` and `min_per_second`";
}

/// `[timeout]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeoutSection {
    #[serde(default, with = "humantime_serde")]
    pub(super) per_try: Option<Duration>,
}

/// `[circuit_breaker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CircuitBreakerSection {
    consecutive_failures: Option<OrOff<u32>>,
    failure_rate: Option<FailureRateSection>,
    #[serde(default, with = "humantime_serde")]
    open_for: Option<Duration>,
    half_open_probes: Option<u32>,
    max_hold: Option<OrOff<Human>>,
}

impl CircuitBreakerSection {
    pub(super) const KEYS: &'static [&'static str] = &[
        "failure_rate",
        "consecutive_failures",
        "open_for",
        "half_open_probes",
        "max_hold",
    ];

    pub(super) fn config(&self, only: Only) -> CircuitBreakerConfig {
        let mut c = CircuitBreakerConfig::default();
        match (only.has("consecutive_failures"), self.consecutive_failures) {
            (true, Some(OrOff::Off)) => c = c.without_consecutive_failures(),
            (true, Some(OrOff::On(n))) => c = c.with_consecutive_failures(n),
            _ => {}
        }
        if let (true, Some(r)) = (only.has("failure_rate"), &self.failure_rate) {
            c = c.with_failure_rate(r.rate());
        }
        if let (true, Some(d)) = (only.has("open_for"), self.open_for) {
            c = c.with_open_for(d);
        }
        if let (true, Some(n)) = (only.has("half_open_probes"), self.half_open_probes) {
            c = c.with_half_open_probes(n);
        }
        match (only.has("max_hold"), self.max_hold) {
            (true, Some(OrOff::Off)) => c = c.without_hold(),
            (true, Some(OrOff::On(Human(d)))) => c = c.with_max_hold(d),
            _ => {}
        }
        c
    }
}

/// `[circuit_breaker.failure_rate]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailureRateSection {
    threshold: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    window: Option<Duration>,
    min_calls: Option<u32>,
}

impl FailureRateSection {
    fn rate(&self) -> FailureRate {
        let mut r = self
            .threshold
            .map_or_else(FailureRate::default, FailureRate::new);
        if let Some(w) = self.window {
            r = r.with_window(w);
        }
        if let Some(n) = self.min_calls {
            r = r.with_min_calls(n);
        }
        r
    }
}

/// `[rate_limit]`: `limit` is required, a rate being the workload's own.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitSection {
    limit: u32,
    #[serde(default, with = "humantime_serde")]
    per: Option<Duration>,
    burst: Option<u32>,
}

impl RateLimitSection {
    pub(super) const KEYS: &'static [&'static str] = &["limit", "per", "burst"];

    pub(super) fn config(&self, only: Only) -> RateLimitConfig {
        let limit = if only.has("limit") {
            self.limit
        } else {
            DEFAULT_RATE_LIMIT
        };
        let per = match (only.has("per"), self.per) {
            (true, Some(per)) => per,
            _ => Duration::from_secs(1),
        };
        let c = RateLimitConfig::new(limit, per);
        match (only.has("burst"), self.burst) {
            (true, Some(b)) => c.with_burst(b),
            _ => c,
        }
    }
}

/// `[idempotency]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdempotencySection {
    #[serde(default, with = "humantime_serde")]
    lease: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    ttl: Option<Duration>,
    namespace: Option<String>,
    unkeyed: Option<UnkeyedName>,
    commit_mode: Option<CommitModeName>,
}

impl IdempotencySection {
    pub(super) const KEYS: &'static [&'static str] =
        &["lease", "ttl", "namespace", "unkeyed", "commit_mode"];

    pub(super) fn config(&self, only: Only) -> IdempotencyConfig {
        let mut c = IdempotencyConfig::default();
        if let (true, Some(d)) = (only.has("lease"), self.lease) {
            c = c.with_lease(d);
        }
        if let (true, Some(d)) = (only.has("ttl"), self.ttl) {
            c = c.with_ttl(d);
        }
        if let (true, Some(n)) = (only.has("namespace"), &self.namespace) {
            c = c.with_namespace(n.as_str());
        }
        if let (true, Some(u)) = (only.has("unkeyed"), self.unkeyed) {
            c = c.with_unkeyed(match u {
                UnkeyedName::Process => Unkeyed::Process,
                UnkeyedName::Reject => Unkeyed::Reject,
            });
        }
        if let (true, Some(m)) = (only.has("commit_mode"), self.commit_mode) {
            c = c.with_commit_mode(match m {
                CommitModeName::Layer => CommitMode::Layer,
                CommitModeName::Handler => CommitMode::Handler,
            });
        }
        c
    }
}

/// `[dead_letter]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadLetterSection {
    max_attempts: Option<u32>,
    destination: Option<String>,
    consumer_name: Option<String>,
    abandon_margin: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    rejected_delay: Option<Duration>,
    max_error_len: Option<usize>,
}

impl DeadLetterSection {
    pub(super) const KEYS: &'static [&'static str] = &[
        "max_attempts",
        "destination",
        "consumer_name",
        "abandon_margin",
        "rejected_delay",
        "max_error_len",
    ];

    pub(super) fn config(&self, only: Only) -> DeadLetterConfig {
        let mut c = DeadLetterConfig::default();
        if let (true, Some(n)) = (only.has("max_attempts"), self.max_attempts) {
            c = c.with_max_attempts(n);
        }
        if let (true, Some(d)) = (only.has("destination"), &self.destination) {
            c = c.with_destination(d.as_str());
        }
        if let (true, Some(n)) = (only.has("consumer_name"), &self.consumer_name) {
            c = c.with_consumer_name(n.as_str());
        }
        if let (true, Some(n)) = (only.has("abandon_margin"), self.abandon_margin) {
            c = c.with_abandon_margin(n);
        }
        if let (true, Some(d)) = (only.has("rejected_delay"), self.rejected_delay) {
            c = c.with_rejected_delay(d);
        }
        if let (true, Some(n)) = (only.has("max_error_len"), self.max_error_len) {
            c = c.with_max_error_len(n);
        }
        c
    }
}

/// `[replay]`: what `redrive dlq replay` and [`DeadLetterQueue::replay`] do by default.
///
/// [`DeadLetterQueue::replay`]: redrive_middleware::dead_letter::DeadLetterQueue::replay
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplaySection {
    pub(super) max_replays: Option<u32>,
    pub(super) rate: Option<f64>,
    pub(super) in_flight: Option<usize>,
    pub(super) destination: Option<String>,
}

impl ReplaySection {
    pub(super) fn replay(&self) -> Replay {
        let mut r = Replay::default();
        if let Some(n) = self.max_replays {
            r = r.with_max_replays(n);
        }
        if let Some(rate) = self.rate {
            r = r.with_rate(rate);
        }
        if let Some(n) = self.in_flight {
            r = r.with_in_flight(n);
        }
        if let Some(d) = &self.destination {
            r = r.to(d.as_str());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_written_here_are_the_layers_own() {
        assert_eq!(
            Redelivery::exponential(DEFAULT_REDELIVERY_INITIAL, Redelivery::default().max()),
            Redelivery::default()
        );
        assert_eq!(
            RateLimitConfig::new(DEFAULT_RATE_LIMIT, Duration::from_secs(1)),
            RateLimitConfig::default()
        );
    }
}
