//! Records to [`Message`]s.
//!
//! | Kafka | redrive |
//! |---|---|
//! | value | `payload` (an empty or null value is an empty payload) |
//! | key | `key` (the ordering key) |
//! | headers | `headers`, in order, repeats kept: UTF-8 values as strings, others as bytes, a null value as empty bytes (see below for the ones left out) |
//! | topic, partition, offset | `metadata.source` |
//! | the consumer's `group.id` | `metadata.source.group` |
//! | the `message-id` header, else `<topic>-<partition>-<offset>@<timestamp ms>` (see below) | `metadata.message_id` |
//! | the `x-redrive-attempt` header, else 1; for a record the committed offset's metadata counts, at least one above its count (see the [crate docs](crate)) | `metadata.attempt` (the Worker counts parked retries on top) |
//! | for a record of a retry topic: the origin topic, and the `x-redrive-origin-partition` and `-offset` headers | `metadata.source` (see [retry topics](crate#retry-topics)) |
//! | timestamp (create or log-append time) | `metadata.enqueued_at` |
//!
//! The id made for a record without a `message-id` header names the record itself:
//! the same on every delivery of it, to any consumer group, and different for another
//! record at the same offset of a topic deleted and created again (its timestamp, the
//! producer's create time or the broker's append time, differs; librdkafka does not
//! give a consumed record its topic's id). A record without a timestamp (a message
//! format older than Kafka 0.10) gets `<topic>-<partition>-<offset>`.
//!
//! A header redrive cannot take is left out, alone: one whose name is not UTF-8 (Kafka
//! allows any bytes; rdkafka cannot return such a name, so it is dropped), one whose
//! name is empty, and one past the [`HeaderLimits`](redrive_core::HeaderLimits). The
//! headers after it are kept, and the record is delivered like any other. Each record
//! with headers left out logs one warning with their count and the first reason.
//!
//! rdkafka reads a name that is not UTF-8 with a panic, which the mapping catches: the
//! panic hook still reports it, and a build with `panic = "abort"` aborts on such a
//! record.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Headers as KafkaHeaders};
use redrive_core::names::{ATTEMPT, MESSAGE_ID};
use redrive_core::{HeaderError, HeaderValue, Headers, Message};

use crate::SYSTEM;

/// A [`Message`] holding a copy of the record's data, delivered to consumer group
/// `group`; `topic` is the record's topic name, shared. Its `received_at` is when it
/// was made (by [`Message::new`]).
pub(crate) fn message(record: &BorrowedMessage<'_>, topic: Arc<str>, group: Arc<str>) -> Message {
    from_parts(Parts {
        topic,
        group,
        partition: record.partition(),
        offset: record.offset(),
        payload: record.payload().unwrap_or_default(),
        key: record.key(),
        headers: record.headers(),
        timestamp_ms: record.timestamp().to_millis(),
    })
}

/// What a [`Message`] is made of: a record's parts, its headers read through rdkafka's
/// [`Headers`](KafkaHeaders) trait (so the mapping can be driven without a broker).
pub(crate) struct Parts<'a, H> {
    pub(crate) topic: Arc<str>,
    /// The consumer group the record was delivered to.
    pub(crate) group: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) payload: &'a [u8],
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) headers: Option<&'a H>,
    /// Milliseconds since the Unix epoch, if the record has a timestamp.
    pub(crate) timestamp_ms: Option<i64>,
}

/// The mapping of the module's table, from a record's parts.
pub(crate) fn from_parts<H: KafkaHeaders>(parts: Parts<'_, H>) -> Message {
    let headers = match parts.headers {
        Some(hs) => {
            let (headers, left_out) = headers(hs);
            if let Some(first) = left_out.first {
                tracing::warn!(
                    topic = &*parts.topic,
                    partition = parts.partition,
                    offset = parts.offset,
                    left_out = left_out.count,
                    first = %first,
                    "record headers left out; the record is delivered with the others"
                );
            }
            headers
        }
        None => Headers::new(),
    };
    let (payload, key) = payload_and_key(parts.payload, parts.key);
    let mut msg = Message::new(payload);
    msg.key = key;
    let meta = &mut msg.metadata;
    meta.message_id = Some(headers.get_str(MESSAGE_ID).map_or_else(
        || {
            record_id(
                &parts.topic,
                parts.partition,
                parts.offset,
                parts.timestamp_ms,
            )
        },
        Arc::from,
    ));
    meta.attempt = headers
        .get_str(ATTEMPT)
        .and_then(|a| a.parse().ok())
        .filter(|&a| a >= 1)
        .unwrap_or(1);
    meta.enqueued_at = parts
        .timestamp_ms
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    meta.source.system = SYSTEM;
    meta.source.destination = parts.topic;
    meta.source.partition = Some(parts.partition);
    meta.source.offset = Some(parts.offset);
    meta.source.group = Some(parts.group);
    msg.headers = headers;
    msg
}

/// Headers of a record left out of its message: how many, and why the first was.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LeftOut {
    pub(crate) count: usize,
    pub(crate) first: Option<String>,
}

impl LeftOut {
    fn add(&mut self, count: usize, why: impl FnOnce() -> String) {
        self.count += count;
        if self.first.is_none() {
            self.first = Some(why());
        }
    }
}

/// Longest part of a header name quoted in a log line.
const QUOTED_NAME_BYTES: usize = 64;

/// The record's headers in order, repeats kept. A header that cannot be taken is left
/// out alone and counted, and the headers after it are still read: one whose name is
/// not UTF-8 (Kafka allows any bytes; rdkafka panics reading such a name, and that
/// panic is caught here, so the panic hook still sees it), one whose name is empty
/// (Kafka allows it; [`Headers`] do not), and one past the header limits. Once the
/// count limit is reached the remaining headers are counted without being read.
pub(crate) fn headers<H: KafkaHeaders>(hs: &H) -> (Headers, LeftOut) {
    let mut headers = Headers::new();
    let mut left_out = LeftOut::default();
    let count = hs.count();
    let max = headers.limits().max_count;
    // Headers that cannot be taken are not kept, so the count limit alone would let a
    // record of hundreds of thousands of bad names (a few bytes each) be read, each a
    // caught panic, on the poll task: reading stops after this many.
    let max_read = max.saturating_mul(2);
    for i in 0..count {
        if headers.len() >= max || i >= max_read {
            left_out.add(count - i, || format!("more than {max} headers"));
            break;
        }
        // `try_get` only reads: rdkafka asks librdkafka for the header, then panics
        // in `str::from_utf8(..).unwrap()` on its name, so nothing is left half done.
        let Ok(header) = catch_unwind(AssertUnwindSafe(|| hs.try_get(i))) else {
            left_out.add(1, || "a header name that is not UTF-8".to_owned());
            continue;
        };
        let Some(h) = header else {
            // Out of bounds: the count said otherwise. Nothing more to read.
            left_out.add(count - i, || "headers rdkafka did not return".to_owned());
            break;
        };
        let value = match h.value {
            None => HeaderValue::Bytes(Bytes::new()),
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) => HeaderValue::Str(s.to_owned()),
                Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(v)),
            },
        };
        if let Err(e) = headers.append(h.key, value) {
            left_out.add(1, || why(h.key, &e));
        }
    }
    (headers, left_out)
}

/// Why `name` was refused, quoting at most [`QUOTED_NAME_BYTES`] of it.
fn why(name: &str, e: &HeaderError) -> String {
    let mut end = name.len().min(QUOTED_NAME_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let quoted = &name[..end];
    let more = if end < name.len() { "…" } else { "" };
    match e {
        HeaderError::EmptyName => "an empty header name".to_owned(),
        HeaderError::TooMany { limit, .. } => {
            format!("header `{quoted}{more}`: more than {limit} headers")
        }
        HeaderError::TooLarge { limit, .. } => {
            format!("header `{quoted}{more}`: headers over {limit} bytes")
        }
        _ => format!("header `{quoted}{more}` refused"),
    }
}

/// The payload and the key, copied into one shared allocation: the Worker copies a
/// message it may park, and a copy of a shared `Bytes` counts a reference where a copy
/// of a freshly built one allocates (once for each).
fn payload_and_key(payload: &[u8], key: Option<&[u8]>) -> (Bytes, Option<Bytes>) {
    let Some(key) = key else {
        return (Bytes::copy_from_slice(payload), None);
    };
    let mut both = Vec::with_capacity(payload.len() + key.len());
    both.extend_from_slice(payload);
    both.extend_from_slice(key);
    let both = Bytes::from(both);
    (
        both.slice(..payload.len()),
        Some(both.slice(payload.len()..)),
    )
}

/// `<topic>-<partition>-<offset>@<timestamp ms>` (without `@…` when the record has no
/// timestamp), written on the stack (numbers by `itoa`, without the formatting
/// machinery) and copied into one allocation. Topic names are at most 249 bytes, so the
/// buffer always holds a real one; a longer name is built on the heap.
fn record_id(topic: &str, partition: i32, offset: i64, timestamp_ms: Option<i64>) -> Arc<str> {
    let mut partition_digits = itoa::Buffer::new();
    let mut offset_digits = itoa::Buffer::new();
    let mut timestamp_digits = itoa::Buffer::new();
    let (at, timestamp) = match timestamp_ms {
        Some(ms) => ("@", timestamp_digits.format(ms)),
        None => ("", ""),
    };
    let parts = [
        topic,
        "-",
        partition_digits.format(partition),
        "-",
        offset_digits.format(offset),
        at,
        timestamp,
    ];
    let mut buf = [0u8; 320];
    let mut len = 0;
    for part in parts {
        let Some(slot) = buf.get_mut(len..len + part.len()) else {
            return Arc::from(parts.concat());
        };
        slot.copy_from_slice(part.as_bytes());
        len += part.len();
    }
    // Whole `str`s were copied, so this is UTF-8.
    match std::str::from_utf8(&buf[..len]) {
        Ok(id) => Arc::from(id),
        Err(_) => Arc::from(parts.concat()),
    }
}

#[cfg(test)]
mod tests;
