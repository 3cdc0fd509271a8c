//! A circuit breaker that pauses intake while a downstream keeps failing: while it is
//! open, `poll_ready` is pending, so the Worker stops taking messages and they wait in
//! the broker instead of burning their redeliveries.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message};
//! use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::default()
//!         .with_consecutive_failures(3)
//!         .with_open_for(Duration::from_secs(10))
//!         // Each failure answers at once here; by default the one that trips the
//!         // breaker would be held and run again when it lets calls through.
//!         .without_hold(),
//! )?;
//! let breaker = layer.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(handler::handler_fn(|_msg: Message| async {
//!         Err::<(), BoxError>("connection refused".into())
//!     }));
//!
//! for _ in 0..3 {
//!     let _ = service.ready().await?.call(Message::new("x")).await;
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! // Intake is paused for the open period, then one probe goes through.
//! let ready = tokio::time::timeout(Duration::from_secs(9), service.ready()).await;
//! assert!(ready.is_err());
//! service.ready().await?;
//! assert_eq!(breaker.state(), CircuitState::HalfOpen);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **What counts**: only errors the [`Classifier`] calls transient are failures. A
//!   permanent error (a poison message) says nothing about the downstream: it is
//!   neither a failure nor a success, so poison messages never trip the breaker.
//! - **Tripping**: after `consecutive_failures` transient failures in a row, or when
//!   the failure rate over the sliding window reaches the threshold with at least
//!   `min_calls` calls in it (each trigger is optional; at least one is on).
//! - **Open**: `poll_ready` is pending, and wakes by itself when the open period ends
//!   (a timer in the service). Nothing is rejected: messages stay in the broker.
//!   Calls admitted before the breaker opened run to their end; their results no
//!   longer count.
//! - **Half-open**: `half_open_probes` calls are let through; when all of them
//!   succeed the breaker closes, when one fails it opens again. Other callers wait in
//!   `poll_ready` and are woken when the probes end. A probe that is dropped (or ends
//!   with a permanent error) gives its place to the next caller.
//! - **Shared**: the state belongs to the layer; every service it builds, and every
//!   clone, sees and feeds the same breaker. [`CircuitHandle::state`] reads it, and
//!   [`OnCircuitOpen`] hears every change.
//!
//! - **Held, not dead-lettered**: a call that fails while the breaker opens (the
//!   failure that trips it, a failed probe, a call that was running) does not go up:
//!   its message is held and run again when the breaker lets a call through, for up
//!   to `max_hold` (15 min). An outage shorter than that uses none of the messages'
//!   delivery attempts, so the dead-letter layer never sees them; intake is paused
//!   meanwhile, so the rest wait in the broker. [`CircuitHandle::held`] counts them.
//!   At shutdown a held message goes up with its last error.
//!
//! # Order
//! Outside the retry layer: the breaker counts a delivery attempt's final result, so
//! retries that rescue a message do not count as failures. Outside idempotency, so an
//! unreachable store trips it too (a key held by another consumer is not a failure),
//! and inside dead letter, which never sees a held message.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use redrive_core::delivery::BoxFuture;
use redrive_core::{BoxError, Classifier, Message, Shutdown};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls flow; failures are counted.
    Closed,
    /// Calls wait in `poll_ready` until the open period ends.
    Open,
    /// A few probe calls are let through to test the downstream.
    HalfOpen,
}

impl CircuitState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Trip on a failure rate over a sliding window.
///
/// | setting | default |
/// |---|---|
/// | `threshold` | 0.5 (half the calls failed) |
/// | `window` | 30 s (sliding, in tenths) |
/// | `min_calls` | 20 calls in the window before the rate counts |
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    threshold: f64,
    window: Duration,
    min_calls: u32,
}

impl Default for FailureRate {
    fn default() -> Self {
        FailureRate {
            threshold: 0.5,
            window: Duration::from_secs(30),
            min_calls: 20,
        }
    }
}

impl FailureRate {
    /// Trips when at least `threshold` (above 0, at most 1) of the calls in the window
    /// failed.
    pub fn new(threshold: f64) -> Self {
        FailureRate {
            threshold,
            ..Self::default()
        }
    }

    /// Sets the sliding window (at least 10 ms).
    #[must_use]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets how many calls the window must hold before the rate can trip the breaker
    /// (at least 1).
    #[must_use]
    pub fn with_min_calls(mut self, n: u32) -> Self {
        self.min_calls = n;
        self
    }
}

/// The circuit breaker's settings, checked by [`CircuitBreakerLayer::new`].
///
/// | setting | default |
/// |---|---|
/// | `consecutive_failures` | 5 transient failures in a row trip it |
/// | `failure_rate` | off ([`FailureRate::default`] when turned on) |
/// | `open_for` | 30 s |
/// | `half_open_probes` | 1 |
/// | `max_hold` (how long a message that failed as the breaker opened is held) | 15 min |
/// | `classifier` | [`Classifier::default`] (markers only) |
#[derive(Clone, Debug)]
pub struct CircuitBreakerConfig {
    consecutive_failures: Option<u32>,
    failure_rate: Option<FailureRate>,
    open_for: Duration,
    half_open_probes: u32,
    max_hold: Option<Duration>,
    classifier: Classifier,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            consecutive_failures: Some(5),
            failure_rate: None,
            open_for: Duration::from_secs(30),
            half_open_probes: 1,
            max_hold: Some(DEFAULT_MAX_HOLD),
            classifier: Classifier::default(),
        }
    }
}

/// The default `max_hold`: below RabbitMQ's default consumer timeout (30 min), after
/// which the broker would take a held delivery back.
const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(15 * 60);

impl CircuitBreakerConfig {
    /// Trips after `n` transient failures in a row (at least 1).
    #[must_use]
    pub fn with_consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = Some(n);
        self
    }

    /// Does not trip on failures in a row (then a failure rate must be set).
    #[must_use]
    pub fn without_consecutive_failures(mut self) -> Self {
        self.consecutive_failures = None;
        self
    }

    /// Also trips on a failure rate over a sliding window.
    #[must_use]
    pub fn with_failure_rate(mut self, rate: FailureRate) -> Self {
        self.failure_rate = Some(rate);
        self
    }

    /// Sets how long the breaker stays open before it lets probes through.
    #[must_use]
    pub fn with_open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// Sets how many probes a half-open breaker lets through, all of which must
    /// succeed for it to close (at least 1).
    #[must_use]
    pub fn with_half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    /// Holds a message that failed as the breaker opened (or failed as a probe) for up
    /// to `max_hold`, running it again whenever the breaker lets a call through, so an
    /// outage shorter than `max_hold` uses none of its delivery attempts. Past
    /// `max_hold` the error goes up, using one attempt; then the message comes back and
    /// may be held again. Keep it below any limit the broker puts on an unsettled
    /// delivery (RabbitMQ's `consumer_timeout`, 30 min by default).
    #[must_use]
    pub fn with_max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = Some(max_hold);
        self
    }

    /// Never holds a message: a failure goes up at once, using one delivery attempt,
    /// even while the breaker is open.
    #[must_use]
    pub fn without_hold(mut self) -> Self {
        self.max_hold = None;
        self
    }

    /// Classifies errors with `classifier` (use the one the rest of the stack uses).
    #[must_use]
    pub fn with_classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures == Some(0) {
            return Err(ConfigError(
                "`consecutive_failures` is 0; set it to 1 or more, or turn it off with \
                 `without_consecutive_failures`"
                    .into(),
            ));
        }
        if let Some(rate) = &self.failure_rate {
            if !(rate.threshold.is_finite() && rate.threshold > 0.0 && rate.threshold <= 1.0) {
                return Err(ConfigError(format!(
                    "the failure-rate threshold is {}; set it above 0.0 and at most 1.0 \
                     (0.5 trips when half the calls fail)",
                    rate.threshold
                )));
            }
            if rate.window < MIN_WINDOW {
                return Err(ConfigError(format!(
                    "the failure-rate window is {:?}; set it to {MIN_WINDOW:?} or more",
                    rate.window
                )));
            }
            if rate.min_calls == 0 {
                return Err(ConfigError(
                    "the failure rate's `min_calls` is 0; set it to 1 or more so one \
                     failed call cannot trip the breaker alone"
                        .into(),
                ));
            }
        }
        if self.consecutive_failures.is_none() && self.failure_rate.is_none() {
            return Err(ConfigError(
                "nothing can trip the breaker; set `consecutive_failures` or a failure rate".into(),
            ));
        }
        if self.open_for.is_zero() {
            return Err(ConfigError(
                "`open_for` is 0, so the breaker would never pause; set it to how long the \
                 downstream needs to recover, e.g. 30 s"
                    .into(),
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError(
                "`half_open_probes` is 0, so the breaker could never close again; set it to \
                 1 or more"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A circuit breaker configuration that cannot work; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid circuit breaker configuration: {}", self.0)
    }
}

impl StdError for ConfigError {}

/// Why the breaker opened.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum OpenReason {
    /// This many transient failures came in a row.
    ConsecutiveFailures(u32),
    /// This share of the calls in the window failed.
    FailureRate {
        /// Failed calls / calls.
        rate: f64,
        /// Calls in the window.
        calls: u64,
    },
    /// A half-open probe failed.
    ProbeFailed,
}

impl fmt::Display for OpenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenReason::ConsecutiveFailures(n) => write!(f, "{n} transient failures in a row"),
            OpenReason::FailureRate { rate, calls } => {
                write!(f, "{:.0} % of {calls} calls failed", rate * 100.0)
            }
            OpenReason::ProbeFailed => f.write_str("a half-open probe failed"),
        }
    }
}

/// The breaker opened, as [`OnCircuitOpen`] sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct CircuitOpen {
    /// Why.
    pub reason: OpenReason,
    /// How long it stays open before probing.
    pub open_for: Duration,
}

/// Called when the breaker opens, and on every state change. Implemented for `()`
/// (nothing) and for closures `Fn(&CircuitOpen)` (which hear openings only).
///
/// Called outside the breaker's lock; keep it short, it runs on the caller's task.
///
/// ```
/// use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen};
///
/// let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::default())?
///     .on_circuit_open(|event: &CircuitOpen| {
///         tracing::warn!(reason = %event.reason, open_for = ?event.open_for, "circuit opened; intake paused");
///     });
/// # let _ = layer;
/// # Ok::<(), redrive_middleware::circuit_breaker::ConfigError>(())
/// ```
pub trait OnCircuitOpen: Send + Sync + 'static {
    /// The breaker opened (from closed, or from half-open when a probe failed).
    fn on_circuit_open(&self, event: &CircuitOpen);

    /// The breaker went from `from` to `to`. Does nothing unless overridden.
    fn on_state_change(&self, from: CircuitState, to: CircuitState) {
        let _ = (from, to);
    }
}

impl OnCircuitOpen for () {
    fn on_circuit_open(&self, _: &CircuitOpen) {}
}

impl<F> OnCircuitOpen for F
where
    F: Fn(&CircuitOpen) + Send + Sync + 'static,
{
    fn on_circuit_open(&self, event: &CircuitOpen) {
        self(event)
    }
}

const MIN_WINDOW: Duration = Duration::from_millis(10);
const BUCKETS: usize = 10;

#[derive(Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    calls: u64,
    failures: u64,
}

/// Calls and failures over a sliding window, in `BUCKETS` buckets.
struct RateWindow {
    bucket_len: Duration,
    buckets: [Bucket; BUCKETS],
}

impl RateWindow {
    fn new(window: Duration) -> Self {
        RateWindow {
            bucket_len: window / BUCKETS as u32,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Records a call at `since` (time since the breaker was made); returns the calls
    /// and failures now in the window.
    fn record(&mut self, since: Duration, failed: bool) -> (u64, u64) {
        // Slot 0 is never current, so zeroed buckets read as stale.
        let slot = u64::try_from(since.as_nanos() / self.bucket_len.as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failures += u64::from(failed);
        self.buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < BUCKETS as u64)
            .fold((0, 0), |(c, f), b| (c + b.calls, f + b.failures))
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { issued: u32, succeeded: u32 },
}

impl Phase {
    fn state(self) -> CircuitState {
        match self {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

struct Inner {
    phase: Phase,
    /// Bumped on every state change; results of calls admitted under an older
    /// generation no longer count.
    generation: u64,
    window: Option<RateWindow>,
    /// Callers waiting for a half-open probe slot.
    waiters: Vec<Waker>,
}

/// A state change to report once the lock is released.
struct Change {
    from: CircuitState,
    to: CircuitState,
    opened: Option<CircuitOpen>,
    wake: Vec<Waker>,
}

struct Core {
    config: CircuitBreakerConfig,
    origin: Instant,
    hook: Box<dyn OnCircuitOpen>,
    inner: Mutex<Inner>,
    /// The closed breaker's fast path, read without the lock: `generation << 1 |
    /// CLOSED` while closed, the generation alone otherwise. Written under the lock at
    /// every state change, so admitting a call and counting a success while closed
    /// (every message, when the downstream is healthy) take no lock.
    closed: AtomicU64,
    /// Transient failures in a row. Failures count under the lock; a success resets
    /// it without one. A success that raced a failure may erase it, as if it had come
    /// just after; one held up across state changes may clear failures of a later
    /// closed period. Either way a trip comes at most one run of failures later.
    consecutive: AtomicU32,
    /// Messages held while the breaker is open.
    held: AtomicU64,
}

/// The flag in [`Core::closed`] set while the breaker is closed.
const CLOSED: u64 = 1;

enum Admit {
    Closed(u64),
    Probe(u64),
    Wait(Instant),
    Blocked,
}

/// How a call ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    /// A permanent error: says nothing about the downstream.
    Ignored,
}

impl Core {
    fn new(config: CircuitBreakerConfig, hook: Box<dyn OnCircuitOpen>) -> Self {
        let window = config.failure_rate.map(|r| RateWindow::new(r.window));
        Core {
            config,
            origin: Instant::now(),
            hook,
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                generation: 0,
                window,
                waiters: Vec::new(),
            }),
            closed: AtomicU64::new(CLOSED),
            consecutive: AtomicU32::new(0),
            held: AtomicU64::new(0),
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) & CLOSED != 0
    }

    /// How a call's result counts: transient errors are failures, except one that says
    /// another consumer holds the message's idempotency key (a busy key says nothing
    /// about the downstream); permanent errors say nothing either.
    fn outcome<T>(&self, result: &Result<T, BoxError>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) if self.config.classifier.classify(&**e).is_permanent() => Outcome::Ignored,
            #[cfg(feature = "idempotency")]
            Err(e) if crate::idempotency::KeyReserved::find(&**e).is_some() => Outcome::Ignored,
            Err(_) => Outcome::Failure,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report(&self, change: Option<Change>) {
        let Some(change) = change else { return };
        match &change.opened {
            Some(open) => tracing::warn!(
                reason = %open.reason, open_for = ?open.open_for,
                "circuit breaker opened; intake paused"
            ),
            None => {
                tracing::info!(from = %change.from, to = %change.to, "circuit breaker state changed")
            }
        }
        if let Some(open) = &change.opened {
            self.hook.on_circuit_open(open);
        }
        self.hook.on_state_change(change.from, change.to);
        change.wake.into_iter().for_each(Waker::wake);
    }

    fn transition(&self, inner: &mut Inner, to: Phase, opened: Option<CircuitOpen>) -> Change {
        let from = inner.phase.state();
        inner.phase = to;
        inner.generation += 1;
        let flag = if matches!(to, Phase::Closed) {
            CLOSED
        } else {
            0
        };
        self.closed
            .store(inner.generation << 1 | flag, Ordering::Release);
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(w) = &mut inner.window {
            w.clear();
        }
        Change {
            from,
            to: to.state(),
            opened,
            wake: std::mem::take(&mut inner.waiters),
        }
    }

    fn open(&self, inner: &mut Inner, reason: OpenReason) -> Change {
        let open_for = self.config.open_for;
        let until = Instant::now() + open_for;
        self.transition(
            inner,
            Phase::Open { until },
            Some(CircuitOpen { reason, open_for }),
        )
    }

    /// Moves an open breaker whose period has ended to half-open.
    fn advance(&self, inner: &mut Inner) -> Option<Change> {
        match inner.phase {
            Phase::Open { until } if until <= Instant::now() => Some(self.transition(
                inner,
                Phase::HalfOpen {
                    issued: 0,
                    succeeded: 0,
                },
                None,
            )),
            _ => None,
        }
    }

    fn admit(&self, waker: &Waker) -> Admit {
        let word = self.closed.load(Ordering::Acquire);
        if word & CLOSED != 0 {
            return Admit::Closed(word >> 1);
        }
        let mut inner = self.lock();
        let change = self.advance(&mut inner);
        let admit = match &mut inner.phase {
            Phase::Closed => Admit::Closed(inner.generation),
            Phase::Open { until } => Admit::Wait(*until),
            Phase::HalfOpen { issued, .. } if *issued < self.config.half_open_probes => {
                *issued += 1;
                Admit::Probe(inner.generation)
            }
            Phase::HalfOpen { .. } => {
                if !inner.waiters.iter().any(|w| w.will_wake(waker)) {
                    inner.waiters.push(waker.clone());
                }
                Admit::Blocked
            }
        };
        drop(inner);
        self.report(change);
        admit
    }

    fn record(&self, generation: u64, outcome: Outcome) {
        // Closed and still of this call's generation: a success (with no failure-rate
        // window to count it in) only resets the run of failures, and a permanent error
        // changes nothing.
        if self.closed.load(Ordering::Acquire) == generation << 1 | CLOSED {
            match outcome {
                Outcome::Success if self.config.failure_rate.is_none() => {
                    if self.consecutive.load(Ordering::Relaxed) != 0 {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                    return;
                }
                Outcome::Ignored => return,
                Outcome::Success | Outcome::Failure => {}
            }
        }
        let mut inner = self.lock();
        if generation != inner.generation {
            return;
        }
        let change = match (inner.phase, outcome) {
            (Phase::Closed, Outcome::Ignored) | (Phase::Open { .. }, _) => None,
            (Phase::Closed, Outcome::Success) => {
                self.consecutive.store(0, Ordering::Relaxed);
                if let Some(w) = &mut inner.window {
                    w.record(self.origin.elapsed(), false);
                }
                None
            }
            (Phase::Closed, Outcome::Failure) => {
                let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                let since = self.origin.elapsed();
                let counts = inner.window.as_mut().map(|w| w.record(since, true));
                let reason = if self
                    .config
                    .consecutive_failures
                    .is_some_and(|n| consecutive >= n)
                {
                    Some(OpenReason::ConsecutiveFailures(consecutive))
                } else {
                    match (counts, self.config.failure_rate) {
                        (Some((calls, failures)), Some(r)) if calls >= u64::from(r.min_calls) => {
                            let rate = failures as f64 / calls as f64;
                            (rate >= r.threshold).then_some(OpenReason::FailureRate { rate, calls })
                        }
                        _ => None,
                    }
                };
                reason.map(|reason| self.open(&mut inner, reason))
            }
            (Phase::HalfOpen { issued, succeeded }, Outcome::Success) => {
                if succeeded + 1 >= self.config.half_open_probes {
                    Some(self.transition(&mut inner, Phase::Closed, None))
                } else {
                    inner.phase = Phase::HalfOpen {
                        issued,
                        succeeded: succeeded + 1,
                    };
                    None
                }
            }
            (Phase::HalfOpen { .. }, Outcome::Failure) => {
                Some(self.open(&mut inner, OpenReason::ProbeFailed))
            }
            (Phase::HalfOpen { .. }, Outcome::Ignored) => {
                Self::give_back(&mut inner);
                None
            }
        };
        drop(inner);
        self.report(change);
    }

    /// A probe slot came back unused (its call was dropped, or ended with a
    /// permanent error): the next caller may probe.
    fn release(&self, generation: u64) {
        let mut inner = self.lock();
        if generation == inner.generation {
            Self::give_back(&mut inner);
        }
    }

    fn give_back(inner: &mut Inner) {
        if let Phase::HalfOpen { issued, .. } = &mut inner.phase {
            *issued = issued.saturating_sub(1);
            inner.waiters.drain(..).for_each(Waker::wake);
        }
    }

    fn state(&self) -> CircuitState {
        match self.lock().phase {
            // The next caller will find it half-open.
            Phase::Open { until } if until <= Instant::now() => CircuitState::HalfOpen,
            phase => phase.state(),
        }
    }
}

/// A half-open probe slot; given back if dropped before its result is recorded.
struct Probe {
    core: Arc<Core>,
    generation: u64,
    armed: bool,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.armed {
            self.core.release(self.generation);
        }
    }
}

/// Permission for one call.
enum Ticket {
    Closed(u64),
    Probe(Probe),
}

impl Ticket {
    fn record(self, core: &Core, outcome: Outcome) {
        match self {
            Ticket::Closed(generation) => core.record(generation, outcome),
            Ticket::Probe(mut probe) => {
                probe.armed = false;
                core.record(probe.generation, outcome);
            }
        }
    }
}

/// Reads a breaker's state, for metrics and health checks. Cheap to clone.
#[derive(Clone)]
pub struct CircuitHandle {
    core: Arc<Core>,
}

impl CircuitHandle {
    /// The current state. An open breaker whose open period has ended reads as
    /// half-open: the next caller will probe.
    pub fn state(&self) -> CircuitState {
        self.core.state()
    }

    /// Messages held now, each waiting for the breaker to let it run again.
    pub fn held(&self) -> u64 {
        self.core.held.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for CircuitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitHandle")
            .field("state", &self.state())
            .finish()
    }
}

/// Wraps a service in [`CircuitBreaker`]. Every service it builds, and every clone,
/// shares one breaker.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    core: Arc<Core>,
}

impl CircuitBreakerLayer {
    /// A breaker with `config`, closed.
    ///
    /// # Errors
    /// [`ConfigError`] when `config` cannot work (a threshold of 0, a NaN rate, no
    /// trigger, a zero open period or no probes); the message says what to change.
    pub fn new(config: CircuitBreakerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(CircuitBreakerLayer {
            core: Arc::new(Core::new(config, Box::new(()))),
        })
    }

    /// Calls `hook` when the breaker opens and on every state change. Starts a fresh
    /// breaker with the same settings: call it while building, before the layer is
    /// used.
    #[must_use]
    pub fn on_circuit_open(self, hook: impl OnCircuitOpen) -> Self {
        CircuitBreakerLayer {
            core: Arc::new(Core::new(self.core.config.clone(), Box::new(hook))),
        }
    }

    /// A handle that reads the breaker's state.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            core: self.core.clone(),
        }
    }
}

impl Default for CircuitBreakerLayer {
    /// A breaker with [`CircuitBreakerConfig::default`], closed.
    fn default() -> Self {
        CircuitBreakerLayer {
            core: Arc::new(Core::new(CircuitBreakerConfig::default(), Box::new(()))),
        }
    }
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.core.config)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker {
            inner,
            core: self.core.clone(),
            sleep: None,
            ticket: None,
        }
    }
}

/// Pauses `poll_ready` while the breaker is open. See the [module docs](self).
pub struct CircuitBreaker<S> {
    inner: S,
    core: Arc<Core>,
    /// Wakes this service when the open period ends.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Permission for the next call, taken by `poll_ready`.
    ticket: Option<Ticket>,
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    fn clone(&self) -> Self {
        // A clone is not ready: it takes its own ticket in `poll_ready`.
        CircuitBreaker {
            inner: self.inner.clone(),
            core: self.core.clone(),
            sleep: None,
            ticket: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl<S> CircuitBreaker<S> {
    /// The breaker's current state.
    pub fn state(&self) -> CircuitState {
        self.core.state()
    }

    /// A handle that reads the breaker's state.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            core: self.core.clone(),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Message> for CircuitBreaker<S>
where
    S: Service<Message> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // A probe slot, once taken, is kept until the call; anything else is
            // asked again, so a breaker that opened meanwhile is seen.
            if !matches!(self.ticket, Some(Ticket::Probe(_))) {
                self.ticket = match self.core.admit(cx.waker()) {
                    Admit::Closed(generation) => Some(Ticket::Closed(generation)),
                    Admit::Probe(generation) => Some(Ticket::Probe(Probe {
                        core: self.core.clone(),
                        generation,
                        armed: true,
                    })),
                    Admit::Wait(until) => {
                        let sleep = self
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                        if sleep.deadline() != until {
                            sleep.as_mut().reset(until);
                        }
                        match sleep.as_mut().poll(cx) {
                            Poll::Ready(()) => continue,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Admit::Blocked => return Poll::Pending,
                };
            }
            return self.inner.poll_ready(cx).map_err(Into::into);
        }
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let ticket = self
            .ticket
            .take()
            .expect("CircuitBreaker::call without poll_ready returning Ready first");
        // Kept to run the message again if it fails while the breaker opens: a clone
        // of the service (made ready again before that run) and of the message.
        let hold = self
            .core
            .config
            .max_hold
            .is_some()
            .then(|| (self.inner.clone(), msg.clone()));
        let inner = self.inner.call(msg);
        ResponseFuture {
            state: State::Calling { inner },
            core: self.core.clone(),
            ticket: Some(ticket),
            hold,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`CircuitBreaker`]: the inner call, whose result is counted;
    /// then, for a call that failed as the breaker opened, the message held and run
    /// again once the breaker lets it through.
    pub struct ResponseFuture<F, S>
    where
        S: Service<Message>,
    {
        #[pin]
        state: State<F, S::Response>,
        core: Arc<Core>,
        ticket: Option<Ticket>,
        hold: Option<(S, Message)>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F, R> {
        /// The first run.
        Calling { #[pin] inner: F },
        /// Held while the breaker is open, then run again.
        Holding { fut: BoxFuture<'static, Result<R, BoxError>> },
    }
}

impl<F, S: Service<Message>> fmt::Debug for ResponseFuture<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, S, T, E> Future for ResponseFuture<F, S>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    S: Service<Message, Response = T> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    T: Send + 'static,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { inner } => {
                    let result = std::task::ready!(inner.poll(cx)).map_err(Into::into);
                    let outcome = this.core.outcome(&result);
                    if let Some(ticket) = this.ticket.take() {
                        ticket.record(this.core, outcome);
                    }
                    match result {
                        Err(error) if outcome == Outcome::Failure && !this.core.is_closed() => {
                            let Some((service, msg)) = this.hold.take() else {
                                return Poll::Ready(Err(error));
                            };
                            let fut = hold(this.core.clone(), service, msg, error);
                            this.state.set(State::Holding { fut: Box::pin(fut) });
                        }
                        other => return Poll::Ready(other),
                    }
                }
                StateProj::Holding { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

/// Holds `msg`, which failed with `error` as the breaker opened, until the breaker
/// lets a call through, then runs it again on `service`; again and again while it
/// fails with the breaker open, up to `max_hold`. The delivery stays with this
/// consumer meanwhile, so the outage uses none of its delivery attempts. Gives up,
/// with the last error, at shutdown or past `max_hold`.
async fn hold<S>(
    core: Arc<Core>,
    mut service: S,
    msg: Message,
    mut error: BoxError,
) -> Result<S::Response, BoxError>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    let max_hold = core.config.max_hold.unwrap_or(Duration::MAX);
    let deadline = Instant::now().checked_add(max_hold);
    let shutdown = msg.extensions.get::<Shutdown>().cloned();
    let _held = Held::new(&core);
    tracing::info!(
        error = %redrive_core::text::truncate(&error.to_string(), 1024),
        "the downstream is failing and the circuit breaker is open: the message is held, \
         without using a delivery attempt, until the breaker lets it through"
    );
    loop {
        let give_up = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let stopping = async {
            match &shutdown {
                Some(s) => s.started().await,
                None => std::future::pending().await,
            }
        };
        let ticket = tokio::select! {
            ticket = admitted(&core) => ticket,
            () = give_up => {
                tracing::warn!(
                    ?max_hold,
                    "a message held for max_hold goes back with its error, using one delivery attempt"
                );
                return Err(error);
            }
            () = stopping => return Err(error),
        };
        // Dropping the ticket on an error gives a probe slot back.
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let result = service.call(msg.clone()).await.map_err(Into::into);
        let outcome = core.outcome(&result);
        ticket.record(&core, outcome);
        match result {
            Err(e) if outcome == Outcome::Failure && !core.is_closed() => error = e,
            other => return other,
        }
    }
}

/// Waits until the breaker lets a call through, and takes its ticket.
async fn admitted(core: &Arc<Core>) -> Ticket {
    loop {
        let admit = std::future::poll_fn(|cx| match core.admit(cx.waker()) {
            Admit::Blocked => Poll::Pending,
            other => Poll::Ready(other),
        })
        .await;
        match admit {
            Admit::Closed(generation) => return Ticket::Closed(generation),
            Admit::Probe(generation) => {
                return Ticket::Probe(Probe {
                    core: core.clone(),
                    generation,
                    armed: true,
                });
            }
            Admit::Wait(until) => tokio::time::sleep_until(until).await,
            Admit::Blocked => {}
        }
    }
}

/// Counts a held message for as long as it lives.
struct Held<'a>(&'a Core);

impl<'a> Held<'a> {
    fn new(core: &'a Core) -> Self {
        core.held.fetch_add(1, Ordering::Relaxed);
        Held(core)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl crate::StackPart for CircuitBreakerLayer {
    fn describe(&self) -> Option<String> {
        let c = &self.core.config;
        let mut trips = Vec::new();
        if let Some(n) = c.consecutive_failures {
            trips.push(format!("consecutive_failures={n}"));
        }
        if let Some(r) = &c.failure_rate {
            trips.push(format!("failure_rate={}", r.threshold));
        }
        Some(format!(
            "circuit_breaker({}, open_for={})",
            trips.join(", "),
            crate::stack::secs(c.open_for)
        ))
    }
}
