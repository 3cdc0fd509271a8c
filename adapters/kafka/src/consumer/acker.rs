//! The acker: it marks its record complete in the partition's watermark, and tells
//! the partition whether the record runs in a handler, which a revoke waits for.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::consumer::StreamConsumer;
use redrive_core::Acker;
use redrive_core::delivery::SettleFuture;

use crate::watermark::{Assigned, Tp};

use super::blocking::off_runtime;
use super::commit::commit_partition;
use super::crash_loop::{COUNT_TIMEOUT, commit_count};
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
}

impl KafkaAcker {
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
        if let Some(assigned) = &self.assigned {
            if !assigned.complete(self.offset) {
                tracing::trace!(topic = %self.tp.0, partition = self.tp.1, offset = self.offset, "ack below an incomplete record, or of a revoked partition");
            }
        }
        // Its run ends after its completion is marked: a revoke that waits for the
        // partition's runs to end then commits a watermark that counts it.
        self.set_running(false);
        match &self.assigned {
            // Not after a revoke: the partition's new owner commits it now.
            Some(assigned) if self.counted.load(Ordering::Acquire) && self.is_current() => {
                // Its count of deliveries is committed: commit its completion before the
                // ack completes, or a crash now would count one more for a record that
                // completed.
                let consumer = self.consumer.clone();
                let assigned = assigned.clone();
                let a = assigned.clone();
                SettleFuture::new(async move {
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
                    // The periodic commit may have committed a later watermark first,
                    // which this commit just moved back: it commits the watermark again.
                    assigned.forget_committed();
                    Ok(())
                })
            }
            _ => SettleFuture::ready(Ok(())),
        }
    }

    fn nack(&self, _delay: Duration) -> SettleFuture<'_> {
        self.set_running(false);
        // Kafka cannot hand back one record. It stays incomplete and holds its
        // partition's watermark, so it is delivered again after a restart or a
        // rebalance. The Worker parks failures instead of nacking them; nacks come only
        // from handing back at shutdown.
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
        a1.nack(Duration::ZERO).await.unwrap();
        assert_eq!(w.running(std::slice::from_ref(&tp)), 0);
        assert_eq!(w.revoke(&tp).map(|c| c.offset), Some(1));
    }
}
