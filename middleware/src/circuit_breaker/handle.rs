//! [`CircuitHandle`]: reads a breaker's state from outside the stack.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::CircuitState;
use super::state::Core;

/// Reads a breaker's state, for metrics and health checks. Cheap to clone.
#[derive(Clone)]
pub struct CircuitHandle {
    pub(super) core: Arc<Core>,
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
