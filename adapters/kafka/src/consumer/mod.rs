//! The consumer: a consumer-group member whose committed offsets follow the watermark.
//!
//! One file per job:
//! - `builder.rs`: [`KafkaConsumerBuilder`], its checks, the start of the tasks, and
//!   the creation of missing retry topics.
//! - `poll.rs`: the poll task, which turns records into deliveries and hands them over
//!   in batches (`batch.rs`), pausing for backpressure (`pause.rs`).
//! - `pause.rs`: pausing and resuming partitions, all of them when the Worker stalls,
//!   one alone at its bound of open records or holding a retry record not yet due.
//! - `commit.rs`: committing the watermarks, periodically and on demand.
//! - `rebalance.rs`: the rdkafka context: assignments, revokes and commit results.
//! - `kept.rs`: what the committed offset's metadata keeps across a restart (records
//!   completed past the offset, deliveries of records that did not complete), read at
//!   assignment and committed before a run.
//! - `not_due.rs`: records of retry topics held, their partitions paused, until due.
//! - `acker.rs`: the acker, which marks a record complete in its watermark, and with
//!   retry topics republishes a failed one.
//! - `open.rs`: [`OpenRecords`], the handle that reads what each partition holds open.
//! - `blocking.rs`: running blocking librdkafka calls without stalling the runtime.

mod acker;
mod batch;
mod blocking;
mod builder;
mod commit;
mod kept;
mod not_due;
mod open;
mod pause;
mod poll;
mod rebalance;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use redrive_core::{Capabilities, Consumer, Delivery, OrderingScope};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::watermark::Watermarks;

use self::batch::{Batch, Spare};
use self::blocking::off_runtime;
use self::commit::commit;
use self::rebalance::Context;

pub use self::builder::KafkaConsumerBuilder;
pub use self::open::OpenRecords;

/// A consumer-group member. See the [crate docs](crate) for the guarantees.
///
/// Offsets are committed from per-partition watermarks: just past the longest run of
/// records whose deliveries were acked. Create it inside a tokio runtime (a task
/// commits the watermarks every [`commit_interval`](KafkaConsumerBuilder::commit_interval)).
pub struct KafkaConsumer {
    consumer: Option<Arc<StreamConsumer<Context>>>,
    rx: mpsc::Receiver<Batch>,
    /// The rest of the batch last received, handed out before the next is taken.
    ready: Batch,
    /// Emptied batches, handed back to the poll task to fill again.
    spare: Arc<Spare>,
    state: Arc<Mutex<Watermarks>>,
    tasks: Vec<JoinHandle<()>>,
    close_timeout: Duration,
    topics: Vec<String>,
    /// With retry topics: the longest delay.
    max_nack_delay: Option<Duration>,
}

impl fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topics", &self.topics)
            .field("closed", &self.consumer.is_none())
            .finish()
    }
}

// `KafkaConsumer::builder` is in `builder.rs`, beside the defaults it sets.
impl KafkaConsumer {
    /// A handle on what is open in each partition this consumer owns (see
    /// [`max_open_per_partition`](KafkaConsumerBuilder::max_open_per_partition)), to
    /// read while the Worker runs the consumer: for metrics, or to alert on a record
    /// that holds its partition.
    pub fn open_records(&self) -> OpenRecords {
        OpenRecords {
            state: Arc::downgrade(&self.state),
        }
    }

    /// Commits every watermark that moved, and waits for the broker (up to the close
    /// timeout). Called by `close`; useful before a planned pause.
    ///
    /// # Errors
    /// [`Error::Kafka`] if the commit failed (the watermarks are offered again),
    /// [`Error::Commit`] if it did not finish within the close timeout,
    /// [`Error::Closed`] after `close`.
    pub async fn commit_now(&self) -> Result<()> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(Error::Closed);
        };
        let state = self.state.clone();
        let work = off_runtime(move || commit(&*consumer, &state, CommitMode::Sync));
        match tokio::time::timeout(self.close_timeout, work).await {
            Ok(Some(result)) => result.map_err(Error::from),
            Ok(None) => Err(Error::Commit("the commit thread panicked".into())),
            Err(_) => Err(Error::Commit(format!(
                "it did not finish within the close timeout ({:?}); the completed records \
                 after the last commit will be delivered again",
                self.close_timeout
            ))),
        }
    }
}

fn lock(state: &Mutex<Watermarks>) -> MutexGuard<'_, Watermarks> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the consumer can do: nack one record, with a delay up to the longest, only with
/// retry topics.
fn capabilities(max_nack_delay: Option<Duration>) -> Capabilities {
    Capabilities::new()
        .with_max_nack_delay(max_nack_delay.unwrap_or_default())
        .with_can_nack(max_nack_delay.is_some())
        .with_delivery_count(false)
        .with_lease(None, false)
        .with_ordering(OrderingScope::Partition)
}

impl Consumer for KafkaConsumer {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        loop {
            match self.ready.pop_front() {
                Some(Ok(d)) => return Ok(Some(d)),
                Some(Err(e)) => return Err(Error::from(e).into()),
                None => {}
            }
            // A channel receive, and the batch is stored before anything else can
            // happen: dropping this future loses nothing.
            match self.rx.recv().await {
                Some(batch) => self.spare.put(std::mem::replace(&mut self.ready, batch)),
                None => return Ok(None),
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.max_nack_delay)
    }

    async fn close(&mut self) -> redrive_core::Result<()> {
        let tasks: Vec<JoinHandle<()>> = self.tasks.drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Once it has ended it holds no handle on the consumer, so the last handle,
            // dropped below off the runtime, is ours.
            let _ = task.await;
        }
        // Records polled and not taken stay incomplete: they hold their watermarks and
        // are delivered again after a restart.
        self.rx.close();
        self.ready = Batch::new();
        let result = self.commit_now().await;
        if let Some(consumer) = self.consumer.take() {
            // Leaving the group can wait on the broker: do it off the runtime, within
            // the close timeout.
            let leave = off_runtime(move || {
                consumer.unsubscribe();
                drop(consumer);
            });
            if tokio::time::timeout(self.close_timeout, leave)
                .await
                .is_err()
            {
                tracing::warn!(timeout = ?self.close_timeout, "the kafka consumer did not leave its group within the close timeout; the broker will expire its session");
            }
        }
        result.map_err(Into::into)
    }
}

impl Drop for KafkaConsumer {
    /// A consumer dropped without [`close`](Consumer::close) (a crash, a panic) commits
    /// nothing more: records after the last commit are delivered again. Its tasks stop,
    /// and librdkafka is closed on a thread of its own, never on the runtime.
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(consumer) = self.consumer.take() {
            let spawned = std::thread::Builder::new()
                .name("redrive-kafka-drop".into())
                .spawn(move || {
                    // The aborted poll task lets go of its handle at its next poll.
                    for _ in 0..500 {
                        if Arc::strong_count(&consumer) == 1 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    drop(consumer);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a thread to close the kafka consumer");
            }
        }
    }
}
