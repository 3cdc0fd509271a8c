//! How AMQP properties and header tables map onto redrive's [`Message`] and back.
//!
//! # Receiving
//! | AMQP | redrive |
//! |---|---|
//! | `message_id` property | [`Metadata::message_id`](redrive_core::Metadata::message_id) and the [`MESSAGE_ID`] header |
//! | `correlation_id` property | the [`CORRELATION_ID`] header, unless the table already has one |
//! | `timestamp` property (seconds) | [`Metadata::enqueued_at`](redrive_core::Metadata::enqueued_at) and the [`TIMESTAMP`] header |
//! | other properties | a header each, unless the table has one of that name: [`CONTENT_TYPE`], [`CONTENT_ENCODING`], [`DELIVERY_MODE`], [`PRIORITY`], [`REPLY_TO`], [`EXPIRATION`], [`TYPE`], [`USER_ID`], [`APP_ID`], [`CLUSTER_ID`] |
//! | [`KEY`] header | [`Message::key`] (removed from the headers) |
//! | [`ATTEMPT`] and [`DELIVERY_COUNT`] headers | [`Metadata::attempt`](redrive_core::Metadata::attempt) (removed from the headers; see below) |
//! | every other header | a header of the same name |
//!
//! Header table values become [`HeaderValue`]s as follows; nothing panics and nothing is
//! dropped silently:
//!
//! | AMQP field type | [`HeaderValue`] |
//! |---|---|
//! | long string (`S`), short string | `Str` when valid UTF-8, else `Bytes` with the raw bytes |
//! | byte array (`x`) | `Bytes` |
//! | boolean (`t`) | `Str`: `true` or `false` |
//! | integers (`b B s u I i l`), timestamp (`T`) | `Str`: the decimal number |
//! | float (`f`), double (`d`) | `Str`: the shortest decimal that parses back to the same value (`NaN`, `inf`, `-inf`) |
//! | decimal (`D`) | `Str`: the exact decimal, scale applied (`value 12345, scale 2` → `123.45`) |
//! | void (`V`) | `Str`: empty |
//! | field array (`A`), field table (`F`) | `Str`: compact JSON; nested strings that are not UTF-8 and byte arrays become arrays of byte numbers, decimals strings, floats that are not finite strings, void `null` |
//!
//! The text form loses the AMQP type. The exact values are always available, typed, in the
//! [`AmqpDelivery`] extension of each message, and the adapter's own republishes (delayed
//! and classic-queue retries) copy the original properties and table, so a retried message
//! keeps every field and its type. A header that does not fit the message's
//! [`HeaderLimits`] (4096 headers, 1 MiB) is left out of
//! [`Message::headers`] with a warning, and kept in [`AmqpDelivery`].
//!
//! # Attempt
//! `attempt` = the [`ATTEMPT`] header (1 when absent) + the quorum queue's
//! [`DELIVERY_COUNT`] when present, else + 1 when the broker flags the delivery as
//! redelivered (a classic queue handing a message back after a consumer or connection
//! loss: at least one more delivery happened).
//!
//! # Publishing
//! The reverse of the above: the property headers listed above set their property (one
//! whose value does not parse, such as a non-numeric [`PRIORITY`], is sent as an ordinary
//! header); the key goes in the [`KEY`] header; a `Str` value is sent as a long string and a
//! `Bytes` value as a byte array, so both come back as they were. AMQP tables hold one value
//! per name: of a repeated header, the first value is sent. Unless the headers say
//! otherwise, messages are persistent (`delivery_mode` 2), stamped with the time of
//! publishing, and given a `message_id` of their own (a random UUID, version 4), so
//! the idempotency layer's default key, which reads it, works without a producer
//! setting one.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldTable, LongString, ShortString};
use redrive_core::{HeaderLimits, HeaderValue, Headers, Message, OutgoingMessage};

pub use redrive_core::names::{ATTEMPT, CORRELATION_ID, MESSAGE_ID};

/// The ordering key of a message, as bytes.
pub const KEY: &str = redrive_core::names::ORDERING_KEY;
/// The quorum queue's delivery count, set by the broker on redeliveries.
pub const DELIVERY_COUNT: &str = "x-delivery-count";
/// The `content_type` property.
pub const CONTENT_TYPE: &str = "amqp-content-type";
/// The `content_encoding` property.
pub const CONTENT_ENCODING: &str = "amqp-content-encoding";
/// The `delivery_mode` property (1 transient, 2 persistent).
pub const DELIVERY_MODE: &str = "amqp-delivery-mode";
/// The `priority` property (0–255).
pub const PRIORITY: &str = "amqp-priority";
/// The `reply_to` property.
pub const REPLY_TO: &str = "amqp-reply-to";
/// The `expiration` property (a per-message TTL in milliseconds, as text).
pub const EXPIRATION: &str = "amqp-expiration";
/// The `timestamp` property (seconds since the Unix epoch).
pub const TIMESTAMP: &str = "amqp-timestamp";
/// The `type` property.
pub const TYPE: &str = "amqp-type";
/// The `user_id` property (RabbitMQ checks it against the connection's user).
pub const USER_ID: &str = "amqp-user-id";
/// The `app_id` property.
pub const APP_ID: &str = "amqp-app-id";
/// The `cluster_id` property.
pub const CLUSTER_ID: &str = "amqp-cluster-id";

/// The limits of a received message's headers: wide enough for what AMQP carries.
pub const RECEIVED_HEADER_LIMITS: HeaderLimits = HeaderLimits {
    max_count: 4096,
    max_bytes: 1024 * 1024,
};

/// What RabbitMQ said about one delivery, exactly: the typed properties and header table,
/// the exchange and routing key it was published with, and the redelivered flag.
///
/// Every message the adapter hands out carries one in its
/// [`extensions`](redrive_core::Message::extensions); cloning is cheap.
///
/// ```
/// # use redrive_core::Message;
/// use redrive_rabbitmq::AmqpDelivery;
/// # fn f(msg: &Message) {
/// if let Some(amqp) = msg.extensions.get::<AmqpDelivery>() {
///     println!("priority {:?}, routed by {}", amqp.properties().priority(), amqp.routing_key());
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AmqpDelivery(Arc<DeliveryInfo>);

#[derive(Debug)]
struct DeliveryInfo {
    properties: BasicProperties,
    exchange: String,
    routing_key: String,
    redelivered: bool,
}

impl AmqpDelivery {
    pub(crate) fn new(
        properties: BasicProperties,
        exchange: String,
        routing_key: String,
        redelivered: bool,
    ) -> Self {
        AmqpDelivery(Arc::new(DeliveryInfo {
            properties,
            exchange,
            routing_key,
            redelivered,
        }))
    }

    /// The message's properties, with its header table, as the broker sent them.
    pub fn properties(&self) -> &BasicProperties {
        &self.0.properties
    }

    /// The exchange the message was published to (empty: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.0.exchange
    }

    /// The routing key it was published with.
    pub fn routing_key(&self) -> &str {
        &self.0.routing_key
    }

    /// Whether the broker flagged this delivery as a redelivery.
    pub fn redelivered(&self) -> bool {
        self.0.redelivered
    }
}

/// A header table value as a [`HeaderValue`], following the table in the module docs.
pub fn header_value(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::LongString(s) => bytes_value(s.as_bytes()),
        AMQPValue::ShortString(s) => HeaderValue::Str(s.as_str().to_owned()),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => HeaderValue::Str(String::new()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => {
            HeaderValue::Str(json(value).to_string())
        }
        other => HeaderValue::Str(scalar_text(other).unwrap_or_default()),
    }
}

fn bytes_value(b: &[u8]) -> HeaderValue {
    match std::str::from_utf8(b) {
        Ok(s) => HeaderValue::Str(s.to_owned()),
        Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(b)),
    }
}

fn scalar_text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::DecimalValue(d) => decimal_text(*d),
        _ => return None,
    })
}

/// `value × 10^-scale` as exact decimal text.
fn decimal_text(d: DecimalValue) -> String {
    let digits = d.value.to_string();
    let scale = usize::from(d.scale);
    if scale == 0 {
        return digits;
    }
    if digits.len() > scale {
        let (int, frac) = digits.split_at(digits.len() - scale);
        format!("{int}.{frac}")
    } else {
        format!("0.{}{digits}", "0".repeat(scale - digits.len()))
    }
}

fn json(value: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Timestamp(n) => Value::from(*n),
        AMQPValue::Float(f) => serde_json::Number::from_f64(f64::from(*f))
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        AMQPValue::Double(f) => serde_json::Number::from_f64(*f)
            .map_or_else(|| Value::String(f.to_string()), Value::Number),
        AMQPValue::DecimalValue(d) => Value::String(decimal_text(*d)),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => byte_numbers(s.as_bytes()),
        },
        AMQPValue::ByteArray(b) => byte_numbers(b.as_slice()),
        AMQPValue::Void => Value::Null,
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), json(v)))
                .collect(),
        ),
    }
}

fn byte_numbers(b: &[u8]) -> serde_json::Value {
    serde_json::Value::Array(b.iter().map(|&x| serde_json::Value::from(x)).collect())
}

/// An integer header value (any AMQP integer type, or decimal text).
fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

fn count(value: &AMQPValue) -> Option<u32> {
    integer(value).map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

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

/// A header value as an AMQP table value: `Str` → long string, `Bytes` → byte array.
pub fn amqp_value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(b.as_ref().into()),
    }
}

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
    use lapin::types::{ByteArray, FieldArray};
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
    use lapin::types::{ByteArray, FieldArray};

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    #[test]
    fn every_field_type_has_a_text_or_bytes_form() {
        let cases: Vec<(AMQPValue, HeaderValue)> = vec![
            (AMQPValue::Boolean(true), "true".into()),
            (AMQPValue::ShortShortInt(-8), "-8".into()),
            (AMQPValue::ShortShortUInt(250), "250".into()),
            (AMQPValue::ShortInt(-300), "-300".into()),
            (AMQPValue::ShortUInt(65000), "65000".into()),
            (AMQPValue::LongInt(-70000), "-70000".into()),
            (AMQPValue::LongUInt(4_000_000_000), "4000000000".into()),
            (
                AMQPValue::LongLongInt(i64::MIN),
                i64::MIN.to_string().into(),
            ),
            (AMQPValue::Float(1.5), "1.5".into()),
            (AMQPValue::Double(0.1), "0.1".into()),
            (AMQPValue::Double(f64::NAN), "NaN".into()),
            (
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 12345,
                }),
                "123.45".into(),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue { scale: 4, value: 5 }),
                "0.0005".into(),
            ),
            (AMQPValue::ShortString("short".into()), "short".into()),
            (AMQPValue::LongString("héllo".into()), "héllo".into()),
            (
                AMQPValue::LongString(vec![0xff, 0xfe].into()),
                HeaderValue::Bytes(Bytes::from_static(&[0xff, 0xfe])),
            ),
            (
                AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2])),
                HeaderValue::Bytes(Bytes::from_static(&[0, 1, 2])),
            ),
            (AMQPValue::Timestamp(1_700_000_000), "1700000000".into()),
            (AMQPValue::Void, "".into()),
            (
                AMQPValue::FieldArray(FieldArray::from(vec![
                    AMQPValue::LongInt(1),
                    AMQPValue::LongString(vec![0xff].into()),
                    AMQPValue::Void,
                ])),
                "[1,[255],null]".into(),
            ),
            (
                AMQPValue::FieldTable(table(&[
                    ("a", AMQPValue::Boolean(false)),
                    ("b", AMQPValue::Float(f32::INFINITY)),
                ])),
                r#"{"a":false,"b":"inf"}"#.into(),
            ),
        ];
        for (amqp, want) in cases {
            assert_eq!(header_value(&amqp), want, "{amqp:?}");
        }
    }

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
