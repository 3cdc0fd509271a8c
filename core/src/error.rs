//! The core crate's error type.

use crate::{BoxError, HeaderError};

/// What can go wrong in core: configuration, the broker, settlement.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration that cannot work; the message says what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker or its client failed.
    #[error("broker error: {0}")]
    Broker(#[source] BoxError),
    /// A settle or lease extension came after the delivery's lease expired; the broker
    /// will deliver the message again.
    #[error("the delivery's lease expired before it was settled; the broker will redeliver it")]
    LeaseExpired,
    /// The destination does not exist.
    #[error("destination `{0}` does not exist")]
    UnknownDestination(String),
    /// The broker refused the message for good: the same publish fails the same way
    /// every time (an invalid destination name, a message over the broker's size or
    /// header limits, attributes it does not accept). Callers should not retry it as
    /// it is; the dead-letter layer falls back to a trimmed envelope, then gives up
    /// loudly.
    #[error("the broker rejected the message: {0}")]
    Rejected(#[source] BoxError),
    /// The broker or adapter does not support this operation.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A header broke a limit.
    #[error(transparent)]
    Header(#[from] HeaderError),
}

impl Error {
    /// A [`Error::Broker`] from any error.
    pub fn broker(err: impl Into<BoxError>) -> Self {
        Error::Broker(err.into())
    }

    /// A [`Error::Rejected`] from any error.
    pub fn rejected(err: impl Into<BoxError>) -> Self {
        Error::Rejected(err.into())
    }

    /// Whether publishing the same message again the same way must fail the same way:
    /// [`Error::Rejected`], [`Error::UnknownDestination`] and [`Error::Header`].
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            Error::Rejected(_) | Error::UnknownDestination(_) | Error::Header(_)
        )
    }

    /// A [`Error::Config`] with this explanation.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}

/// `Result` with core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
