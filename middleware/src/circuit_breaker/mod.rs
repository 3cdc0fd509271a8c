//! A circuit breaker that pauses intake while a downstream keeps failing: while it is
//! open, `poll_ready` is pending, so the Worker stops taking messages and they wait in
//! the broker instead of burning their redeliveries.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message};
//! use redrive_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), BoxError> {
//! let layer = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::default()
//!         .with_consecutive_failures(3)
//!         .with_open_for(Duration::from_secs(10))
//!         // Each failure answers at once here; by default the one that trips the
//!         // breaker would be held and run again when it lets calls through.
//!         .without_hold(),
//! )?;
//! let breaker = layer.handle();
//! let mut service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service(handler::handler_fn(|_msg: Message| async {
//!         Err::<(), BoxError>("connection refused".into())
//!     }));
//!
//! for _ in 0..3 {
//!     let _ = service.ready().await?.call(Message::new("x")).await;
//! }
//! assert_eq!(breaker.state(), CircuitState::Open);
//!
//! // Intake is paused for the open period, then one probe goes through.
//! let ready = tokio::time::timeout(Duration::from_secs(9), service.ready()).await;
//! assert!(ready.is_err());
//! service.ready().await?;
//! assert_eq!(breaker.state(), CircuitState::HalfOpen);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **What counts**: only errors the [`Classifier`](redrive_core::Classifier) calls
//!   transient are failures. A permanent error (a poison message) says nothing about
//!   the downstream: it is neither a failure nor a success, so poison messages never
//!   trip the breaker.
//! - **Tripping**: after `consecutive_failures` transient failures in a row, or when
//!   the failure rate over the sliding window reaches the threshold with at least
//!   `min_calls` calls in it (each trigger is optional; at least one is on).
//! - **Open**: `poll_ready` is pending, and wakes by itself when the open period ends
//!   (a timer in the service). Nothing is rejected: messages stay in the broker.
//!   Calls admitted before the breaker opened run to their end; their results no
//!   longer count.
//! - **Half-open**: `half_open_probes` calls are let through; when all of them
//!   succeed the breaker closes, when one fails it opens again. Other callers wait in
//!   `poll_ready` and are woken when the probes end. A probe that is dropped (or ends
//!   with a permanent error) gives its place to the next caller.
//! - **Shared**: the state belongs to the layer; every service it builds, and every
//!   clone, sees and feeds the same breaker. [`CircuitHandle::state`] reads it, and
//!   [`OnCircuitOpen`] hears every change.
//!
//! - **Held, not dead-lettered**: a call that fails while the breaker opens (the
//!   failure that trips it, a failed probe, a call that was running) does not go up:
//!   its message is held and run again when the breaker lets a call through, for up
//!   to `max_hold` (15 min). An outage shorter than that uses none of the messages'
//!   delivery attempts, so the dead-letter layer never sees them; intake is paused
//!   meanwhile, so the rest wait in the broker. [`CircuitHandle::held`] counts them.
//!   At shutdown a held message goes up with its last error.
//!
//! # Order
//! Outside the retry layer: the breaker counts a delivery attempt's final result, so
//! retries that rescue a message do not count as failures. Outside idempotency, so an
//! unreachable store trips it too (a key held by another consumer is not a failure),
//! and inside dead letter, which never sees a held message.

mod config;
mod future;
mod handle;
mod hold;
mod hook;
mod layer;
mod state;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redrive_core::{BoxError, Message};
use tokio::time::Sleep;
use tower::Service;

pub use crate::error::ConfigError;
pub use config::{CircuitBreakerConfig, FailureRate};
pub use future::ResponseFuture;
pub use handle::CircuitHandle;
pub use hook::{CircuitOpen, OnCircuitOpen, OpenReason};
pub use layer::CircuitBreakerLayer;
pub use state::CircuitState;

use future::State;
use state::{Admit, Core, Probe, Ticket};

/// Pauses `poll_ready` while the breaker is open. See the [module docs](self).
pub struct CircuitBreaker<S> {
    inner: S,
    core: Arc<Core>,
    /// Wakes this service when the open period ends.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Permission for the next call, taken by `poll_ready`.
    ticket: Option<Ticket>,
}

impl<S: Clone> Clone for CircuitBreaker<S> {
    fn clone(&self) -> Self {
        // A clone is not ready: it takes its own ticket in `poll_ready`.
        CircuitBreaker {
            inner: self.inner.clone(),
            core: self.core.clone(),
            sleep: None,
            ticket: None,
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl<S> CircuitBreaker<S> {
    /// The breaker's current state.
    pub fn state(&self) -> CircuitState {
        self.core.state()
    }

    /// A handle that reads the breaker's state.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle {
            core: self.core.clone(),
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S> Service<Message> for CircuitBreaker<S>
where
    S: Service<Message> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // A probe slot, once taken, is kept until the call; anything else is
            // asked again, so a breaker that opened meanwhile is seen.
            if !matches!(self.ticket, Some(Ticket::Probe(_))) {
                self.ticket = match self.core.admit(cx.waker(), true) {
                    Admit::Closed(generation) => Some(Ticket::Closed(generation)),
                    Admit::Probe(generation) => Some(Ticket::Probe(Probe {
                        core: self.core.clone(),
                        generation,
                        armed: true,
                    })),
                    Admit::Wait(until) => {
                        let sleep = self
                            .sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                        if sleep.deadline() != until {
                            sleep.as_mut().reset(until);
                        }
                        match sleep.as_mut().poll(cx) {
                            Poll::Ready(()) => continue,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    Admit::Blocked => return Poll::Pending,
                };
            }
            return self.inner.poll_ready(cx).map_err(Into::into);
        }
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        let ticket = self
            .ticket
            .take()
            .expect("CircuitBreaker::call without poll_ready returning Ready first");
        // Kept to run the message again if it fails while the breaker opens: a clone
        // of the service (made ready again before that run) and of the message.
        let hold = self
            .core
            .config
            .max_hold
            .is_some()
            .then(|| (self.inner.clone(), msg.clone()));
        let inner = self.inner.call(msg);
        ResponseFuture {
            state: State::Calling { inner },
            core: self.core.clone(),
            ticket: Some(ticket),
            hold,
        }
    }
}
