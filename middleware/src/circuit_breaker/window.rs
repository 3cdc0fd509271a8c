//! [`RateWindow`]: calls and failures over a sliding window, for the failure rate.

use std::time::Duration;

const BUCKETS: usize = 10;

#[derive(Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    calls: u64,
    failures: u64,
}

/// Calls and failures over a sliding window, in `BUCKETS` buckets.
pub(super) struct RateWindow {
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

impl RateWindow {
    pub(super) fn new(window: Duration) -> Self {
        RateWindow {
            bucket_len: window / BUCKETS as u32,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Records a call at `since` (time since the breaker was made); returns the calls
    /// and failures now in the window.
    pub(super) fn record(&mut self, since: Duration, failed: bool) -> (u64, u64) {
        // Slot 0 is never current, so zeroed buckets read as stale.
        let slot = u64::try_from(since.as_nanos() / self.bucket_len.as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failures += u64::from(failed);
        self.buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < BUCKETS as u64)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }

    pub(super) fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}
