//! The acker: it marks its record complete in the partition's watermark, and tells
//! the partition whether the record runs in a handler, which a revoke waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redrive_core::Acker;
use redrive_core::delivery::SettleFuture;

use crate::watermark::{Assigned, Tp};

use super::blocking::off_runtime;
use super::commit::commit_one;
use super::crash_loop::{COUNT_TIMEOUT, FirstRecord, commit_before_running, died_metadata};

/// Marks a record complete in its partition's watermark.
pub(super) struct KafkaAcker {
    /// The record's partition, as assigned when it was polled; `None` if it was not.
    pub(super) assigned: Option<Arc<Assigned>>,
    pub(super) tp: Tp,
    pub(super) offset: i64,
    /// Whether the record is in a handler, as the Worker last said.
    pub(super) running: AtomicBool,
    /// Set for the first record of an assignment, whose deliveries are counted in the
    /// committed offset's metadata.
    pub(super) first: Option<Box<FirstRecord>>,
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
        match self.first.as_deref() {
            // Not after a revoke: the partition's new owner commits it now.
            Some(first) if first.recorded.load(Ordering::Acquire) && self.is_current() => {
                // Its count of deliveries is committed: commit past it before the ack
                // completes, or a crash now would count one more for a record that
                // completed.
                let consumer = first.consumer.clone();
                let assigned = self.assigned.clone();
                let (tp, past) = (self.tp.clone(), self.offset + 1);
                SettleFuture::new(async move {
                    let cleared = tokio::time::timeout(
                        COUNT_TIMEOUT,
                        off_runtime(move || {
                            consumer.upgrade().map(|c| commit_one(&*c, &tp, past, None))
                        }),
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
                    if let Some(a) = assigned {
                        a.forget_committed();
                    }
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
        if running {
            if let Some(first) = self.first.as_deref().filter(|_| self.is_current()) {
                if !first.recorded.swap(true, Ordering::AcqRel) {
                    let metadata = died_metadata(self.offset, first.deliveries);
                    commit_before_running(first, &self.tp, self.offset, &metadata);
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
            first: None,
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
        assert_eq!(w.revoke(&tp), Some(1));
    }
}
