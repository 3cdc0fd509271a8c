//! [`Budget`]: a cap on retries, shared by every clone of a [`RetryLayer`](super::RetryLayer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::ConfigError;
use crate::shard::Counter;

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
const BUCKETS: usize = 10;

/// One bucket's counts. `slot` says which bucket length they belong to; counts of a
/// slot that has left the window are stale.
struct Bucket {
    slot: AtomicU64,
    /// Added to by every message, so kept in per-thread shards: calls on several cores
    /// do not pass its cache line back and forth.
    first_tries: Counter,
    retries: AtomicU64,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            slot: AtomicU64::new(0),
            first_tries: Counter::new(),
            retries: AtomicU64::new(0),
        }
    }
}

/// The budget's counters: a ring of `BUCKETS` buckets, each a tenth of the window.
///
/// Every message deposits a first try, so deposits take no lock: an atomic add into
/// the current bucket's shard for this thread. The lock is taken to reuse a bucket for a new slot (once per
/// bucket length) and to withdraw (only on a retry), so two retries cannot both take
/// the last unit of budget. A deposit held up for most of a window between reading the
/// clock and adding may be counted in a later round of its bucket, or wiped by that
/// round's reset; the budget is a rate, and one first try more or less does not change
/// it.
pub(crate) struct SharedBudget {
    origin: Instant,
    /// A bucket's length in nanoseconds (at least 1), so finding the current bucket
    /// divides 64-bit integers, not 128-bit ones.
    bucket_nanos: u64,
    reserve: f64,
    ratio: f64,
    buckets: [Bucket; BUCKETS],
    /// Held to reuse a bucket and to withdraw.
    lock: Mutex<()>,
}

impl SharedBudget {
    pub(crate) fn new(budget: &Budget) -> Self {
        SharedBudget {
            origin: Instant::now(),
            bucket_nanos: u64::try_from((budget.window / BUCKETS as u32).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            reserve: f64::from(budget.min_per_second) * budget.window.as_secs_f64(),
            ratio: budget.ratio,
            buckets: Default::default(),
            lock: Mutex::new(()),
        }
    }

    /// The current bucket slot (a count of bucket lengths since `origin`); slot 0 is
    /// never current, so zeroed buckets read as stale.
    fn slot(&self) -> u64 {
        // 2^64 ns is 584 years: the saturation is never reached in practice.
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (since / self.bucket_nanos).saturating_add(1)
    }

    /// The bucket of `slot`, emptied first if it still holds an older slot's counts.
    fn bucket(&self, slot: u64) -> &Bucket {
        let b = &self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot.load(Ordering::Acquire) != slot {
            let _reuse = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            // Only forwards: a caller that read the clock before a newer slot took the
            // bucket counts into the newer slot rather than wiping it.
            if b.slot.load(Ordering::Relaxed) < slot {
                b.first_tries.reset();
                b.retries.store(0, Ordering::Relaxed);
                b.slot.store(slot, Ordering::Release);
            }
        }
        b
    }

    /// Counts a first try.
    pub(crate) fn deposit(&self) {
        self.bucket(self.slot()).first_tries.add(1);
    }

    /// Takes one retry from the budget; `false` when it is spent.
    pub(crate) fn withdraw(&self) -> bool {
        let slot = self.slot();
        let current = self.bucket(slot);
        let _withdraw = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (first, retries) = self
            .buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot.load(Ordering::Acquire)) < BUCKETS as u64)
            .fold((0, 0), |(f, r), b| {
                (
                    f + b.first_tries.sum(),
                    r + b.retries.load(Ordering::Relaxed),
                )
            });
        let allowed = self.reserve + self.ratio * first as f64;
        if (retries as f64) < allowed.floor() {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
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
