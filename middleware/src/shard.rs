//! Per-thread shards for counters that every call adds to: a thread adds into its own
//! shard, on cache lines of its own, so calls running on several cores at once do not
//! pass one line back and forth; readers sum the shards.

use std::sync::OnceLock;
#[cfg(feature = "retry")]
use std::sync::atomic::AtomicU64;
#[cfg(any(feature = "metrics", feature = "retry"))]
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards per counter, and the unit the in-memory idempotency store sizes its own by:
/// the machine's parallelism rounded up to a power of two, at most 64.
pub(crate) fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .next_power_of_two()
            .min(64)
    })
}

/// This thread's shard among `shards` (a power of two), handed out in turn as threads
/// first count something.
#[cfg(any(feature = "metrics", feature = "retry"))]
pub(crate) fn index(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    // A thread whose locals are gone (it is exiting) counts into the first shard.
    SHARD.try_with(|s| *s).unwrap_or(0) & (shards - 1)
}

/// A counter in per-thread shards.
#[cfg(feature = "retry")]
pub(crate) struct Counter {
    shards: Box<[Padded]>,
}

/// One shard, on cache lines of its own (128 bytes: x86 fetches lines in pairs).
#[cfg(feature = "retry")]
#[repr(align(128))]
#[derive(Default)]
struct Padded(AtomicU64);

#[cfg(feature = "retry")]
impl Counter {
    pub(crate) fn new() -> Self {
        Counter {
            shards: (0..count()).map(|_| Padded::default()).collect(),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.shards[index(self.shards.len())]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.shards
            .iter()
            .fold(0, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }

    /// Sets every shard to zero. Adds made meanwhile may survive it.
    pub(crate) fn reset(&self) {
        for s in self.shards.iter() {
            s.0.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, feature = "retry"))]
mod tests {
    use super::*;

    #[test]
    fn adds_from_many_threads_sum_up_and_reset() {
        let counter = Counter::new();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| (0..1_000).for_each(|_| counter.add(1)));
            }
        });
        assert_eq!(counter.sum(), 8_000);
        counter.reset();
        assert_eq!(counter.sum(), 0);
    }
}
