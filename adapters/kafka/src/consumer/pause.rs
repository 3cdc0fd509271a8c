//! Pausing and resuming partitions: every assigned one while the Worker takes no
//! records (backpressure), and one alone at its bound of open records or holding a
//! retry record not yet due.

use std::sync::{Arc, Mutex};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::KafkaResult;

use crate::watermark::{Assigned, Tp, Watermarks};

use super::lock;
use super::rebalance::Context;

/// The partition of `assigned` is full: pauses it, with a warning. Returns whether it
/// is paused (not when it is no longer this consumer's, or the pause failed).
pub(super) fn pause_full(consumer: &StreamConsumer<Context>, assigned: &Arc<Assigned>) -> bool {
    if !assigned.is_current() || assigned.is_paused() {
        return false;
    }
    let (topic, partition) = assigned.tp();
    let (stuck_offset, stuck_for) = assigned.stuck().unwrap_or_default();
    match pause_alone(consumer, assigned) {
        Ok(()) => {
            tracing::warn!(
                topic = &**topic,
                partition,
                stuck_offset,
                ?stuck_for,
                "a kafka partition reached its bound of open records behind an incomplete \
                 record (max_open_per_partition); pausing it until that record completes"
            );
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, topic = &**topic, partition, stuck_offset, "pausing a kafka partition at its bound of open records failed");
            false
        }
    }
}

/// Pauses the partition of `assigned` alone, holding a record of a retry topic that is
/// not due yet; returns whether it is paused.
pub(super) fn pause_one(consumer: &StreamConsumer<Context>, assigned: &Assigned) -> bool {
    if assigned.is_paused() {
        return true;
    }
    match pause_alone(consumer, assigned) {
        Ok(()) => true,
        Err(e) => {
            let (topic, partition) = assigned.tp();
            tracing::warn!(error = %e, topic = &**topic, partition, "pausing a retry topic's partition until its next record is due failed; its records wait in memory");
            false
        }
    }
}

/// Pauses the partition of `assigned` alone, and notes it paused if that worked.
fn pause_alone(consumer: &StreamConsumer<Context>, assigned: &Assigned) -> KafkaResult<()> {
    consumer.pause(&one_partition(assigned.tp()))?;
    assigned.set_paused(true);
    Ok(())
}

/// Resumes the partitions of `full` (paused alone) that have room again and no record
/// `held` them (keeping them paused while every partition is, `all_paused`: resuming
/// those resumes them), and forgets those a rebalance took.
pub(super) fn resume_emptied(
    consumer: &StreamConsumer<Context>,
    full: &mut Vec<Arc<Assigned>>,
    all_paused: bool,
    held: impl Fn(&Assigned) -> bool,
) {
    full.retain(|assigned| {
        // A rebalance resumed it when it took it away; a held one is resumed once its
        // last record is due.
        if !assigned.is_paused() || !assigned.is_current() || held(assigned) {
            return false;
        }
        if assigned.is_full() {
            return true;
        }
        let (topic, partition) = assigned.tp();
        if all_paused {
            assigned.set_paused(false);
            return false;
        }
        match consumer.resume(&one_partition(assigned.tp())) {
            Ok(()) => {
                assigned.set_paused(false);
                tracing::debug!(
                    topic = &**topic,
                    partition,
                    "a kafka partition paused alone (at its bound of open records, or until a retry record was due) resumed"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, topic = &**topic, partition, "resuming a kafka partition failed; trying again");
                true
            }
        }
    });
}

/// A list of one partition.
fn one_partition(tp: &Tp) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Resumes the partition of `assigned` if it was paused for being full: librdkafka
/// keeps a partition paused across rebalances, and this assignment's tracking ends
/// (called when it is revoked or replaced).
pub(super) fn resume_taken<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    assigned: &Assigned,
) {
    if assigned.set_paused(false) {
        if let Err(e) = consumer.resume(&one_partition(assigned.tp())) {
            let (topic, partition) = assigned.tp();
            tracing::warn!(error = %e, topic = &**topic, partition, "resuming a kafka partition paused at its bound failed as it was revoked; if assigned again it stays paused");
        }
    }
}

/// Pauses or resumes every assigned partition (but those paused for being full, which
/// stay paused); returns whether that worked.
pub(super) fn set_paused(
    consumer: &StreamConsumer<Context>,
    state: &Mutex<Watermarks>,
    pause: bool,
) -> bool {
    let result = consumer.assignment().and_then(|tpl| {
        if pause {
            consumer.pause(&tpl)
        } else {
            consumer.resume(&not_full(tpl, state))
        }
    });
    match result {
        Ok(()) => {
            tracing::debug!(pause, "kafka partitions paused or resumed for backpressure");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, pause, "pausing or resuming kafka partitions failed");
            false
        }
    }
}

/// `tpl` without the partitions paused for being full.
fn not_full(tpl: TopicPartitionList, state: &Mutex<Watermarks>) -> TopicPartitionList {
    let mut state = lock(state);
    let full = |topic: &str, partition: i32| {
        let tp: Tp = (state.topic(topic), partition);
        state.get(&tp).is_some_and(|a| a.is_paused())
    };
    let mut full = full;
    if !tpl
        .elements()
        .iter()
        .any(|e| full(e.topic(), e.partition()))
    {
        return tpl;
    }
    let mut out = TopicPartitionList::with_capacity(tpl.count());
    for e in tpl.elements() {
        if !full(e.topic(), e.partition()) {
            out.add_partition(e.topic(), e.partition());
        }
    }
    out
}
