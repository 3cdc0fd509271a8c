//! Giving back what the Worker never ran: the session cancels its consumer first, and
//! [`close`](redrive_core::Consumer::close) republishes, on a classic queue, the
//! deliveries `receive` never returned, with the attempt they had.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::BasicCancelOptions;

use crate::topology::QueueKind;

use super::delivery::accept;
use super::session::Session;
use super::{Current, RabbitConsumer};

impl Session {
    /// Cancels the session's consumer, once: the broker sends it nothing more, and the
    /// deliveries it sent can still be settled. The Worker hands a RabbitMQ delivery
    /// back only when it stops (a delivery stays this consumer's while its channel is
    /// open), so what it hands back must not come back to this consumer, which would
    /// hold it unsettled until it closes and count one more delivery. If `receive` is
    /// called again, the ended stream is taken as a lost session and the consumer
    /// reconnects.
    pub(super) async fn stop_consuming(&self) {
        let mut consuming = self.consuming.lock().await;
        if let Some(tag) = consuming.take() {
            let channel = self.settler.channel();
            let cancel = channel.basic_cancel(&tag, BasicCancelOptions::default());
            match tokio::time::timeout(self.config.close_timeout, cancel).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "cancelling the consumer before a hand-back failed");
                }
                Err(_) => tracing::debug!(
                    timeout = ?self.config.close_timeout,
                    "cancelling the consumer before a hand-back did not finish in time"
                ),
            }
        }
    }
}

impl RabbitConsumer {
    /// Hands back, untried, the deliveries the broker sent into the prefetch window that
    /// `receive` never returned, before the connection closes. Closing it would return
    /// them marked redelivered, which a classic queue's attempt counts as one more,
    /// although no handler saw them. So on a classic queue the session cancels its
    /// consumer, takes what is buffered and what arrives before the `basic.cancel-ok`
    /// (within the close timeout), and republishes each with the attempt it had, one
    /// after the other so their order holds, within the publish timeout in all. What is
    /// not republished by then (or after a republish failed) goes back with the
    /// connection, counted. A quorum queue counts a return however it is made, so its
    /// deliveries are left to the close.
    pub(super) async fn hand_back_buffered(&mut self) {
        if let Some(current) = self.current.as_mut() {
            match current.has_changed() {
                Ok(true) => {
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
                Ok(false) if self.cached.is_none() => {
                    self.cached = current.borrow_and_update().clone();
                }
                _ => {}
            }
        }
        let Some(Current { session, stream }) = self.cached.take() else {
            return;
        };
        let next = self.next.take();
        if session.config.topology.kind() != QueueKind::Classic || !session.is_alive() {
            return;
        }
        let close_timeout = session.config.close_timeout;
        let deadline = tokio::time::Instant::now() + close_timeout;
        // After the `basic.cancel-ok`, a stream ends once its buffered deliveries are read.
        let _ = tokio::time::timeout_at(deadline, session.stop_consuming()).await;
        let mut buffered = Vec::new();
        let mut complete = true;
        'streams: for mut stream in std::iter::once(stream).chain(next) {
            loop {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(Some(Ok(d))) => match accept(&session, d) {
                        Ok((acker, _)) => buffered.push(acker),
                        Err(gap) => {
                            // As in `receive`: nothing on this channel is settled any
                            // more; its deliveries go back with it.
                            tracing::error!(queue = %self.queue, error = %gap, "RabbitMQ broke the delivery-tag sequence");
                            session.alive.store(false, Ordering::Release);
                            return;
                        }
                    },
                    Ok(Some(Err(_)) | None) => break,
                    Err(_) => {
                        complete = false;
                        break 'streams;
                    }
                }
            }
        }
        if !complete {
            tracing::debug!(
                queue = %self.queue,
                timeout = ?close_timeout,
                "the consumer was not cancelled within the close timeout; deliveries still on their way go back with the connection, counted"
            );
        }
        if buffered.is_empty() {
            return;
        }
        let publish_timeout = session.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + publish_timeout;
        let total = buffered.len();
        let mut handed_back = 0usize;
        for acker in &buffered {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            // A failed republish has handed its message back with `basic.nack`; the
            // next would most likely fail the same way.
            if acker
                .republish(&session, Duration::ZERO, acker.attempt, left)
                .await
                .is_err()
            {
                break;
            }
            handed_back += 1;
        }
        if handed_back < total {
            tracing::warn!(
                queue = %self.queue,
                handed_back,
                returned = total - handed_back,
                timeout = ?publish_timeout,
                "not every delivery the Worker never took could be republished with its attempt; the rest go back with the connection, one attempt more"
            );
        } else {
            tracing::debug!(queue = %self.queue, handed_back, "deliveries the Worker never took handed back with their attempt");
        }
    }
}
