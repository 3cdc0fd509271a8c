//! [`ResponseFuture`] of [`DeadLetter`](super::DeadLetter).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::SystemTime;

use redrive_core::delivery::BoxFuture;
use redrive_core::{BoxError, Metadata, Outcome, OutgoingMessage, Publisher, classify};

use super::envelope::{self, Envelope};
use super::error::Kind;
use super::layer::Shared;
use super::{DeadLetterError, DeadLetterEvent, OnDeadLetter, Reason};

pin_project_lite::pin_project! {
    /// The future of [`DeadLetter`](super::DeadLetter): the inner call, then, if the
    /// message is to be dead-lettered, the confirmed publish.
    pub struct ResponseFuture<F, P, H> {
        #[pin]
        state: State<F>,
        pending: Option<Pending<P, H>>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        DeadLettering { fut: BoxFuture<'static, Result<Outcome, BoxError>> },
    }
}

/// The message as it came in, kept in case it must be dead-lettered.
pub(crate) struct Pending<P, H> {
    shared: Arc<Shared<P, H>>,
    message: OutgoingMessage,
    metadata: Metadata,
}

impl<F, P, H> ResponseFuture<F, P, H> {
    pub(crate) fn new(
        fut: F,
        shared: Arc<Shared<P, H>>,
        message: OutgoingMessage,
        metadata: Metadata,
    ) -> Self {
        ResponseFuture {
            state: State::Inner { fut },
            pending: Some(Pending {
                shared,
                message,
                metadata,
            }),
        }
    }
}

impl<F, P: Publisher, H: OnDeadLetter> ResponseFuture<F, P, H> {
    /// A message back past its attempt limit: dead-lettered without running.
    pub(crate) fn abandoned(
        shared: Arc<Shared<P, H>>,
        message: OutgoingMessage,
        metadata: Metadata,
        max_attempts: u32,
    ) -> Self {
        let err: BoxError = Box::new(Abandoned {
            attempt: metadata.attempt,
            max_attempts,
        });
        let pending = Pending {
            shared,
            message,
            metadata,
        };
        ResponseFuture {
            state: State::DeadLettering {
                fut: Box::pin(pending.dead_letter(err, Reason::Abandoned)),
            },
            pending: None,
        }
    }
}

/// Why a message back past its attempt limit is dead-lettered without running.
#[derive(Debug)]
struct Abandoned {
    attempt: u32,
    max_attempts: u32,
}

impl fmt::Display for Abandoned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "delivery attempt {} is well past the limit of {}: earlier deliveries ended without a \
             result this layer saw (most often the process or its connection died while handling the \
             message; else its dead letter could not be published or the filter declined its error), \
             so it was not run again",
            self.attempt, self.max_attempts
        )
    }
}

impl std::error::Error for Abandoned {}

impl<F, P, H> fmt::Debug for ResponseFuture<F, P, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Inner { .. } => "inner",
            State::DeadLettering { .. } => "dead_lettering",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<F, R, E, P, H> Future for ResponseFuture<F, P, H>
where
    F: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
    P: Publisher,
    H: OnDeadLetter,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            match this.state.project() {
                StateProj::Inner { fut } => {
                    let err: BoxError = match ready!(fut.poll(cx)) {
                        Ok(response) => return Poll::Ready(Ok(response.into())),
                        Err(e) => e.into(),
                    };
                    let pending = this.pending.take().expect("polled after completion");
                    let Some(reason) = pending.decide(&err) else {
                        return Poll::Ready(Err(err));
                    };
                    let fut = Box::pin(pending.dead_letter(err, reason));
                    self.as_mut()
                        .project()
                        .state
                        .set(State::DeadLettering { fut });
                }
                StateProj::DeadLettering { fut } => return fut.as_mut().poll(cx),
            }
        }
    }
}

impl<P: Publisher, H: OnDeadLetter> Pending<P, H> {
    /// Whether `err` sends the message to the DLQ, and why.
    fn decide(&self, err: &BoxError) -> Option<Reason> {
        let config = &self.shared.config;
        let class = config.classifier.classify(&**err);
        let reason = if class.is_permanent() {
            Reason::Permanent
        } else if self.metadata.attempt >= config.max_attempts {
            Reason::Exhausted
        } else {
            return None;
        };
        if let Some(filter) = &config.filter {
            if !filter(&**err, &class) {
                tracing::debug!(
                    %reason, error = %redrive_core::text::bounded(&**err, config.max_error_len),
                    "dead-letter filter declined the error; it goes up"
                );
                return None;
            }
        }
        Some(reason)
    }

    async fn dead_letter(self, err: BoxError, reason: Reason) -> Result<Outcome, BoxError> {
        let Pending {
            shared,
            message,
            metadata,
        } = self;
        let config = &shared.config;
        // Cut once here: it goes into logs, the error and the envelope.
        let handler_error =
            envelope::truncate(&envelope::error_text(&*err), config.max_error_len).into_owned();
        let fail = |kind, destination: String, handler_error: String| -> BoxError {
            let e = DeadLetterError {
                kind,
                destination,
                handler_error,
            };
            tracing::error!(attempt = metadata.attempt, error = %e, "dead-lettering failed");
            Box::new(e)
        };
        let destination = match &config.destination {
            Some(d) => d.clone(),
            None if metadata.source.destination.is_empty() => {
                return Err(fail(Kind::NoDestination, String::new(), handler_error));
            }
            None => super::default_destination(&metadata.source.destination),
        };
        let envelope = Envelope {
            metadata: &metadata,
            reason,
            error: &handler_error,
            max_error_len: config.max_error_len,
            consumer: config.consumer_name.as_deref(),
            now: SystemTime::now(),
        };
        // Publishes a dead letter; on the broker's confirm, logs it, tells the hook and
        // answers the outcome.
        let (shared, err, handler_error, metadata, to) = (
            &shared,
            &err,
            &handler_error,
            &metadata,
            destination.as_str(),
        );
        let publish = move |dead: OutgoingMessage| async move {
            shared.publisher.publish(to, dead.clone()).await?;
            Ok::<_, redrive_core::Error>(confirmed(
                shared,
                err,
                handler_error,
                reason,
                metadata,
                to,
                &dead,
            ))
        };
        let mut whole = message.clone();
        let first = match envelope.write(&mut whole) {
            Err(e) => Kind::Envelope(e),
            Ok(()) => match publish(whole).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) => Kind::Publish(e),
            },
        };
        if !first.is_deterministic() {
            return Err(fail(first, destination.clone(), handler_error.clone()));
        }
        // The same dead letter would fail the same way: publish it trimmed instead.
        tracing::warn!(
            destination = %destination,
            cause = ?first,
            "the dead letter cannot be published whole; publishing it trimmed"
        );
        let mut trimmed = message;
        let second = match envelope.write_trimmed(&mut trimmed) {
            Err(e) => Kind::Rejected(redrive_core::Error::Header(e)),
            Ok(()) => match publish(trimmed).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if e.is_deterministic() => Kind::Rejected(e),
                Err(e) => Kind::Publish(e),
            },
        };
        let rejected = matches!(second, Kind::Rejected(_));
        let e = fail(second, destination.clone(), handler_error.clone());
        Err(if rejected {
            // Needs a person; until then the message waits in its queue, coming back
            // at this pace rather than the Worker's.
            classify::retry_after(e, config.rejected_delay)
        } else {
            e
        })
    }
}

/// Logs and reports a confirmed dead letter.
fn confirmed<P, H: OnDeadLetter>(
    shared: &Shared<P, H>,
    err: &BoxError,
    handler_error: &str,
    reason: Reason,
    metadata: &Metadata,
    destination: &str,
    published: &OutgoingMessage,
) -> Outcome {
    let config = &shared.config;
    tracing::warn!(
        destination = %destination,
        %reason,
        attempt = metadata.attempt,
        error = %envelope::truncate(handler_error, config.max_error_len),
        "message dead-lettered"
    );
    shared.hook.on_dead_letter(&DeadLetterEvent {
        destination,
        reason,
        error: &**err,
        metadata,
        message: published,
    });
    Outcome::DeadLettered
}
