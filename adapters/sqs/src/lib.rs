//! AWS SQS adapter for redrive, on `aws-sdk-sqs`: a [`Consumer`](redrive_core::Consumer)
//! with long polling, batched deletes and visibility-timeout leases, and a
//! [`Publisher`](redrive_core::Publisher) that fits headers into SQS's 10 message
//! attributes.
//!
//! ```no_run
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message, OutgoingMessage, Publisher, Worker};
//! use redrive_sqs::Sqs;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), BoxError> {
//! // Region and credentials from the AWS configuration chain; the endpoint given here
//! // (an emulator) or from it.
//! let sqs = Sqs::from_env_with_endpoint("http://127.0.0.1:9324").await;
//! sqs.publisher()
//!     .publish("orders", OutgoingMessage::new("hello").with_header("x-correlation-id", "c-1")?)
//!     .await?;
//!
//! let consumer = sqs.consumer("orders").wait_time(Duration::from_secs(20)).build().await?;
//! let handler = handler::handler_fn(|msg: Message| async move {
//!     println!("{:?} (attempt {})", msg.payload, msg.attempt());
//!     Ok::<_, BoxError>(())
//! });
//! let report = Worker::builder(consumer).service(handler)
//!     .concurrency(32)
//!     .build()? // the lease is the queue's visibility timeout: the Worker extends it
//!     .run_until(redrive_core::shutdown_signal()) // SIGTERM or Ctrl-C
//!     .await;
//! println!("{report:?}");
//! # Ok(())
//! # }
//! ```
//!
//! # What maps to what
//! | redrive | SQS |
//! |---|---|
//! | `receive` | `ReceiveMessage`: long poll (20 s by default), up to 10 per call, buffered |
//! | `attempt` | `ApproximateReceiveCount`, less the receives this consumer gave back untried (see [`SqsConsumer`]) |
//! | `enqueued_at` | `SentTimestamp` |
//! | `key` | `MessageGroupId` on FIFO queues; the [`KEY_ATTRIBUTE`](attributes::KEY_ATTRIBUTE) on standard ones |
//! | headers | message attributes, overflow packed: see [`attributes`] |
//! | `ack` | `DeleteMessageBatch`, batched by 10 or a 10 ms flush; resolves when confirmed |
//! | `nack(delay)` | `ChangeMessageVisibility` to `delay` (whole seconds, at most 12 h) |
//! | `extend(lease)` | `ChangeMessageVisibility` to `lease` |
//! | `hand_back` (untried) | `ChangeMessageVisibility` to 0, the receive remembered as untried |
//! | lease (capability) | the visibility timeout, read at start-up with `GetQueueAttributes` |
//! | ordering (capability) | per key (group) on FIFO queues, none on standard ones |
//! | `publish` | `SendMessage`; [`SqsPublisher::send_batch`] uses `SendMessageBatch`, and so does a [`BatchingPublisher`] for the publishes waiting at once |
//!
//! # Guarantees
//! - **Leases**: the consumer declares the visibility timeout as an extendable lease, so
//!   the Worker extends it (`ChangeMessageVisibility`) every half lease while a handler
//!   runs or a message is parked: a slow handler is not delivered twice. Extensions stop
//!   when the message is settled.
//! - **Prefetch is bounded**: one batch is fetched ahead at most, and a fetched message
//!   that waited longer than `max_buffer_age` is made visible again instead of being
//!   handed out with its visibility timeout nearly spent.
//! - **Cancel-safe `receive`**: fetches run in their own task; a dropped `receive`
//!   loses nothing.
//! - **Acks are confirmed**: an ack resolves only when SQS confirmed the delete; entries
//!   SQS failed on its side are retried, then reported as an error (the message comes
//!   back, and is handled again: make handlers idempotent, as with any SQS consumer).
//! - **Nothing dropped silently on publish**: a message that cannot be laid out in SQS's
//!   limits fails with an [`Error`] that says why, before any request.
//! - **Native redrive policy**: see [`RedrivePolicy`] for how SQS's `maxReceiveCount`
//!   and redrive's dead-letter limit interact (set `maxReceiveCount` above redrive's).
//!   A consumer of a queue without one warns at start-up, with the attribute to set.
//! - **Queue names SQS accepts**: names are checked against SQS's rules
//!   ([`validate_queue_name`]) before any request, since emulators accept more: name a
//!   dead-letter queue `orders-dlq`, not `orders.dlq`. A publish SQS would refuse every
//!   time is [`redrive_core::Error::Rejected`].
//!
//! # Configuration
//! [`Sqs::from_env`] takes region, credentials and endpoint from the normal AWS chain
//! (`AWS_REGION`, `AWS_ACCESS_KEY_ID`, profiles, instance roles, `AWS_ENDPOINT_URL_SQS`);
//! [`Sqs::from_env_with_endpoint`] overrides the endpoint; [`Sqs::from_sdk_config`] and
//! [`Sqs::from_client`] take what the application built.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod acker;
pub mod attributes;
mod client;
mod consumer;
mod error;
mod name;
mod publisher;
pub mod queue_stats;

pub use acker::MAX_VISIBILITY_TIMEOUT;
pub use attributes::HeaderOverflow;
pub use client::{QueueInfo, RedrivePolicy, Sqs};
pub use consumer::{SqsConsumer, SqsConsumerBuilder};
pub use error::{Error, Result};
pub use name::{FIFO_SUFFIX, MAX_QUEUE_NAME_LEN, validate_queue_name};
pub use publisher::{
    BatchingPublisher, DEAD_LETTER_HEADER, DEFAULT_MAX_MESSAGE_BYTES, FifoDeduplication,
    SqsPublisher,
};
pub use queue_stats::{QueueCounts, QueueFigures, QueueStats, QueueStatsBuilder, QueueStatus};

/// Re-exported so applications can build their own client or configuration.
pub use aws_config;
/// Re-exported so applications can build their own client or configuration.
pub use aws_sdk_sqs;

/// The value of `messaging.system` for SQS (as OpenTelemetry names it).
pub const SYSTEM: &str = "aws_sqs";
