//! Worker configuration: ordering, redelivery backoff, lease keeping, shutdown.

use std::time::Duration;

use crate::classify::Classifier;

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

/// The delay before a failed message is delivered again, by attempt: exponential,
/// with equal jitter unless turned off.
///
/// | field | default |
/// |---|---|
/// | `initial` | 1 s |
/// | `max` | 5 min |
/// | `multiplier` | 2.0 |
/// | `jitter` | on (the delay is drawn from ½·d ..= d) |
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Redelivery {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: bool,
}

impl Default for Redelivery {
    fn default() -> Self {
        Redelivery {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: true,
        }
    }
}

impl Redelivery {
    /// Exponential backoff from `initial` up to `max`, doubling each attempt.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Redelivery {
            initial,
            max,
            ..Self::default()
        }
    }

    /// The same delay every time.
    pub fn constant(delay: Duration) -> Self {
        Redelivery {
            initial: delay,
            max: delay,
            multiplier: 1.0,
            jitter: false,
        }
    }

    /// Sets the multiplier (at least 1).
    #[must_use]
    pub fn with_multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Turns jitter on or off.
    #[must_use]
    pub fn with_jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The largest delay this backoff gives.
    pub fn max(&self) -> Duration {
        self.max
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(format!(
                "redelivery multiplier must be a finite number >= 1, got {}",
                self.multiplier
            ));
        }
        if self.max < self.initial {
            return Err(format!(
                "redelivery max ({:?}) is below its initial delay ({:?}); raise the max or lower the initial delay",
                self.max, self.initial
            ));
        }
        Ok(())
    }

    /// The delay after delivery attempt `attempt` (1-based) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let d = if secs.is_finite() && secs < self.max.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            self.max
        };
        if self.jitter {
            let half = d / 2;
            half + half.mul_f64(fastrand::f64())
        } else {
            d
        }
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

    #[test]
    fn invalid_backoff_is_rejected() {
        let r = Redelivery::exponential(Duration::from_secs(2), Duration::from_secs(1));
        assert!(r.validate().unwrap_err().contains("below its initial"));
        let r = Redelivery::default().with_multiplier(f64::NAN);
        assert!(r.validate().is_err());
    }
}
