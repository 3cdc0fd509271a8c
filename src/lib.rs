//! # redrive
//!
//! Consumer-side reliability for message brokers. Brokers deliver at least once; redrive
//! gives every consumer retries with backoff, dead-lettering, idempotency, ordering per
//! key, lease keeping, graceful shutdown and observability, as tower layers over a
//! broker-agnostic [`Consumer`].
//!
//! This crate re-exports [`redrive_core`] (the contract and the [`Worker`]) and
//! [`redrive_middleware`] (the layers).
//!
//! ```
//! use std::time::Duration;
//! use redrive::memory::MemoryBroker;
//! use redrive::{handler, Message, OutgoingMessage, Publisher, Worker};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), redrive::BoxError> {
//! let broker = MemoryBroker::new();
//! broker.publish("emails", OutgoingMessage::new("to: ops@example.com")).await?;
//!
//! let handler = handler::handler_fn(|msg: Message| async move {
//!     // send the email...
//!     let _ = msg.payload;
//!     Ok::<_, std::io::Error>(())
//! });
//! let report = Worker::builder(broker.consumer("emails")).service(handler)
//!     .build()?
//!     .run_until(tokio::time::sleep(Duration::from_millis(20)))
//!     .await;
//! assert_eq!(report.processed, 1);
//! # Ok(())
//! # }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use redrive_core::*;
pub use redrive_middleware as middleware;

#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod config;

/// The RabbitMQ adapter.
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub use redrive_rabbitmq as rabbitmq;

/// The AWS SQS adapter.
#[cfg(feature = "sqs")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqs")))]
pub use redrive_sqs as sqs;

/// The Kafka adapter.
#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub use redrive_kafka as kafka;

/// The README's examples, compiled as doc tests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
