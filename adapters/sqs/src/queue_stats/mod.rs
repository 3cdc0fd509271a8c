//! [`QueueStats`]: SQS's own figures for a few queues (messages visible, in flight and
//! delayed), read every interval with `GetQueueAttributes`, for gauges and health checks.
//!
//! ```no_run
//! use std::time::Duration;
//! use redrive_sqs::{QueueStats, Sqs};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let sqs = Sqs::from_env().await;
//! let consumer = sqs.consumer("orders").build().await?;
//!
//! // The queue and the dead-letter queue of its redrive policy, read every 15 s.
//! let stats = QueueStats::for_queue(sqs.clone(), consumer.queue()).start()?;
//! if let Some(counts) = stats.counts("orders") {
//!     println!("{} visible, {} in flight", counts.visible, counts.in_flight);
//! }
//!
//! // As the `redrive.queue.depth`, `redrive.queue.in_flight` and `redrive.queue.delayed`
//! // gauges of redrive-middleware.
//! use redrive_middleware::metrics::{MetricsLayer, QueueReading};
//! let metrics = MetricsLayer::new(&opentelemetry::global::meter("orders-consumer"));
//! for figures in stats.snapshot() {
//!     let (stats, name) = (stats.clone(), figures.queue.clone());
//!     metrics.observe_queue(redrive_sqs::SYSTEM, figures.queue, move || {
//!         let c = stats.counts(&name)?;
//!         Some(QueueReading::new(c.visible).with_in_flight(c.in_flight).with_delayed(c.delayed))
//!     });
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Cheap to read**: the poller keeps the last figures in memory; [`snapshot`](QueueStats::snapshot)
//!   and [`counts`](QueueStats::counts) copy them out under a short lock and never wait
//!   for SQS. Figures are as old as the [interval](QueueStatsBuilder::interval) (15 s by
//!   default) at most, while SQS answers. SQS's figures are themselves approximate (its
//!   attributes are named `ApproximateNumberOf…`).
//! - **Absent, never wrong**: a queue SQS does not have ([`QueueStatus::NotFound`]),
//!   refuses to show ([`QueueStatus::Refused`]) or cannot be asked about
//!   ([`QueueStatus::Unavailable`]) has no [`counts`](QueueFigures::counts): the figures
//!   of a read that failed are dropped, not kept as if they were current.
//! - **Keeps going**: neither a missing queue nor an unreachable endpoint ends the
//!   poller; it asks again at the next interval. Each change of a queue's status is
//!   logged once (missing, refused or unavailable at warn; its return at info), not on
//!   every tick.
//! - **Bounded**: each queue's read (its URL looked up once, then `GetQueueAttributes`)
//!   takes at most the [timeout](QueueStatsBuilder::timeout) (5 s by default), the SDK's
//!   own retries included.
//! - **Stops**: when the last clone of the [`QueueStats`] is dropped, or at
//!   [`stop`](QueueStats::stop), the poller ends at once; it never holds the runtime open.
//! - **One request per queue per interval**: `GetQueueAttributes` for the three counts
//!   only, on the [`Sqs`] handle's client (its endpoint, region and credentials).

// One file per job (a comment, as this module's docs are for users):
// - `mod.rs`: the handle and the figures it hands out.
// - `builder.rs`: the settings, checked when the poller starts.
// - `poll.rs`: the background task that reads.
mod builder;
mod poll;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

pub use builder::QueueStatsBuilder;

use crate::{QueueInfo, Sqs};

/// Reads the messages visible, in flight and delayed of a few queues every interval;
/// see the [module docs](self). Clones share the poller, which stops when the last clone
/// is dropped or at [`stop`](Self::stop).
#[derive(Clone)]
pub struct QueueStats {
    inner: Arc<Inner>,
}

/// What the handles share; dropping it (the last handle) stops the poller.
struct Inner {
    figures: Arc<Mutex<Vec<QueueFigures>>>,
    stop: watch::Sender<bool>,
}

impl QueueStats {
    /// A poller of `queues` (names or URLs) through `sqs`, with the defaults of
    /// [`QueueStatsBuilder`]; start it with [`QueueStatsBuilder::start`].
    pub fn builder<Q>(sqs: Sqs, queues: impl IntoIterator<Item = Q>) -> QueueStatsBuilder
    where
        Q: Into<String>,
    {
        QueueStatsBuilder::new(sqs, queues.into_iter().map(Into::into).collect())
    }

    /// A poller of the queue `info` describes (as [`SqsConsumer::queue`](crate::SqsConsumer::queue)
    /// or [`Sqs::queue_info`] give it) under the name it was given, and of the
    /// dead-letter queue its redrive policy names, if it has one, under that queue's
    /// name (the last part of its ARN, looked up in the account and region of `sqs`).
    pub fn for_queue(sqs: Sqs, info: &QueueInfo) -> QueueStatsBuilder {
        let mut queues = vec![info.name.to_string()];
        queues.extend(
            info.redrive_policy
                .as_ref()
                .and_then(|p| p.dead_letter_target_arn.rsplit(':').next())
                .filter(|name| !name.is_empty())
                .map(str::to_owned),
        );
        QueueStatsBuilder::new(sqs, queues)
    }

    /// The last figures of every queue, in the order they were given (queues given
    /// twice are read once).
    pub fn snapshot(&self) -> Vec<QueueFigures> {
        self.inner.figures().clone()
    }

    /// The last counts of `queue` (as it was given: a name or a URL), or `None` when it
    /// is not polled or its last read failed (see [`QueueFigures::counts`]).
    pub fn counts(&self, queue: &str) -> Option<QueueCounts> {
        self.inner
            .figures()
            .iter()
            .find(|f| f.queue == queue)
            .and_then(|f| f.counts)
    }

    /// Stops the poller of every clone; it ends at once. The figures stay as they were
    /// last read.
    pub fn stop(&self) {
        self.inner.stop.send_replace(true);
    }

    /// Whether the poller has ended (after [`stop`](Self::stop)).
    pub fn is_stopped(&self) -> bool {
        self.inner.stop.is_closed()
    }
}

impl Inner {
    fn figures(&self) -> std::sync::MutexGuard<'_, Vec<QueueFigures>> {
        // The poller writes whole values; a panic cannot leave one half-written.
        self.figures.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for QueueStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueStats")
            .field("figures", &*self.inner.figures())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

/// One queue's figures in a [`QueueStats::snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueFigures {
    /// The queue, as it was given (a name or a URL).
    pub queue: String,
    /// The status of the last read.
    pub status: QueueStatus,
    /// The counts of the last read, `Some` only when it succeeded
    /// ([`QueueStatus::Read`]).
    pub counts: Option<QueueCounts>,
}

/// What SQS said about a queue at the last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueStatus {
    /// Not read yet.
    Pending,
    /// Read: the counts are SQS's at that time.
    Read,
    /// SQS has no such queue.
    NotFound,
    /// SQS refused to tell (access denied, a KMS key the credentials cannot use); the
    /// warning logged says why.
    Refused,
    /// SQS could not be asked, or did not answer within the timeout, or answered without
    /// the counts; the warning logged says why. The poller asks again at the next
    /// interval.
    Unavailable,
}

/// A queue's counts, as `GetQueueAttributes` returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCounts {
    /// Messages visible, ready to be received (`ApproximateNumberOfMessages`).
    pub visible: u64,
    /// Messages received and neither deleted nor visible again yet
    /// (`ApproximateNumberOfMessagesNotVisible`).
    pub in_flight: u64,
    /// Messages sent with a delay that has not passed yet
    /// (`ApproximateNumberOfMessagesDelayed`).
    pub delayed: u64,
    /// When SQS answered.
    pub read_at: SystemTime,
}

/// The settings the poller runs with, checked by the builder.
#[derive(Clone, Debug)]
struct Config {
    sqs: Sqs,
    queues: Vec<String>,
    interval: Duration,
    timeout: Duration,
}
