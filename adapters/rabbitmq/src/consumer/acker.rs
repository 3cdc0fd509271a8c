//! The acker: acks, nacks (requeue or republish, with a delay or not) and hands back one
//! delivery on the channel it came on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use redrive_core::Acker;
use redrive_core::delivery::SettleFuture;

use crate::connection::publish_confirmed;
use crate::error::{Error, Result};
use crate::mapping::{self, AmqpDelivery};
use crate::settle::Settlement;
use crate::topology::QueueKind;

use super::session::Session;

/// Settles one delivery on the channel it came on.
pub(super) struct RabbitAcker {
    pub(super) session: Weak<Session>,
    /// The delivery tag on the session's consuming channel.
    pub(super) tag: u64,
    /// Set once an ack or a requeue reached the settler: dropping the acker after that
    /// has nothing to hand back, and takes no lock to find that out.
    pub(super) settling: AtomicBool,
    pub(super) amqp: AmqpDelivery,
    pub(super) payload: Bytes,
    pub(super) attempt: u32,
}

impl RabbitAcker {
    /// The delivery's session, if its connection is still the one it came on.
    fn session(&self) -> Result<Arc<Session>> {
        self.session
            .upgrade()
            .filter(|s| s.is_alive())
            .ok_or(Error::ChannelClosed)
    }

    /// Settles the delivery through its channel's [`Settler`](crate::settle::Settler).
    async fn settle(&self, how: Settlement) -> Result<()> {
        let session = self.session()?;
        self.settling.store(true, Ordering::Relaxed);
        if session.settler.settle(self.tag, how).await {
            if let Some(careful) = session.careful.as_ref() {
                careful.settled();
            }
            Ok(())
        } else {
            Err(Error::ChannelClosed)
        }
    }

    async fn do_ack(&self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }

    async fn requeue(&self) -> Result<()> {
        self.settle(Settlement::Requeue).await
    }

    async fn do_nack(&self, delay: Duration) -> Result<()> {
        let session = self.session()?;
        let topology = &session.config.topology;
        if delay.is_zero() && topology.kind() == QueueKind::Quorum {
            // The quorum queue counts this redelivery itself.
            return self.requeue().await;
        }
        let delay = if delay > topology.max_delay() {
            tracing::warn!(requested = ?delay, max = ?topology.max_delay(), "nack delay above the topology's largest; using the largest");
            topology.max_delay()
        } else {
            delay
        };
        let timeout = session.config.publish_timeout;
        self.republish(&session, delay, self.attempt.saturating_add(1), timeout)
            .await
    }

    /// Gives the message back untried: the session stops consuming first (see
    /// [`Session::stop_consuming`]). A quorum queue takes it back with
    /// `basic.nack(requeue)`, and counts that as a delivery; a classic queue gets a copy
    /// with the attempt the message had, so the next consumer sees the same attempt.
    async fn do_hand_back(&self) -> Result<()> {
        let session = self.session()?;
        session.stop_consuming().await;
        match session.config.topology.kind() {
            QueueKind::Quorum => self.requeue().await,
            QueueKind::Classic => {
                let timeout = session.config.publish_timeout;
                self.republish(&session, Duration::ZERO, self.attempt, timeout)
                    .await
            }
        }
    }

    /// Publishes a copy with `attempt` to the queue (`delay` zero) or to its delay
    /// queue, and acks the original once the broker confirmed the copy. If the copy
    /// fails or takes longer than `timeout`, the original is handed back with
    /// `basic.nack(requeue)`.
    pub(super) async fn republish(
        &self,
        session: &Session,
        delay: Duration,
        attempt: u32,
        timeout: Duration,
    ) -> Result<()> {
        let mut routing_key = session.config.topology.queue().to_owned();
        let copy = async {
            if !delay.is_zero() {
                routing_key = session.ensure_delay_queue(delay).await?;
            }
            let properties = mapping::republish_properties(
                self.amqp.properties(),
                attempt,
                (!delay.is_zero()).then_some(delay),
            );
            let channel = session.publish_channel().await?;
            publish_confirmed(&channel, "", &routing_key, &self.payload, properties).await
        };
        let republished = match tokio::time::timeout(timeout, copy).await {
            Ok(republished) => republished,
            Err(_) => Err(Error::Timeout {
                what: format!("republishing to `{routing_key}` (until the broker's confirm)"),
                after: timeout,
                blocked: session.publishing_blocked(),
            }),
        };
        match republished {
            // The copy is confirmed: only now may the original go.
            Ok(()) => match self.do_ack().await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "the retry copy was published but the original could not be acked; it will be delivered twice");
                    Err(e)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, queue = %routing_key, "republishing for redelivery failed; handing the message back with basic.nack");
                if let Err(e2) = self.requeue().await {
                    tracing::warn!(error = %e2, "basic.nack failed too; the broker redelivers the message when the channel closes");
                }
                Err(e)
            }
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        // Settled: nothing happens. Unsettled (its call ended without settling it): it is
        // handed back, so it cannot stop later acks from sharing frames.
        if *self.settling.get_mut() {
            return;
        }
        if let Some(session) = self.session.upgrade() {
            session.settler.abandon(self.tag);
        }
    }
}

impl Acker for RabbitAcker {
    fn ack(&self) -> SettleFuture<'_> {
        SettleFuture::new(async { self.do_ack().await.map_err(Into::into) })
    }

    fn nack(&self, delay: Duration) -> SettleFuture<'_> {
        SettleFuture::new(async move { self.do_nack(delay).await.map_err(Into::into) })
    }

    fn hand_back(&self) -> SettleFuture<'_> {
        SettleFuture::new(async { self.do_hand_back().await.map_err(Into::into) })
    }

    fn extend(&self, _lease: Duration) -> SettleFuture<'_> {
        // RabbitMQ holds an unacked message until its channel closes: nothing to extend.
        SettleFuture::ready(Ok(()))
    }
}
