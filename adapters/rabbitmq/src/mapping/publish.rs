//! Publishing: an outgoing message's headers into properties and a header table (see
//! the module docs), and the properties of the adapter's own republishes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use redrive_core::OutgoingMessage;

use super::value::amqp_value;
use super::{
    APP_ID, ATTEMPT, CLUSTER_ID, CONTENT_ENCODING, CONTENT_TYPE, CORRELATION_ID, DELIVERY_COUNT,
    DELIVERY_MODE, EXPIRATION, KEY, MESSAGE_ID, PRIORITY, REPLY_TO, TIMESTAMP, TYPE, USER_ID,
};

/// The properties an outgoing message is published with (see the module docs).
pub(crate) fn publish_properties(msg: &OutgoingMessage) -> BasicProperties {
    let mut props = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut delivery_mode = None;
    let mut timestamp = None;
    for (name, value) in &msg.headers {
        let text = value.as_str();
        let short = || text.map(ShortString::from);
        let lower = name.to_ascii_lowercase();
        let taken = match lower.as_str() {
            CONTENT_TYPE => {
                short().map(|v| props = std::mem::take(&mut props).with_content_type(v))
            }
            CONTENT_ENCODING => {
                short().map(|v| props = std::mem::take(&mut props).with_content_encoding(v))
            }
            DELIVERY_MODE => text
                .and_then(|t| t.trim().parse::<u8>().ok())
                .map(|v| delivery_mode = Some(v)),
            PRIORITY => text
                .and_then(|t| t.trim().parse::<u8>().ok())
                .map(|v| props = std::mem::take(&mut props).with_priority(v)),
            REPLY_TO => short().map(|v| props = std::mem::take(&mut props).with_reply_to(v)),
            EXPIRATION => short().map(|v| props = std::mem::take(&mut props).with_expiration(v)),
            TIMESTAMP => text
                .and_then(|t| t.trim().parse::<u64>().ok())
                .map(|v| timestamp = Some(v)),
            TYPE => short().map(|v| props = std::mem::take(&mut props).with_type(v)),
            USER_ID => short().map(|v| props = std::mem::take(&mut props).with_user_id(v)),
            APP_ID => short().map(|v| props = std::mem::take(&mut props).with_app_id(v)),
            CLUSTER_ID => short().map(|v| props = std::mem::take(&mut props).with_cluster_id(v)),
            MESSAGE_ID if props.message_id().is_none() => {
                short().map(|v| props = std::mem::take(&mut props).with_message_id(v))
            }
            CORRELATION_ID if props.correlation_id().is_none() => {
                short().map(|v| props = std::mem::take(&mut props).with_correlation_id(v))
            }
            _ => None,
        };
        if taken.is_none() && !table.contains_key(name) {
            table.insert(name.into(), amqp_value(value));
        }
    }
    if let Some(key) = &msg.key {
        table.insert(KEY.into(), AMQPValue::LongString(key.as_ref().into()));
    }
    if props.message_id().is_none() && !msg.headers.contains(MESSAGE_ID) {
        props = props.with_message_id(ShortString::from(new_message_id()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    props
        .with_headers(table)
        .with_delivery_mode(delivery_mode.unwrap_or(PERSISTENT))
        .with_timestamp(timestamp.unwrap_or(now))
}

/// A random UUID (version 4, RFC 9562), as 36 characters.
fn new_message_id() -> String {
    let bits = fastrand::u128(..);
    // The version (4) and the variant (0b10) in their places.
    let n = (bits & !(0xf << 76) & !(0b11 << 62)) | (0x4 << 76) | (0b10 << 62);
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The properties of the adapter's own republish of a delivery: the original ones, with
/// `attempt` in the [`ATTEMPT`] header, the broker's count removed and, for a delay,
/// `expiration` set to it and `delivery_mode` 2 (persistent): the copy waits in a delay
/// queue, and must survive a broker restart there whatever the original's mode was.
pub(crate) fn republish_properties(
    original: &BasicProperties,
    attempt: u32,
    delay: Option<Duration>,
) -> BasicProperties {
    let mut table = original.headers().clone().unwrap_or_default();
    let mut inner = table.inner().clone();
    inner.remove(DELIVERY_COUNT);
    inner.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
    table = FieldTable::from(inner);
    let props = original.clone().with_headers(table);
    match delay {
        Some(d) => {
            let ms = d.as_millis().max(1);
            props
                .with_expiration(ShortString::from(ms.to_string()))
                .with_delivery_mode(PERSISTENT)
        }
        None => props,
    }
}

/// The `delivery_mode` of a persistent message.
const PERSISTENT: u8 = 2;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use redrive_core::HeaderValue;

    use crate::mapping::{receive, table};

    #[test]
    fn outgoing_headers_round_trip_through_properties() {
        let msg = OutgoingMessage::new("x")
            .with_key(vec![0u8, 0xff])
            .with_header("x-text", "v")
            .unwrap()
            .with_header("x-bin", vec![0xffu8])
            .unwrap()
            .with_header(CORRELATION_ID, "corr")
            .unwrap()
            .with_header(MESSAGE_ID, "id-1")
            .unwrap()
            .with_header(PRIORITY, "7")
            .unwrap()
            .with_header(CONTENT_TYPE, "application/json")
            .unwrap()
            .with_header(DELIVERY_MODE, "not a number")
            .unwrap();
        let props = publish_properties(&msg);
        assert_eq!(props.priority(), &Some(7));
        assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "corr");
        assert_eq!(props.delivery_mode(), &Some(2));
        let r = receive(&props, false);
        assert_eq!(r.key.as_deref(), Some(&[0u8, 0xff][..]));
        assert_eq!(r.message_id.as_deref(), Some("id-1"));
        for (name, value) in &msg.headers {
            assert_eq!(r.headers.get(name), Some(value), "{name}");
        }
        assert!(r.enqueued_at.is_some());
    }

    #[test]
    fn a_message_without_an_id_gets_a_random_uuid() {
        let a = publish_properties(&OutgoingMessage::new("x"));
        let b = publish_properties(&OutgoingMessage::new("x"));
        let (a, b) = (
            a.message_id().clone().unwrap(),
            b.message_id().clone().unwrap(),
        );
        assert_ne!(a, b);
        let id = a.as_str();
        assert_eq!(id.len(), 36, "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        assert_eq!(id.matches('-').count(), 4, "{id}");

        let given = OutgoingMessage::new("x")
            .with_header(MESSAGE_ID, "m-1")
            .unwrap();
        let props = publish_properties(&given);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "m-1");
        // A message id the property cannot carry stays a header, and none is made up.
        let bytes = OutgoingMessage::new("x")
            .with_header(MESSAGE_ID, HeaderValue::Bytes(Bytes::from_static(b"\xff")))
            .unwrap();
        assert!(publish_properties(&bytes).message_id().is_none());
    }

    #[test]
    fn republish_sets_attempt_and_expiration_and_keeps_the_rest() {
        let original = BasicProperties::default()
            .with_priority(3)
            .with_headers(table(&[
                (DELIVERY_COUNT, AMQPValue::LongLongInt(2)),
                ("x-f", AMQPValue::Float(2.5)),
            ]));
        let p = republish_properties(&original, 4, Some(Duration::from_millis(1500)));
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "1500");
        assert_eq!(
            p.delivery_mode(),
            &Some(PERSISTENT),
            "a delay copy is persistent"
        );
        assert_eq!(p.priority(), &Some(3));
        let h = p.headers().as_ref().unwrap().inner();
        assert_eq!(h.get("x-f"), Some(&AMQPValue::Float(2.5)));
        assert!(!h.contains_key(DELIVERY_COUNT));
        assert_eq!(receive(&p, false).attempt, 4);
    }
}
