//! [`Window`]: two counts over a sliding window, kept in a ring of buckets. The retry
//! budget counts first tries and retries in one; the circuit breaker, calls and
//! failures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window: each holds a tenth of it.
const BUCKETS: usize = 10;

/// A count that can be added to through a shared reference.
pub(crate) trait Tally {
    /// A count of zero.
    fn zero() -> Self;
    fn add(&self, n: u64);
    fn sum(&self) -> u64;
    /// Sets the count to zero. Adds made meanwhile may survive it.
    fn reset(&self);
}

impl Tally for AtomicU64 {
    fn zero() -> Self {
        AtomicU64::new(0)
    }

    fn add(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }

    fn reset(&self) {
        self.store(0, Ordering::Relaxed);
    }
}

/// Sharded, for a count that every call on every core adds to.
#[cfg(feature = "retry")]
impl Tally for crate::shard::Counter {
    fn zero() -> Self {
        crate::shard::Counter::new()
    }

    fn add(&self, n: u64) {
        crate::shard::Counter::add(self, n);
    }

    fn sum(&self) -> u64 {
        crate::shard::Counter::sum(self)
    }

    fn reset(&self) {
        crate::shard::Counter::reset(self);
    }
}

/// One bucket's counts. `slot` says which bucket length they belong to; counts of a
/// slot that has left the window are stale.
struct Bucket<T> {
    slot: AtomicU64,
    first: T,
    second: AtomicU64,
}

impl<T: Tally> Bucket<T> {
    fn new() -> Self {
        Bucket {
            slot: AtomicU64::new(0),
            first: T::zero(),
            second: AtomicU64::new(0),
        }
    }

    fn add(&self, first: u64, second: u64) {
        // Adding nothing is skipped: a deposit of a first try does not touch the
        // second count's cache line.
        if first != 0 {
            self.first.add(first);
        }
        if second != 0 {
            self.second.fetch_add(second, Ordering::Relaxed);
        }
    }
}

/// Two counts over a sliding window, in `BUCKETS` buckets of a tenth of it each.
///
/// The first count is of type `T`: a `shard::Counter`, in per-thread shards, for one
/// that every call adds to from any core; an `AtomicU64` otherwise.
///
/// Adding takes no lock: an atomic add into the current bucket. A lock is taken to
/// reuse a bucket for a new slot (once per bucket length) and in
/// [`add_if`](Window::add_if), so two callers cannot both be let in on the last unit.
/// An add held up for most of a window between reading the clock and adding may be
/// counted in a later round of its bucket, or wiped by that round's reset; the window
/// measures a rate, and one count more or less does not change it.
pub(crate) struct Window<T = AtomicU64> {
    origin: Instant,
    /// A bucket's length in nanoseconds (at least 1), so finding the current bucket
    /// divides 64-bit integers, not 128-bit ones.
    bucket_nanos: u64,
    buckets: [Bucket<T>; BUCKETS],
    /// Held to reuse a bucket and in `add_if`.
    lock: Mutex<()>,
}

impl<T: Tally> Window<T> {
    /// A window of `window`, starting now.
    pub(crate) fn new(window: Duration) -> Self {
        Window {
            origin: Instant::now(),
            bucket_nanos: u64::try_from((window / BUCKETS as u32).as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            buckets: std::array::from_fn(|_| Bucket::new()),
            lock: Mutex::new(()),
        }
    }

    /// The current bucket slot (a count of bucket lengths since `origin`); slot 0 is
    /// never current, so zeroed buckets read as stale.
    pub(crate) fn slot(&self) -> u64 {
        // 2^64 ns is 584 years: the saturation is never reached in practice.
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        (since / self.bucket_nanos).saturating_add(1)
    }

    /// The bucket of `slot`, emptied first if it still holds an older slot's counts.
    /// Takes the lock to empty it: not to be called with the lock held.
    fn bucket(&self, slot: u64) -> &Bucket<T> {
        let b = &self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot.load(Ordering::Acquire) != slot {
            let _reuse = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            // Only forwards: a caller that read the clock before a newer slot took the
            // bucket counts into the newer slot rather than wiping it.
            if b.slot.load(Ordering::Relaxed) < slot {
                b.first.reset();
                b.second.store(0, Ordering::Relaxed);
                b.slot.store(slot, Ordering::Release);
            }
        }
        b
    }

    /// Adds to the counts of `slot` (read from [`slot`](Window::slot)).
    pub(crate) fn add(&self, slot: u64, first: u64, second: u64) {
        self.bucket(slot).add(first, second);
    }

    /// The two counts over the window that ends in `slot`.
    pub(crate) fn sum(&self, slot: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot.load(Ordering::Acquire)) < BUCKETS as u64)
            .fold((0, 0), |(first, second), b| {
                (
                    first + b.first.sum(),
                    second + b.second.load(Ordering::Relaxed),
                )
            })
    }

    /// Adds to the current counts if `admit`, given the counts over the window, says
    /// so; returns whether it did. Holds the lock from summing to adding, so two
    /// callers cannot both be admitted on the last unit.
    #[cfg(feature = "retry")]
    pub(crate) fn add_if(
        &self,
        first: u64,
        second: u64,
        admit: impl FnOnce(u64, u64) -> bool,
    ) -> bool {
        let slot = self.slot();
        let current = self.bucket(slot);
        let _admit = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let (in_first, in_second) = self.sum(slot);
        let admitted = admit(in_first, in_second);
        if admitted {
            current.add(first, second);
        }
        admitted
    }

    /// Empties every bucket.
    #[cfg(feature = "circuit-breaker")]
    pub(crate) fn clear(&mut self) {
        for b in &mut self.buckets {
            // `&mut self`: nobody adds meanwhile, so the slots may go back to 0.
            *b.slot.get_mut() = 0;
            b.first.reset();
            *b.second.get_mut() = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(1);
    const BUCKET: Duration = Duration::from_millis(100);

    /// Adds at the current slot and returns the counts over the window ending there.
    fn record(w: &Window, first: u64, second: u64) -> (u64, u64) {
        let slot = w.slot();
        w.add(slot, first, second);
        w.sum(slot)
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_age_out_one_at_a_time() {
        let w = Window::<AtomicU64>::new(WINDOW);
        assert_eq!(record(&w, 1, 1), (1, 1));
        tokio::time::advance(BUCKET * 5).await;
        assert_eq!(record(&w, 2, 0), (3, 1));
        // The first bucket's last moment: still in the window.
        tokio::time::advance(BUCKET * 5 - Duration::from_nanos(1)).await;
        assert_eq!(w.sum(w.slot()), (3, 1));
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert_eq!(w.sum(w.slot()), (2, 0), "the first bucket left the window");
        tokio::time::advance(BUCKET * 5).await;
        assert_eq!(w.sum(w.slot()), (0, 0), "every bucket left the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_bucket_is_reused_and_never_moved_back() {
        let w = Window::<AtomicU64>::new(WINDOW);
        let old = w.slot();
        w.add(old, 5, 4);
        // A full window later the ring comes back to the same bucket.
        tokio::time::advance(WINDOW).await;
        let new = w.slot();
        assert_eq!(new % BUCKETS as u64, old % BUCKETS as u64);
        assert_eq!(record(&w, 1, 0), (1, 0), "the stale counts were wiped");
        // A caller that read the clock before the bucket moved on counts into the
        // newer slot rather than wiping it.
        w.add(old, 1, 1);
        assert_eq!(w.sum(new), (2, 1));
    }

    #[cfg(feature = "circuit-breaker")]
    #[tokio::test(start_paused = true)]
    async fn clear_empties_every_bucket() {
        let mut w = Window::<AtomicU64>::new(WINDOW);
        for _ in 0..BUCKETS {
            w.add(w.slot(), 2, 1);
            tokio::time::advance(BUCKET).await;
        }
        w.add(w.slot(), 1, 1);
        assert_eq!(w.sum(w.slot()), (19, 10));
        w.clear();
        assert_eq!(w.sum(w.slot()), (0, 0));
        assert_eq!(record(&w, 1, 0), (1, 0), "counts again after clearing");
    }

    #[cfg(feature = "retry")]
    #[test]
    fn add_if_admits_no_more_than_allowed_from_many_threads() {
        let w = Window::<crate::shard::Counter>::new(Duration::from_secs(60));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..1_000).for_each(|_| w.add(w.slot(), 1, 0)));
            }
        });
        let admitted = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1_000 {
                        if w.add_if(0, 1, |first, second| second < first / 2) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // Half of 4,000, not one more.
        assert_eq!(admitted.into_inner(), 2_000);
        assert_eq!(w.sum(w.slot()), (4_000, 2_000));
    }
}
