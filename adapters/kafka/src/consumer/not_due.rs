//! Records of retry topics that are not due yet. The first one of a partition holds it:
//! the partition is paused, the records received after it wait behind it in order, and
//! the poll task hands them out as they fall due, resuming the partition once none is
//! left. No thread sleeps, and polling goes on, so a delay may be longer than
//! `max.poll.interval.ms`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use rdkafka::consumer::StreamConsumer;
use redrive_core::Delivery;

use crate::watermark::Assigned;

use super::batch::Batch;
use super::pause::pause_one;
use super::rebalance::Context;

/// The partitions held by a record not due yet.
#[derive(Default)]
pub(super) struct NotDue {
    holds: Vec<Hold>,
}

struct Hold {
    assigned: Arc<Assigned>,
    /// In offset order, each with when it is due; the first is not due yet.
    records: VecDeque<(SystemTime, Delivery)>,
    /// Whether the partition is still to be paused.
    to_pause: bool,
}

impl NotDue {
    /// Whether a record holds the partition of `assigned`.
    pub(super) fn holds(&self, assigned: &Assigned) -> bool {
        self.holds
            .iter()
            .any(|h| std::ptr::eq(Arc::as_ptr(&h.assigned), assigned))
    }

    /// Keeps `delivery`, a record of `assigned` due at `due`, when it is not due at
    /// `now` or an earlier record holds its partition; else gives it back.
    pub(super) fn hold(
        &mut self,
        assigned: &Arc<Assigned>,
        due: SystemTime,
        delivery: Delivery,
        now: SystemTime,
    ) -> Option<Delivery> {
        if let Some(hold) = self
            .holds
            .iter_mut()
            .find(|h| Arc::ptr_eq(&h.assigned, assigned))
        {
            hold.records.push_back((due, delivery));
            return None;
        }
        if due <= now {
            return Some(delivery);
        }
        self.holds.push(Hold {
            assigned: assigned.clone(),
            records: VecDeque::from([(due, delivery)]),
            to_pause: true,
        });
        None
    }

    /// Pauses the partitions held since the last call.
    pub(super) fn pause_new(&mut self, consumer: &StreamConsumer<Context>) {
        for hold in self.holds.iter_mut().filter(|h| h.to_pause) {
            hold.to_pause = false;
            if hold.assigned.is_current() {
                pause_one(consumer, &hold.assigned);
            }
        }
    }

    /// When the first hold falls due.
    pub(super) fn next_due(&self) -> Option<SystemTime> {
        self.holds
            .iter()
            .filter_map(|h| h.records.front().map(|(due, _)| *due))
            .min()
    }

    /// Moves the records due by `now` to `out`, in order. A partition none holds any
    /// more goes to `paused`, the partitions paused alone, which the poll task resumes
    /// when they have room. Drops the holds of partitions no longer this consumer's:
    /// their records go to the partition's new owner.
    pub(super) fn release(
        &mut self,
        now: SystemTime,
        out: &mut Batch,
        paused: &mut Vec<Arc<Assigned>>,
    ) {
        self.holds.retain_mut(|hold| {
            if !hold.assigned.is_current() {
                return false;
            }
            while hold.records.front().is_some_and(|(due, _)| *due <= now) {
                if let Some((_, delivery)) = hold.records.pop_front() {
                    out.push_back(Ok(delivery));
                }
            }
            if !hold.records.is_empty() {
                return true;
            }
            if !hold.to_pause {
                paused.push(hold.assigned.clone());
            }
            false
        });
    }
}
