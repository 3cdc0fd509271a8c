//! [`ResponseFuture`]: one delivery attempt's tries.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use redrive_core::{BoxError, Message, Shutdown};
use tokio::time::Instant;
use tower::Service;

use super::layer::Shared;
use super::{OnRetry, RetryEvent, Try};

type Wait = Pin<Box<dyn Future<Output = Woke> + Send>>;

/// How a backoff sleep ended.
enum Woke {
    Elapsed,
    Shutdown,
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] future: F },
        Waiting { wait: Wait },
        Readying,
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`Retry`](super::Retry): the first try, then each retry after
    /// its delay. Dropping it stops retrying.
    pub struct ResponseFuture<S, H>
    where
        S: Service<Message>,
    {
        #[pin]
        state: State<S::Future>,
        service: S,
        message: Message,
        shared: Arc<Shared<H>>,
        tries: u32,
        // When the first try started waiting or failed; read from the clock only then,
        // so a try that succeeds on its first poll never reads it.
        started: Option<Instant>,
        previous: Duration,
        slept: Duration,
        last_error: Option<BoxError>,
        span: tracing::Span,
    }
}

/// The span of one try: a child of the delivery attempt's span (the trace layer's),
/// tagged with both numbers, so a trace shows every try and the delays between them.
pub(crate) fn try_span(message: &Message, number: u32) -> tracing::Span {
    tracing::info_span!(
        "redrive.try",
        otel.name = %format_args!("try {number}"),
        redrive.attempt = i64::from(message.metadata.attempt),
        redrive.try = i64::from(number),
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

impl<S, H> ResponseFuture<S, H>
where
    S: Service<Message>,
{
    pub(crate) fn new(
        future: S::Future,
        service: S,
        message: Message,
        shared: Arc<Shared<H>>,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            span,
            state: State::Calling { future },
            service,
            message,
            shared,
            tries: 1,
            started: None,
            previous: Duration::ZERO,
            slept: Duration::ZERO,
            last_error: None,
        }
    }
}

impl<S, H> fmt::Debug for ResponseFuture<S, H>
where
    S: Service<Message>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("tries", &self.tries)
            .finish_non_exhaustive()
    }
}

/// Why no further try is made.
#[derive(Debug)]
enum Stop {
    Permanent,
    Exhausted,
    Shutdown,
    HintTooLong,
    Elapsed,
    Window,
    Budget,
}

impl<S, H> Future for ResponseFuture<S, H>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
    H: OnRetry,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result = {
                        let _entered = this.span.enter();
                        match future.poll(cx) {
                            Poll::Ready(result) => result,
                            Poll::Pending => {
                                this.started.get_or_insert_with(Instant::now);
                                return Poll::Pending;
                            }
                        }
                    };
                    let error: BoxError = match result {
                        Ok(response) => {
                            this.span.record("otel.status_code", "OK");
                            return Poll::Ready(Ok(response));
                        }
                        Err(e) => e.into(),
                    };
                    let shutdown = this.message.extensions.get::<Shutdown>();
                    let config = &this.shared.config;
                    let class = config.classifier.classify(&*error);
                    this.span.record("otel.status_code", "ERROR");
                    this.span.record("error.type", class.kind.as_str());
                    let elapsed = this.started.get_or_insert_with(Instant::now).elapsed();
                    let next = *this.tries;
                    let delay = class
                        .retry_after
                        .unwrap_or_else(|| config.backoff.delay(next, *this.previous));
                    let stop = if class.is_permanent() {
                        Some(Stop::Permanent)
                    } else if *this.tries >= config.max_tries {
                        Some(Stop::Exhausted)
                    } else if shutdown.is_some_and(Shutdown::is_started) {
                        Some(Stop::Shutdown)
                    } else if class.retry_after.is_some_and(|d| d > config.backoff.max()) {
                        Some(Stop::HintTooLong)
                    } else if elapsed.saturating_add(delay) > config.max_elapsed {
                        Some(Stop::Elapsed)
                    } else if this.slept.saturating_add(delay) > this.shared.window {
                        // Reached only after retry_after hints: computed delays alone
                        // stay within the window, their worst-case sum.
                        Some(Stop::Window)
                    } else if this.shared.budget.as_ref().is_some_and(|b| !b.withdraw()) {
                        Some(Stop::Budget)
                    } else {
                        None
                    };
                    if let Some(stop) = stop {
                        tracing::debug!(tries = *this.tries, reason = ?stop, error = %error, "not retrying");
                        return Poll::Ready(Err(error));
                    }
                    tracing::debug!(try_number = *this.tries, ?delay, error = %error, "retrying");
                    this.shared.hook.on_retry(&RetryEvent {
                        try_number: *this.tries,
                        delay,
                        error: &*error,
                        message: this.message,
                    });
                    #[cfg(feature = "metrics")]
                    if let Some(counter) = &this.shared.counter {
                        counter.record(this.message);
                    }
                    *this.previous = delay;
                    *this.slept += delay;
                    *this.last_error = Some(error);
                    let wait: Wait = match shutdown.cloned() {
                        Some(shutdown) => Box::pin(async move {
                            tokio::select! {
                                () = tokio::time::sleep(delay) => Woke::Elapsed,
                                () = shutdown.started() => Woke::Shutdown,
                            }
                        }),
                        None => Box::pin(async move {
                            tokio::time::sleep(delay).await;
                            Woke::Elapsed
                        }),
                    };
                    this.state.set(State::Waiting { wait });
                }
                StateProj::Waiting { wait } => {
                    if let Woke::Shutdown = ready!(wait.as_mut().poll(cx)) {
                        tracing::debug!(tries = *this.tries, "shutdown began; not retrying");
                        let error = this.last_error.take().expect("set before waiting");
                        return Poll::Ready(Err(error));
                    }
                    this.state.set(State::Readying);
                }
                StateProj::Readying => {
                    // Readiness is asked for only now, after the delay: a slot the
                    // inner service hands out (a concurrency permit) is not held while
                    // sleeping.
                    ready!(this.service.poll_ready(cx)).map_err(Into::into)?;
                    *this.tries += 1;
                    *this.last_error = None;
                    // The kept copy carries the try number too, so `OnRetry` sees it.
                    this.message.extensions.insert(Try {
                        number: *this.tries,
                    });
                    let message = if *this.tries >= this.shared.config.max_tries {
                        std::mem::take(this.message)
                    } else {
                        this.message.clone()
                    };
                    *this.span = try_span(&message, *this.tries);
                    let future = {
                        let _entered = this.span.enter();
                        this.service.call(message)
                    };
                    this.state.set(State::Calling { future });
                }
            }
        }
    }
}
