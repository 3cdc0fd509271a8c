//! The acker: it marks its record complete in the partition's watermark, and tells
//! the partition whether the record runs in a handler, which a revoke waits for.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use redrive_core::delivery::SettleFuture;
use redrive_core::{Acker, Backoff};

use crate::retry::RetryCopy;
use crate::watermark::{Assigned, Tp};

use super::blocking::off_runtime;
use super::commit::commit_partition;
use super::kept::{COUNT_TIMEOUT, commit_count};
use super::rebalance::Context;

/// Marks a record complete in its partition's watermark.
pub(super) struct KafkaAcker {
    /// The record's partition, as assigned when it was polled; `None` if it was not.
    pub(super) assigned: Option<Arc<Assigned>>,
    pub(super) tp: Tp,
    pub(super) offset: i64,
    /// Whether the record is in a handler, as the Worker last said.
    pub(super) running: AtomicBool,
    /// To commit its deliveries before a run.
    pub(super) consumer: Weak<StreamConsumer<Context>>,
    /// The record's attempt when it was received.
    pub(super) attempt: u32,
    /// Its runs so far.
    pub(super) runs: AtomicU32,
    /// Whether its deliveries are committed before its first run too: the first record
    /// of an assignment, or one the committed metadata counted.
    pub(super) count_first: bool,
    /// Whether a count of its deliveries was committed: its completion is then
    /// committed before the ack completes.
    pub(super) counted: AtomicBool,
    /// With retry topics: what a nack republishes.
    pub(super) retry: Option<Box<RetryCopy>>,
}

impl KafkaAcker {
    /// Marks the record complete in its partition's watermark.
    fn mark_complete(&self) {
        if let Some(assigned) = &self.assigned {
            if !assigned.complete(self.offset) {
                tracing::trace!(topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "completed below an incomplete record, or of a revoked partition");
            }
        }
    }

    /// Commits the partition past the completed record, whose count of deliveries was
    /// committed: or a crash now would count one more for a record that completed.
    async fn commit_counted(&self) -> redrive_core::Result<()> {
        let Some(assigned) = self.assigned.clone() else {
            return Ok(());
        };
        let consumer = self.consumer.clone();
        let a = assigned.clone();
        let cleared = tokio::time::timeout(
            COUNT_TIMEOUT,
            off_runtime(move || consumer.upgrade().map(|c| commit_partition(&*c, &a))),
        )
        .await;
        if !matches!(cleared, Ok(Some(Some(Ok(()))))) {
            tracing::warn!(
                ?cleared,
                "committing past a counted record failed or took too long; the periodic commit tries again"
            );
        }
        // The periodic commit may have committed a later watermark first, which this
        // commit just moved back: it commits the watermark again.
        assigned.forget_committed();
        Ok(())
    }

    fn set_running(&self, running: bool) {
        if self.running.swap(running, Ordering::AcqRel) == running {
            return;
        }
        if let Some(assigned) = &self.assigned {
            if running {
                assigned.started();
            } else {
                assigned.stopped();
            }
        }
    }
}

/// How a republish the broker refused is tried again: from 1 s, doubling to 30 s.
const REPUBLISH_BACKOFF: Backoff =
    Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30));

/// Tries a refused republish of the record at `offset` (its next attempt and delay in
/// `next`) again until the retry topic takes it, and then completes the record; or
/// until its partition is revoked (its new owner gets it) or the consumer is gone (it
/// comes again after the restart).
async fn republish_until_taken(
    copy: RetryCopy,
    assigned: Arc<Assigned>,
    consumer: Weak<StreamConsumer<Context>>,
    offset: i64,
    (attempt, delay): (u32, Duration),
) {
    let (topic, partition) = assigned.tp().clone();
    for tries in 1u32.. {
        tokio::time::sleep(REPUBLISH_BACKOFF.delay_for(tries)).await;
        if !assigned.is_current() || consumer.strong_count() == 0 {
            tracing::debug!(topic = %topic, partition, offset, "the partition was revoked or the consumer closed: its next owner gets the record its retry topic did not take");
            return;
        }
        match copy.republish(attempt, delay).await {
            Ok(()) => {
                assigned.complete(offset);
                tracing::info!(topic = %topic, partition, offset, tries = tries + 1, "the retry topic took the record at last");
                return;
            }
            // Warned at the first failures and every tenth after.
            Err(e) if tries < 3 || tries % 10 == 0 => {
                tracing::warn!(error = %e, topic = %topic, partition, offset, tries = tries + 1, "a failed record could still not go to its retry topic; trying again");
            }
            Err(_) => {}
        }
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        // A call aborted at the shutdown deadline ends without a settle: it runs no more.
        if *self.running.get_mut() {
            self.set_running(false);
        }
    }
}

impl Acker for KafkaAcker {
    fn ack(&self) -> SettleFuture<'_> {
        self.mark_complete();
        // Its run ends after its completion is marked: a revoke that waits for the
        // partition's runs to end then commits a watermark that counts it.
        self.set_running(false);
        if self.counted.load(Ordering::Acquire) && self.is_current() {
            SettleFuture::new(self.commit_counted())
        } else {
            SettleFuture::ready(Ok(()))
        }
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        match &self.retry {
            // Not after a revoke: the partition's new owner runs it again.
            Some(retry) if self.is_current() => SettleFuture::new(async move {
                let runs = self.runs.load(Ordering::Acquire).max(1);
                let next = self.attempt.saturating_add(runs);
                if let Err(e) = retry.republish(next, delay).await {
                    // The record stays incomplete, holding its partition's committed
                    // offset, while the republish is tried again in the background.
                    self.set_running(false);
                    tracing::warn!(error = %e, topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "a failed record could not go to its retry topic; trying again in the background (it holds its partition's committed offset meanwhile)");
                    if let Some(assigned) = &self.assigned {
                        tokio::spawn(republish_until_taken(
                            (**retry).clone(),
                            assigned.clone(),
                            self.consumer.clone(),
                            self.offset,
                            (next, delay),
                        ));
                    }
                    return Ok(());
                }
                // Republished: the record is done here. Its run ends after that, as for
                // an ack.
                self.mark_complete();
                self.set_running(false);
                if self.counted.load(Ordering::Acquire) && self.is_current() {
                    self.commit_counted().await?;
                }
                Ok(())
            }),
            _ => self.hand_back(),
        }
    }

    fn hand_back(&self) -> SettleFuture<'_> {
        self.set_running(false);
        // Kafka cannot hand back one record. It stays incomplete and holds its
        // partition's watermark, so it is delivered again after a restart or a
        // rebalance. Without retry topics the Worker parks failures instead of nacking
        // them; nacks come only from handing back at shutdown.
        tracing::debug!(topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "record handed back: it holds the watermark and is delivered again after a restart");
        SettleFuture::ready(Ok(()))
    }

    fn extend(&self, _lease: Duration) -> SettleFuture<'_> {
        // Records have no lease: a consumer keeps its partitions while it polls.
        SettleFuture::ready(Ok(()))
    }

    fn running(&self, running: bool) {
        if running && !self.running.load(Ordering::Acquire) {
            // A run starts: count it before the handler can crash, when it is a retry
            // in place or the metadata counts this record.
            let runs = self.runs.fetch_add(1, Ordering::AcqRel) + 1;
            if runs > 1 || self.count_first {
                if let Some(assigned) = self.assigned.as_ref().filter(|_| self.is_current()) {
                    let deliveries = self.attempt.saturating_add(runs - 1);
                    if assigned.delivered(self.offset, deliveries)
                        && commit_count(&self.consumer, assigned, self.offset)
                    {
                        self.counted.store(true, Ordering::Release);
                    }
                }
            }
        }
        self.set_running(running);
    }

    fn is_current(&self) -> bool {
        // After a revoke the record belongs to the partition's new owner: the Worker
        // hands it back unrun, also when it was parked or waiting behind its key.
        self.assigned.as_ref().is_some_and(|a| a.is_current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watermark::Watermarks;

    fn acker(assigned: &Arc<Assigned>, offset: i64) -> KafkaAcker {
        KafkaAcker {
            assigned: Some(assigned.clone()),
            tp: ("t".into(), 0),
            offset,
            running: AtomicBool::new(false),
            consumer: Weak::new(),
            attempt: 1,
            runs: AtomicU32::new(0),
            count_first: false,
            counted: AtomicBool::new(false),
            retry: None,
        }
    }

    #[tokio::test]
    async fn an_acker_counts_its_record_running_once_until_it_settles_or_drops() {
        let mut w = Watermarks::default();
        let tp: Tp = ("t".into(), 0);
        let assigned = w.assign(tp.clone());
        assigned.received(&[0, 1, 2]);
        let (a0, a1, a2) = (
            acker(&assigned, 0),
            acker(&assigned, 1),
            acker(&assigned, 2),
        );
        a0.running(true);
        a0.running(true);
        a1.running(true);
        a2.running(true);
        assert_eq!(
            w.running(std::slice::from_ref(&tp)),
            3,
            "said twice, counted once"
        );
        a1.running(false);
        a1.running(false);
        assert_eq!(w.running(std::slice::from_ref(&tp)), 2, "parked");
        a0.ack().await.unwrap();
        assert_eq!(w.running(std::slice::from_ref(&tp)), 1, "acked");
        a0.running(false);
        assert_eq!(
            w.running(std::slice::from_ref(&tp)),
            1,
            "nothing to undo after the ack"
        );
        drop(a2);
        assert_eq!(w.running(std::slice::from_ref(&tp)), 0, "dropped mid-run");
        a1.hand_back().await.unwrap();
        assert_eq!(w.running(std::slice::from_ref(&tp)), 0);
        assert_eq!(w.revoke(&tp).map(|c| c.offset), Some(1));
    }
}
