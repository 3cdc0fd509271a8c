//! Settles a consuming channel's deliveries in delivery-tag order, coalescing acks.
//!
//! The broker handles every `basic.ack` frame as a unit of work, about as costly as the
//! delivery it settles. With many deliveries in flight, their calls end close together,
//! so the acks that end while an earlier frame is being written, or while the sender
//! yields once to the calls already woken, go out together as one `basic.ack` with
//! `multiple` set, which settles every unsettled delivery up to its tag. Under light
//! load a lone ack waits one turn of the scheduler and goes out as a single ack.
//!
//! A multiple ack is only safe where it settles nothing it should not, so:
//! - the [`Ledger`] knows every delivery handed to the Worker, by tag, and a multiple
//!   ack of tag T is sent only when every delivery at or below T was acked by its call,
//!   or settled by an earlier frame;
//! - one sender at a time pushes a channel's frames, in the order the ledger decided
//!   them; a batch's `basic.nack` frames go first, so the broker has taken those
//!   deliveries back before an ack that spans their tags arrives, and covers none;
//! - a delivery still running (a slow handler) ends the run: the acks behind it go out
//!   one by one, as they would without coalescing, so no call waits for another;
//! - a delivery whose acker is dropped unsettled is handed back with the next frames,
//!   so it cannot end every run for as long as the channel lives.
//!
//! # Bounds
//! The ledger keeps only the deliveries not yet settled on the wire; the broker counts
//! each of them as unacked, so there are about as many as the channel's prefetch, however
//! many deliveries settle behind one that still runs. A delivery tag that skips more
//! tags than the prefetch could have had unacked is a broken protocol: the delivery is
//! refused ([`TagGap`]), nothing is allocated for the gap, and the consumer closes the
//! channel and reconnects.
//!
//! One file per job:
//! - `ledger.rs`: the [`Ledger`], which keeps each delivery's state by tag and decides
//!   the frames that settle them.
//! - `send.rs`: the one sender at a time, which pushes a batch's frames in order.
//! - `error.rs`: [`TagGap`], a delivery tag the channel's window cannot explain.

mod error;
mod ledger;
mod send;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use lapin::Channel;
use tokio::sync::Notify;

use self::ledger::Slot;

pub(crate) use self::error::TagGap;
pub(crate) use self::ledger::{Frame, Ledger};

/// How a call settles its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// `basic.ack`, coalesced with its neighbours' where the ledger allows.
    Ack,
    /// `basic.nack` with requeue: the broker delivers it again.
    Requeue,
}

/// Counts a consumer's settlement frames, over all its channels.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// `basic.ack` and `basic.nack` frames written.
    pub(crate) frames: AtomicU64,
    /// Deliveries those frames settled.
    pub(crate) settled: AtomicU64,
}

/// A consuming channel's ledger and the channel its frames go on.
pub(crate) struct Settler {
    channel: Channel,
    ledger: Mutex<Ledger>,
    /// Wakes the calls waiting for their frames when a batch was sent.
    sent: Notify,
    counters: Arc<Counters>,
}

impl Settler {
    /// The settler of `channel`, consumed with a prefetch of `window`.
    pub(crate) fn new(channel: Channel, window: u16, counters: Arc<Counters>) -> Self {
        Self {
            channel,
            ledger: Mutex::new(Ledger::new(window)),
            sent: Notify::new(),
            counters,
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a delivery handed to the Worker.
    ///
    /// # Errors
    /// A tag gap the channel's prefetch cannot explain: the channel must be closed.
    pub(crate) fn deliver(&self, tag: u64) -> Result<(), TagGap> {
        self.ledger().deliver(tag)
    }

    /// The channel the deliveries came on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Lets tags skip up to `window` deliveries, for a consumer started on this channel
    /// with that prefetch.
    pub(crate) fn widen(&self, window: u16) {
        self.ledger().widen(window);
    }

    /// Hands `tag` back with the next frames sent, if nothing settled it: for an acker
    /// dropped unsettled. Without a next frame, closing the channel hands it back.
    pub(crate) fn abandon(&self, tag: u64) {
        self.ledger().abandon(tag);
    }

    /// Settles `tag`; returns once the frame that settles it was written: `true`, or
    /// `false` when the channel could not take it (the broker then delivers the message
    /// again).
    pub(crate) async fn settle(&self, tag: u64, how: Settlement) -> bool {
        let slot = match how {
            Settlement::Ack => Slot::Ack,
            Settlement::Requeue => Slot::Requeue,
        };
        self.ledger().mark(tag, slot);
        loop {
            let wait = {
                let mut ledger = self.ledger();
                if let Some(written) = ledger.outcome(tag) {
                    return written;
                }
                if ledger.sending {
                    // Created under the lock, so the sender's wake-up cannot be missed.
                    Some(self.sent.notified())
                } else {
                    ledger.sending = true;
                    None
                }
            };
            match wait {
                Some(sent) => sent.await,
                None => self.send().await,
            }
        }
    }
}
