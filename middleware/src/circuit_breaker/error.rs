//! Errors of the circuit breaker.

use std::error::Error as StdError;
use std::fmt;

/// A circuit breaker configuration that cannot work; the message says what to change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub(super) String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid circuit breaker configuration: {}", self.0)
    }
}

impl StdError for ConfigError {}
