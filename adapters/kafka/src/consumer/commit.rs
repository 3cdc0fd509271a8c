//! Committing the watermarks: those that moved, periodically and on demand, and one
//! partition's offset with its metadata.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

use crate::watermark::{Tp, Watermarks};

use super::lock;
use super::rebalance::Context;

/// Commits the watermarks that moved; on failure they are offered again.
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
    for ((topic, partition), offset) in &dirty {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    let result = consumer.commit(&tpl, mode);
    if let Err(e) = &result {
        tracing::warn!(error = %e, "offset commit failed; trying again with the next commit");
        lock(state).commit_failed(&dirty);
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

/// Commits `offset` of `tp`, with `metadata` if given, and waits for the broker.
pub(super) fn commit_one<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    tp: &Tp,
    offset: i64,
    metadata: Option<&str>,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))?;
    if let Some(metadata) = metadata {
        if let Some(mut e) = tpl.find_partition(&tp.0, tp.1) {
            e.set_metadata(metadata);
        }
    }
    consumer.commit(&tpl, CommitMode::Sync)
}
