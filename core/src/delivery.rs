//! A delivery: a message and the handle that settles it with the broker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{Message, Result};

/// A boxed, sendable future, as the object-safe [`Acker`] returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Settles one delivery with the broker. Adapters implement it; the Worker calls it.
///
/// Implementations need not guard against a second settle: [`Delivery`] makes sure each
/// is called at most once for `ack`/`nack`.
pub trait Acker: Send + Sync + 'static {
    /// The message was handled: remove it from the broker.
    fn ack(&self) -> BoxFuture<'_, Result<()>>;
    /// The message was not handled: deliver it again after `delay` (zero: at once).
    fn nack(&self, delay: Duration) -> BoxFuture<'_, Result<()>>;
    /// Keep the message invisible to other consumers for `lease` from now.
    fn extend(&self, lease: Duration) -> BoxFuture<'_, Result<()>>;

    /// Whether this consumer may still handle the message. `false` once the broker gave
    /// it to another consumer (a Kafka partition revoked in a rebalance): the Worker
    /// then hands it back without running it, also when it was parked or waiting
    /// behind its key. `true` by default.
    fn is_current(&self) -> bool {
        true
    }

    /// The Worker is about to run the message in its handler (`true`), or stopped
    /// without settling it: it parked it for a later attempt, or found it no longer
    /// current (`false`). The Worker says `true` before its last [`is_current`] check,
    /// so an adapter that marks a partition revoked, then waits for its running
    /// messages (Kafka, in a rebalance), either counts this one or has it handed back.
    /// It need not wait for parked or queued messages. A no-op by default.
    ///
    /// [`is_current`]: Acker::is_current
    fn running(&self, running: bool) {
        let _ = running;
    }
}

/// A message and its acker. Settlement happens once: a second `ack` or `nack` is a
/// logged no-op, never a panic and never a second broker call.
pub struct Delivery {
    /// The message.
    pub message: Message,
    acker: Settle,
}

impl Delivery {
    /// A delivery of `message`, settled through `acker`.
    pub fn new(message: Message, acker: impl Acker) -> Self {
        Delivery {
            message,
            acker: Settle {
                acker: Box::new(acker),
                settled: AtomicBool::new(false),
            },
        }
    }

    /// Splits into the message and the settle handle.
    pub fn into_parts(self) -> (Message, Settle) {
        (self.message, self.acker)
    }

    /// Joins a message and a settle handle back into a delivery.
    pub fn from_parts(message: Message, acker: Settle) -> Self {
        Delivery { message, acker }
    }

    /// Acks the message. See [`Settle::ack`].
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await
    }

    /// Nacks the message. See [`Settle::nack`].
    pub async fn nack(&self, delay: Duration) -> Result<()> {
        self.acker.nack(delay).await
    }

    /// Extends the lease. See [`Settle::extend`].
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        self.acker.extend(lease).await
    }

    /// Whether the delivery was settled.
    pub fn is_settled(&self) -> bool {
        self.acker.is_settled()
    }

    /// Whether this consumer may still handle the message. See [`Acker::is_current`].
    pub fn is_current(&self) -> bool {
        self.acker.is_current()
    }

    /// Tells the acker the message started or stopped running. See [`Acker::running`].
    pub fn running(&self, running: bool) {
        self.acker.running(running);
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("settled", &self.is_settled())
            .finish()
    }
}

/// Settles a delivery exactly once.
pub struct Settle {
    acker: Box<dyn Acker>,
    settled: AtomicBool,
}

impl Settle {
    fn first_settle(&self, what: &str) -> bool {
        let first = !self.settled.swap(true, Ordering::AcqRel);
        if !first {
            tracing::warn!(
                settle = what,
                "delivery already settled; ignoring the second settle"
            );
        }
        first
    }

    /// Acks, once. A later `ack` or `nack` does nothing but log a warning.
    pub async fn ack(&self) -> Result<()> {
        if self.first_settle("ack") {
            self.acker.ack().await
        } else {
            Ok(())
        }
    }

    /// Nacks with `delay`, once. A later `ack` or `nack` does nothing but log a warning.
    pub async fn nack(&self, delay: Duration) -> Result<()> {
        if self.first_settle("nack") {
            self.acker.nack(delay).await
        } else {
            Ok(())
        }
    }

    /// Extends the lease by `lease` from now; does nothing once settled.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        if self.is_settled() {
            return Ok(());
        }
        self.acker.extend(lease).await
    }

    /// Whether `ack` or `nack` was called.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Whether this consumer may still handle the message. See [`Acker::is_current`].
    pub fn is_current(&self) -> bool {
        self.acker.is_current()
    }

    /// Tells the acker the message started or stopped running. See [`Acker::running`].
    pub fn running(&self, running: bool) {
        self.acker.running(running);
    }
}

impl fmt::Debug for Settle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settle")
            .field("settled", &self.is_settled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    #[derive(Clone, Default)]
    struct Counting(Arc<AtomicUsize>);

    impl Acker for Counting {
        fn ack(&self) -> BoxFuture<'_, Result<()>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn nack(&self, _: Duration) -> BoxFuture<'_, Result<()>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(()) })
        }
        fn extend(&self, _: Duration) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn second_settle_is_a_no_op() {
        let calls = Counting::default();
        let d = Delivery::new(Message::new("x"), calls.clone());
        d.ack().await.unwrap();
        d.nack(Duration::ZERO).await.unwrap();
        d.ack().await.unwrap();
        assert!(d.is_settled());
        assert_eq!(calls.0.load(Ordering::SeqCst), 1);
    }
}
