//! Receiving: a delivery's properties and header table into headers, key and attempt
//! (see the module docs), and the [`Message`] built from them.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use redrive_core::{HeaderValue, Headers, Message};

use super::value::{count, header_value};
use super::{
    APP_ID, ATTEMPT, AmqpDelivery, CLUSTER_ID, CONTENT_ENCODING, CONTENT_TYPE, CORRELATION_ID,
    DELIVERY_COUNT, DELIVERY_MODE, EXPIRATION, KEY, MESSAGE_ID, PRIORITY, RECEIVED_HEADER_LIMITS,
    REPLY_TO, TIMESTAMP, TYPE, USER_ID,
};

/// A received message's parts, mapped.
pub(crate) struct Received {
    pub(crate) headers: Headers,
    pub(crate) key: Option<Bytes>,
    pub(crate) attempt: u32,
    pub(crate) message_id: Option<Arc<str>>,
    pub(crate) enqueued_at: Option<SystemTime>,
}

/// Maps a delivery's properties onto headers, key and attempt.
pub(crate) fn receive(props: &BasicProperties, redelivered: bool) -> Received {
    let mut headers = Headers::with_limits(RECEIVED_HEADER_LIMITS);
    let mut key = None;
    let mut base = None;
    let mut delivery_count = None;
    // Headers left out, and the first reason: one warning per message, however many
    // a producer sends past the limits.
    let mut left_out = 0usize;
    let mut first_reason = None;
    let mut put = |headers: &mut Headers, name: &str, value: HeaderValue| {
        if let Err(e) = headers.insert(name.to_owned(), value) {
            left_out += 1;
            first_reason.get_or_insert(e);
        }
    };
    if let Some(table) = props.headers() {
        for (name, value) in table.inner() {
            let name = name.as_str();
            if name == KEY {
                key = Some(match value {
                    AMQPValue::LongString(s) => Bytes::copy_from_slice(s.as_bytes()),
                    AMQPValue::ByteArray(b) => Bytes::copy_from_slice(b.as_slice()),
                    other => Bytes::from(header_value(other).as_bytes().to_vec()),
                });
            } else if name == ATTEMPT && count(value).is_some() {
                base = count(value);
            } else if name == DELIVERY_COUNT && count(value).is_some() {
                delivery_count = count(value);
            } else {
                put(&mut headers, name, header_value(value));
            }
        }
    }
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_owned());
    let properties: [(&str, Option<String>); 10] = [
        (CONTENT_TYPE, text(props.content_type())),
        (CONTENT_ENCODING, text(props.content_encoding())),
        (DELIVERY_MODE, props.delivery_mode().map(|n| n.to_string())),
        (PRIORITY, props.priority().map(|n| n.to_string())),
        (REPLY_TO, text(props.reply_to())),
        (EXPIRATION, text(props.expiration())),
        (TYPE, text(props.kind())),
        (USER_ID, text(props.user_id())),
        (APP_ID, text(props.app_id())),
        (CLUSTER_ID, text(props.cluster_id())),
    ];
    for (name, value) in properties {
        // A table header of the same name (sent because it did not parse) stays.
        if let Some(v) = value.filter(|_| !headers.contains(name)) {
            put(&mut headers, name, HeaderValue::Str(v));
        }
    }
    let message_id = text(props.message_id());
    if let Some(id) = &message_id {
        if !headers.contains(MESSAGE_ID) {
            put(&mut headers, MESSAGE_ID, HeaderValue::Str(id.clone()));
        }
    }
    let message_id = message_id.map(Arc::from);
    if let Some(id) = text(props.correlation_id()) {
        if !headers.contains(CORRELATION_ID) {
            put(&mut headers, CORRELATION_ID, HeaderValue::Str(id));
        }
    }
    let enqueued_at = props.timestamp().and_then(|secs| {
        if !headers.contains(TIMESTAMP) {
            put(&mut headers, TIMESTAMP, HeaderValue::Str(secs.to_string()));
        }
        UNIX_EPOCH.checked_add(Duration::from_secs(secs))
    });
    if let Some(e) = first_reason {
        tracing::warn!(
            left_out, first = %e,
            "AMQP headers left out of the message headers; they stay in the AmqpDelivery extension"
        );
    }
    let extra = match delivery_count {
        Some(n) => n,
        None => u32::from(redelivered),
    };
    Received {
        headers,
        key,
        attempt: base.unwrap_or(1).max(1).saturating_add(extra),
        message_id,
        enqueued_at,
    }
}

/// Builds the [`Message`] of a delivery.
pub(crate) fn message(
    queue: &Arc<str>,
    payload: Bytes,
    received: Received,
    amqp: AmqpDelivery,
) -> Message {
    let mut message = Message {
        payload,
        headers: received.headers,
        key: received.key,
        metadata: redrive_core::Metadata {
            message_id: received.message_id,
            source: redrive_core::Source {
                system: crate::SYSTEM,
                destination: queue.clone(),
                partition: None,
                offset: None,
                group: None,
            },
            attempt: received.attempt,
            enqueued_at: received.enqueued_at,
            received_at: SystemTime::now(),
        },
        extensions: Default::default(),
    };
    message.extensions.insert(amqp);
    message
}

#[cfg(test)]
mod props {
    //! Property tests: whatever lapin hands over, the mapping is total and bounded.
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,30}",
            Just(String::new()),
            prop::sample::select(vec![KEY, ATTEMPT, DELIVERY_COUNT, MESSAGE_ID, CONTENT_TYPE])
                .prop_map(str::to_owned),
        ]
    }

    fn value() -> impl Strategy<Value = AMQPValue> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(AMQPValue::Boolean),
            any::<i8>().prop_map(AMQPValue::ShortShortInt),
            any::<i64>().prop_map(AMQPValue::LongLongInt),
            any::<u64>().prop_map(AMQPValue::Timestamp),
            any::<f32>().prop_map(AMQPValue::Float),
            any::<f64>().prop_map(AMQPValue::Double),
            (any::<u8>(), any::<u32>())
                .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
            ".{0,40}".prop_map(|s| AMQPValue::ShortString(s.into())),
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
            Just(AMQPValue::Void),
            "-?[0-9]{1,12}".prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8)
                    .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                prop::collection::vec((name(), inner), 0..8).prop_map(|entries| {
                    let mut t = FieldTable::default();
                    for (k, v) in entries {
                        t.insert(k.into(), v);
                    }
                    AMQPValue::FieldTable(t)
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn any_properties_map_to_bounded_headers_and_an_attempt(
            entries in prop::collection::vec((name(), value()), 0..200),
            many in 0usize..5000,
            message_id in proptest::option::of(".{0,300}"),
            redelivered in any::<bool>(),
        ) {
            let mut table = FieldTable::default();
            for (k, v) in entries {
                table.insert(k.into(), v);
            }
            for i in 0..many {
                table.insert(format!("h{i}").into(), AMQPValue::LongString(LongString::from("v")));
            }
            let mut props = BasicProperties::default().with_headers(table);
            if let Some(id) = message_id {
                props = props.with_message_id(id.into());
            }
            let r = receive(&props, redelivered);
            let limits = RECEIVED_HEADER_LIMITS;
            prop_assert!(r.headers.len() <= limits.max_count);
            prop_assert!(r.headers.size() <= limits.max_bytes);
            prop_assert!(r.attempt >= 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    use crate::mapping::table;

    #[test]
    fn attempt_comes_from_the_header_plus_the_broker_count() {
        let props = |t: FieldTable| BasicProperties::default().with_headers(t);
        assert_eq!(receive(&BasicProperties::default(), false).attempt, 1);
        assert_eq!(receive(&BasicProperties::default(), true).attempt, 2);
        let quorum = props(table(&[(DELIVERY_COUNT, AMQPValue::LongLongInt(3))]));
        assert_eq!(receive(&quorum, true).attempt, 4);
        let both = props(table(&[
            (ATTEMPT, AMQPValue::LongLongInt(5)),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(1)),
        ]));
        let r = receive(&both, true);
        assert_eq!(r.attempt, 6);
        assert!(r.headers.is_empty(), "{:?}", r.headers);
        let text = props(table(&[(ATTEMPT, AMQPValue::LongString("7".into()))]));
        assert_eq!(receive(&text, false).attempt, 7);
        let junk = props(table(&[(ATTEMPT, AMQPValue::Boolean(true))]));
        let r = receive(&junk, false);
        assert_eq!(r.attempt, 1);
        assert_eq!(r.headers.get_str(ATTEMPT), Some("true"));
    }
}
