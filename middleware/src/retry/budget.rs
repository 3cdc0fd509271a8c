//! [`Budget`]: a cap on retries, shared by every clone of a [`RetryLayer`](super::RetryLayer).

use std::time::Duration;

use super::ConfigError;
use crate::shard::Counter;
use crate::window::Window;

/// How many retries a layer may make, as a share of the traffic it sees: retries in
/// the last `window` may number at most `min_per_second · window + ratio · first tries`
/// in that window.
///
/// | setting | default |
/// |---|---|
/// | `window` | 10 s (sliding, in tenths) |
/// | `ratio` | 0.2 (retries add at most 20 % to the load) |
/// | `min_per_second` | 10 (so a quiet consumer can still retry) |
///
/// This is Finagle's retry budget, the one tower's `TpsBudget` implements: during an
/// outage, when every message fails, retries stop once the budget is spent, and the
/// load on the failing downstream stays within `1 + ratio` times the normal load
/// instead of `max_tries` times. A message whose retry is refused ends with its last
/// error; the Worker nacks it and the broker redelivers it later.
///
/// The budget belongs to the [`RetryLayer`](super::RetryLayer): every service it
/// builds, and every clone of those, draws from the same budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    window: Duration,
    ratio: f64,
    min_per_second: u32,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            window: Duration::from_secs(10),
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

impl Budget {
    /// Sets the sliding window the budget counts over (at least 10 ms).
    #[must_use]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets the share of first tries that may be retried (finite, at least 0).
    #[must_use]
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = ratio;
        self
    }

    /// Sets the retries per second allowed whatever the traffic.
    #[must_use]
    pub fn with_min_per_second(mut self, n: u32) -> Self {
        self.min_per_second = n;
        self
    }

    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The ratio.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The minimum retries per second.
    pub fn min_per_second(&self) -> u32 {
        self.min_per_second
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !(self.ratio.is_finite() && self.ratio >= 0.0) {
            return Err(ConfigError::new(
                "retry",
                format!(
                    "the retry budget ratio is {}; set it to a finite number of at least 0.0 \
                 (0.2 lets retries add 20 % to the load)",
                    self.ratio
                ),
            ));
        }
        if self.window < MIN_WINDOW {
            return Err(ConfigError::new(
                "retry",
                format!(
                    "the retry budget window is {:?}; set it to {MIN_WINDOW:?} or more (10 s is typical)",
                    self.window
                ),
            ));
        }
        Ok(())
    }
}

const MIN_WINDOW: Duration = Duration::from_millis(10);

/// The budget's counts: first tries and retries over the sliding window.
///
/// Every message deposits a first try, so deposits take no lock: an atomic add into
/// this thread's shard of the current bucket (first tries are counted in per-thread
/// shards, so calls on several cores do not pass a cache line back and forth). A
/// withdrawal holds the window's lock from summing to adding, so two retries cannot
/// both take the last unit of budget.
pub(crate) struct SharedBudget {
    /// First tries (sharded) and retries.
    window: Window<Counter>,
    reserve: f64,
    ratio: f64,
}

impl SharedBudget {
    pub(crate) fn new(budget: &Budget) -> Self {
        SharedBudget {
            window: Window::new(budget.window),
            reserve: f64::from(budget.min_per_second) * budget.window.as_secs_f64(),
            ratio: budget.ratio,
        }
    }

    /// Counts a first try.
    pub(crate) fn deposit(&self) {
        self.window.add(self.window.slot(), 1, 0);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        self.window.add_if(0, 1, |first, retries| {
            let allowed = self.reserve + self.ratio * first as f64;
            (retries as f64) < allowed.floor()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ratio_and_reserve_cap_retries_and_the_window_refills() {
        let budget = Budget::default()
            .with_window(Duration::from_secs(1))
            .with_ratio(0.5)
            .with_min_per_second(2);
        let shared = SharedBudget::new(&budget);
        for _ in 0..4 {
            shared.deposit();
        }
        // Reserve 2 (2/s over 1 s) + half of 4 first tries = 4 retries.
        assert_eq!((0..10).filter(|_| shared.withdraw()).count(), 4);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(!shared.withdraw(), "still inside the window");
        tokio::time::advance(Duration::from_millis(600)).await;
        // The first tries and retries have left the window; only the reserve is back.
        assert_eq!((0..10).filter(|_| shared.withdraw()).count(), 2);
    }

    #[test]
    fn deposits_from_many_threads_all_count() {
        let budget = Budget::default()
            .with_window(Duration::from_secs(60))
            .with_ratio(0.1)
            .with_min_per_second(0);
        let shared = SharedBudget::new(&budget);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..5_000).for_each(|_| shared.deposit()));
            }
        });
        // A tenth of 20,000 first tries, not one more.
        assert_eq!((0..3_000).filter(|_| shared.withdraw()).count(), 2_000);
    }

    #[test]
    fn invalid_budgets_say_what_to_change() {
        let err = Budget::default()
            .with_ratio(f64::NAN)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("budget ratio is NaN"), "{err}");
        let err = Budget::default().with_ratio(-1.0).validate().unwrap_err();
        assert!(err.to_string().contains("at least 0.0"), "{err}");
        let err = Budget::default()
            .with_window(Duration::ZERO)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
    }
}
