//! The consumer: a queue consumed with a prefetch and manual acks, reconnecting on loss.
//!
//! One file per job:
//! - `builder.rs`: [`ConsumerBuilder`], its checks, and the first connection.
//! - `session.rs`: a session, one connection with its consuming channel and a
//!   connection of its own for republishes: opening it, publishing on it, closing it.
//! - `reconnect.rs`: the background task that watches the session and opens a new one
//!   when it is lost.
//! - `careful.rs`: careful mode, prefetch 1 after a frame the client could not parse
//!   broke the connection, until the message that broke it is gone.
//! - `delivery.rs`: a lapin delivery turned into the Worker's [`Delivery`].
//! - `acker.rs`: the acker, which acks, nacks and hands back one delivery on the channel
//!   it came on.
//! - `hand_back.rs`: giving back what the Worker never ran: cancelling the consumer, and
//!   at [`close`](Consumer::close) republishing the deliveries `receive` never returned.
//! - `monitor.rs`: [`ConnectionMonitor`], the handle that reads the connection state.

mod acker;
mod builder;
mod careful;
mod delivery;
mod hand_back;
mod monitor;
mod reconnect;
mod session;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redrive_core::{Capabilities, Consumer, Delivery};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};

use self::delivery::delivery;
use self::monitor::Shared;
use self::reconnect::{Loss, STREAM_ENDED, session_id};
use self::session::Session;

pub use self::builder::ConsumerBuilder;
pub use self::monitor::ConnectionMonitor;

/// Consumes one RabbitMQ queue. See the [crate docs](crate) for the guarantees.
///
/// [`receive`](Consumer::receive) reads the current channel's deliveries itself, so a
/// delivery crosses no task on its way to the Worker, and is cancel-safe. A background
/// task on the current tokio runtime watches the connection and reconnects, also while
/// the Worker is busy. [`close`](Consumer::close) hands back the deliveries the Worker
/// never took (on a classic queue, with the attempt they had: see the
/// [crate docs](crate)). Dropping the consumer closes its connection; unsettled messages
/// go back to the queue, marked redelivered (one attempt more).
pub struct RabbitConsumer {
    /// The channel being consumed, as the background task last opened it; `None` inside
    /// while it reconnects. Taken by `close`.
    current: Option<watch::Receiver<Option<Current>>>,
    /// `receive`'s copy of the current channel.
    cached: Option<Current>,
    /// The stream that follows `cached`'s on the same session (it left careful mode),
    /// read once `cached`'s ends.
    next: Option<lapin::Consumer>,
    /// Tells the background task that a session's delivery stream ended, and why.
    lost: mpsc::UnboundedSender<Loss>,
    /// Shared with every message's `source.destination`.
    queue: Arc<str>,
    shared: Arc<Shared>,
    caps: Capabilities,
    close_timeout: Duration,
    task: Option<JoinHandle<Result<()>>>,
}

/// A session and its delivery stream.
#[derive(Clone)]
struct Current {
    session: Arc<Session>,
    stream: lapin::Consumer,
}

impl fmt::Debug for RabbitConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConsumer")
            .field("capabilities", &self.caps)
            .field("connected", &self.shared.connected.load(Ordering::Relaxed))
            .field(
                "reconnects",
                &self.shared.reconnects.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl RabbitConsumer {
    /// How many times this consumer reconnected after losing its connection.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// A handle that reads the connection state after the consumer moved into a Worker.
    pub fn monitor(&self) -> ConnectionMonitor {
        ConnectionMonitor {
            shared: self.shared.clone(),
        }
    }
}

impl RabbitConsumer {
    /// Takes the channel the background task published: a new session, none while it
    /// reconnects, or the current session consuming again with its full prefetch, whose
    /// stream is read once the careful consumer's ends, so none of the deliveries already
    /// on their way to it are left unsettled.
    fn adopt(&mut self, next: Option<Current>) {
        match (self.cached.as_ref(), next) {
            (Some(cached), Some(next))
                if Arc::ptr_eq(&cached.session, &next.session)
                    && cached.stream.tag() != next.stream.tag() =>
            {
                self.next = Some(next.stream);
            }
            (_, next) => {
                self.cached = next;
                self.next = None;
            }
        }
    }
}

impl Consumer for RabbitConsumer {
    async fn receive(&mut self) -> redrive_core::Result<Option<Delivery>> {
        loop {
            let Some(current) = self.current.as_mut() else {
                return Ok(None);
            };
            match current.has_changed() {
                Err(_) => return Ok(None),
                Ok(true) => {
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
                Ok(false) if self.cached.is_none() => {
                    self.cached = current.borrow_and_update().clone();
                }
                Ok(false) => {}
            }
            let Some(current) = self.current.as_mut() else {
                return Ok(None);
            };
            let Some(Current { session, stream }) = self.cached.as_mut() else {
                // Reconnecting: wait for the next session (or the end).
                if current.changed().await.is_err() {
                    return Ok(None);
                }
                continue;
            };
            // Both branches are cancel-safe: a stream hands out a delivery only when it
            // returns it.
            tokio::select! {
                biased;
                item = stream.next() => match item {
                    Some(Ok(d)) if session.is_alive() => match delivery(session, &self.queue, d) {
                        Ok(d) => return Ok(Some(d)),
                        Err(gap) => {
                            // Nothing on this channel can be settled safely any more: its
                            // deliveries go back to the queue when it closes.
                            tracing::error!(queue = %self.queue, error = %gap, "RabbitMQ broke the delivery-tag sequence");
                            session.alive.store(false, Ordering::Release);
                            let _ = self.lost.send(Loss::new(session_id(session), gap.to_string()));
                            self.cached = None;
                            self.next = None;
                            if current.changed().await.is_err() {
                                return Ok(None);
                            }
                        }
                    },
                    Some(Ok(_)) => {
                        // Its channel is gone: it cannot be settled, and the broker
                        // redelivers it.
                        self.shared.stale.fetch_add(1, Ordering::Relaxed);
                    }
                    ended => {
                        if ended.is_none() {
                            if let Some(next) = self.next.take() {
                                // The session left careful mode: its new consumer's
                                // deliveries follow the old one's.
                                *stream = next;
                                continue;
                            }
                        }
                        let loss = match ended {
                            Some(Err(e)) => Some(Loss::lapin(session_id(session), &e)),
                            // A careful consumer the session cancelled ends too; its
                            // successor comes through `current`.
                            _ if session.retired(stream) => None,
                            _ => Some(Loss::new(session_id(session), STREAM_ENDED)),
                        };
                        if let Some(loss) = loss {
                            let _ = self.lost.send(loss);
                        }
                        self.cached = None;
                        self.next = None;
                        if current.changed().await.is_err() {
                            return Ok(None);
                        }
                    }
                },
                changed = current.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                    let next = current.borrow_and_update().clone();
                    self.adopt(next);
                }
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    /// Hands back the deliveries the broker sent that `receive` never returned (on a
    /// classic queue, with the attempt they had: see the [crate docs](crate)), then
    /// closes the connections, within the builder's `close_timeout`; past it they
    /// are dropped and this fails with [`Error::Timeout`].
    async fn close(&mut self) -> redrive_core::Result<()> {
        self.hand_back_buffered().await;
        // Dropping the receiver tells the background task to close the connections; it
        // does so within the close timeout. Twice that is a backstop for a task stuck
        // elsewhere.
        self.cached = None;
        self.next = None;
        self.current = None;
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let backstop = self.close_timeout * 2;
        match tokio::time::timeout(backstop, &mut task).await {
            Ok(Ok(closed)) => closed.map_err(Into::into),
            // The task panicked or was cancelled: nothing is left to close.
            Ok(Err(_)) => Ok(()),
            Err(_) => {
                task.abort();
                Err(Error::Timeout {
                    what: "stopping the consumer's connection task".into(),
                    after: backstop,
                    blocked: false,
                }
                .into())
            }
        }
    }
}
