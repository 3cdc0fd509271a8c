//! The core contract of redrive: [`Message`], [`Delivery`] and [`Acker`], the
//! [`Consumer`] and [`Publisher`] traits with their [`Capabilities`], error
//! classification, handlers, and the [`Worker`] runtime that ties them together.
//!
//! Adapters implement [`Consumer`], [`Acker`] and [`Publisher`] for a broker; the
//! Worker feeds deliveries to any `tower::Service<Message>` and settles each exactly
//! once. Middleware lives in `redrive-middleware`.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backoff;
pub mod classify;
mod consumer;
mod cow_vec;
pub mod delivery;
mod error;
pub mod handler;
mod headers;
mod message;
pub mod names;
mod signal;
pub mod text;
pub mod worker;

#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub mod memory;

#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

pub use backoff::{Backoff, InvalidBackoff, Jitter};
pub use classify::{Classification, Classifier, ErrorKind};
pub use consumer::{Capabilities, Consumer, OrderingScope, Publisher};
pub use delivery::{Acker, Delivery, Settle, SettleFuture};
pub use error::{Error, Result};
pub use handler::{CatchPanic, CatchPanicLayer, Outcome, Panicked, handler_fn};
pub use headers::{HeaderError, HeaderLimits, HeaderValue, Headers};
pub use message::{Extensions, Message, Metadata, OutgoingMessage, Source};
pub use signal::shutdown_signal;
pub use worker::{
    Execution, Health, HealthReport, LeaseKeeping, OrderingMode, Pipeline, Redelivery, Report,
    Shutdown, Worker, WorkerBuilder,
};

/// A boxed error, as handlers and layers pass them around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
