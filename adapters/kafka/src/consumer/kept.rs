//! What survives a restart: the committed offset's metadata keeps the records
//! completed past the offset (skipped when they come again) and the deliveries of
//! records that did not complete (their `attempt` goes on from there), read back at
//! assignment. The encoding is in `watermark/metadata.rs`.
//!
//! A record's deliveries are committed before it runs when a crash in its handler
//! would otherwise go uncounted: the first record of an assignment (the one at the
//! committed offset, which may be the record that killed the last consumer), a record
//! the metadata counted, and every retry in place. So a record that kills its consumer
//! is seen with a rising attempt after each restart, a dead-letter layer's
//! `max_attempts` ends the loop, and `max_attempts` means the same across restarts as
//! on a broker that counts deliveries itself.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::watermark::{Assigned, Kept, Tp};

use super::blocking::blocking;
use super::commit::commit_partition;
use super::rebalance::Context;

/// How long reading the committed offsets at assignment, or committing a count before
/// a record runs, may take; past it the count is not kept (and a warning says so).
pub(super) const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the committed offsets' metadata of newly assigned partitions, and gives each
/// partition what it kept.
pub(super) fn read_kept(
    consumer: &BaseConsumer<Context>,
    tpl: &TopicPartitionList,
    assigned: &[(Tp, Arc<Assigned>)],
) {
    let committed = blocking(|| consumer.committed_offsets(tpl.clone(), COUNT_TIMEOUT));
    let committed = match committed {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading the committed offsets failed; records completed past them are processed again, and earlier deliveries are not counted");
            return;
        }
    };
    for e in committed.elements() {
        let Offset::Offset(offset) = e.offset() else {
            continue;
        };
        // rdkafka panics on metadata that is not UTF-8 (anything may commit some).
        let kept = catch_unwind(AssertUnwindSafe(|| Kept::parse(offset, e.metadata())));
        let Ok(Some(kept)) = kept else {
            continue;
        };
        if kept.is_empty() {
            continue;
        }
        if let Some((_, a)) = assigned
            .iter()
            .find(|(tp, _)| tp.1 == e.partition() && *tp.0 == *e.topic())
        {
            tracing::info!(
                topic = e.topic(),
                partition = e.partition(),
                committed = offset,
                completed_past_it = kept.done_count(),
                counted = kept.attempts.len(),
                "the committed offset keeps records completed past it (they are skipped) and delivery counts"
            );
            a.set_kept(kept);
        }
    }
}

/// Commits the partition's offset with the record's count of deliveries before its
/// handler runs, so a crash in the handler leaves it counted; waits at most
/// [`COUNT_TIMEOUT`]. Returns whether it was tried (not when the consumer is gone).
pub(super) fn commit_count(
    consumer: &Weak<StreamConsumer<Context>>,
    assigned: &Arc<Assigned>,
    offset: i64,
) -> bool {
    let Some(consumer) = consumer.upgrade() else {
        return false;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let a = assigned.clone();
    let spawned = std::thread::Builder::new()
        .name("redrive-kafka-count".into())
        .spawn(move || {
            let _ = tx.send(commit_partition(&*consumer, &a));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to commit a delivery count");
        return false;
    }
    let (topic, partition) = assigned.tp();
    match blocking(|| rx.recv_timeout(COUNT_TIMEOUT)) {
        Ok(Ok(())) => {
            tracing::debug!(
                topic = &**topic,
                partition,
                offset,
                "delivery count committed"
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, topic = &**topic, partition, offset, "committing the delivery count failed; a crash in this run is not counted");
        }
        Err(_) => {
            tracing::warn!(timeout = ?COUNT_TIMEOUT, topic = &**topic, partition, offset, "committing the delivery count took too long; a crash in this run may not be counted");
        }
    }
    true
}
