//! Holding a message that failed as the breaker opened, and running it again once the
//! breaker lets a call through.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use redrive_core::{BoxError, Message, Shutdown};
use tokio::time::Instant;
use tower::Service;

use super::state::{Admit, Core, Outcome, Probe, Ticket};

/// Holds `msg`, which failed with `error` as the breaker opened, until the breaker
/// lets a call through, then runs it again on `service`; again and again while it
/// fails with the breaker open, up to `max_hold`. The delivery stays with this
/// consumer meanwhile, so the outage uses none of its delivery attempts. Gives up,
/// with the last error, at shutdown or past `max_hold`.
pub(super) async fn hold<S>(
    core: Arc<Core>,
    mut service: S,
    msg: Message,
    mut error: BoxError,
) -> Result<S::Response, BoxError>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    let max_hold = core.config.max_hold.unwrap_or(Duration::MAX);
    let deadline = Instant::now().checked_add(max_hold);
    let shutdown = msg.extensions.get::<Shutdown>().cloned();
    let _held = Held::new(&core);
    tracing::info!(
        error = %redrive_core::text::truncate(&error.to_string(), 1024),
        "the downstream is failing and the circuit breaker is open: the message is held, \
         without using a delivery attempt, until the breaker lets it through"
    );
    loop {
        let give_up = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let stopping = async {
            match &shutdown {
                Some(s) => s.started().await,
                None => std::future::pending().await,
            }
        };
        let ticket = tokio::select! {
            ticket = admitted(&core) => ticket,
            () = give_up => {
                tracing::warn!(
                    ?max_hold,
                    "a message held for max_hold goes back with its error, using one delivery attempt"
                );
                return Err(error);
            }
            () = stopping => return Err(error),
        };
        // Dropping the ticket on an error gives a probe slot back.
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(Into::into)?;
        let result = service.call(msg.clone()).await.map_err(Into::into);
        let outcome = core.outcome(&result);
        ticket.record(&core, outcome);
        match result {
            Err(e) if outcome == Outcome::Failure && !core.is_closed() => error = e,
            other => return other,
        }
    }
}

/// Waits until the breaker lets a call through, and takes its ticket.
async fn admitted(core: &Arc<Core>) -> Ticket {
    loop {
        let admit = std::future::poll_fn(|cx| match core.admit(cx.waker(), false) {
            Admit::Blocked => Poll::Pending,
            other => Poll::Ready(other),
        })
        .await;
        match admit {
            Admit::Closed(generation) => return Ticket::Closed(generation),
            Admit::Probe(generation) => {
                return Ticket::Probe(Probe {
                    core: core.clone(),
                    generation,
                    armed: true,
                });
            }
            Admit::Wait(until) => tokio::time::sleep_until(until).await,
            Admit::Blocked => {}
        }
    }
}

/// Counts a held message for as long as it lives.
struct Held<'a>(&'a Core);

impl<'a> Held<'a> {
    fn new(core: &'a Core) -> Self {
        core.held.fetch_add(1, Ordering::AcqRel);
        Held(core)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.0.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.hold_ended();
        }
    }
}
