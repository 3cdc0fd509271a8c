//! [`CircuitBreakerLayer`].

use std::fmt;
use std::sync::Arc;

use tower::Layer;

use super::state::Core;
use super::{CircuitBreaker, CircuitBreakerConfig, CircuitHandle, ConfigError, OnCircuitOpen};

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

    /// The breaker's settings.
    pub fn config(&self) -> &CircuitBreakerConfig {
        &self.core.config
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
