//! Rebalances and commit results: the rdkafka context that starts and ends the
//! tracking of assigned partitions, and lets a revoke wait for running records.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::RuntimeFlavor;

use crate::watermark::{Assigned, Tp, Watermarks};

use super::commit::add;
use super::kept::read_kept;
use super::lock;
use super::pause::resume_taken;

/// Waits until no record of `tps` runs in a handler, or `timeout` passed.
///
/// Called from the rebalance callback, on the thread that polls: on a multi-thread
/// runtime that worker thread is handed over (`block_in_place`) so the Worker's tasks run
/// on; off the runtime (librdkafka closing) it just waits; on a current-thread runtime
/// waiting would stop the very tasks it waits for, so it does not.
fn wait_for_running(state: &Mutex<Watermarks>, tps: &[Tp], timeout: Duration) {
    let running = || lock(state).running(tps);
    if timeout.is_zero() || running() == 0 {
        return;
    }
    let wait = || {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let n = running();
            if n == 0 || std::time::Instant::now() >= deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let left = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        Ok(_) => {
            tracing::info!(
                running = running(),
                "partitions revoked on a current-thread runtime: not waiting for their running records, which are delivered again to the new owner"
            );
            return;
        }
        Err(_) => wait(),
    };
    if left > 0 {
        tracing::warn!(
            running = left,
            ?timeout,
            "revoke deadline passed with records still running; they are delivered again to the new owner"
        );
    }
}

/// Tracks assignments and commit results for the watermarks.
pub(super) struct Context {
    pub(super) state: Arc<Mutex<Watermarks>>,
    pub(super) revoke_timeout: Duration,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut replaced: Vec<Arc<Assigned>> = Vec::new();
                let assigned: Vec<(Tp, Arc<Assigned>)> = {
                    let mut state = lock(&self.state);
                    tpl.elements()
                        .iter()
                        .map(|e| {
                            let tp: Tp = (state.topic(e.topic()), e.partition());
                            replaced.extend(state.get(&tp));
                            let a = state.assign(tp.clone());
                            (tp, a)
                        })
                        .collect()
                };
                // Assigned again without a revoke.
                for old in &replaced {
                    resume_taken(consumer, old);
                }
                read_kept(consumer, tpl, &assigned);
                tracing::info!(partitions = tpl.count(), "kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                // Stop starting their records, let the running ones complete (up to the
                // deadline), then commit what is complete before the partitions go to
                // another member. Acks that come later are ignored: those records are
                // delivered again to the new owner.
                let tps: Vec<Tp> = {
                    let mut state = lock(&self.state);
                    tpl.elements()
                        .iter()
                        .map(|e| {
                            let tp: Tp = (state.topic(e.topic()), e.partition());
                            state.start_revoke(&tp);
                            tp
                        })
                        .collect()
                };
                wait_for_running(&self.state, &tps, self.revoke_timeout);
                let mut last = TopicPartitionList::new();
                {
                    let mut state = lock(&self.state);
                    for tp in &tps {
                        if let Some(a) = state.get(tp) {
                            resume_taken(consumer, &a);
                        }
                        if let Some(c) = state.revoke(tp) {
                            let _ = add(&mut last, &c);
                        }
                    }
                }
                if last.count() > 0 {
                    if let Err(e) = consumer.commit(&last, CommitMode::Sync) {
                        tracing::warn!(error = %e, "commit of revoked partitions failed; their completed records may be delivered again");
                    }
                }
                tracing::info!(partitions = tpl.count(), "kafka partitions revoked");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "kafka rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!(error = %e, "offset commit failed; trying again with the next commit");
            let mut state = lock(&self.state);
            let failed: Vec<(Tp, i64)> = offsets
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((state.topic(e.topic()), e.partition()), o)),
                    _ => None,
                })
                .collect();
            state.commit_failed(failed.iter().map(|(tp, o)| (tp, *o)));
        }
    }
}
