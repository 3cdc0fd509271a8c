//! [`QueueStats`]: the broker's own figures for a few queues (messages ready, consumers),
//! read every interval with a passive `queue.declare`, for gauges and health checks.
//!
//! ```
//! use std::time::Duration;
//! use redrive_rabbitmq::{QueueStats, Topology};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let url = std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.into());
//! let topology = Topology::new("redrive-doc-stats").with_dead_letter_queue("redrive-doc-stats-dlq");
//! let connection = redrive_rabbitmq::connect(&url, "redrive-doc").await?;
//! topology.declare(&connection).await?;
//!
//! // The queue and its dead-letter queue, read every second.
//! let stats = QueueStats::for_topology(&url, &topology)
//!     .interval(Duration::from_secs(1))
//!     .start()?;
//! tokio::time::sleep(Duration::from_millis(500)).await;
//! if let Some(counts) = stats.counts("redrive-doc-stats-dlq") {
//!     println!("{} dead letters, read at {:?}", counts.ready, counts.read_at);
//! }
//!
//! // As the `redrive.queue.depth` and `redrive.queue.consumers` gauges of redrive-middleware.
//! use redrive_middleware::metrics::{MetricsLayer, QueueReading};
//! let metrics = MetricsLayer::new(&opentelemetry::global::meter("orders-consumer"));
//! for queue in [topology.queue(), "redrive-doc-stats-dlq"] {
//!     let (stats, name) = (stats.clone(), queue.to_owned());
//!     metrics.observe_queue(redrive_rabbitmq::SYSTEM, queue, move || {
//!         let counts = stats.counts(&name)?;
//!         Some(QueueReading::new(counts.ready.into()).with_consumers(counts.consumers.into()))
//!     });
//! }
//! // The gauges hold clones, so the poller runs as long as the meter provider: stop it.
//! stats.stop();
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Cheap to read**: the poller keeps the last figures in memory; [`snapshot`](QueueStats::snapshot)
//!   and [`counts`](QueueStats::counts) copy them out under a short lock and never wait
//!   for the broker. Figures are as old as the [interval](QueueStatsBuilder::interval)
//!   (15 s by default) at most, while the broker answers.
//! - **Absent, never wrong**: a queue the broker does not have ([`QueueStatus::NotFound`]),
//!   refuses to show ([`QueueStatus::Refused`]) or cannot be asked about
//!   ([`QueueStatus::Disconnected`]) has no [`counts`](QueueFigures::counts): the figures
//!   of a read that failed are dropped, not kept as if they were current.
//! - **Keeps going**: neither a missing queue nor a lost connection ends the poller. A
//!   passive declare of a missing queue makes the broker close the channel; the poller
//!   opens another. A lost connection is opened again after a backoff ([`Reconnect`]).
//!   Each change of a queue's status is logged once (a queue missing or refused, or the
//!   connection lost, at warn; its return at info), not on every tick.
//! - **Bounded**: connecting, opening a channel, each declare and closing each take at
//!   most the [timeout](QueueStatsBuilder::timeout) (5 s by default); a declare the
//!   broker does not answer in time counts as a lost connection.
//! - **Stops**: when the last clone of the [`QueueStats`] is dropped, or at
//!   [`stop`](QueueStats::stop), the poller closes its connection (within the timeout)
//!   and ends; it never holds the runtime open.
//! - **Its own connection**: the poller never shares a consumer's connection or
//!   channel, so a queue that is missing cannot close a channel that carries deliveries.

// One file per job (a comment, as this module's docs are for users):
// - `mod.rs`: the handle and the figures it hands out.
// - `builder.rs`: the settings, checked when the poller starts.
// - `poll.rs`: the background task that connects and reads.
mod builder;
mod poll;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::watch;

pub use builder::QueueStatsBuilder;

use crate::Reconnect;
use crate::topology::Topology;

/// Reads messages ready and consumers of a few queues every interval, on a connection
/// of its own; see the [module docs](self). Clones share the poller, which stops when
/// the last clone is dropped or at [`stop`](Self::stop).
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
    /// A poller of `queues` on the broker at `url`, with the defaults of
    /// [`QueueStatsBuilder`]; start it with [`QueueStatsBuilder::start`].
    pub fn builder<Q>(
        url: impl Into<String>,
        queues: impl IntoIterator<Item = Q>,
    ) -> QueueStatsBuilder
    where
        Q: Into<String>,
    {
        QueueStatsBuilder::new(url.into(), queues.into_iter().map(Into::into).collect())
    }

    /// A poller of `topology`'s queue, its dead-letter queue if it has one, and its
    /// delay queues. Delay queues are declared when a delay first needs them, so those
    /// not declared yet are [`QueueStatus::NotFound`] and logged at debug only; the queue
    /// and its dead-letter queue are logged at warn when missing.
    pub fn for_topology(url: impl Into<String>, topology: &Topology) -> QueueStatsBuilder {
        let mut queues = vec![topology.queue().to_owned()];
        queues.extend(topology.dead_letter_queue().map(str::to_owned));
        QueueStatsBuilder::new(url.into(), queues).optional_queues(topology.delay_queues())
    }

    /// The last figures of every queue, in the order they were given (queues given
    /// twice are read once).
    pub fn snapshot(&self) -> Vec<QueueFigures> {
        self.inner.figures().clone()
    }

    /// The last counts of `queue`, or `None` when it is not polled or its last read
    /// failed (see [`QueueFigures::counts`]).
    pub fn counts(&self, queue: &str) -> Option<QueueCounts> {
        self.inner
            .figures()
            .iter()
            .find(|f| f.queue == queue)
            .and_then(|f| f.counts)
    }

    /// Stops the poller of every clone: it closes its connection (within the timeout)
    /// and ends. The figures stay as they were last read.
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
    /// The queue.
    pub queue: String,
    /// The status of the last read.
    pub status: QueueStatus,
    /// The counts of the last read, `Some` only when it succeeded
    /// ([`QueueStatus::Read`]).
    pub counts: Option<QueueCounts>,
}

/// What the broker said about a queue at the last read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QueueStatus {
    /// Not read yet: the poller is connecting.
    Pending,
    /// Read: the counts are the broker's at that time.
    Read,
    /// The broker has no such queue (`NOT_FOUND`).
    NotFound,
    /// The broker refused to tell (`ACCESS_REFUSED`, or an exclusive queue of another
    /// connection); the warning logged says which.
    Refused,
    /// The poller has no connection to the broker; it is reconnecting.
    Disconnected,
}

/// A queue's counts, as a passive `queue.declare` returns them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueCounts {
    /// Messages ready for delivery (not those delivered and unacknowledged).
    pub ready: u32,
    /// Consumers on the queue.
    pub consumers: u32,
    /// When the broker answered.
    pub read_at: SystemTime,
}

/// The settings the poller runs with, checked by the builder.
#[derive(Clone, Debug)]
struct Config {
    url: String,
    /// Each queue once, and whether it may be missing without a warning.
    queues: Vec<(String, bool)>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
    reconnect: Reconnect,
    connection_name: String,
}
