//! The middleware crate's error type.

/// What can go wrong when assembling a stack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A layer's configuration cannot work with this consumer; the message says what
    /// to change.
    #[error("{layer}: {message}")]
    Config {
        /// The layer, as [`Stack::describe`](crate::Stack::describe) names it.
        layer: &'static str,
        /// What is wrong and what to change.
        message: String,
    },
}

impl Error {
    /// A [`Error::Config`] for `layer` from any displayable error.
    pub fn config(layer: &'static str, err: impl std::fmt::Display) -> Self {
        Error::Config {
            layer,
            message: err.to_string(),
        }
    }
}

/// A layer's configuration that cannot work, whatever the consumer: what a layer's
/// constructor returns. One type for every layer; each layer's module re-exports it
/// (`retry::ConfigError`, `idempotency::ConfigError`, …).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {layer} configuration: {message}")]
pub struct ConfigError {
    layer: &'static str,
    message: String,
}

impl ConfigError {
    /// A configuration error of `layer` (`"retry"`, `"dead-letter"`, …).
    #[cfg_attr(
        not(any(
            feature = "retry",
            feature = "timeout",
            feature = "circuit-breaker",
            feature = "rate-limit",
            feature = "dead-letter",
            feature = "idempotency"
        )),
        allow(dead_code, reason = "only the layers make configuration errors")
    )]
    pub(crate) fn new(layer: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            layer,
            message: message.into(),
        }
    }

    /// The layer whose configuration it is.
    pub fn layer(&self) -> &'static str {
        self.layer
    }

    /// What is wrong and what to change.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first `T` in `err`'s source chain, `err` itself included.
#[cfg_attr(
    not(feature = "idempotency"),
    allow(dead_code, reason = "used by the idempotency layer's error lookups")
)]
pub(crate) fn find_in_chain<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}
