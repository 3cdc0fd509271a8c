//! [`CircuitBreakerConfig`] and [`FailureRate`]: the breaker's settings, checked when
//! the layer is built.

use std::time::Duration;

use redrive_core::Classifier;

use super::ConfigError;

/// Trip on a failure rate over a sliding window.
///
/// | setting | default |
/// |---|---|
/// | `threshold` | 0.5 (half the calls failed) |
/// | `window` | 30 s (sliding, in tenths) |
/// | `min_calls` | 20 calls in the window before the rate counts |
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    pub(super) threshold: f64,
    pub(super) window: Duration,
    pub(super) min_calls: u32,
}

impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(30),
            min_calls: 20,
        }
    }
}

impl FailureRate {
    /// Trips when at least `threshold` (above 0, at most 1) of the calls in the window
    /// failed.
    pub fn new(threshold: f64) -> Self {
        FailureRate {
            threshold,
            ..Self::default()
        }
    }

    /// Sets the sliding window (at least 10 ms).
    #[must_use]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets how many calls the window must hold before the rate can trip the breaker
    /// (at least 1).
    #[must_use]
    pub fn with_min_calls(mut self, n: u32) -> Self {
        self.min_calls = n;
        self
    }
}

/// The circuit breaker's settings, checked by
/// [`CircuitBreakerLayer::new`](super::CircuitBreakerLayer::new).
///
/// | setting | default |
/// |---|---|
/// | `consecutive_failures` | 5 transient failures in a row trip it |
/// | `failure_rate` | off ([`FailureRate::default`] when turned on) |
/// | `open_for` | 30 s |
/// | `half_open_probes` | 1 |
/// | `max_hold` (how long a message that failed as the breaker opened is held) | 15 min |
/// | `classifier` | [`Classifier::default`] (markers only) |
#[derive(Clone, Debug)]
pub struct CircuitBreakerConfig {
    pub(super) consecutive_failures: Option<u32>,
    pub(super) failure_rate: Option<FailureRate>,
    pub(super) open_for: Duration,
    pub(super) half_open_probes: u32,
    pub(super) max_hold: Option<Duration>,
    pub(super) classifier: Classifier,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: Some(5),
            failure_rate: None,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
            max_hold: Some(DEFAULT_MAX_HOLD),
            classifier: Classifier::default(),
        }
    }
}

/// The default `max_hold`: below RabbitMQ's default consumer timeout (30 min), after
/// which the broker would take a held delivery back.
const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(15 * 60);

impl CircuitBreakerConfig {
    /// Trips after `n` transient failures in a row (at least 1).
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Does not trip on failures in a row (then a failure rate must be set).
    #[must_use]
    pub fn without_consecutive_failures(mut self) -> Self {
        self.consecutive_failures = None;
        self
    }

    /// Also trips on a failure rate over a sliding window.
    #[must_use]
    pub fn with_failure_rate(mut self, rate: FailureRate) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Sets how long the breaker stays open before it lets probes through.
    #[must_use]
    pub fn with_open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Sets how many probes a half-open breaker lets through, all of which must
    /// succeed for it to close (at least 1).
    #[must_use]
    pub fn with_half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    /// Holds a message that failed as the breaker opened (or failed as a probe) for up
    /// to `max_hold`, running it again whenever the breaker lets a call through, so an
    /// outage shorter than `max_hold` uses none of its delivery attempts. Past
    /// `max_hold` the error goes up, using one attempt; then the message comes back and
    /// may be held again. Keep it below any limit the broker puts on an unsettled
    /// delivery (RabbitMQ's `consumer_timeout`, 30 min by default).
    #[must_use]
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Never holds a message: a failure goes up at once, using one delivery attempt,
    /// even while the breaker is open.
    #[must_use]
    pub fn without_hold(mut self) -> Self {
        self.max_hold = None;
        self
    }

    /// Classifies errors with `classifier` (use the one the rest of the stack uses).
    #[must_use]
    pub fn with_classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError::new(
                "circuit breaker",
                "`consecutive_failures` is 0; set it to 1 or more, or turn it off with \
                 `without_consecutive_failures`",
            ));
        }
        if let Some(rate) = &self.failure_rate {
            if !(rate.threshold.is_finite() && rate.threshold > 0.0 && rate.threshold <= 1.0) {
                return Err(ConfigError::new(
                    "circuit breaker",
                    format!(
                        "the failure-rate threshold is {}; set it above 0.0 and at most 1.0 \
                     (0.5 trips when half the calls fail)",
                        rate.threshold
                    ),
                ));
            }
            if rate.window < MIN_WINDOW {
                return Err(ConfigError::new(
                    "circuit breaker",
                    format!(
                        "the failure-rate window is {:?}; set it to {MIN_WINDOW:?} or more",
                        rate.window
                    ),
                ));
            }
            if rate.min_calls == 0 {
                return Err(ConfigError::new(
                    "circuit breaker",
                    "the failure rate's `min_calls` is 0; set it to 1 or more so one \
                     failed call cannot trip the breaker alone",
                ));
            }
        }
        if self.consecutive_failures.is_none() && self.failure_rate.is_none() {
            return Err(ConfigError::new(
                "circuit breaker",
                "nothing can trip the breaker; set `consecutive_failures` or a failure rate",
            ));
        }
        if self.open_for.is_zero() {
            return Err(ConfigError::new(
                "circuit breaker",
                "`open_for` is 0, so the breaker would never pause; set it to how long the \
                 downstream needs to recover, e.g. 30 s",
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::new(
                "circuit breaker",
                "`half_open_probes` is 0, so the breaker could never close again; set it to \
                 1 or more",
            ));
        }
        Ok(())
    }
}

/// The shortest failure-rate window.
const MIN_WINDOW: Duration = Duration::from_millis(10);
