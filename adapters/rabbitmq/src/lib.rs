//! RabbitMQ adapter for redrive, on [lapin]: a [`Consumer`](redrive_core::Consumer) with
//! prefetch and manual acks, an [`Acker`](redrive_core::Acker) that never loses a
//! message, a confirmed [`Publisher`](redrive_core::Publisher), an idempotent
//! [`Topology`] declare, reconnects, and a [`QueueStats`] poller of queue depths.
//!
//! ```
//! use std::time::Duration;
//! use redrive_core::{handler, Message, OutgoingMessage, Publisher, Worker};
//! use redrive_rabbitmq::{QueueKind, RabbitConsumer, RabbitPublisher, Topology};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let url = std::env::var("AMQP_URL").unwrap_or_else(|_| redrive_rabbitmq::DEFAULT_URL.into());
//! let topology = Topology::new("redrive-doc-orders")
//!     .with_kind(QueueKind::Quorum)
//!     .with_dead_letter_queue("redrive-doc-orders-dlq");
//! let consumer = RabbitConsumer::builder(&url, topology).prefetch(64).connect().await?;
//! let monitor = consumer.monitor();
//!
//! let publisher = RabbitPublisher::connect(&url).await?;
//! publisher.publish("redrive-doc-orders", OutgoingMessage::new("hello")).await?;
//!
//! let worker = Worker::builder(consumer)
//!     .handler(handler::handler_fn(|msg: Message| async move {
//!         println!("attempt {}: {:?}", msg.attempt(), msg.payload);
//!         Ok::<_, std::io::Error>(())
//!     }))
//!     .build()?;
//! let report = worker.run_until(tokio::time::sleep(Duration::from_millis(500))).await;
//! assert!(report.acked >= 1);
//! println!("reconnects: {}", monitor.reconnects());
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//! - **Acks**: a message leaves the queue only by `basic.ack` on the channel it came on.
//!   A delivery whose connection was lost cannot be settled (its acker fails with
//!   [`Error::ChannelClosed`]); the broker delivers it again, as a redelivery.
//! - **Coalesced acks**: acks that end while an earlier settlement frame is being
//!   written (or in the same turn of the scheduler) share one `basic.ack` with
//!   `multiple` set, which the broker handles as one unit of work instead of one per
//!   message. The adapter keeps every delivery's state by
//!   delivery tag, so a multiple ack is sent only when every delivery it covers was
//!   acked (a `basic.nack` goes on the wire before any ack that spans its tag); a
//!   delivery still running ends the run, and the acks behind it go one by one. A lone
//!   ack waits one turn of the scheduler, never for company. A delivery whose acker is dropped
//!   unsettled is handed back with `basic.nack`. [`ConnectionMonitor::settled`] and
//!   [`ConnectionMonitor::settle_frames`] show how many frames the acks took.
//! - **Attempt**: from the quorum queue's `x-delivery-count` where the queue keeps one,
//!   plus the [`ATTEMPT`] header the adapter writes on every republish
//!   ([`mapping`] has the formula).
//! - **Nack**, by queue kind and delay:
//!
//!   | | delay zero | delay > 0 |
//!   |---|---|---|
//!   | quorum | `basic.nack(requeue)`; the broker counts it | republish to a delay queue |
//!   | classic | republish to the queue, attempt + 1 | republish to a delay queue, attempt + 1 |
//!
//! - **Hand-back** (the Worker gives back a message it never ran, when it stops): the
//!   session first cancels its consumer, so the message does not come back to it and
//!   wait there, unsettled, until it closes. A classic queue gets a copy with the
//!   attempt the message had: the next consumer sees the same attempt. A quorum queue
//!   takes it back with `basic.nack(requeue)`; its `x-delivery-count` is the broker's
//!   own, and RabbitMQ 3.x counts that return as a delivery (one more attempt).
//!
//!   The broker also sends deliveries into the prefetch window that the Worker never
//!   takes before it stops. On a classic queue, [`close`](redrive_core::Consumer::close)
//!   hands them back the same way: it cancels the consumer, takes the deliveries
//!   buffered and those that arrive before the `basic.cancel-ok` (within the
//!   [`close_timeout`](ConsumerBuilder::close_timeout)), and republishes each with the
//!   attempt it had, in order, within one
//!   [`publish_timeout`](ConsumerBuilder::publish_timeout) in all; what is not
//!   republished by then goes back with the connection, one attempt more, never lost.
//!   On a quorum queue they go back when the connection closes, and the broker counts
//!   that return as a delivery, as it counts a `basic.nack(requeue)`. Dropping the
//!   consumer without `close` returns them with the connection too, counted on both
//!   queue kinds.
//!
//!   A republish is a copy of the message (same properties and typed headers, the
//!   attempt one higher) published with `mandatory` on a confirm channel; the original
//!   is acked only after the broker confirmed the copy. If the copy fails, the original
//!   is handed back with `basic.nack(requeue)` and the nack reports the error. A
//!   republished message goes to the back of the queue. Delays go through
//!   per-message-TTL delay queues that dead-letter back into the queue ([`topology`]
//!   explains the buckets); the largest delay is declared in the consumer's capabilities.
//!   A delayed copy is persistent whatever the original's `delivery_mode`, and behind a
//!   quorum queue its delay queue is a quorum queue that dead-letters it back at least
//!   once, so a broker restart or a queue without a leader during the delay loses
//!   nothing ([`topology`](topology#delay-queues)).
//! - **Messages no consumer can settle** (one that kills the process or breaks the
//!   connection on every delivery): a quorum queue with a dead-letter queue is declared
//!   with a delivery limit and a dead-letter exchange, so the broker dead-letters it
//!   ([`topology`](topology#messages-no-consumer-can-settle)); a classic queue cannot
//!   count them, and the consumer warns at start.
//! - **A message the client cannot parse** (a header name that is not UTF-8) breaks the
//!   connection, and the broker returns the deliveries of its prefetch window with it,
//!   counting each toward the delivery limit. So that they do not reach the limit with
//!   it, the consumer then consumes with prefetch 1 ("careful mode", logged at warn and
//!   counted by [`ConnectionMonitor::careful_modes`]): only that message breaks the
//!   connection again, until the broker dead-letters it. Once as many deliveries as the
//!   configured prefetch are settled without another such loss, the consumer cancels
//!   its consumer and consumes again on the same channel with the configured prefetch
//!   (RabbitMQ applies a `basic.qos` to the consumers started after it); the deliveries
//!   already sent to the cancelled consumer are settled on that channel as usual.
//!   [`ConnectionMonitor::prefetch`] shows the prefetch in use.
//! - **Bounded settlement**: a republish (delayed retry, classic redelivery or
//!   hand-back) that the broker does not confirm within the builder's
//!   [`publish_timeout`](ConsumerBuilder::publish_timeout) (10 s) fails with
//!   [`Error::Timeout`] and hands the message back with `basic.nack(requeue)`; closing
//!   the connections takes at most its
//!   [`close_timeout`](ConsumerBuilder::close_timeout) (5 s). A broker that blocks
//!   publishing during a resource alarm cannot hold a Worker's shutdown. Republishes go
//!   on a connection of their own, so such an alarm does not stop acks.
//! - **Leases**: none. RabbitMQ keeps an unacked message as long as its channel is open,
//!   so `extend` does nothing and succeeds.
//! - **Connection loss**: detected from the connection's error callback and the end of
//!   the consumer stream; the consumer reconnects with exponential backoff and jitter
//!   ([`Reconnect`]), declares the topology again and resumes consuming. The Worker keeps
//!   running; reconnects are logged and counted ([`ConnectionMonitor`]).
//!
//! # Features
//! - `tls`: `amqps://` addresses through rustls with its ring provider, which the adapter
//!   installs as rustls's process default unless the application installed one. The
//!   server's certificate is checked against the platform's root certificates and, if
//!   given, a CA file: [`ConsumerBuilder::tls_ca_file`],
//!   [`RabbitPublisher::connect_with_ca_file`], [`connect_with_ca_file`]. Off by
//!   default: a plain build compiles no TLS, and an `amqps://` address is then an
//!   [`Error::Config`], never a plaintext connection.
//! - `native-tls`: `amqps://` through the platform's TLS library instead.
//!
//! A connection that fails says why when it can: an `amqp://` address whose port takes
//! TLS only, an `amqps://` address whose port is plaintext, a server certificate of an
//! unknown certificate authority.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod connection;
mod consumer;
mod error;
pub mod mapping;
mod publisher;
pub mod queue_stats;
mod settle;
pub mod topology;

pub use connection::{DEFAULT_URL, Reconnect, connect, connect_with_ca_file};
pub use consumer::{ConnectionMonitor, ConsumerBuilder, RabbitConsumer};
pub use error::{Error, Result};
pub use mapping::{ATTEMPT, AmqpDelivery};
pub use publisher::RabbitPublisher;
pub use queue_stats::{QueueCounts, QueueFigures, QueueStats, QueueStatsBuilder, QueueStatus};
pub use topology::{QueueKind, Topology};

/// The AMQP client this adapter is built on, for typed properties and headers.
pub use lapin;

/// The value of `messaging.system` for RabbitMQ.
pub const SYSTEM: &str = "rabbitmq";
