//! Crash loops: the deliveries of a record that ended without a fate (its consumer
//! died running it) are counted in the committed offset's metadata, read back at
//! assignment, and raise the record's `attempt`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer as _, StreamConsumer};

use crate::watermark::{Assigned, Tp};

use super::blocking::blocking;
use super::commit::commit_one;
use super::rebalance::Context;

/// The committed offset's metadata that counts the deliveries of the record at the
/// committed offset which ended without a fate: `redrive:a=<offset>:<deliveries>`.
/// Committed when the first record of an assignment starts running (it may be one
/// that killed its consumer before), cleared by the commit past it when it completes.
/// At assignment, a record found there is delivered with `attempt` one above the
/// count, so a record that kills its consumer is seen with a rising attempt after each
/// restart, and a dead-letter layer's `max_attempts` ends the loop.
const DIED: &str = "redrive:a=";

pub(super) fn died_metadata(offset: i64, deliveries: u32) -> String {
    format!("{DIED}{offset}:{deliveries}")
}

fn parse_died(metadata: &str) -> Option<(i64, u32)> {
    let (offset, count) = metadata.strip_prefix(DIED)?.split_once(':')?;
    Some((offset.parse().ok()?, count.parse().ok()?))
}

/// How long reading the committed offsets at assignment, or committing a count before
/// a record runs, may take; past it the count is not kept (and a warning says so).
pub(super) const COUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the committed offsets' metadata of newly assigned partitions, and gives each
/// partition the count of deliveries without a fate it holds.
pub(super) fn read_deaths(
    consumer: &BaseConsumer<Context>,
    tpl: &TopicPartitionList,
    assigned: &[(Tp, Arc<Assigned>)],
) {
    let committed = blocking(|| consumer.committed_offsets(tpl.clone(), COUNT_TIMEOUT));
    let committed = match committed {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading the committed offsets failed; deliveries that ended without a fate before this assignment are not counted");
            return;
        }
    };
    for e in committed.elements() {
        // rdkafka panics on metadata that is not UTF-8 (anything may commit some).
        let metadata = catch_unwind(AssertUnwindSafe(|| parse_died(e.metadata())));
        let Ok(Some((offset, count))) = metadata else {
            continue;
        };
        if let Some((_, a)) = assigned
            .iter()
            .find(|(tp, _)| tp.1 == e.partition() && *tp.0 == *e.topic())
        {
            tracing::info!(
                topic = e.topic(),
                partition = e.partition(),
                offset,
                deliveries = count,
                "a record was delivered before without a fate (its consumer died running it)"
            );
            a.set_died(offset, count);
        }
    }
}

/// Commits the first record's count of deliveries before its handler runs, so a crash
/// in the handler leaves it counted; waits at most [`COUNT_TIMEOUT`].
pub(super) fn commit_before_running(first: &FirstRecord, tp: &Tp, offset: i64, metadata: &str) {
    let Some(consumer) = first.consumer.upgrade() else {
        return;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (tp2, metadata2) = (tp.clone(), metadata.to_owned());
    let spawned = std::thread::Builder::new()
        .name("redrive-kafka-count".into())
        .spawn(move || {
            let _ = tx.send(commit_one(&*consumer, &tp2, offset, Some(&metadata2)));
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to commit a delivery count");
        return;
    }
    match blocking(|| rx.recv_timeout(COUNT_TIMEOUT)) {
        Ok(Ok(())) => {
            tracing::debug!(topic = %tp.0, partition = tp.1, offset, metadata, "delivery count committed")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, offset, "committing the delivery count failed; a crash in this run is not counted")
        }
        Err(_) => {
            tracing::warn!(timeout = ?COUNT_TIMEOUT, topic = %tp.0, partition = tp.1, offset, "committing the delivery count took too long; a crash in this run may not be counted")
        }
    }
}

/// The first record of an assignment: the one at the committed offset, which may have
/// died with an earlier consumer (see [`DIED`]).
pub(super) struct FirstRecord {
    pub(super) consumer: Weak<StreamConsumer<Context>>,
    /// Its deliveries so far, this one included.
    pub(super) deliveries: u32,
    /// Whether its start was committed.
    pub(super) recorded: AtomicBool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_are_written_and_read_back() {
        assert_eq!(died_metadata(42, 3), "redrive:a=42:3");
        assert_eq!(parse_died("redrive:a=42:3"), Some((42, 3)));
        for other in [
            "",
            "redrive:a=42",
            "redrive:a=x:1",
            "redrive:a=1:-1",
            "app-data",
        ] {
            assert_eq!(parse_died(other), None, "{other}");
        }
    }
}
