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

use std::collections::BTreeMap;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;

/// Where one delivery is in its settlement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Handed to the Worker; its call has not settled it yet.
    Open,
    /// Its call acked it; no frame is on the way yet.
    Ack,
    /// Its call handed it back (`basic.nack` with requeue); no frame is on the way yet.
    Requeue,
    /// Its frame is being pushed by the current sender.
    Sending,
    /// Settled on the wire.
    Done,
    /// Its frame failed: the channel is gone, and the broker delivers it again.
    Failed,
}

/// How a call settles its delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settlement {
    /// `basic.ack`, coalesced with its neighbours' where the ledger allows.
    Ack,
    /// `basic.nack` with requeue: the broker delivers it again.
    Requeue,
}

/// A frame the ledger decided to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `basic.ack`; with `multiple`, of every unsettled delivery up to `tag`.
    Ack {
        /// The delivery tag.
        tag: u64,
        /// Whether the ack settles every unsettled delivery up to `tag`.
        multiple: bool,
    },
    /// `basic.nack` with requeue, of `tag` alone.
    Requeue {
        /// The delivery tag.
        tag: u64,
    },
}

/// A delivery tag further ahead than the channel's window allows: the broker (or a proxy
/// between) broke the protocol, and the channel cannot be trusted with a multiple ack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TagGap {
    /// The tag that arrived.
    pub(crate) tag: u64,
    /// The tag expected.
    pub(crate) expected: u64,
    /// The channel's prefetch.
    pub(crate) window: u64,
}

impl std::fmt::Display for TagGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivery tag {} arrived where {} was expected: {} deliveries skipped, more than \
             the channel's prefetch of {} allows (a broker or proxy broke the protocol); \
             the channel is closed and its deliveries come again",
            self.tag,
            self.expected,
            self.tag - self.expected,
            self.window
        )
    }
}

/// The settlement state of every delivery not yet settled on the wire.
///
/// Only unsettled deliveries are kept, by tag; a tag below `next` that is not kept is
/// settled. Every kept delivery is one the broker counts as unacked (or one whose frame
/// failed, on a channel that is gone), so the ledger holds at most about the channel's
/// prefetch, however many deliveries settle behind one that is still running.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// The tag the next delivery should have; every tag below it was delivered.
    next: u64,
    /// The deliveries not settled on the wire yet (never [`Slot::Done`]).
    slots: BTreeMap<u64, Slot>,
    /// The tags calls settled since the last [`take`](Self::take), so a batch looks at
    /// its own deliveries.
    pending: Vec<u64>,
    /// Whether a sender is pushing a batch now.
    sending: bool,
    /// The channel's prefetch: the largest tag gap that can be told from a broken channel.
    window: u64,
}

impl Ledger {
    /// A new channel's ledger: its first delivery has tag 1; `window` is its prefetch.
    pub(crate) fn new(window: u16) -> Self {
        Ledger {
            next: 1,
            slots: BTreeMap::new(),
            pending: Vec::new(),
            sending: false,
            window: u64::from(window),
        }
    }

    /// The oldest delivery not settled on the wire (the next tag if there is none).
    #[cfg(test)]
    fn oldest(&self) -> u64 {
        self.slots.keys().next().copied().unwrap_or(self.next)
    }

    /// Records a delivery handed to the Worker. Tags arrive in increasing order.
    ///
    /// # Errors
    /// A tag that skips more deliveries than the channel's prefetch could have had
    /// unacked: nothing is recorded, and the channel must be closed.
    pub(crate) fn deliver(&mut self, tag: u64) -> Result<(), TagGap> {
        let next = self.next;
        if tag < next {
            // Tags only grow on a channel; one seen again is left as it is.
            tracing::warn!(
                tag,
                expected = next,
                "a delivery tag came again or out of order"
            );
            return Ok(());
        }
        if tag - next > self.window {
            return Err(TagGap {
                tag,
                expected: next,
                window: self.window,
            });
        }
        if tag > next {
            // A tag the consumer never saw cannot be known settled: it stays open, so no
            // multiple ack ever covers it (acks behind it go one by one). The broker
            // counts it as unacked, so at most the prefetch of them are kept.
            tracing::warn!(
                tag,
                expected = next,
                "a delivery tag was skipped; acks on this channel stop sharing frames"
            );
            for skipped in next..tag {
                self.slots.insert(skipped, Slot::Open);
            }
        }
        self.slots.insert(tag, Slot::Open);
        self.next = tag + 1;
        Ok(())
    }

    /// Lets tags skip up to `window` deliveries: for a consumer started on the same
    /// channel with a larger prefetch. Never narrows.
    fn widen(&mut self, window: u16) {
        self.window = self.window.max(u64::from(window));
    }

    /// Records that a call settled `tag` (`Slot::Ack` or `Slot::Requeue`). A tag that is
    /// not open (settled before) keeps its state.
    fn mark(&mut self, tag: u64, how: Slot) {
        if let Some(slot) = self.slots.get_mut(&tag) {
            if *slot == Slot::Open {
                *slot = how;
                self.pending.push(tag);
            }
        }
    }

    /// Hands back a delivery whose acker was dropped unsettled (its call ended without
    /// settling it, as a task that panicked does): it would stop every later multiple
    /// ack for as long as the channel lives, so it is requeued with the next frames.
    fn abandon(&mut self, tag: u64) {
        self.mark(tag, Slot::Requeue);
    }

    /// `Some(true)` once `tag` is settled on the wire, `Some(false)` if its frame failed,
    /// `None` while it waits.
    fn outcome(&self, tag: u64) -> Option<bool> {
        if tag >= self.next {
            // Never delivered on this channel: nothing to wait for.
            return Some(false);
        }
        match self.slots.get(&tag) {
            // Below `next` and not kept: settled.
            None | Some(Slot::Done) => Some(true),
            Some(Slot::Failed) => Some(false),
            Some(_) => None,
        }
    }

    /// The frames that settle every call-settled delivery, in the order they must be
    /// sent; their slots become `Sending`. Called by the one sender, so no slot is
    /// `Sending` before.
    ///
    /// It looks at the deliveries settled since the last batch and at the run at the
    /// front, never at the settled tail behind a delivery still running.
    pub(crate) fn take(&mut self) -> Vec<Frame> {
        let mut pending = std::mem::take(&mut self.pending);
        // Frames go in tag order, whatever order the calls ended in.
        pending.sort_unstable();
        let mut frames = Vec::new();
        // Hand-backs go first: once one is on the wire, the broker no longer counts its
        // delivery as unacked, so an ack sent after it cannot cover it.
        for &tag in &pending {
            if let Some(slot) = self.slots.get_mut(&tag) {
                if *slot == Slot::Requeue {
                    frames.push(Frame::Requeue { tag });
                    *slot = Slot::Sending;
                }
            }
        }
        // The run at the front: acked, settled or just handed back, up to the first
        // delivery still open. One multiple ack settles all of its acks.
        let mut last_ack = None;
        let mut acks = 0usize;
        for (&tag, slot) in &self.slots {
            match slot {
                Slot::Ack => {
                    last_ack = Some(tag);
                    acks += 1;
                }
                Slot::Done | Slot::Sending => {}
                _ => break,
            }
        }
        if let Some(last) = last_ack {
            frames.push(Frame::Ack {
                tag: last,
                multiple: acks > 1,
            });
            for slot in self.slots.range_mut(..=last).map(|(_, slot)| slot) {
                if *slot == Slot::Ack {
                    *slot = Slot::Sending;
                }
            }
        }
        // Behind the run, each acked delivery goes alone: the run's acks are sending now.
        for &tag in &pending {
            if let Some(slot) = self.slots.get_mut(&tag) {
                if *slot == Slot::Ack {
                    frames.push(Frame::Ack {
                        tag,
                        multiple: false,
                    });
                    *slot = Slot::Sending;
                }
            }
        }
        // Kept for its capacity.
        pending.clear();
        self.pending = pending;
        frames
    }

    /// Records how the frames of [`take`](Self::take) went (`ok[i]` for `frames[i]`),
    /// forgets the settled deliveries at the front, and returns how many deliveries the
    /// written frames settled.
    pub(crate) fn finish(&mut self, frames: &[Frame], ok: &[bool]) -> u64 {
        let mut settled = 0;
        let mut done = Vec::new();
        for (frame, &ok) in frames.iter().zip(ok) {
            let to = if ok { Slot::Done } else { Slot::Failed };
            let range = match *frame {
                Frame::Ack {
                    tag,
                    multiple: true,
                } => 0..=tag,
                Frame::Ack { tag, .. } | Frame::Requeue { tag } => tag..=tag,
            };
            for (&tag, slot) in self.slots.range_mut(range) {
                if *slot == Slot::Sending {
                    *slot = to;
                    if ok {
                        settled += 1;
                        done.push(tag);
                    }
                }
            }
        }
        // Settled on the wire: forgotten.
        for tag in done {
            self.slots.remove(&tag);
        }
        settled
    }
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

    /// Takes the ledger's frames, pushes them in order and waits until each is written.
    /// Called by the one sender (the ledger's `sending` is set).
    async fn send(&self) {
        let mut guard = Sending {
            settler: self,
            frames: Vec::new(),
            ok: Vec::new(),
        };
        // The calls already woken on this runtime run first, and the acks they end with
        // join this batch: under load, frames carry several acks each; idle, the wait is
        // one turn of the scheduler.
        tokio::task::yield_now().await;
        guard.frames = self.ledger().take();
        let mut writes: Vec<Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>>> = guard
            .frames
            .iter()
            .map(|frame| self.write(*frame))
            .collect();
        let mut ok: Vec<Option<bool>> = vec![None; writes.len()];
        // Each write queues its frame on its first poll, and this polls them in order:
        // after the first poll every frame is queued, in the ledger's order.
        poll_fn(|cx| {
            let mut waiting = false;
            for (write, ok) in writes.iter_mut().zip(ok.iter_mut()) {
                if ok.is_none() {
                    match write.as_mut().poll(cx) {
                        Poll::Ready(Ok(())) => *ok = Some(true),
                        Poll::Ready(Err(e)) => {
                            tracing::debug!(error = %e, "a settlement frame could not be written");
                            *ok = Some(false);
                        }
                        Poll::Pending => waiting = true,
                    }
                }
            }
            if waiting {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        guard.ok = ok.into_iter().map(|ok| ok.unwrap_or(false)).collect();
    }

    fn write(&self, frame: Frame) -> Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + '_>> {
        match frame {
            Frame::Ack { tag, multiple } => {
                Box::pin(self.channel.basic_ack(tag, BasicAckOptions { multiple }))
            }
            Frame::Requeue { tag } => Box::pin(self.channel.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )),
        }
    }
}

/// Ends a send: records its outcome, lets the next sender in and wakes the waiting
/// calls. A send dropped part-way took no frames yet (it was yielding), or queued every
/// frame it took (taking and queueing happen in one poll), so its frames count as
/// written.
struct Sending<'a> {
    settler: &'a Settler,
    frames: Vec<Frame>,
    /// Per frame, whether it was written; empty if the send did not finish.
    ok: Vec<bool>,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if self.ok.len() != self.frames.len() {
            self.ok = vec![true; self.frames.len()];
        }
        let mut ledger = self.settler.ledger();
        let settled = ledger.finish(&self.frames, &self.ok);
        ledger.sending = false;
        drop(ledger);
        let written = self.ok.iter().filter(|ok| **ok).count() as u64;
        let counters = &self.settler.counters;
        counters.frames.fetch_add(written, Ordering::Relaxed);
        counters.settled.fetch_add(settled, Ordering::Relaxed);
        // Every waiter looks again: its frame was written, or one of them sends next.
        self.settler.sent.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(tags: std::ops::RangeInclusive<u64>) -> Ledger {
        let mut l = Ledger::new(32);
        for t in tags {
            l.deliver(t).unwrap();
        }
        l
    }

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    #[test]
    fn acks_at_the_front_go_as_one_multiple_ack() {
        let mut l = ledger(1..=5);
        for t in [3, 1, 2] {
            l.mark(t, Slot::Ack);
        }
        let frames = l.take();
        assert_eq!(frames, [ack(3, true)]);
        assert_eq!(l.finish(&frames, &[true]), 3);
        assert_eq!(l.oldest(), 4);
        assert_eq!(l.outcome(2), Some(true));
        assert_eq!(l.outcome(4), None);
    }

    #[test]
    fn a_lone_ack_is_a_single_ack() {
        let mut l = ledger(1..=3);
        l.mark(1, Slot::Ack);
        assert_eq!(l.take(), [ack(1, false)]);
    }

    #[test]
    fn acks_behind_an_open_delivery_go_one_by_one() {
        let mut l = ledger(1..=4);
        l.mark(2, Slot::Ack);
        l.mark(4, Slot::Ack);
        let frames = l.take();
        assert_eq!(frames, [ack(2, false), ack(4, false)]);
        l.finish(&frames, &[true, true]);
        // Tag 1 still runs: nothing is forgotten yet.
        assert_eq!(l.oldest(), 1);
        assert_eq!(l.outcome(4), Some(true));
        // When 1 ends, one ack settles it; the multiple flag would add nothing.
        l.mark(1, Slot::Ack);
        let frames = l.take();
        assert_eq!(frames, [ack(1, false)]);
        l.finish(&frames, &[true]);
        assert_eq!(l.oldest(), 3);
        // 3 then covers itself only: 4 is settled already.
        l.mark(3, Slot::Ack);
        assert_eq!(l.take(), [ack(3, false)]);
    }

    #[test]
    fn a_long_settled_tail_behind_a_running_delivery_is_acked_once_it_ends() {
        // One slow call (tag 1) while 10,000 fast ones behind it end, a few per batch.
        let mut l = ledger(1..=10_001);
        for chunk in (2..=10_001u64).collect::<Vec<_>>().chunks(7) {
            for &t in chunk.iter().rev() {
                l.mark(t, Slot::Ack);
            }
            let frames = l.take();
            let singles: Vec<Frame> = chunk.iter().map(|&t| ack(t, false)).collect();
            assert_eq!(frames, singles, "in tag order, one by one");
            l.finish(&frames, &vec![true; frames.len()]);
            assert!(l.pending.is_empty());
        }
        // Only the slow one is kept: the settled tail is forgotten as it settles.
        assert_eq!((l.oldest(), l.slots.len()), (1, 1));
        // Nothing settled waits; only the slow one is open.
        assert_eq!(l.take(), []);
        l.mark(1, Slot::Ack);
        let frames = l.take();
        assert_eq!(frames, [ack(1, false)]);
        assert_eq!(l.finish(&frames, &[true]), 1);
        // The whole tail is forgotten with it, and the next delivery starts a new run.
        assert_eq!((l.oldest(), l.slots.len()), (10_002, 0));
        l.deliver(10_002).unwrap();
        l.deliver(10_003).unwrap();
        l.mark(10_003, Slot::Ack);
        l.mark(10_002, Slot::Ack);
        assert_eq!(l.take(), [ack(10_003, true)]);
    }

    #[test]
    fn the_ledger_keeps_only_unsettled_deliveries_behind_a_running_one() {
        // One call never ends (tag 1) while 100,000 deliveries behind it are acked: the
        // ledger holds what is unsettled, not the settled tail.
        let mut l = ledger(1..=1);
        for t in 2..=100_001u64 {
            l.deliver(t).unwrap();
            l.mark(t, Slot::Ack);
            let frames = l.take();
            l.finish(&frames, &vec![true; frames.len()]);
        }
        assert_eq!(l.slots.len(), 1, "only the running delivery is kept");
    }

    #[test]
    fn a_tag_gap_above_the_window_is_refused_without_allocating() {
        let mut l = ledger(1..=2);
        // A broker (or proxy) that jumps the tag by 2^40 breaks the protocol.
        let gap = l.deliver(1 << 40).expect_err("a gap of 2^40 tags");
        assert_eq!(
            gap,
            TagGap {
                tag: 1 << 40,
                expected: 3,
                window: 32
            }
        );
        assert!(gap.to_string().contains("prefetch of 32"), "{gap}");
        assert_eq!(l.slots.len(), 2, "nothing allocated for the gap");
        // A gap the prefetch can explain is kept open; one tag more is not.
        l.deliver(3 + 32).unwrap();
        assert_eq!(l.slots.len(), 2 + 33);
        assert!(l.deliver(36 + 33).is_err());
    }

    #[test]
    fn a_settled_delivery_inside_the_run_is_covered_without_harm() {
        let mut l = ledger(1..=4);
        l.mark(2, Slot::Ack);
        let frames = l.take();
        l.finish(&frames, &[true]);
        for t in [1, 3] {
            l.mark(t, Slot::Ack);
        }
        // 2 is settled: a multiple ack of 3 settles 1 and 3.
        assert_eq!(l.take(), [ack(3, true)]);
    }

    #[test]
    fn no_multiple_ack_covers_a_requeue() {
        let mut l = ledger(1..=4);
        l.mark(1, Slot::Ack);
        l.mark(2, Slot::Requeue);
        l.mark(3, Slot::Ack);
        l.mark(4, Slot::Ack);
        let frames = l.take();
        // The requeue is on the wire before the ack that would otherwise cover it.
        assert_eq!(frames, [Frame::Requeue { tag: 2 }, ack(4, true)]);
        assert_eq!(l.finish(&frames, &[true; 2]), 4);
        assert_eq!(l.oldest(), 5);
        assert!(l.slots.is_empty());
    }

    #[test]
    fn a_failed_frame_fails_its_deliveries() {
        let mut l = ledger(1..=3);
        l.mark(1, Slot::Ack);
        l.mark(2, Slot::Ack);
        let frames = l.take();
        assert_eq!(l.finish(&frames, &[false]), 0);
        assert_eq!(l.outcome(1), Some(false));
        assert_eq!(l.outcome(2), Some(false));
        assert_eq!(l.outcome(3), None);
    }

    #[test]
    fn a_tag_never_seen_stays_open_and_is_never_covered() {
        let mut l = Ledger::new(32);
        for t in [1, 2, 4] {
            l.deliver(t).unwrap();
        }
        for t in [1, 2, 4] {
            l.mark(t, Slot::Ack);
        }
        // 3 was never seen here, so no ack may cover it: 4 goes alone.
        let frames = l.take();
        assert_eq!(frames, [ack(2, true), ack(4, false)]);
        l.finish(&frames, &[true; 2]);
        assert_eq!(l.oldest(), 3);
        // Even once nothing else is open, a later ack does not cover it.
        l.deliver(5).unwrap();
        l.mark(5, Slot::Ack);
        assert_eq!(l.take(), [ack(5, false)]);
    }

    #[test]
    fn an_abandoned_delivery_is_handed_back_and_unblocks_the_run() {
        let mut l = ledger(1..=4);
        l.mark(2, Slot::Ack);
        l.mark(3, Slot::Ack);
        // 1's acker is dropped unsettled; 4 ends after.
        l.abandon(1);
        l.mark(4, Slot::Ack);
        let frames = l.take();
        assert_eq!(frames, [Frame::Requeue { tag: 1 }, ack(4, true)]);
        l.finish(&frames, &[true; 2]);
        assert!(l.slots.is_empty());
        // Abandoning a settled delivery changes nothing.
        let mut l = ledger(1..=2);
        l.mark(1, Slot::Ack);
        l.abandon(1);
        assert_eq!(l.take(), [ack(1, false)]);
    }

    #[test]
    fn a_tag_never_delivered_is_not_waited_for() {
        let l = ledger(1..=2);
        assert_eq!(l.outcome(5), Some(false));
        assert_eq!(l.outcome(0), Some(true));
    }
}
