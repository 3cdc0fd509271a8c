//! The background task: watches the session's connection and opens a new session
//! whenever it or the consumer is lost.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::error::Result;

use super::Current;
use super::builder::Config;
use super::careful::{Careful, careful_reached};
use super::monitor::Shared;
use super::session::{Opened, Session};

/// Watches the connection and reconnects whenever it or the consumer is lost,
/// publishing each new session to `receive` through `tx`.
pub(super) async fn run(
    config: Arc<Config>,
    shared: Arc<Shared>,
    tx: watch::Sender<Option<Current>>,
    mut lost: mpsc::UnboundedReceiver<Loss>,
    mut opened: Opened,
) -> Result<()> {
    let queue: Arc<str> = config.topology.queue().into();
    loop {
        let Opened {
            session,
            stream,
            mut events,
        } = opened;
        let id = session_id(&session);
        tx.send_replace(Some(Current {
            session: session.clone(),
            stream,
        }));
        let loss = loop {
            tokio::select! {
                biased;
                () = tx.closed() => {
                    return session.shut("consumer closed").await;
                }
                Some(event) = events.next() => match event {
                    lapin::Event::Error(e) => break Loss::lapin(id, &e),
                    lapin::Event::ConnectionBlocked(why) => {
                        tracing::warn!(queue = %queue, reason = %why, "RabbitMQ blocked the connection (resource alarm)");
                    }
                    lapin::Event::ConnectionUnblocked => {
                        tracing::info!(queue = %queue, "RabbitMQ unblocked the connection");
                    }
                    _ => {}
                },
                Some(loss) = lost.recv() => {
                    // A report about an earlier session is stale.
                    if loss.session == id {
                        break loss;
                    }
                }
                () = careful_reached(&session) => {
                    let Some(careful) = session.careful.as_ref() else { continue };
                    match session.leave_careful_mode(careful).await {
                        Ok(None) => {}
                        Ok(Some(stream)) => {
                            shared.prefetch.store(config.prefetch, Ordering::Relaxed);
                            tracing::info!(
                                queue = %queue,
                                prefetch = config.prefetch,
                                settled = careful.target,
                                "the message that broke the connection is gone; consuming with the full prefetch again"
                            );
                            tx.send_replace(Some(Current {
                                session: session.clone(),
                                stream,
                            }));
                        }
                        Err(e) => {
                            break Loss::new(id, format!("consuming with the full prefetch again failed: {e}"));
                        }
                    }
                }
            }
        };
        tx.send_replace(None);
        shared.connected.store(false, Ordering::Relaxed);
        tracing::warn!(queue = %queue, reason = %loss.why, "RabbitMQ consumer lost its connection; reconnecting");
        // One at a time after a frame the client could not parse, until the message that
        // broke the connection is gone (see `Careful`).
        let was_careful = session.careful.as_ref().is_some_and(Careful::is_active);
        let careful = config.prefetch > 1 && (loss.unparsable || was_careful);
        if careful && !was_careful {
            let total = shared.careful.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(
                queue = %queue,
                cause = %loss.why,
                prefetch = config.prefetch,
                careful_modes = total,
                "a frame the client could not parse broke the connection; consuming one message at a time until the message that broke it is gone, so the deliveries of its prefetch window are not returned with it again"
            );
        }
        let _ = session.shut("reconnecting").await;
        drop((events, session));
        let mut n = 0u32;
        opened = loop {
            let wait = config.reconnect.delay(n);
            tokio::select! {
                () = tx.closed() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            let open = tokio::select! {
                () = tx.closed() => return Ok(()),
                open = Session::open(&config, careful) => open,
            };
            match open {
                Ok(s) => break s,
                Err(e) => {
                    n = n.saturating_add(1);
                    tracing::warn!(queue = %queue, attempt = n, error = %e, "RabbitMQ reconnect failed");
                }
            }
        };
        let total = shared.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
        let prefetch = if careful { 1 } else { config.prefetch };
        shared.prefetch.store(prefetch, Ordering::Relaxed);
        shared.connected.store(true, Ordering::Relaxed);
        tracing::info!(queue = %queue, reconnects = total, prefetch, "RabbitMQ consumer reconnected and consuming again");
    }
}

/// Why a session is lost when its delivery stream ends.
pub(super) const STREAM_ENDED: &str =
    "the delivery stream ended (the broker cancelled the consumer or closed the channel)";

/// Why a session was lost.
pub(super) struct Loss {
    /// The session, by [`session_id`].
    session: usize,
    why: String,
    /// Whether the client could not parse a frame the broker sent: a delivery's
    /// properties it cannot read (see [`Careful`]).
    unparsable: bool,
}

impl Loss {
    pub(super) fn new(session: usize, why: impl Into<String>) -> Self {
        Loss {
            session,
            why: why.into(),
            unparsable: false,
        }
    }

    pub(super) fn lapin(session: usize, e: &lapin::Error) -> Self {
        Loss {
            session,
            why: e.to_string(),
            unparsable: matches!(e.kind(), lapin::ErrorKind::ParsingError(_)),
        }
    }
}

/// Identifies a session in loss reports.
pub(super) fn session_id(session: &Arc<Session>) -> usize {
    Arc::as_ptr(session) as usize
}
