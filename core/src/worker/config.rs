//! Worker configuration: ordering, redelivery backoff, lease keeping, shutdown.

use std::time::Duration;

use crate::classify::Classifier;
use crate::{Backoff, Jitter};

/// How the Worker orders messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OrderingMode {
    /// Any message may run beside any other. A failed message goes back to the broker.
    #[default]
    Unordered,
    /// Messages with the same [`key`](crate::Message::key) run one at a time, in the
    /// order received; different keys run in parallel. A failed message **parks** its
    /// key. Messages without a key run unordered. The Worker tracks keys by a randomly
    /// seeded 64-bit hash: two keys that share one (about one chance in 2^64 per pair)
    /// run in one order, never out of order.
    PerKey,
    /// Messages of the same partition (Kafka) run one at a time, in order; a failed
    /// message parks its partition.
    PerPartition,
}

/// Where the Worker runs its handler calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Execution {
    /// Each handler call on its own tokio task: calls run in parallel on every thread
    /// of the runtime, and a handler that blocks its thread holds up only itself.
    #[default]
    Spawned,
    /// Every handler call polled inside the Worker's own task, like a stream's
    /// `buffer_unordered`: no task spawn and no cross-thread wake-up per message, so the
    /// most throughput for handlers that mostly wait on I/O. Calls share one thread at a
    /// time: a handler that blocks or computes for long stalls the others, and the lease
    /// keeping of the messages beside it. Spawn CPU-heavy work from the handler
    /// (`tokio::task::spawn_blocking`) in this mode.
    InTask,
}

/// The delay before a failed message is delivered again, by attempt: a [`Backoff`],
/// exponential with equal jitter unless set otherwise.
///
/// | field | default |
/// |---|---|
/// | `initial` | 1 s |
/// | `max` | 5 min |
/// | `multiplier` | 2.0 |
/// | `jitter` | [`Jitter::Equal`] (the delay is drawn from ½·d ..= d) |
///
/// Any [`Backoff`] can stand in, with its own jitter:
///
/// ```
/// use std::time::Duration;
/// use redrive_core::{Backoff, Jitter, Redelivery};
///
/// let r = Redelivery::from(
///     Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60))
///         .with_jitter(Jitter::Full),
/// );
/// assert_eq!(r.max(), Duration::from_secs(60));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Redelivery {
    backoff: Backoff,
}

impl Default for Redelivery {
    fn default() -> Self {
        Self::exponential(Duration::from_secs(1), Duration::from_secs(300))
    }
}

impl From<Backoff> for Redelivery {
    fn from(backoff: Backoff) -> Self {
        Redelivery { backoff }
    }
}

impl Redelivery {
    /// Exponential backoff from `initial` up to `max`, doubling each attempt, with equal
    /// jitter.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff::exponential(initial, max)
            .with_jitter(Jitter::Equal)
            .into()
    }

    /// The same delay every time.
    pub fn constant(delay: Duration) -> Self {
        Backoff::constant(delay).into()
    }

    /// Sets the multiplier (at least 1).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.backoff = self.backoff.with_multiplier(multiplier);
        self
    }

    /// Turns jitter on ([`Jitter::Equal`]) or off ([`Jitter::None`]);
    /// [`with_backoff`](Redelivery::with_backoff) takes any other.
    #[must_use]
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        let jitter = if jitter { Jitter::Equal } else { Jitter::None };
        self.backoff = self.backoff.with_jitter(jitter);
        self
    }

    /// Replaces the whole backoff: delays, multiplier and jitter.
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The backoff behind the delays.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The largest delay this backoff gives.
    pub fn max(&self) -> Duration {
        self.backoff.max()
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        self.backoff
            .validate()
            .map_err(|e| e.named("redelivery", "initial delay").to_string())
    }

    /// The delay after delivery attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.backoff.delay_for(attempt)
    }
}

/// When the Worker extends a running or parked message's lease.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub enum LeaseKeeping {
    /// Extend when half the lease has passed, if the broker has extendable leases.
    #[default]
    Auto,
    /// Extend at this interval; the broker must have extendable leases.
    Every(Duration),
    /// Never extend.
    Off,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) concurrency: usize,
    pub(crate) execution: Execution,
    pub(crate) max_waiting: Option<usize>,
    pub(crate) max_parked: usize,
    pub(crate) ordering: OrderingMode,
    pub(crate) redelivery: Redelivery,
    pub(crate) lease_keeping: LeaseKeeping,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) settle_timeout: Duration,
    pub(crate) classifier: Classifier,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "redrive".to_owned(),
            concurrency: 16,
            execution: Execution::Spawned,
            max_waiting: None,
            max_parked: 1024,
            ordering: OrderingMode::Unordered,
            redelivery: Redelivery::default(),
            lease_keeping: LeaseKeeping::Auto,
            shutdown_timeout: Duration::from_secs(30),
            settle_timeout: Duration::from_secs(10),
            classifier: Classifier::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_without_jitter_doubles_to_the_max() {
        let r = Redelivery::exponential(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(false);
        let d: Vec<_> = (1..=6).map(|a| r.delay(a).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(r.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_to_full() {
        let r = Redelivery::exponential(Duration::from_secs(8), Duration::from_secs(8));
        for _ in 0..1000 {
            let d = r.delay(1);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(8),
                "{d:?}"
            );
        }
    }

    /// The delays `Redelivery::default()` gave before it was a `Backoff`: 1 s doubling
    /// to 5 min, each drawn from ½·d ..= d.
    #[test]
    fn the_default_keeps_its_delays() {
        let r = Redelivery::default();
        for attempt in 1..=12 {
            let d = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(300));
            let draws: Vec<_> = (0..500).map(|_| r.delay(attempt)).collect();
            let outside = draws.iter().find(|x| !(d / 2..=d).contains(x));
            assert_eq!(
                outside,
                None,
                "attempt {attempt}: not in {:?}..={d:?}",
                d / 2
            );
            let mid = d * 3 / 4;
            assert!(
                draws.iter().any(|x| *x < mid) && draws.iter().any(|x| *x > mid),
                "attempt {attempt}: no spread"
            );
        }
        let exact = Redelivery::default().with_jitter(false);
        let d: Vec<_> = (1..=12).map(|a| exact.delay(a).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(exact.delay(u32::MAX).as_secs(), 300);
    }

    #[test]
    fn any_backoff_can_stand_in() {
        let b = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(40))
            .with_jitter(Jitter::None);
        let r = Redelivery::from(b);
        assert_eq!(r, Redelivery::default().with_backoff(b));
        assert_eq!(r.backoff(), &b);
        let d: Vec<_> = (1..=4).map(|a| r.delay(a).as_millis()).collect();
        assert_eq!(d, vec![10, 20, 40, 40]);
        assert_eq!(r.with_jitter(true).backoff().jitter(), Jitter::Equal);
        assert_eq!(
            Redelivery::constant(Duration::from_secs(3)).backoff(),
            &Backoff::constant(Duration::from_secs(3))
        );
    }

    #[test]
    fn invalid_backoff_is_rejected() {
        let r = Redelivery::exponential(Duration::from_secs(2), Duration::from_secs(1));
        assert!(r.validate().unwrap_err().contains("below its initial"));
        let r = Redelivery::default().with_multiplier(f64::NAN);
        assert!(
            r.validate()
                .unwrap_err()
                .contains("redelivery multiplier is NaN")
        );
    }
}
