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
//!
//! [`Message`]: redrive_core::Message
//! [`Message::key`]: redrive_core::Message::key
//! [`Message::headers`]: redrive_core::Message::headers
//! [`HeaderValue`]: redrive_core::HeaderValue

// One file per job (a comment, as this module's docs are for users):
// - `receive.rs`: a delivery's properties and header table into headers, key and
//   attempt, and the `Message` built from them.
// - `publish.rs`: an outgoing message's headers into properties and a header table,
//   and the properties of the adapter's own republishes.
// - `value.rs`: one header table value into a `HeaderValue` (`header_value`) and back
//   (`amqp_value`).
// - `delivery.rs`: `AmqpDelivery`, the typed delivery each message carries.
mod delivery;
mod publish;
mod receive;
mod value;

#[cfg(test)]
use lapin::types::{AMQPValue, FieldTable};
use redrive_core::HeaderLimits;

pub use self::delivery::AmqpDelivery;
pub use self::value::{amqp_value, header_value};
pub use redrive_core::names::{ATTEMPT, CORRELATION_ID, MESSAGE_ID};

pub(crate) use self::publish::{publish_properties, republish_properties};
pub(crate) use self::receive::{Received, message, receive};

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

/// A header table of `entries`, for the tests.
#[cfg(test)]
fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert((*k).into(), v.clone());
    }
    t
}
