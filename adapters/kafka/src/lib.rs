//! Kafka adapter for redrive, on rdkafka: a [`Consumer`](redrive_core::Consumer) whose
//! committed offsets follow a per-partition watermark of completed records, and a
//! [`Publisher`](redrive_core::Publisher) that waits for the broker's acknowledgement.
//!
//! ```no_run
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message, OrderingMode, Worker};
//! use redrive_kafka::KafkaConsumer;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), BoxError> {
//! let consumer = KafkaConsumer::builder("127.0.0.1:9092", "billing", ["orders"]).build()?;
//! let handler = handler::handler_fn(|msg: Message| async move {
//!     println!("{:?} (attempt {})", msg.payload, msg.attempt());
//!     Ok::<_, BoxError>(())
//! });
//! let report = Worker::builder(consumer).service(handler)
//!     .concurrency(64)
//!     .ordering(OrderingMode::PerKey) // keys of one partition in parallel, each in order
//!     .redelivery(redrive_core::Redelivery::exponential(
//!         Duration::from_millis(100),
//!         Duration::from_secs(30),
//!     ))
//!     .build()?
//!     .run_until(redrive_core::shutdown_signal()) // SIGTERM or Ctrl-C
//!     .await;
//! println!("{report:?}");
//! # Ok(())
//! # }
//! ```
//!
//! # How it works
//! - **Ordering and parallelism**: the Worker's [`OrderingMode::PerKey`] runs records
//!   with different keys in parallel, also within one partition, and records of one key
//!   strictly in order; [`OrderingMode::PerPartition`] runs each partition in order.
//!   With [`OrderingMode::Unordered`] records run in any order.
//! - **Offset watermark**: per partition, the committed offset only moves to just past
//!   the longest run of records whose deliveries were acked. A slow, parked or failed
//!   record holds it. Records after it that completed are kept in the committed
//!   offset's metadata (see below), so after a crash or a rebalance consumption resumes
//!   at the first record not known complete and skips the ones known complete: nothing
//!   is lost, and duplicates are bounded by the work since the last commit. Watermarks
//!   are committed every [`commit_interval`](KafkaConsumerBuilder::commit_interval),
//!   when partitions are revoked, and on close. `enable.auto.commit` and
//!   `enable.auto.offset.store` are off: the adapter commits explicit offsets and
//!   nothing else does.
//! - **A record that holds its partition**: records received after the oldest
//!   incomplete one are kept (16 bytes each) until it completes. At
//!   [`max_open_per_partition`](KafkaConsumerBuilder::max_open_per_partition) of them
//!   (default 100 000) the partition is paused, with a warning naming the stuck offset
//!   and how long it has been open, and resumed once down to half; the other partitions
//!   flow on. [`KafkaConsumer::open_records`] reads the counts, to export as metrics.
//! - **Retries by parking** (the default): Kafka cannot hand back one record, so the
//!   consumer declares `can_nack = false` and the Worker parks a failed record: it runs
//!   it again after its redelivery delay as the next attempt, later records of its key
//!   wait, other keys flow on. A parked record holds its partition's watermark until it
//!   succeeds or is dead-lettered. For failures that last, use
//!   [retry topics](#retry-topics).
//! - **What survives a restart**: the committed offset's metadata keeps what the
//!   offset alone cannot (`redrive:a=<offset>:<deliveries>,…;d=<gap>.<len>.…`, at most
//!   4,000 bytes, under Kafka's default `offset.metadata.max.bytes`):
//!   - *records completed past the offset*, as runs. After a restart or a rebalance
//!     they are received complete and skipped (logged at debug, counted in
//!     [`PartitionBacklog::skipped`], summed up at info at assignment), so a restart
//!     redoes only records that were not done. A partition whose completed records
//!     make 128 runs (completions scattered between incomplete records) is paused
//!     until they merge, so the metadata always fits;
//!   - *deliveries of records that did not complete*. Before a record runs again in
//!     place, and before the first record of an assignment runs (the one at the
//!     committed offset, which may be the record that killed the last consumer), its
//!     count of deliveries is committed (waiting at most 5 s); its completion is
//!     committed before its ack completes. A record the metadata counts is delivered
//!     with `attempt` one above the count, so a record retried in place keeps its
//!     attempts across a crash, a restart and a rebalance, a record that kills its
//!     process (an abort, running out of memory) is seen with a rising attempt after
//!     each restart, and a dead-letter layer's `max_attempts` means the same as on a
//!     broker that counts deliveries itself. A crash while a record that kills is not
//!     yet first and not retried (records before it still uncommitted) is not counted;
//!     it becomes first within that many restarts. Every record running at the crash
//!     is a suspect, as with a broker's delivery count.
//!
//!   Needs a broker that returns commit metadata (Kafka does; tansu 0.6 answers with
//!   none, so on it completed records come again and counts start from the record's
//!   header). Metadata that is not redrive's is ignored.
//! - **Rebalances**: on revoke, records of the revoked partitions are no longer
//!   started (the Worker hands back queued, waiting and parked ones unrun), the ones
//!   running in a handler get up to
//!   [`revoke_timeout`](KafkaConsumerBuilder::revoke_timeout) to complete (the Worker
//!   tells the adapter through [`Acker::running`](redrive_core::Acker::running)), then
//!   completed work is committed synchronously, so the new owner starts after it. Acks
//!   that arrive later are ignored (the new owner gets those records again). On
//!   assign, tracking starts afresh.
//! - **Shutdown**: the Worker hands back parked and waiting records (they stay
//!   uncommitted), then calls [`close`](redrive_core::Consumer::close), which commits the
//!   final watermarks and leaves the group off the runtime, each bounded by
//!   [`close_timeout`](KafkaConsumerBuilder::close_timeout), so it cannot hang.
//!   Reading the committed offsets at assignment (for their metadata) is bounded by
//!   5 s; past it the metadata is not read, with a warning.
//! - **Throughput**: records are polled by a task of their own and handed to the Worker
//!   in batches. For handlers that do little per record, run calls in the Worker's task
//!   ([`Execution::InTask`]): on a 2-core machine, with the full middleware Stack around
//!   a no-op handler, a record took about 4 µs of CPU there and 6.3 to 7.6 µs with a
//!   task per call, the default, which kept up with the broker on the same machine in
//!   13 of 22 rounds where the in-task Worker kept up in all (`cargo bench -p
//!   redrive-kafka`, in the repository). A task per call spreads handlers that compute
//!   over the runtime's threads.
//!
//! # Retry topics
//! Parking keeps a failed record in the process: its wait lives in memory, and it
//! holds its partition's committed offset, so a long outage fills
//! [`max_open_per_partition`](KafkaConsumerBuilder::max_open_per_partition) and a
//! restart runs it again at once. Each parked record also splits the completed records
//! after it into another run of the commit metadata, so failures scattered through a
//! partition pause it at 128 runs until parked records complete (at 1 % failing with a
//! 100 ms delay, a few times a second: see `BENCHMARKS.md` in the repository). With
//! [`retry_topics`](KafkaConsumerBuilder::retry_topics), a failed record leaves the
//! partition instead:
//!
//! - **The nack republishes it** to a delay topic of the consumer group,
//!   `<topic>.retry.<group>.<delay>ms`, chosen by the nack's delay (the smallest delay
//!   at least as long), with the record's payload, key and headers (its trace context
//!   among them) and these headers: [`x-redrive-attempt`](redrive_core::names::ATTEMPT)
//!   (the next attempt), [`x-redrive-due`](retry::DUE) (when it is due, ms since the
//!   epoch), `message-id` (the origin record's id) and the
//!   [origin](retry::ORIGIN_TOPIC)'s topic, partition and offset. Once the broker
//!   acknowledged the copy the record completes, and its partition moves on. A publish
//!   that fails or times out ([`RetryTopics::with_timeout`], 5 s) is tried again in the
//!   background, from 1 s doubling to 30 s, until the retry topic takes it (the record
//!   then completes) or the partition goes to another consumer (which gets the record);
//!   meanwhile the record holds its partition's committed offset, so a restart runs it
//!   again.
//! - **The consumer reads the delay topics** beside its own. A record that is not due
//!   holds its delay topic's partition: that partition alone is paused, no thread
//!   sleeps, polling goes on, so a delay may be longer than `max.poll.interval.ms`; the
//!   poll task hands the record out when it is due, and resumes the partition. A due
//!   time is trusted no further than the topic's delay after the record was published
//!   (its timestamp): a record written by hand, or by a producer whose clock is ahead,
//!   cannot hold the partition longer. It is
//!   delivered as its origin record: `source` names the origin topic, partition and
//!   offset, `attempt` comes from its header, and its message id, trace and correlation
//!   id are the origin's. A dead-letter layer sees the same attempt count after a crash,
//!   a restart or a rebalance (the header travels with the record; a record killed
//!   while running is counted in the commit metadata, as above), and its default
//!   destination is `<origin topic>-dlq`.
//! - **Ordering**: a retried record is no longer in order with the records of its key.
//!   The Worker nacks only with [`OrderingMode::Unordered`]; with `PerKey` or
//!   `PerPartition` it parks, as without retry topics. The consumer's largest nack
//!   delay is the longest delay, so the Worker refuses a [`Redelivery`] backoff that
//!   reaches past it.
//! - **The delay topics must exist**:
//!   [`create_retry_topics`](KafkaConsumerBuilder::create_retry_topics) creates the
//!   missing ones with their origin topic's partition count, or create them with the
//!   cluster's tools (names from [`RetryTopics::topics`]). They belong to the
//!   consumer's group: another group of the same topic has retry topics of its own.
//!
//! ```no_run
//! use std::time::Duration;
//! use redrive_core::{handler, BoxError, Message, OrderingMode, Redelivery, Worker};
//! use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), BoxError> {
//! let delays = [Duration::from_secs(1), Duration::from_secs(10), Duration::from_secs(60)];
//! let retries = RetryTopics::new(KafkaPublisher::new("127.0.0.1:9092")?, delays);
//! let builder = KafkaConsumer::builder("127.0.0.1:9092", "billing", ["orders"])
//!     .retry_topics(retries);
//! builder.create_retry_topics().await?; // orders.retry.billing.1000ms, …
//! let consumer = builder.build()?;
//! let handler = handler::handler_fn(|msg: Message| async move { Ok::<_, BoxError>(()) });
//! Worker::builder(consumer)
//!     .service(handler)
//!     .ordering(OrderingMode::Unordered)
//!     .redelivery(Redelivery::exponential(Duration::from_secs(1), Duration::from_secs(60)))
//!     .build()?
//!     .run_until(redrive_core::shutdown_signal())
//!     .await;
//! # Ok(())
//! # }
//! ```
//!
//! # TLS and SASL
//! With the `tls` feature (`kafka-tls` of the `redrive` crate), librdkafka is built
//! with the system OpenSSL (`libssl-dev` and `pkg-config` on Debian), which brings TLS
//! and SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (Kerberos is not built in). Without
//! it, a client with a TLS or SCRAM setting is refused when built, with an
//! [`Error::Config`] that names the feature.
//!
//! ```no_run
//! use redrive_kafka::{KafkaConsumer, KafkaPublisher, SaslMechanism};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), redrive_kafka::Error> {
//! let password = std::env::var("KAFKA_PASSWORD").unwrap_or_default();
//! let consumer = KafkaConsumer::builder("broker-1:9093", "billing", ["orders"])
//!     .tls_ca_file("/etc/kafka/ca.pem") // leave out to trust the system's CAs
//!     .sasl(SaslMechanism::ScramSha512, "billing", &password)
//!     .build()?;
//! let dead_letters = KafkaPublisher::builder("broker-1:9093")
//!     .tls_ca_file("/etc/kafka/ca.pem")
//!     .sasl(SaslMechanism::ScramSha512, "billing", &password)
//!     .build()?;
//! # Ok(())
//! # }
//! ```
//!
//! | to | on [`KafkaConsumerBuilder`], [`KafkaPublisherBuilder`], [`ConsumerLagBuilder`] | librdkafka settings |
//! |---|---|---|
//! | use TLS, trusting the system's CAs | `.set("security.protocol", "ssl")` | `security.protocol=ssl` |
//! | trust a CA file (PEM) | `tls_ca_file(path)` | `security.protocol=ssl`, `ssl.ca.location` |
//! | log in with SASL PLAIN or SCRAM | `sasl(SaslMechanism::…, user, password)` | `security.protocol=sasl_ssl`, `sasl.mechanisms`, `sasl.username`, `sasl.password` |
//! | present a client certificate (mTLS) | `.set("ssl.certificate.location", cert).set("ssl.key.location", key)` | and `ssl.key.password` for an encrypted key |
//!
//! `tls_ca_file` and `sasl` go together in either order (`sasl_ssl`); SASL over
//! plaintext is only for a local broker: set `security.protocol=sasl_plaintext`, and
//! `sasl` keeps it. librdkafka checks the broker's host name against its certificate
//! (`ssl.endpoint.identification.algorithm=https`); the certificate must name the
//! address the broker advertises. The builders' `Debug` output hides `sasl.password`
//! and `ssl.key.password`. Give the dead-letter publisher and the lag poller the same
//! settings as the consumer.
//!
//! A handshake that fails (a CA that did not issue the broker's certificate) shows in
//! the consumer's first receive, within milliseconds, as an [`Error::Kafka`] that says
//! what to check; librdkafka reports the exact cause
//! through the `log` crate. A publish waits for a connection until the record's
//! `message.timeout.ms` (300 s by default), then fails as timed out. A TLS client at a
//! plaintext port gets no error: it waits, as for a broker that does not answer.
//!
//! [`OrderingMode::PerKey`]: redrive_core::OrderingMode::PerKey
//! [`OrderingMode::PerPartition`]: redrive_core::OrderingMode::PerPartition
//! [`OrderingMode::Unordered`]: redrive_core::OrderingMode::Unordered
//! [`Execution::InTask`]: redrive_core::Execution::InTask
//! [`Redelivery`]: redrive_core::Redelivery
#![cfg_attr(docsrs, feature(doc_cfg))]

mod consumer;
mod error;
pub mod lag;
pub mod mapping;
mod publisher;
pub mod retry;
mod security;
mod watermark;

pub use consumer::{KafkaConsumer, KafkaConsumerBuilder, OpenRecords};
pub use error::{Error, Result};
pub use lag::{ConsumerLag, ConsumerLagBuilder, LagStatus, PartitionLag, TopicLag};
pub use publisher::{KafkaPublisher, KafkaPublisherBuilder};
pub use retry::RetryTopics;
pub use security::SaslMechanism;
pub use watermark::PartitionBacklog;

/// Re-exported so applications can configure clients and use the mock cluster.
pub use rdkafka;

/// The value of `messaging.system` for Kafka (as OpenTelemetry names it).
pub const SYSTEM: &str = "kafka";
