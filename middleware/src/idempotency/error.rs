//! Errors of the idempotency layer and its stores.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use redrive_core::BoxError;

#[derive(Debug)]
enum StoreErrorKind {
    Backend(BoxError),
    LeaseLost(String),
}

/// An [`IdempotencyStore`](super::IdempotencyStore) operation failed.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
}

impl StoreError {
    /// The store's backend (a connection, a query) failed.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        StoreError {
            kind: StoreErrorKind::Backend(err.into()),
        }
    }

    /// The token no longer holds `key`: its lease expired and the key may have been
    /// reserved by another consumer since.
    pub fn lease_lost(key: impl Into<String>) -> Self {
        StoreError {
            kind: StoreErrorKind::LeaseLost(key.into()),
        }
    }

    /// Whether this is [`StoreError::lease_lost`].
    pub fn is_lease_lost(&self) -> bool {
        matches!(self.kind, StoreErrorKind::LeaseLost(_))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StoreErrorKind::Backend(e) => write!(f, "idempotency store failed: {e}"),
            StoreErrorKind::LeaseLost(key) => write!(
                f,
                "the reservation of idempotency key `{key}` was lost: its lease expired and \
                 another consumer may hold the key"
            ),
        }
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match &self.kind {
            StoreErrorKind::Backend(e) => Some(&**e),
            StoreErrorKind::LeaseLost(_) => None,
        }
    }
}

/// Another consumer holds the key's reservation: the message is being processed
/// elsewhere right now.
///
/// Transient; the layer wraps it in [`retry_after`](redrive_core::classify::retry_after)
/// with the lease left, so the message comes back when the other consumer has committed
/// (then it is skipped) or its lease has expired (then it is processed here).
#[derive(Debug)]
pub struct KeyReserved {
    pub(crate) key: String,
    pub(crate) remaining: Duration,
}

impl KeyReserved {
    /// The idempotency key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// How much longer the other consumer's lease lasts.
    pub fn remaining(&self) -> Duration {
        self.remaining
    }
}

impl fmt::Display for KeyReserved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idempotency key `{}` is reserved by another consumer for {:?} more",
            self.key, self.remaining
        )
    }
}

impl StdError for KeyReserved {}

/// A message without an idempotency key, refused under
/// [`Unkeyed::Reject`](super::Unkeyed::Reject). Wrapped as permanent: it is never
/// retried, and the dead-letter layer takes it out of the queue unrun.
#[derive(Debug)]
pub struct MissingKey;

impl fmt::Display for MissingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "the message has no idempotency key (no `idempotency-key` or `message-id` header, \
             no broker message id), and the idempotency layer rejects unkeyed messages",
        )
    }
}

impl StdError for MissingKey {}
