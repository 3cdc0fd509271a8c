//! [`Backoff`] and [`Jitter`]: the delay between two tries. They live in
//! [`redrive_core`], where the Worker's [`Redelivery`](redrive_core::Redelivery) and the
//! adapters' reconnects use them too; this module re-exports them.

use redrive_core::InvalidBackoff;
pub use redrive_core::{Backoff, Jitter};

use super::ConfigError;

/// A backoff [`validate`](Backoff::validate) refuses, as the retry layer's error.
impl From<InvalidBackoff> for ConfigError {
    fn from(err: InvalidBackoff) -> Self {
        ConfigError::new("retry", err.to_string())
    }
}
