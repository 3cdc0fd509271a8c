//! The breaker's state machine: [`CircuitState`], and [`Core`], a lock with an atomic
//! fast path for the closed breaker, shared by the layer, its services and their calls.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use redrive_core::BoxError;
use tokio::time::Instant;

use super::{CircuitBreakerConfig, CircuitOpen, OnCircuitOpen, OpenReason};
use crate::window::Window;

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

    /// The state as the `redrive.circuit.state` gauge reports it: 0 closed, 1
    /// half-open, 2 open.
    pub fn code(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    /// Calls and failures, when the breaker trips on a failure rate.
    window: Option<Window>,
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

pub(super) struct Core {
    pub(super) config: CircuitBreakerConfig,
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
    pub(super) held: AtomicU64,
}

/// The flag in [`Core::closed`] set while the breaker is closed.
const CLOSED: u64 = 1;

pub(super) enum Admit {
    Closed(u64),
    Probe(u64),
    Wait(Instant),
    Blocked,
}

/// How a call ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    Success,
    Failure,
    /// A permanent error: says nothing about the downstream.
    Ignored,
}

impl Core {
    pub(super) fn new(config: CircuitBreakerConfig, hook: Box<dyn OnCircuitOpen>) -> Self {
        let window = config.failure_rate.map(|r| Window::new(r.window));
        Core {
            config,
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

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) & CLOSED != 0
    }

    /// How a call's result counts: transient errors are failures, except one that says
    /// another consumer holds the message's idempotency key (a busy key says nothing
    /// about the downstream); permanent errors say nothing either.
    pub(super) fn outcome<T>(&self, result: &Result<T, BoxError>) -> Outcome {
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

    /// Whether a call may go through now. `intake` is a caller that asks ahead of a
    /// message it may not have yet (`poll_ready`); while messages are held, the
    /// probes of a half-open breaker are theirs, so an idle intake cannot keep the one
    /// slot from them.
    pub(super) fn admit(&self, waker: &Waker, intake: bool) -> Admit {
        let word = self.closed.load(Ordering::Acquire);
        if word & CLOSED != 0 {
            return Admit::Closed(word >> 1);
        }
        let mut inner = self.lock();
        let change = self.advance(&mut inner);
        let admit = match &mut inner.phase {
            Phase::Closed => Admit::Closed(inner.generation),
            Phase::Open { until } => Admit::Wait(*until),
            Phase::HalfOpen { issued, .. }
                if *issued < self.config.half_open_probes
                    && !(intake && self.held.load(Ordering::Acquire) > 0) =>
            {
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
                if let Some(w) = &inner.window {
                    w.add(w.slot(), 1, 0);
                }
                None
            }
            (Phase::Closed, Outcome::Failure) => {
                let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                // Calls and failures now in the window.
                let counts = inner.window.as_ref().map(|w| {
                    let slot = w.slot();
                    w.add(slot, 1, 1);
                    w.sum(slot)
                });
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

    /// The last held message is gone (run, given up at `max_hold` or at shutdown):
    /// an intake waiting behind it may take a probe slot now.
    pub(super) fn hold_ended(&self) {
        let mut inner = self.lock();
        if matches!(inner.phase, Phase::HalfOpen { .. }) {
            inner.waiters.drain(..).for_each(Waker::wake);
        }
    }

    fn give_back(inner: &mut Inner) {
        if let Phase::HalfOpen { issued, .. } = &mut inner.phase {
            *issued = issued.saturating_sub(1);
            inner.waiters.drain(..).for_each(Waker::wake);
        }
    }

    pub(super) fn state(&self) -> CircuitState {
        match self.lock().phase {
            // The next caller will find it half-open.
            Phase::Open { until } if until <= Instant::now() => CircuitState::HalfOpen,
            phase => phase.state(),
        }
    }
}

/// A half-open probe slot; given back if dropped before its result is recorded.
pub(super) struct Probe {
    pub(super) core: Arc<Core>,
    pub(super) generation: u64,
    pub(super) armed: bool,
}

impl Drop for Probe {
    fn drop(&mut self) {
        if self.armed {
            self.core.release(self.generation);
        }
    }
}

/// Permission for one call.
pub(super) enum Ticket {
    Closed(u64),
    Probe(Probe),
}

impl Ticket {
    pub(super) fn record(self, core: &Core, outcome: Outcome) {
        match self {
            Ticket::Closed(generation) => core.record(generation, outcome),
            Ticket::Probe(mut probe) => {
                probe.armed = false;
                core.record(probe.generation, outcome);
            }
        }
    }
}
