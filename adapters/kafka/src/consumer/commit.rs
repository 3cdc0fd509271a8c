//! Committing the watermarks with their metadata: those that changed, periodically and
//! on demand, and one partition's at once.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::watermark::{Assigned, Commit, Watermarks};

use super::lock;
use super::rebalance::Context;

/// Adds `commit` to `tpl`, with its metadata.
pub(super) fn add(tpl: &mut TopicPartitionList, commit: &Commit) -> KafkaResult<()> {
    let mut e = tpl.add_partition(&commit.tp.0, commit.tp.1);
    e.set_offset(Offset::Offset(commit.offset))?;
    e.set_metadata(commit.metadata.as_str());
    Ok(())
}

/// Commits the watermarks that moved, or whose metadata changed; on failure they are
/// offered again.
pub(super) fn commit<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    state: &Mutex<Watermarks>,
    mode: CommitMode,
) -> KafkaResult<()> {
    let dirty = lock(state).take_dirty();
    if dirty.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(dirty.len());
    for c in &dirty {
        add(&mut tpl, c)?;
    }
    let result = consumer.commit(&tpl, mode);
    if let Err(e) = &result {
        tracing::warn!(error = %e, "offset commit failed; trying again with the next commit");
        lock(state).commit_failed(dirty.iter().map(|c| (&c.tp, c.offset)));
    } else {
        tracing::trace!(?dirty, "offsets committed");
    }
    result
}

pub(super) async fn commit_every(
    consumer: Weak<StreamConsumer<Context>>,
    state: Arc<Mutex<Watermarks>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(consumer) = consumer.upgrade() else {
            return;
        };
        // Async: the request is queued, the result comes to `commit_callback`.
        let _ = commit(&*consumer, &state, CommitMode::Async);
    }
}

/// Commits the offset of `assigned`'s partition with its metadata now, and waits for
/// the broker.
pub(super) fn commit_partition<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    assigned: &Assigned,
) -> KafkaResult<()> {
    let Some((offset, metadata)) = assigned.commit_point() else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::with_capacity(1);
    add(
        &mut tpl,
        &Commit {
            tp: assigned.tp().clone(),
            offset,
            metadata,
        },
    )?;
    consumer.commit(&tpl, CommitMode::Sync)
}
