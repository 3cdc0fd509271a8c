//! Careful mode: after a frame the client could not parse broke the connection, the
//! session consumes one message at a time until the message that broke it is gone.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Notify;

use crate::error::Result;

use super::session::Session;

/// A session that consumes with prefetch 1 because a frame the client could not parse
/// broke the last connection: the deliveries in flight with the message that broke it
/// were returned with it, and counted toward the delivery limit with it. One at a time,
/// only that message breaks the connection again. Once the configured prefetch's worth
/// of deliveries is settled, the returned window is behind, and the session consumes
/// with the configured prefetch again.
pub(super) struct Careful {
    /// The careful consumer's tag; its stream ends when the session leaves careful mode.
    tag: String,
    /// Deliveries to settle before leaving careful mode: the configured prefetch, the
    /// most the broker returned with the message that broke the connection.
    pub(super) target: u64,
    /// Deliveries settled on this session.
    settled: AtomicU64,
    /// Woken when `settled` reaches `target`.
    reached: Notify,
    /// Set once the session cancels the careful consumer.
    over: AtomicBool,
}

impl Careful {
    /// A careful session's state: `tag` is its consumer's, `target` the deliveries to
    /// settle before it leaves careful mode.
    pub(super) fn new(tag: String, target: u64) -> Self {
        Careful {
            tag,
            target,
            settled: AtomicU64::new(0),
            reached: Notify::new(),
            over: AtomicBool::new(false),
        }
    }

    /// Counts one settled delivery.
    pub(super) fn settled(&self) {
        if self.settled.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.reached.notify_waiters();
        }
    }

    /// Returns once `target` deliveries were settled; never if the session left careful
    /// mode.
    async fn reached(&self) {
        loop {
            // Created before the check, so a settle in between still wakes it.
            let woken = self.reached.notified();
            if self.over.load(Ordering::Acquire) {
                return std::future::pending().await;
            }
            if self.settled.load(Ordering::Acquire) >= self.target {
                return;
            }
            woken.await;
        }
    }

    pub(super) fn is_active(&self) -> bool {
        !self.over.load(Ordering::Acquire)
    }
}

impl Session {
    /// Leaves careful mode: cancels the careful consumer and consumes again on the same
    /// channel with the configured prefetch, which RabbitMQ applies to consumers started
    /// after the `basic.qos` (`global` off). The channel stays open, so the deliveries
    /// the careful consumer received before its `basic.cancel-ok` are still settled on
    /// it; `receive` reads them before the new consumer's. `None` when the session
    /// stopped consuming.
    pub(super) async fn leave_careful_mode(
        &self,
        careful: &Careful,
    ) -> Result<Option<lapin::Consumer>> {
        careful.over.store(true, Ordering::Release);
        let mut consuming = self.consuming.lock().await;
        if consuming.is_none() {
            return Ok(None);
        }
        let channel = self.settler.channel();
        channel
            .basic_cancel(&careful.tag, BasicCancelOptions::default())
            .await?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await?;
        // Delivery tags go on counting on this channel, now in a wider window.
        self.settler.widen(self.config.prefetch);
        let tag = self.config.consumer_tag();
        let stream = channel
            .basic_consume(
                self.config.topology.queue(),
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *consuming = Some(tag);
        Ok(Some(stream))
    }

    /// Whether `stream` is the careful consumer this session cancelled: its end is no loss.
    pub(super) fn retired(&self, stream: &lapin::Consumer) -> bool {
        self.careful
            .as_ref()
            .is_some_and(|c| !c.is_active() && stream.tag().as_str() == c.tag)
    }
}

/// Returns once a careful session settled enough deliveries to leave careful mode; never
/// for any other session.
pub(super) async fn careful_reached(session: &Session) {
    match session.careful.as_ref() {
        Some(careful) => careful.reached().await,
        None => std::future::pending().await,
    }
}
