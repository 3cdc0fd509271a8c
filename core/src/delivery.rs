//! A delivery: a message and the handle that settles it with the broker.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::{Message, Result};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What an [`Acker`]'s `ack`, `nack` and `extend` return: an answer known at once, or
/// a boxed future to await.
///
/// An acker that settles by bookkeeping alone (Kafka's offset watermark, the in-memory
/// broker) answers with [`SettleFuture::ready`], which allocates nothing; one that
/// talks to the broker returns [`SettleFuture::new`] around its future. Like most
/// futures, it panics if polled again after it completed.
///
/// ```
/// use redrive_core::delivery::SettleFuture;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// assert!(SettleFuture::ready(Ok(())).await.is_ok());
/// assert!(SettleFuture::new(async { Ok(()) }).await.is_ok());
/// # }
/// ```
#[must_use = "a settlement does nothing more until it is awaited"]
pub struct SettleFuture<'a>(SettleState<'a>);

enum SettleState<'a> {
    /// `None` once taken by the poll that completed.
    Ready(Option<Result<()>>),
    Boxed(BoxFuture<'a, Result<()>>),
}

impl<'a> SettleFuture<'a> {
    /// The settlement is done, with this result.
    pub fn ready(result: Result<()>) -> Self {
        SettleFuture(SettleState::Ready(Some(result)))
    }

    /// The settlement finishes when `future` does; it is boxed.
    pub fn new(future: impl Future<Output = Result<()>> + Send + 'a) -> Self {
        SettleFuture(SettleState::Boxed(Box::pin(future)))
    }
}

impl<'a> From<BoxFuture<'a, Result<()>>> for SettleFuture<'a> {
    fn from(future: BoxFuture<'a, Result<()>>) -> Self {
        SettleFuture(SettleState::Boxed(future))
    }
}

impl Future for SettleFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.get_mut().0 {
            SettleState::Ready(result) => Poll::Ready(
                result
                    .take()
                    .expect("SettleFuture polled after it completed"),
            ),
            SettleState::Boxed(future) => future.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for SettleFuture<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            SettleState::Ready(_) => "ready",
            SettleState::Boxed(_) => "boxed",
        };
        f.debug_tuple("SettleFuture").field(&state).finish()
    }
}

/// Settles one delivery with the broker. Adapters implement it; the Worker calls it.
///
/// Implementations need not guard against a second settle: [`Delivery`] makes sure each
/// is called at most once for `ack`/`nack`.
pub trait Acker: Send + Sync + 'static {
    /// The message was handled: remove it from the broker.
    fn ack(&self) -> SettleFuture<'_>;
    /// The message was not handled: deliver it again after `delay` (zero: at once).
    fn nack(&self, delay: Duration) -> SettleFuture<'_>;
    /// Keep the message invisible to other consumers for `lease` from now.
    fn extend(&self, lease: Duration) -> SettleFuture<'_>;

    /// The message was not tried: give it back for delivery at once, without counting a
    /// delivery attempt where the adapter can avoid it. The Worker hands back what it
    /// never ran: messages waiting at shutdown, or no longer this consumer's. A
    /// message that failed is `nack`ed instead, and counts.
    ///
    /// [`nack`](Acker::nack) with no delay by default. An adapter whose broker counts
    /// every redelivery (an SQS receive count, a quorum queue's delivery count) may
    /// keep the default; one whose count is redrive's own (a header on a republished
    /// copy) should not advance it here.
    fn hand_back(&self) -> SettleFuture<'_> {
        self.nack(Duration::ZERO)
    }

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

    /// Hands the message back untried. See [`Settle::hand_back`].
    pub async fn hand_back(&self) -> Result<()> {
        self.acker.hand_back().await
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

    /// Hands the message back untried (see [`Acker::hand_back`]), once. A later
    /// settle does nothing but log a warning.
    pub async fn hand_back(&self) -> Result<()> {
        if self.first_settle("hand back") {
            self.acker.hand_back().await
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
        fn ack(&self) -> SettleFuture<'_> {
            self.0.fetch_add(1, Ordering::SeqCst);
            SettleFuture::ready(Ok(()))
        }
        fn nack(&self, _: Duration) -> SettleFuture<'_> {
            self.0.fetch_add(1, Ordering::SeqCst);
            SettleFuture::new(async { Ok(()) })
        }
        fn extend(&self, _: Duration) -> SettleFuture<'_> {
            SettleFuture::ready(Ok(()))
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
