//! Errors of the dead-letter layer.

use std::error::Error as StdError;
use std::fmt;

use redrive_core::HeaderError;

#[derive(Debug)]
pub(crate) enum Kind {
    NoDestination,
    Envelope(HeaderError),
    Publish(redrive_core::Error),
    /// Refused for good, whole and trimmed: the last refusal.
    Rejected(redrive_core::Error),
}

impl Kind {
    /// Whether the same dead letter would fail the same way again.
    pub(crate) fn is_deterministic(&self) -> bool {
        match self {
            Kind::Envelope(_) | Kind::Rejected(_) => true,
            Kind::Publish(e) => e.is_deterministic(),
            Kind::NoDestination => false,
        }
    }
}

/// A message should have been dead-lettered but was not: the Worker nacks it, so it
/// is delivered again and nothing is lost.
///
/// The handler's error is part of the message text, not of the
/// [`source`](StdError::source) chain: this error is transient (a DLQ outage or a
/// configuration to fix), so the Worker redelivers with its backoff even when the
/// handler's error was permanent.
#[derive(Debug)]
pub struct DeadLetterError {
    pub(crate) kind: Kind,
    pub(crate) destination: String,
    pub(crate) handler_error: String,
}

impl DeadLetterError {
    /// The dead-letter destination, empty when none could be worked out.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The handler's error that led to the dead-lettering, as text.
    pub fn handler_error(&self) -> &str {
        &self.handler_error
    }

    /// Whether publishing to the dead-letter destination failed (or was not confirmed).
    pub fn is_publish(&self) -> bool {
        matches!(self.kind, Kind::Publish(_))
    }

    /// Whether the envelope did not fit the message's header limits.
    pub fn is_envelope(&self) -> bool {
        matches!(self.kind, Kind::Envelope(_))
    }

    /// Whether the broker refused the dead letter for good, whole and trimmed (an
    /// invalid destination, a message over its limits). The message stays in its queue
    /// and comes back after [`DeadLetterConfig::with_rejected_delay`](super::DeadLetterConfig::with_rejected_delay);
    /// this needs a person: fix the destination or take the message out by hand.
    pub fn is_rejected(&self) -> bool {
        matches!(self.kind, Kind::Rejected(_))
    }
}

impl fmt::Display for DeadLetterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::NoDestination => f.write_str(
                "cannot dead-letter: the message has no source destination to derive \
                 `<destination>-dlq` from; set one with `DeadLetterConfig::with_destination`",
            )?,
            Kind::Envelope(_) => write!(
                f,
                "cannot dead-letter to `{}`: the envelope does not fit the message's header \
                 limits; lower `max_error_len` or raise the limits",
                self.destination
            )?,
            Kind::Publish(_) => write!(
                f,
                "publishing to dead-letter destination `{}` failed; the message will be redelivered",
                self.destination
            )?,
            Kind::Rejected(e) => write!(
                f,
                "dead-letter destination `{}` refused the message for good, whole and trimmed ({e}); \
                 it stays in its queue and comes back after the rejected delay: fix the destination \
                 or remove the message by hand",
                self.destination
            )?,
        }
        write!(f, " (handler error: {})", self.handler_error)
    }
}

impl StdError for DeadLetterError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            Kind::NoDestination => None,
            Kind::Envelope(e) => Some(e),
            Kind::Publish(e) | Kind::Rejected(e) => Some(e),
        }
    }
}
