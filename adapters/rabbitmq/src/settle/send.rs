//! Sending: the one sender at a time takes the ledger's frames and pushes them in order.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;

use lapin::options::{BasicAckOptions, BasicNackOptions};

use super::{Frame, Settler};

impl Settler {
    /// Takes the ledger's frames, pushes them in order and waits until each is written.
    /// Called by the one sender (the ledger's `sending` is set).
    pub(super) async fn send(&self) {
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
