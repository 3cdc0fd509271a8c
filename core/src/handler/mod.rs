//! Handlers: any `tower::Service<Message>`, and helpers that make one from an async function.
//!
#![cfg_attr(feature = "json", doc = "```")]
#![cfg_attr(not(feature = "json"), doc = "```ignore")]
//! use redrive_core::{handler, Message};
//! use serde::Deserialize;
//!
//! // From an async function of the message.
//! let plain = handler::handler_fn(|msg: Message| async move {
//!     println!("{} bytes", msg.payload.len());
//!     Ok::<_, std::io::Error>(())
//! });
//!
//! // Typed: the payload is decoded from JSON first.
//! #[derive(Deserialize)]
//! struct Order { id: u64 }
//! let typed = handler::json(|order: Order, _msg: Message| async move {
//!     println!("order {}", order.id);
//!     Ok::<_, std::io::Error>(())
//! });
//! # let _ = (plain, typed);
//! ```
//!
//! A payload that fails to decode is a [`permanent`](crate::classify::Permanent) error
//! naming the type and the decode error: retrying cannot fix it.
//!
//! # Panics
//! A handler that panics fails like one that returns an error: the handlers made here
//! catch the panic and return [`Panicked`] (transient), so every layer sees the
//! failure, the retry layer retries it and the dead-letter layer counts it toward its
//! limit and puts the panic's message in the envelope. For a hand-written service, put
//! [`CatchPanicLayer`] innermost (the middleware's `Stack` does). A decoder that panics
//! on a payload gives a permanent [`DecodeError`]. The Worker catches whatever still
//! escapes, as a last resort.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
#[cfg(feature = "json")]
use serde::de::DeserializeOwned;
use tower::Service;

use crate::{BoxError, Message, classify};

/// How the stack disposed of a message that the Worker will ack.
///
/// Handlers return `()` (which converts to [`Outcome::Processed`]) or an `Outcome`;
/// layers that end a message's life without the handler's success report what they did,
/// so metrics, traces and the Worker's report can tell the cases apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler succeeded.
    #[default]
    Processed,
    /// The message was published to a dead-letter destination, confirmed.
    DeadLettered,
    /// The message was a duplicate of one already processed; the handler was skipped.
    Deduplicated,
    /// A layer skipped the message deliberately (logged and counted).
    Skipped,
}

impl Outcome {
    /// A short lowercase name: `processed`, `dead_lettered`, `deduplicated`, `skipped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Deduplicated => "deduplicated",
            Outcome::Skipped => "skipped",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<()> for Outcome {
    fn from((): ()) -> Self {
        Outcome::Processed
    }
}

/// A handler made from an async function of the [`Message`]. See [`handler_fn`].
#[derive(Clone, Copy)]
pub struct HandlerFn<F> {
    f: F,
}

/// Makes a handler from an async function `Message -> Result<R, E>`, where `R` is `()`
/// or an [`Outcome`] and `E` any error.
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn { f }
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

impl<F, Fut, R, E> Service<Message> for HandlerFn<F>
where
    F: FnMut(Message) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = HandlerFuture<Fut>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        HandlerFuture::start(|| (self.f)(msg))
    }
}

pin_project_lite::pin_project! {
    /// The future of a [`HandlerFn`] or [`Typed`] handler: the user's future, with a
    /// panic turned into [`Panicked`] as [`CatchPanic`] does.
    pub struct HandlerFuture<Fut> {
        #[pin]
        inner: CatchPanicFuture<Fut>,
    }
}

impl<Fut> HandlerFuture<Fut> {
    /// Calls the user's function, catching a panic in its synchronous part too.
    fn start(call: impl FnOnce() -> Fut) -> Self {
        HandlerFuture {
            inner: CatchPanicFuture::start(call),
        }
    }
}

impl<Fut, R, E> Future for HandlerFuture<Fut>
where
    Fut: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
{
    type Output = Result<Outcome, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx).map(|r| r.map(Into::into))
    }
}

/// A handler (or a service inside the stack) panicked: the panic as an error, so that
/// every layer sees it as a failure. Transient by default.
///
/// ```
/// use redrive_core::Panicked;
///
/// let err = Panicked::from_payload(Box::new("index out of bounds"));
/// assert_eq!(err.to_string(), "handler panicked: index out of bounds");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("handler panicked: {message}")]
pub struct Panicked {
    message: String,
}

impl Panicked {
    /// The most bytes of a panic's message kept (a panic can quote a payload).
    pub const MAX_MESSAGE_LEN: usize = 1024;

    /// From what [`std::panic::catch_unwind`] returns: the message of a `&str` or
    /// `String` payload, cut to [`MAX_MESSAGE_LEN`](Self::MAX_MESSAGE_LEN) bytes.
    pub fn from_payload(payload: Box<dyn Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| crate::text::truncate(s, Self::MAX_MESSAGE_LEN).into_owned())
            .or_else(|| {
                payload
                    .downcast_ref::<String>()
                    .map(|s| crate::text::truncate(s, Self::MAX_MESSAGE_LEN).into_owned())
            })
            .unwrap_or_else(|| "a panic with a payload that is not text".to_owned());
        Panicked { message }
    }

    /// The panic's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Turns a panic in the inner service's `call` or future into a [`Panicked`] error.
/// See [`CatchPanicLayer`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> CatchPanic<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CatchPanic { inner }
    }
}

/// Puts [`CatchPanic`] around a service: innermost, right around the handler, so a
/// panic is an error that every layer sees (the retry layer retries it, the dead-letter
/// layer dead-letters it at the limit).
///
/// ```
/// use redrive_core::{BoxError, CatchPanicLayer, Message, Panicked};
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = CatchPanicLayer.layer(service_fn(|_m: Message| async {
///     if true { panic!("bug") }
///     Ok::<(), BoxError>(())
/// }));
/// let err = svc.oneshot(Message::new("x")).await.unwrap_err();
/// assert!(err.is::<Panicked>());
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct CatchPanicLayer;

impl<S> tower::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic::new(inner)
    }
}

impl<S> Service<Message> for CatchPanic<S>
where
    S: Service<Message>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        CatchPanicFuture::start(|| self.inner.call(msg))
    }
}

pin_project_lite::pin_project! {
    /// The future of [`CatchPanic`].
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: Option<F>,
        panicked: Option<Panicked>,
    }
}

impl<F> CatchPanicFuture<F> {
    /// Makes the future with `call`, catching a panic in it: the future then answers
    /// [`Panicked`] when first polled.
    fn start(call: impl FnOnce() -> F) -> Self {
        match std::panic::catch_unwind(AssertUnwindSafe(call)) {
            Ok(fut) => CatchPanicFuture {
                inner: Some(fut),
                panicked: None,
            },
            Err(panic) => CatchPanicFuture {
                inner: None,
                panicked: Some(Panicked::from_payload(panic)),
            },
        }
    }
}

impl<F, R, E> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<R, E>>,
    E: Into<BoxError>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(p) = this.panicked.take() {
            return Poll::Ready(Err(p.into()));
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            panic!("CatchPanicFuture polled after completion");
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(poll) => poll.map(|r| r.map_err(Into::into)),
            Err(panic) => {
                this.inner.set(None);
                Poll::Ready(Err(Panicked::from_payload(panic).into()))
            }
        }
    }
}

/// Decodes a payload into a `T`.
pub trait Decode<T> {
    /// The format's name, for error messages (`"JSON"`).
    const FORMAT: &'static str;
    /// Decodes `payload`.
    fn decode(payload: &[u8]) -> Result<T, BoxError>;
}

/// JSON with serde.
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

#[cfg(feature = "json")]
impl<T: DeserializeOwned> Decode<T> for Json {
    const FORMAT: &'static str = "JSON";

    fn decode(payload: &[u8]) -> Result<T, BoxError> {
        serde_json::from_slice(payload).map_err(Into::into)
    }
}

/// A payload did not decode into the handler's type. Always [`permanent`](classify::Permanent).
#[derive(Debug, thiserror::Error)]
#[error("payload is not valid {format} for `{type_name}`: {source}")]
pub struct DecodeError {
    format: &'static str,
    type_name: &'static str,
    #[source]
    source: BoxError,
}

impl DecodeError {
    /// The type the payload should have decoded into.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

/// A handler that decodes the payload with `D` before calling an async function of the
/// value and the message. See [`json`] and [`typed`].
pub struct Typed<D, T, F> {
    f: F,
    _marker: PhantomData<fn() -> (D, T)>,
}

impl<D, T, F: Clone> Clone for Typed<D, T, F> {
    fn clone(&self) -> Self {
        Typed {
            f: self.f.clone(),
            _marker: PhantomData,
        }
    }
}

impl<D, T, F> fmt::Debug for Typed<D, T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("type", &std::any::type_name::<T>())
            .finish_non_exhaustive()
    }
}

/// Makes a handler that decodes the payload as JSON into `T` and calls `f(value, message)`.
#[cfg(feature = "json")]
#[cfg_attr(docsrs, doc(cfg(feature = "json")))]
pub fn json<T, F, Fut>(f: F) -> Typed<Json, T, F>
where
    F: FnMut(T, Message) -> Fut,
{
    typed(f)
}

/// Makes a handler that decodes the payload with the decoder `D` into `T` and calls
/// `f(value, message)`.
pub fn typed<D, T, F, Fut>(f: F) -> Typed<D, T, F>
where
    F: FnMut(T, Message) -> Fut,
{
    Typed {
        f,
        _marker: PhantomData,
    }
}

impl<D, T, F, Fut, R, E> Service<Message> for Typed<D, T, F>
where
    D: Decode<T>,
    F: FnMut(T, Message) -> Fut,
    Fut: Future<Output = Result<R, E>>,
    R: Into<Outcome>,
    E: Into<BoxError>,
{
    type Response = Outcome;
    type Error = BoxError;
    type Future = Either<Ready<Result<Outcome, BoxError>>, HandlerFuture<Fut>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Message) -> Self::Future {
        // A decoder that panics on these bytes panics on them every time.
        let decoded = std::panic::catch_unwind(|| D::decode(&msg.payload))
            .unwrap_or_else(|panic| Err(Panicked::from_payload(panic).into()));
        match decoded {
            Ok(value) => Either::Right(HandlerFuture::start(|| (self.f)(value, msg))),
            Err(source) => Either::Left(ready(Err(classify::permanent(DecodeError {
                format: D::FORMAT,
                type_name: std::any::type_name::<T>(),
                source,
            })))),
        }
    }
}

#[cfg(test)]
mod tests;
