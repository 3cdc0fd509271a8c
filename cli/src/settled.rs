//! [`Settled`]: a consumer whose receive, once started, is always finished, so a run
//! that ends leaves no receive in flight.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use redrive_core::{Capabilities, Consumer, Delivery, Result};

type Pending<C> = Pin<Box<dyn Future<Output = (C, Result<Option<Delivery>>)> + Send>>;

/// Wraps a consumer whose receive keeps going after its future is dropped (SQS: the
/// `ReceiveMessage` long poll runs in a task of its own, and one cut short at close still
/// hides what it took for the visibility timeout). A run over the DLQ drops the receive
/// it was waiting on when the queue goes quiet or Ctrl-C stops it, then hands its held
/// letters back, which that receive can still take. Here the receive is kept, and
/// [`close`](Consumer::close) waits for it (at most `settle_within`) and hands back what
/// it brought before closing the consumer, so every letter is visible again at the end.
pub(crate) struct Settled<C> {
    consumer: Option<C>,
    pending: Option<Pending<C>>,
    caps: Capabilities,
    settle_within: Duration,
}

impl<C: Consumer> Settled<C> {
    pub(crate) fn new(consumer: C, settle_within: Duration) -> Self {
        Settled {
            caps: consumer.capabilities(),
            consumer: Some(consumer),
            pending: None,
            settle_within,
        }
    }

    /// The receive in flight, started if there is none.
    fn pending(&mut self) -> Option<&mut Pending<C>> {
        if self.pending.is_none() {
            let mut consumer = self.consumer.take()?;
            self.pending = Some(Box::pin(async move {
                let r = consumer.receive().await;
                (consumer, r)
            }));
        }
        self.pending.as_mut()
    }
}

impl<C: Consumer> Consumer for Settled<C> {
    async fn receive(&mut self) -> Result<Option<Delivery>> {
        let Some(pending) = self.pending() else {
            return Ok(None);
        };
        // Dropping this future here keeps the receive in `self.pending`.
        let (consumer, result) = pending.await;
        self.pending = None;
        self.consumer = Some(consumer);
        result
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn close(&mut self) -> Result<()> {
        if let Some(pending) = self.pending.take() {
            match tokio::time::timeout(self.settle_within, pending).await {
                Ok((consumer, result)) => {
                    self.consumer = Some(consumer);
                    if let Ok(Some(delivery)) = result {
                        let (_, settle) = delivery.into_parts();
                        if let Err(e) = settle.hand_back().await {
                            tracing::warn!(error = %e, "handing back a letter received at the end failed; it returns after its visibility timeout");
                        }
                    }
                }
                Err(_) => tracing::warn!(
                    "a receive did not finish at the end; what it took returns after its visibility timeout"
                ),
            }
        }
        match self.consumer.as_mut() {
            Some(c) => c.close().await,
            None => Ok(()),
        }
    }
}
