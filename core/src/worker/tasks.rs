//! The Worker's running calls and timers: [`Tasks`], spawned or polled in place.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;

use futures_util::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::mpsc;

use super::Execution;
use super::state::{Done, Held, KeyId};
use crate::handler::Panicked;

/// The Worker's running calls and timers, spawned or polled in place by [`Execution`].
///
/// Spawned ones report back through a channel rather than through their join handles:
/// a join handle in a `FuturesUnordered` costs two allocations and two wake-ups per
/// call, a channel send one wake-up and at most an allocation per 32 calls. They are
/// not aborted when the Worker's future is dropped: they watch the Worker's stop
/// signal, whose sender goes with it, and each then ends like a call at the shutdown
/// deadline (the handler future dropped, the message handed back) or a parked message
/// at shutdown (handed back).
pub(super) struct Tasks {
    execution: Execution,
    /// Polled in the Worker's task ([`Execution::InTask`]).
    local: FuturesUnordered<LocalTask>,
    /// Spawned and not yet reported back.
    spawned: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

/// A call or timer polled in the Worker's task.
type LocalTask = Pin<Box<dyn Future<Output = Done> + Send>>;

impl Tasks {
    pub(super) fn new(execution: Execution) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Tasks {
            execution,
            local: FuturesUnordered::new(),
            spawned: 0,
            done_tx,
            done_rx,
        }
    }

    /// Runs a task that holds `held`; a panic in it (the handler's own are caught in
    /// the call) still reports back, as [`Done::Crashed`], in either execution mode, so
    /// the Worker never waits for a task that is gone nor keeps what it held.
    pub(super) fn spawn(&mut self, fut: impl Future<Output = Done> + Send + 'static, held: Held) {
        let fut = guarded(fut, held);
        match self.execution {
            Execution::InTask => self.local.push(Box::pin(fut)),
            Execution::Spawned => {
                let done = self.done_tx.clone();
                self.spawned += 1;
                // The receiver lives as long as the Worker; a send after it is gone
                // has no one to tell.
                //
                // The call is boxed: tokio moves a task's future by value several times
                // as it spawns and runs it, and a call's is several hundred bytes, which
                // would also put the task's allocation on glibc's slower path for large
                // blocks.
                let fut = Box::pin(fut);
                tokio::spawn(async move {
                    let _ = done.send(fut.await);
                });
            }
        }
    }

    /// Starts a call that holds `key`. In [`Execution::InTask`] it is polled once at
    /// once, and one that completes there (a handler with nothing to wait for, an ack
    /// the broker takes synchronously) is returned without ever entering the set.
    pub(super) fn start(
        &mut self,
        call: impl Future<Output = Done> + Send + 'static,
        key: Option<KeyId>,
    ) -> Option<Done> {
        let held = Held {
            call: true,
            parked: false,
            key,
        };
        if self.execution == Execution::Spawned {
            self.spawn(call, held);
            return None;
        }
        let mut call: LocalTask = Box::pin(guarded(call, held));
        // Polled with a waker that does nothing: a call still pending is pushed into
        // the set, which polls it again before it waits, with its own waker.
        match call.as_mut().now_or_never() {
            Some(done) => Some(done),
            None => {
                self.local.push(call);
                None
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.local.is_empty() && self.spawned == 0
    }

    /// The next task to end; cancel-safe. `None` when none is running.
    pub(super) async fn next(&mut self) -> Option<Done> {
        if self.spawned == 0 {
            return self.local.next().await;
        }
        tokio::select! {
            Some(done) = self.local.next(), if !self.local.is_empty() => Some(done),
            // Never `None`: the Worker holds a sender.
            Some(done) = self.done_rx.recv() => {
                self.spawned -= 1;
                Some(done)
            }
        }
    }
}

/// `future`, with a panic inside it turned into [`Done::Crashed`] for what it `held`.
fn guarded(
    future: impl Future<Output = Done> + Send + 'static,
    held: Held,
) -> impl Future<Output = Done> + Send + 'static {
    AssertUnwindSafe(future).catch_unwind().map(move |r| {
        r.unwrap_or_else(|panic| Done::Crashed {
            panic: Panicked::from_payload(panic).message().to_owned(),
            held,
        })
    })
}
