//! What a running Worker is doing, for liveness and readiness probes: [`Health`].

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A handle on a Worker's state, from [`Worker::health`](super::Worker::health): cheap
/// to clone, read from any thread while the Worker runs, and kept valid after it stops.
///
/// The Worker writes a few counters as it goes (no lock, no allocation); a probe reads
/// them with [`report`](Health::report), [`is_live`](Health::is_live) and
/// [`is_ready`](Health::is_ready).
///
/// ```
/// use std::time::Duration;
/// use redrive_core::memory::MemoryBroker;
/// use redrive_core::worker::Phase;
/// use redrive_core::{handler_fn, Message, Worker};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let broker = MemoryBroker::new();
/// let worker = Worker::builder(broker.consumer("orders"))
///     .handler(handler_fn(|_: Message| async { Ok::<_, std::io::Error>(()) }))
///     .build()?;
/// let health = worker.health();
/// assert_eq!(health.report().phase, Phase::NotStarted);
///
/// worker.run_until(tokio::time::sleep(Duration::from_millis(10))).await;
/// assert_eq!(health.report().phase, Phase::Stopped);
/// assert!(!health.is_live());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    /// The Worker's name, set when it is built.
    name: OnceLock<Box<str>>,
    /// The zero of `last_received`.
    epoch: Instant,
    phase: AtomicU8,
    received: AtomicU64,
    /// Nanoseconds from `epoch` to the last receive, plus one; 0: none yet.
    last_received: AtomicU64,
    receive_failures: AtomicU32,
    in_flight: AtomicUsize,
    parked: AtomicUsize,
    waiting: AtomicUsize,
}

/// Where a Worker is in its life, as [`HealthReport::phase`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Built, not yet run.
    NotStarted,
    /// Taking deliveries from the consumer.
    Consuming,
    /// Intake stopped (a shutdown, the consumer closed, the service failed): finishing
    /// or handing back what it holds.
    Draining,
    /// Its run ended, or its future was dropped.
    Stopped,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::NotStarted,
        Phase::Consuming,
        Phase::Draining,
        Phase::Stopped,
    ];

    /// The phase's name in lower case: `not_started`, `consuming`, `draining`,
    /// `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::NotStarted => "not_started",
            Phase::Consuming => "consuming",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Worker's state at one moment, from [`Health::report`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Where the Worker is in its life.
    pub phase: Phase,
    /// Deliveries taken from the consumer so far.
    pub received: u64,
    /// Time since the last delivery was taken; `None` before the first. A quiet queue
    /// is not a fault: compare with the broker's backlog (a queue depth gauge) to tell
    /// a stalled consumer from an idle one.
    pub since_last_received: Option<Duration>,
    /// Receives that failed in a row, up to now (0 once one succeeds): the broker is
    /// unreachable or refusing the consumer while this grows.
    pub receive_failures: u32,
    /// Handler calls holding a concurrency slot. A call that ends while the Worker
    /// waits for the broker gives its slot back when the Worker next turns (the next
    /// delivery, say), and is counted until then: an idle Worker can read a few.
    pub in_flight: usize,
    /// Failed messages the Worker holds until their next attempt.
    pub parked: usize,
    /// Messages waiting behind a busy ordering key.
    pub waiting: usize,
}

impl Health {
    pub(super) fn new() -> Self {
        Health {
            inner: Arc::new(Inner {
                name: OnceLock::new(),
                epoch: Instant::now(),
                phase: AtomicU8::new(Phase::NotStarted as u8),
                received: AtomicU64::new(0),
                last_received: AtomicU64::new(0),
                receive_failures: AtomicU32::new(0),
                in_flight: AtomicUsize::new(0),
                parked: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    /// The Worker's name (`WorkerBuilder::name`; `redrive` by default).
    pub fn worker_name(&self) -> &str {
        self.inner.name.get().map_or("redrive", |n| n)
    }

    pub(super) fn named(&self, name: &str) {
        let _ = self.inner.name.set(name.into());
    }

    /// The Worker's state now.
    pub fn report(&self) -> HealthReport {
        let inner = &*self.inner;
        let last = inner.last_received.load(Relaxed);
        HealthReport {
            phase: self.phase(),
            received: inner.received.load(Relaxed),
            since_last_received: (last > 0).then(|| {
                let at = inner.epoch + Duration::from_nanos(last - 1);
                Instant::now().saturating_duration_since(at)
            }),
            receive_failures: inner.receive_failures.load(Relaxed),
            in_flight: inner.in_flight.load(Relaxed),
            parked: inner.parked.load(Relaxed),
            waiting: inner.waiting.load(Relaxed),
        }
    }

    /// For a liveness probe: false once the Worker has stopped, for whatever reason (a
    /// process whose Worker stopped without the process exiting does no work and should
    /// be restarted). A Worker not yet started is live.
    pub fn is_live(&self) -> bool {
        self.phase() != Phase::Stopped
    }

    /// For a readiness probe: true while the Worker takes deliveries and its last
    /// receive succeeded. A circuit breaker's state, or a backlog, are the
    /// application's to add: the metrics example shows one way.
    pub fn is_ready(&self) -> bool {
        self.phase() == Phase::Consuming && self.inner.receive_failures.load(Relaxed) == 0
    }

    fn phase(&self) -> Phase {
        let raw = self.inner.phase.load(Relaxed);
        Phase::ALL
            .into_iter()
            .find(|p| *p as u8 == raw)
            .unwrap_or(Phase::Stopped)
    }

    pub(super) fn set_phase(&self, phase: Phase) {
        self.inner.phase.store(phase as u8, Relaxed);
    }

    /// One delivery taken.
    #[inline]
    pub(super) fn received(&self) {
        let inner = &*self.inner;
        inner.received.fetch_add(1, Relaxed);
        let nanos = u64::try_from(inner.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        inner.last_received.store(nanos + 1, Relaxed);
    }

    #[inline]
    pub(super) fn receive_failures(&self, in_a_row: u32) {
        self.inner.receive_failures.store(in_a_row, Relaxed);
    }

    /// The Worker's counts at the top of a turn of its loop.
    #[inline]
    pub(super) fn counts(&self, in_flight: usize, parked: usize, waiting: usize) {
        let inner = &*self.inner;
        inner.in_flight.store(in_flight, Relaxed);
        inner.parked.store(parked, Relaxed);
        inner.waiting.store(waiting, Relaxed);
    }
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("worker", &self.worker_name())
            .field("report", &self.report())
            .finish()
    }
}

/// Marks the Worker stopped when its run ends, however it ends: the future returning
/// or being dropped.
pub(super) struct StoppedOnDrop(pub(super) Health);

impl Drop for StoppedOnDrop {
    fn drop(&mut self) {
        self.0.set_phase(Phase::Stopped);
    }
}
