//! [`ConsumerLag`]: a consumer group's lag on each partition of a few topics (the high
//! watermark less the group's committed offset), read every interval, for gauges and
//! health checks.
//!
//! ```no_run
//! use redrive_kafka::{ConsumerLag, KafkaConsumer};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let brokers = "127.0.0.1:9092";
//! let consumer = KafkaConsumer::builder(brokers, "billing", ["orders"]).build()?;
//! let lag = ConsumerLag::builder(brokers, "billing", ["orders"]).start()?;
//! for p in lag.partitions("orders").unwrap_or_default() {
//!     println!("partition {}: {} records behind", p.partition, p.lag);
//! }
//!
//! // As the `redrive.consumer.lag` and `redrive.consumer.oldest_incomplete_age` gauges of
//! // redrive-middleware: the lag of every partition, and the age of the oldest record
//! // this consumer has not finished on each partition it owns where one is open.
//! use redrive_middleware::metrics::{MetricsLayer, PartitionReading};
//! let metrics = MetricsLayer::new(&opentelemetry::global::meter("billing"));
//! let (lag, open) = (lag.clone(), consumer.open_records());
//! metrics.observe_partitions(redrive_kafka::SYSTEM, "orders", "billing", move || {
//!     let partitions = lag.partitions("orders").unwrap_or_default();
//!     partitions.iter().map(|p| PartitionReading::new(p.partition).with_lag(p.lag)).collect()
//! });
//! metrics.observe_partitions(redrive_kafka::SYSTEM, "orders", "billing", move || {
//!     open.partitions()
//!         .into_iter()
//!         .filter(|b| b.topic == "orders" && b.oldest_incomplete.is_some())
//!         .map(|b| PartitionReading::new(b.partition).with_oldest_incomplete_age(b.oldest_age))
//!         .collect()
//! });
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Never joins the group**: the poller is a librdkafka consumer with the group's
//!   `group.id` that never subscribes; it asks the group coordinator for the committed
//!   offsets (`OffsetFetch`) and the partition leaders for the watermarks
//!   (`ListOffsets`), so the group's members see no rebalance.
//! - **Off the runtime**: librdkafka's calls block, so the poller runs on a thread of its
//!   own, never on an async runtime's threads; [`start`](ConsumerLagBuilder::start) needs
//!   no runtime.
//! - **Cheap to read**: the poller keeps the last figures in memory; [`snapshot`](ConsumerLag::snapshot)
//!   and [`partitions`](ConsumerLag::partitions) copy them out under a short lock and
//!   never wait for the broker. Figures are as old as the
//!   [interval](ConsumerLagBuilder::interval) (15 s by default) at most, while the broker
//!   answers.
//! - **Absent, never wrong**: a topic the broker does not have ([`LagStatus::NotFound`])
//!   or that cannot be read whole within the timeout ([`LagStatus::Unavailable`]) has no
//!   partitions: the figures of a read that failed are dropped, not kept as if current,
//!   and a topic's partitions are all from one read.
//! - **Keeps going**: neither a missing topic nor a broker that is down ends the poller;
//!   it asks again at the next interval. Each change of a topic's status is logged once.
//! - **Per group, not per member**: the figures are the group's, so every replica that
//!   runs a poller for the same group reports the same ones; aggregate them with `max`,
//!   not `sum`, or run one poller per group.
//! - **Stops**: when the last clone of the [`ConsumerLag`] is dropped, or at
//!   [`stop`](ConsumerLag::stop), the poller ends, within the timeout of a read in
//!   progress.
//!
//! # Lag
//! A partition's lag is its high watermark (the offset the next record will get) less
//! the group's committed offset (the next record the group will read). A partition the
//! group has committed nothing on counts every record still in it (the high watermark
//! less the low), as a group reading from the earliest offset (the adapter's
//! `auto.offset.reset`) would. The lag of a partition the group has committed past its
//! end (after records were deleted) is zero.

// One file per job (a comment, as this module's docs are for users):
// - `mod.rs`: the handle and the figures it hands out.
// - `builder.rs`: the settings, checked when the poller starts.
// - `poll.rs`: the thread that reads.
mod builder;
mod poll;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::SystemTime;

pub use builder::ConsumerLagBuilder;

/// Reads a consumer group's lag on every partition of a few topics every interval, on a
/// thread of its own; see the [module docs](self). Clones share the poller, which stops
/// when the last clone is dropped or at [`stop`](Self::stop).
#[derive(Clone)]
pub struct ConsumerLag {
    inner: Arc<Inner>,
}

/// What the handles share; dropping it (the last handle) stops the poller.
struct Inner {
    figures: Arc<Mutex<Vec<TopicLag>>>,
    /// Sending, or dropping it, wakes the poller to stop.
    stop: Mutex<Option<mpsc::Sender<()>>>,
    stopped: Arc<AtomicBool>,
}

impl ConsumerLag {
    /// A poller of group `group`'s lag on every partition of `topics`, at `brokers`
    /// (`host:port,host:port`), with the defaults of [`ConsumerLagBuilder`]; start it
    /// with [`ConsumerLagBuilder::start`].
    pub fn builder<T: Into<String>>(
        brokers: &str,
        group: &str,
        topics: impl IntoIterator<Item = T>,
    ) -> ConsumerLagBuilder {
        ConsumerLagBuilder::new(brokers, group, topics.into_iter().map(Into::into).collect())
    }

    /// The last figures of every topic, in the order they were given (topics given twice
    /// are read once).
    pub fn snapshot(&self) -> Vec<TopicLag> {
        self.inner.figures().clone()
    }

    /// The partitions of `topic` at the last read, in partition order, or `None` when it
    /// is not polled or its last read failed.
    pub fn partitions(&self, topic: &str) -> Option<Vec<PartitionLag>> {
        self.inner
            .figures()
            .iter()
            .find(|t| t.topic == topic && t.status == LagStatus::Read)
            .map(|t| t.partitions.clone())
    }

    /// Stops the poller of every clone: it ends once a read in progress is done (within
    /// the timeout). The figures stay as they were last read.
    pub fn stop(&self) {
        // Dropping the sender wakes the poller as a message would.
        self.inner
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Whether the poller has ended (after [`stop`](Self::stop)).
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }
}

impl Inner {
    fn figures(&self) -> std::sync::MutexGuard<'_, Vec<TopicLag>> {
        // The poller writes whole values; a panic cannot leave one half-written.
        self.figures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for ConsumerLag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsumerLag")
            .field("figures", &*self.inner.figures())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// One topic's figures in a [`ConsumerLag::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicLag {
    /// The topic.
    pub topic: String,
    /// The status of the last read.
    pub status: LagStatus,
    /// Every partition at the last read, in partition order; empty unless it succeeded
    /// ([`LagStatus::Read`]).
    pub partitions: Vec<PartitionLag>,
    /// When the last read that succeeded finished; `None` unless the last read succeeded.
    pub read_at: Option<SystemTime>,
}

/// What the broker said about a topic at the last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LagStatus {
    /// Not read yet.
    Pending,
    /// Read: the figures are the broker's at that time.
    Read,
    /// The broker has no such topic.
    NotFound,
    /// The broker could not be asked, refused, or did not answer in time; the warning
    /// logged says why. The poller asks again at the next interval.
    Unavailable,
}

/// One partition's lag, from [`ConsumerLag::partitions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The partition's low watermark: the offset of its oldest record.
    pub low_watermark: i64,
    /// The partition's high watermark: the offset its next record will get.
    pub high_watermark: i64,
    /// The group's committed offset (the next record it will read), if it committed one.
    pub committed: Option<i64>,
    /// Records the group has not committed: `high_watermark - committed`, or
    /// `high_watermark - low_watermark` with no committed offset; never below zero.
    pub lag: u64,
}

impl PartitionLag {
    fn new(partition: i32, low: i64, high: i64, committed: Option<i64>) -> Self {
        let from = committed.unwrap_or(low);
        PartitionLag {
            partition,
            low_watermark: low,
            high_watermark: high,
            committed,
            lag: u64::try_from(high.saturating_sub(from)).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionLag;

    #[test]
    fn lag_counts_from_the_committed_offset_else_the_low_watermark() {
        assert_eq!(PartitionLag::new(0, 0, 10, Some(4)).lag, 6);
        assert_eq!(PartitionLag::new(0, 3, 10, None).lag, 7);
        assert_eq!(PartitionLag::new(0, 0, 10, Some(10)).lag, 0);
        // Committed past the end (records deleted, a topic recreated): not negative.
        assert_eq!(PartitionLag::new(0, 0, 10, Some(12)).lag, 0);
    }
}
