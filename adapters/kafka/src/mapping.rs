//! Records to [`Message`]s.
//!
//! | Kafka | redrive |
//! |---|---|
//! | value | `payload` (an empty or null value is an empty payload) |
//! | key | `key` (the ordering key) |
//! | headers | `headers`, in order, repeats kept: UTF-8 values as strings, others as bytes, a null value as empty bytes |
//! | topic, partition, offset | `metadata.source` |
//! | the `message-id` header, else `<topic>-<partition>-<offset>` | `metadata.message_id` |
//! | the `x-redrive-attempt` header, else 1 | `metadata.attempt` (the Worker counts parked retries on top) |
//! | timestamp (create or log-append time) | `metadata.enqueued_at` |

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::Message as _;
use rdkafka::message::{BorrowedMessage, Headers as _};
use redrive_core::names::{ATTEMPT, MESSAGE_ID};
use redrive_core::{HeaderValue, Headers, Message};

use crate::SYSTEM;

/// A [`Message`] holding a copy of the record's data; `topic` is the record's topic
/// name, shared. Its `received_at` is when it was made (by [`Message::new`]).
pub(crate) fn message(record: &BorrowedMessage<'_>, topic: Arc<str>) -> Message {
    let mut headers = Headers::new();
    if let Some(hs) = record.headers() {
        for h in hs.iter() {
            let value = match h.value {
                None => HeaderValue::Bytes(Bytes::new()),
                Some(v) => match std::str::from_utf8(v) {
                    Ok(s) => HeaderValue::Str(s.to_owned()),
                    Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(v)),
                },
            };
            if let Err(e) = headers.append(h.key, value) {
                tracing::warn!(
                    topic = record.topic(),
                    partition = record.partition(),
                    offset = record.offset(),
                    header = h.key,
                    error = %e,
                    "record headers beyond the header limits are left out"
                );
                break;
            }
        }
    }
    let (payload, key) = payload_and_key(record.payload().unwrap_or_default(), record.key());
    let mut msg = Message::new(payload);
    msg.key = key;
    let meta = &mut msg.metadata;
    meta.message_id = Some(headers.get_str(MESSAGE_ID).map_or_else(
        || record_id(&topic, record.partition(), record.offset()),
        Arc::from,
    ));
    meta.attempt = headers
        .get_str(ATTEMPT)
        .and_then(|a| a.parse().ok())
        .filter(|&a| a >= 1)
        .unwrap_or(1);
    meta.enqueued_at = record
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    meta.source.system = SYSTEM;
    meta.source.destination = topic;
    meta.source.partition = Some(record.partition());
    meta.source.offset = Some(record.offset());
    msg.headers = headers;
    msg
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

/// `<topic>-<partition>-<offset>`, written on the stack (numbers by `itoa`, without the
/// formatting machinery) and copied into one allocation. Topic names are at most 249
/// bytes, so the buffer always holds a real one; a longer name is built on the heap.
fn record_id(topic: &str, partition: i32, offset: i64) -> Arc<str> {
    let mut partition_digits = itoa::Buffer::new();
    let mut offset_digits = itoa::Buffer::new();
    let parts = [
        topic,
        "-",
        partition_digits.format(partition),
        "-",
        offset_digits.format(offset),
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
mod tests {
    use super::{payload_and_key, record_id};

    #[test]
    fn payload_and_key_share_one_buffer_and_keep_their_bytes() {
        let (payload, key) = payload_and_key(b"{\"id\":1}", Some(b"order-7"));
        assert_eq!(&payload[..], b"{\"id\":1}");
        let key = key.expect("a key");
        assert_eq!(&key[..], b"order-7");
        // One allocation: the key starts where the payload ends.
        assert_eq!(payload.as_ptr().wrapping_add(payload.len()), key.as_ptr());
        let (payload, key) = payload_and_key(b"", Some(b""));
        assert!(payload.is_empty() && key.is_some_and(|k| k.is_empty()));
        let (payload, key) = payload_and_key(b"body", None);
        assert_eq!((&payload[..], key), (&b"body"[..], None));
    }

    #[test]
    fn record_ids_name_topic_partition_and_offset() {
        assert_eq!(&*record_id("orders", 3, 42), "orders-3-42");
        assert_eq!(&*record_id("t", -1, i64::MIN), format!("t--1-{}", i64::MIN));
        let longest = "x".repeat(249);
        assert_eq!(
            &*record_id(&longest, i32::MAX, i64::MAX),
            format!("{longest}-{}-{}", i32::MAX, i64::MAX)
        );
        // Longer than any Kafka topic name: built on the heap instead.
        let long = "y".repeat(400);
        assert_eq!(&*record_id(&long, 0, 1), format!("{long}-0-1"));
    }
}
