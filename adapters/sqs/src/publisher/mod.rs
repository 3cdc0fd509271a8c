//! The publisher: `SendMessage` and `SendMessageBatch`, with headers as attributes.

mod batching;

use std::time::Duration;

use aws_sdk_sqs::types::{BatchResultErrorEntry, SendMessageBatchRequestEntry};
use redrive_core::{OutgoingMessage, Publisher};

pub use batching::BatchingPublisher;

use crate::attributes::{self, Encoded, HeaderOverflow, UNKEYED_GROUP_PREFIX};
use crate::client::is_fifo_name;
use crate::{Error, Result, Sqs};

/// The classic SQS message size limit, 256 KiB: the default `max_message_bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;

/// How a publish to a FIFO queue sets the deduplication id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FifoDeduplication {
    /// A fresh random id per message published: every publish is a new message (the
    /// SDK's own retries of one request reuse it, so they are deduplicated). The default.
    #[default]
    PerMessage,
    /// No id: the queue must have `ContentBasedDeduplication` turned on, and SQS drops a
    /// message with the same body as one sent in the last 5 minutes.
    ///
    /// Except for dead letters: a message that carries redrive's dead-letter envelope
    /// (the [`DEAD_LETTER_HEADER`] header) gets a fresh random id all the same. SQS
    /// answers a dropped send as a success, so a second dead letter of one body would
    /// be lost while its original is deleted.
    ContentBased,
}

/// A header every dead letter carries: the dead-letter layer's error kind
/// ([`redrive_core::names::ERROR_KIND`]). A FIFO publish of a message with it always
/// gets a deduplication id of its own ([`FifoDeduplication::ContentBased`]).
pub const DEAD_LETTER_HEADER: &str = redrive_core::names::ERROR_KIND;

/// Publishes to SQS queues, by name or URL; the destination of
/// [`Publisher::publish`] is a queue. Cheap to clone. Made by [`Sqs::publisher`].
///
/// Headers become message attributes as described in [`attributes`](crate::attributes):
/// up to 10, with the rest packed into one JSON attribute unless packing is turned off.
/// On a FIFO queue (a name ending in `.fifo`) the key is the message group id and each
/// message gets a deduplication id ([`FifoDeduplication`]); an unkeyed message gets a
/// group of its own.
///
/// A queue name is checked against SQS's rules first
/// ([`validate_queue_name`](crate::validate_queue_name)): `orders.dlq`, which some
/// emulators accept, fails before any request (name a dead-letter queue `orders-dlq`).
/// A publish SQS would refuse every time is [`redrive_core::Error::Rejected`], so a
/// dead-letter layer can tell it from an outage.
///
/// | setting | default |
/// |---|---|
/// | `header_overflow` | [`HeaderOverflow::Pack`] |
/// | `max_message_bytes` (body and attributes) | 256 KiB |
/// | `fifo_deduplication` | [`FifoDeduplication::PerMessage`] (a dead letter always gets an id of its own) |
#[derive(Clone, Debug)]
pub struct SqsPublisher {
    sqs: Sqs,
    overflow: HeaderOverflow,
    max_message_bytes: usize,
    dedup: FifoDeduplication,
}

struct Prepared {
    encoded: Encoded,
    group_id: Option<String>,
    dedup_id: Option<String>,
}

impl Prepared {
    /// The message as an entry of a `SendMessageBatch` request.
    fn into_entry(self, id: String) -> SendMessageBatchRequestEntry {
        SendMessageBatchRequestEntry::builder()
            .id(id)
            .message_body(self.encoded.body)
            .set_message_attributes(Some(self.encoded.attributes).filter(|a| !a.is_empty()))
            .set_message_group_id(self.group_id)
            .set_message_deduplication_id(self.dedup_id)
            .build()
            .expect("id and body are set")
    }
}

/// The error of an entry SQS failed in a `SendMessageBatch` answer.
fn entry_error(f: &BatchResultErrorEntry) -> Error {
    Error::BatchEntry {
        operation: "SendMessageBatch",
        code: f.code().to_owned(),
        message: f.message().unwrap_or_default().to_owned(),
        sender_fault: f.sender_fault(),
    }
}

fn random_id() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

impl SqsPublisher {
    /// A publisher with the default settings.
    pub fn new(sqs: Sqs) -> Self {
        SqsPublisher {
            sqs,
            overflow: HeaderOverflow::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            dedup: FifoDeduplication::default(),
        }
    }

    /// What to do with headers beyond SQS's 10 attributes.
    #[must_use]
    pub fn with_header_overflow(mut self, overflow: HeaderOverflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// The largest message (body plus attributes, as SQS counts them) to send; larger
    /// ones fail with [`Error::MessageTooLarge`] before any request. Raise it up to
    /// 1 MiB for queues whose `MaximumMessageSize` allows it.
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// How FIFO deduplication ids are set.
    #[must_use]
    pub fn with_fifo_deduplication(mut self, dedup: FifoDeduplication) -> Self {
        self.dedup = dedup;
        self
    }

    /// This publisher, with concurrent publishes to one queue gathered into
    /// `SendMessageBatch` calls: a publish waits at most `linger` for others to join its
    /// call (zero: it goes with those already waiting). See [`BatchingPublisher`].
    pub fn batched(self, linger: Duration) -> BatchingPublisher {
        BatchingPublisher::new(self, linger)
    }

    fn prepare(&self, fifo: bool, msg: &OutgoingMessage) -> Result<Prepared> {
        let encoded = attributes::encode(msg, !fifo, self.overflow, self.max_message_bytes)?;
        if !fifo {
            return Ok(Prepared {
                encoded,
                group_id: None,
                dedup_id: None,
            });
        }
        let dead_letter = msg.headers.get(DEAD_LETTER_HEADER).is_some();
        let dedup_id = (self.dedup == FifoDeduplication::PerMessage || dead_letter).then(random_id);
        let group_id = match &msg.key {
            Some(key) => attributes::group_id(key)?.to_owned(),
            None => format!("{UNKEYED_GROUP_PREFIX}{}", random_id()),
        };
        Ok(Prepared {
            encoded,
            group_id: Some(group_id),
            dedup_id,
        })
    }

    /// Sends one message with `SendMessage` and returns SQS's message id.
    ///
    /// # Errors
    /// A queue name SQS does not accept ([`Error::InvalidQueueName`]), a header, key or
    /// size SQS cannot take (all before any request), a missing queue
    /// ([`Error::QueueDoesNotExist`]), or the request's error. Through
    /// [`Publisher::publish`], those that would fail again the same way
    /// ([`Error::is_rejection`]) are [`redrive_core::Error::Rejected`], and a missing
    /// queue is [`redrive_core::Error::UnknownDestination`].
    pub async fn send(&self, queue: &str, message: &OutgoingMessage) -> Result<String> {
        let url = self.sqs.queue_url(queue).await?;
        let p = self.prepare(is_fifo_name(&url), message)?;
        let out = self
            .sqs
            .client()
            .send_message()
            .queue_url(&url)
            .message_body(p.encoded.body)
            .set_message_attributes(Some(p.encoded.attributes).filter(|a| !a.is_empty()))
            .set_message_group_id(p.group_id)
            .set_message_deduplication_id(p.dedup_id)
            .send()
            .await
            .map_err(|e| Error::for_queue(queue, "SendMessage", e))?;
        Ok(out.message_id().unwrap_or_default().to_owned())
    }

    /// Sends messages with `SendMessageBatch`, 10 per call (fewer where their size
    /// needs), in order, and returns once SQS has accepted every one.
    ///
    /// Every message is checked before anything is sent. A failed entry fails the call
    /// with that entry's error; the entries before it were sent, so a retry of the whole
    /// call may duplicate them (as any at-least-once publish may).
    ///
    /// # Errors
    /// As [`send`](Self::send), or [`Error::BatchEntry`] for an entry SQS refused.
    pub async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<()> {
        let url = self.sqs.queue_url(queue).await?;
        let fifo = is_fifo_name(&url);
        let prepared = messages
            .iter()
            .map(|m| self.prepare(fifo, m))
            .collect::<Result<Vec<_>>>()?;
        let mut batch: Vec<SendMessageBatchRequestEntry> = Vec::new();
        let mut size = 0;
        for (i, p) in prepared.into_iter().enumerate() {
            let entry_size = p.encoded.size();
            if batch.len() == crate::acker::MAX_BATCH
                || (!batch.is_empty() && size + entry_size > self.max_message_bytes)
            {
                self.send_entries(queue, &url, std::mem::take(&mut batch))
                    .await?;
                size = 0;
            }
            size += entry_size;
            batch.push(p.into_entry(i.to_string()));
        }
        if !batch.is_empty() {
            self.send_entries(queue, &url, batch).await?;
        }
        Ok(())
    }

    async fn send_entries(
        &self,
        queue: &str,
        url: &str,
        entries: Vec<SendMessageBatchRequestEntry>,
    ) -> Result<()> {
        let out = self
            .sqs
            .client()
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| Error::for_queue(queue, "SendMessageBatch", e))?;
        match out.failed().first() {
            None => Ok(()),
            Some(f) => Err(entry_error(f)),
        }
    }
}

impl Publisher for SqsPublisher {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.send(destination, &message).await?;
        Ok(())
    }

    /// A queue URL is taken as it is; a queue name must be one SQS accepts
    /// ([`validate_queue_name`](crate::validate_queue_name)).
    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        if destination.starts_with("https://") || destination.starts_with("http://") {
            return Ok(());
        }
        crate::validate_queue_name(destination)
            .map_err(|e| redrive_core::Error::config(e.to_string()))
    }
}
