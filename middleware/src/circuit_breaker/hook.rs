//! [`OnCircuitOpen`]: the hook that hears the breaker open and change state.

use std::fmt;
use std::time::Duration;

use super::CircuitState;

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
