//! Batches: the records of one poll, handed from the poll task to `receive` in one
//! channel send, and the emptied ones kept to fill again.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use rdkafka::error::KafkaResult;
use redrive_core::Delivery;

/// Records polled together, handed to `receive` in one channel send.
pub(super) type Batch = VecDeque<KafkaResult<Delivery>>;

/// Batches `receive` has emptied, kept for the poll task to fill again: a batch of 64
/// deliveries is about 15 KiB, so reusing them spares an allocation of that size per
/// poll, freed on whichever thread received it.
pub(super) struct Spare {
    batches: Mutex<Vec<Batch>>,
    /// The most kept: as many as can be on their way at once.
    max: usize,
}

impl Spare {
    pub(super) fn new(max: usize) -> Self {
        Spare {
            batches: Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// An empty batch with room for `capacity` deliveries, reused if one is kept.
    pub(super) fn take(&self, capacity: usize) -> Batch {
        let kept = self
            .batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        kept.unwrap_or_else(|| Batch::with_capacity(capacity))
    }

    /// Keeps `batch`, emptied, unless enough are kept.
    pub(super) fn put(&self, batch: Batch) {
        debug_assert!(batch.is_empty());
        let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        if batches.len() < self.max && batch.capacity() > 0 {
            batches.push(batch);
        }
    }
}

/// The most records in one batch: what the poll task takes from librdkafka's queue in
/// one go once one has arrived.
pub(super) const BATCH: usize = 64;
