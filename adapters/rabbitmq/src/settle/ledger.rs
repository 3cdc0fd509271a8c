//! The [`Ledger`]: every unsettled delivery's state by tag, and the frames that settle
//! them.

use std::collections::BTreeMap;

use super::TagGap;

/// Where one delivery is in its settlement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Slot {
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
    pub(super) sending: bool,
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
    pub(super) fn widen(&mut self, window: u16) {
        self.window = self.window.max(u64::from(window));
    }

    /// Records that a call settled `tag` (`Slot::Ack` or `Slot::Requeue`). A tag that is
    /// not open (settled before) keeps its state.
    pub(super) fn mark(&mut self, tag: u64, how: Slot) {
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
    pub(super) fn abandon(&mut self, tag: u64) {
        self.mark(tag, Slot::Requeue);
    }

    /// `Some(true)` once `tag` is settled on the wire, `Some(false)` if its frame failed,
    /// `None` while it waits.
    pub(super) fn outcome(&self, tag: u64) -> Option<bool> {
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
