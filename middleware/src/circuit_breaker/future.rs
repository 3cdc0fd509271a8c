//! [`ResponseFuture`]: one call, counted, then held and run again if it failed as the
//! breaker opened.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redrive_core::delivery::BoxFuture;
use redrive_core::{BoxError, Message};
use tower::Service;

use super::hold::hold;
use super::state::{Core, Outcome, Ticket};

pin_project_lite::pin_project! {
    /// The future of a [`CircuitBreaker`](super::CircuitBreaker): the inner call, whose result is counted;
    /// then, for a call that failed as the breaker opened, the message held and run
    /// again once the breaker lets it through.
    pub struct ResponseFuture<F, S>
    where
        S: Service<Message>,
    {
        #[pin]
        pub(super) state: State<F, S::Response>,
        pub(super) core: Arc<Core>,
        pub(super) ticket: Option<Ticket>,
        pub(super) hold: Option<(S, Message)>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    pub(super) enum State<F, R> {
        /// The first run.
        Calling { #[pin] inner: F },
        /// Held while the breaker is open, then run again.
        Holding { fut: BoxFuture<'static, Result<R, BoxError>> },
    }
}

impl<F, S: Service<Message>> fmt::Debug for ResponseFuture<F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, S, T, E> Future for ResponseFuture<F, S>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
    S: Service<Message, Response = T> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    T: Send + 'static,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { inner } => {
                    let result = std::task::ready!(inner.poll(cx)).map_err(Into::into);
                    let outcome = this.core.outcome(&result);
                    if let Some(ticket) = this.ticket.take() {
                        ticket.record(this.core, outcome);
                    }
                    match result {
                        Err(error) if outcome == Outcome::Failure && !this.core.is_closed() => {
                            let Some((service, msg)) = this.hold.take() else {
                                return Poll::Ready(Err(error));
                            };
                            let fut = hold(this.core.clone(), service, msg, error);
                            this.state.set(State::Holding { fut: Box::pin(fut) });
                        }
                        other => return Poll::Ready(other),
                    }
                }
                StateProj::Holding { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}
