//! The delay buckets: the delay queue that holds a delay, and every delay queue up to
//! the largest delay (see the [module docs](super#delay-queues)).

use std::time::Duration;

use super::{QueueKind, Topology};

/// The smallest delay bucket, in milliseconds (2⁷).
const MIN_BUCKET_EXP: u32 = 7;

impl Topology {
    /// The delay queue that holds a message delayed by `delay`: `<queue>.delay.<bucket>ms`
    /// for a classic queue, `<queue>.delay-quorum.<bucket>ms` for a quorum queue (see
    /// the [module docs](super#delay-queues)).
    pub fn delay_queue(&self, delay: Duration) -> String {
        self.bucket_queue(bucket_exp(delay))
    }

    /// Every delay queue up to the largest delay.
    pub fn delay_queues(&self) -> Vec<String> {
        self.bucket_exps()
            .map(|exp| self.bucket_queue(exp))
            .collect()
    }

    /// The bucket exponents up to the largest delay.
    pub(super) fn bucket_exps(&self) -> std::ops::Range<u32> {
        if self.max_delay.is_zero() {
            return 0..0;
        }
        MIN_BUCKET_EXP..bucket_exp(self.max_delay) + 1
    }

    /// The delay queue of the bucket of 2^`exp` ms.
    pub(super) fn bucket_queue(&self, exp: u32) -> String {
        let infix = match self.kind {
            QueueKind::Classic => "delay",
            QueueKind::Quorum => "delay-quorum",
        };
        format!("{}.{infix}.{}ms", self.queue, 1u64 << exp)
    }
}

/// The power of two (in ms) of `delay`'s bucket.
pub(super) fn bucket_exp(delay: Duration) -> u32 {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
    let exp = 64 - (ms - 1).leading_zeros();
    exp.clamp(MIN_BUCKET_EXP, 63)
}
