//! [`RetryConfig`]: backoff, limits, budget and classifier.

use std::time::Duration;

use redrive_core::{Capabilities, Classifier};

use super::{Backoff, Budget, ConfigError};

/// The retry layer's settings, checked by [`RetryLayer::new`](super::RetryLayer::new)
/// and, against a broker, by [`check`](RetryConfig::check).
///
/// | setting | default |
/// |---|---|
/// | `backoff` | [`Backoff::default`]: 100 ms doubling to 10 s, full jitter |
/// | `max_tries` | 3 (the first try and two retries) |
/// | `max_elapsed` | 30 s from the start of the first try |
/// | `budget` | [`Budget::default`]: 20 % of first tries over 10 s, at least 10/s |
/// | `classifier` | [`Classifier::default`] (markers only) |
#[derive(Clone, Debug)]
pub struct RetryConfig {
    pub(crate) backoff: Backoff,
    pub(crate) max_tries: u32,
    pub(crate) max_elapsed: Duration,
    pub(crate) budget: Option<Budget>,
    pub(crate) classifier: Classifier,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            backoff: Backoff::default(),
            max_tries: 3,
            max_elapsed: Duration::from_secs(30),
            budget: Some(Budget::default()),
            classifier: Classifier::default(),
        }
    }
}

impl RetryConfig {
    /// Sets the delay between tries.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the most tries per delivery attempt, the first included (at least 1; 1
    /// turns retries off).
    #[must_use]
    pub fn with_max_tries(mut self, n: u32) -> Self {
        self.max_tries = n;
        self
    }

    /// Sets how long after the first try began a retry may still start: a retry whose
    /// delay would end later is not made. `Duration::MAX` lifts the limit.
    #[must_use]
    pub fn with_max_elapsed(mut self, d: Duration) -> Self {
        self.max_elapsed = d;
        self
    }

    /// Sets the retry budget.
    #[must_use]
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Retries without a budget: every failure may be retried `max_tries − 1` times,
    /// even during an outage.
    #[must_use]
    pub fn without_budget(mut self) -> Self {
        self.budget = None;
        self
    }

    /// Classifies errors with `classifier` (use the one the rest of the stack uses).
    #[must_use]
    pub fn with_classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// The backoff.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The most tries per delivery attempt.
    pub fn max_tries(&self) -> u32 {
        self.max_tries
    }

    /// The elapsed-time limit.
    pub fn max_elapsed(&self) -> Duration {
        self.max_elapsed
    }

    /// The budget, if any.
    pub fn budget(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }

    /// The longest time one delivery attempt can spend sleeping between tries: the
    /// sum of the largest delays `max_tries − 1` retries can draw, at most
    /// `max_elapsed`. The layer keeps to it: a `retry_after` hint that would sleep
    /// past it is left to the broker. The tries' own run time comes on top.
    ///
    /// ```
    /// use std::time::Duration;
    /// use redrive_middleware::retry::{Backoff, RetryConfig};
    ///
    /// let config = RetryConfig::default()
    ///     .with_backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(4)))
    ///     .with_max_tries(5);
    /// // 1 s + 2 s + 4 s + 4 s
    /// assert_eq!(config.window(), Duration::from_secs(11));
    /// ```
    pub fn window(&self) -> Duration {
        let mut total = Duration::ZERO;
        for n in 1..self.max_tries {
            let upper = self.backoff.upper_bound(n);
            if upper >= self.backoff.max() {
                // Every later retry draws up to the max too.
                let rest = self.max_tries - n;
                total = total.saturating_add(upper.saturating_mul(rest));
                break;
            }
            total = total.saturating_add(upper);
            if total >= self.max_elapsed {
                break;
            }
        }
        total.min(self.max_elapsed)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_tries == 0 {
            return Err(ConfigError::new(
                "retry",
                "`max_tries` is 0; it counts the first try too, so set it to 1 (no retries) or more",
            ));
        }
        if self.max_elapsed.is_zero() && self.max_tries > 1 {
            return Err(ConfigError::new(
                "retry",
                "`max_elapsed` is 0, so no retry could ever start; raise it, or set \
                 `max_tries` to 1 to turn retries off",
            ));
        }
        self.backoff.validate()?;
        if let Some(budget) = &self.budget {
            budget.validate()?;
        }
        Ok(())
    }

    /// Checks these settings against what the consumer's broker can do.
    ///
    /// A message stays invisible to other consumers for its lease. When the broker's
    /// lease cannot be extended (`caps.lease` is set and `caps.extendable` is not),
    /// the whole retry [`window`](Self::window) must fit inside it, or the broker
    /// hands the message to another consumer while this one is still retrying it.
    /// When the lease is extendable, the Worker keeps extending it while the message
    /// is in flight, retries included, so any window fits.
    ///
    /// The check covers the sleeps between tries; the tries themselves take time too,
    /// so leave room for them (a [`timeout`](crate::timeout) layer inside the retry
    /// bounds each one).
    ///
    /// ```
    /// use std::time::Duration;
    /// use redrive_core::Capabilities;
    /// use redrive_middleware::retry::RetryConfig;
    ///
    /// let caps = Capabilities::new().with_lease(Some(Duration::from_secs(20)), false);
    /// // Ten tries: delays of 0.1, 0.2, 0.4 … 6.4 s then 10 s, cut at max_elapsed (30 s).
    /// let config = RetryConfig::default().with_max_tries(10);
    /// let err = config.check(&caps).unwrap_err();
    /// assert!(err.to_string().contains("lower `max_elapsed`"), "{err}");
    /// let config = config.with_max_elapsed(Duration::from_secs(10));
    /// assert!(config.check(&caps).is_ok());
    /// ```
    ///
    /// # Errors
    /// [`ConfigError`] when the settings are invalid, or when the window does not fit
    /// in a lease that cannot be extended; the message says what to change.
    pub fn check(&self, caps: &Capabilities) -> Result<(), ConfigError> {
        self.validate()?;
        let (Some(lease), false) = (caps.lease, caps.extendable) else {
            return Ok(());
        };
        let window = self.window();
        if window >= lease {
            return Err(ConfigError::new(
                "retry",
                format!(
                    "retries can keep a message for {window:?} ({} tries, delays up to {:?}, \
                 max_elapsed {:?}), but the broker's lease is {lease:?} and cannot be \
                 extended, so it would redeliver the message to another consumer \
                 meanwhile; lower `max_elapsed` well below {lease:?} (leave room for the \
                 tries themselves), or lower `max_tries` or the backoff max",
                    self.max_tries,
                    self.backoff.max(),
                    self.max_elapsed,
                ),
            ));
        }
        Ok(())
    }
}
