//! How a message's headers, key and payload travel as an SQS body and message attributes.
//!
//! SQS allows 10 message attributes per message, each named with ASCII letters, digits,
//! `-`, `_` and `.`, with a non-empty value. redrive's messages carry more: a dead-lettered
//! message alone has a dozen envelope headers, plus trace context and the user's own.
//!
//! # Layout
//! - Every header that can be an attribute is sent as one (`String` for text, `Binary`
//!   for bytes, so binary values stay binary), as long as all of them fit.
//! - When they do not all fit, the first 9 that can be attributes are sent as such, trace
//!   context first ([`PRIORITY_HEADERS`]: `traceparent`, `tracestate`, `x-correlation-id`,
//!   so other SQS tools see them), then in header order; all others are packed, in order,
//!   into one attribute, [`HEADERS_ATTRIBUTE`] (`x-redrive-headers`): a JSON array of
//!   `[name, value]` pairs, where a text value is a JSON string and a byte value is
//!   `{"b": "<base64>"}`. Headers that cannot be attributes at all (an invalid name, an
//!   empty value, a second value of the same name) are always packed. Characters SQS
//!   refuses in an attribute (U+FFFE, U+FFFF, control characters) are JSON escapes there.
//! - On a standard queue the key travels in [`KEY_ATTRIBUTE`]; on a FIFO queue it is the
//!   message group id and takes no attribute.
//! - A payload that is not text SQS accepts (not UTF-8, or with characters outside SQS's
//!   allowed set, or empty) is sent base64-encoded, marked by [`BODY_ENCODING_ATTRIBUTE`].
//!
//! Each of these takes one of the 10 slots. With [`HeaderOverflow::Reject`] nothing is
//! packed: a message that would need packing fails to publish with
//! [`Error::TooManyAttributes`] or [`Error::InvalidAttribute`]. With either setting, a
//! message larger than the publisher's `max_message_bytes` (body and attributes, counted
//! as SQS counts them) fails with [`Error::MessageTooLarge`]; nothing is dropped silently.
//!
//! The consumer reverses all of this: attributes become headers (sorted by name, since SQS
//! does not keep their order), then the packed headers follow in their order.

use std::collections::HashMap;

use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use redrive_core::{HeaderLimits, HeaderValue, Headers, OutgoingMessage};

use crate::{Error, Result};

/// The most message attributes SQS allows on one message.
pub const MAX_ATTRIBUTES: usize = 10;

/// The attribute that carries the headers that do not fit as attributes of their own.
pub const HEADERS_ATTRIBUTE: &str = "x-redrive-headers";

/// The attribute that carries the key on a standard queue.
pub const KEY_ATTRIBUTE: &str = redrive_core::names::ORDERING_KEY;

/// The attribute that marks a base64-encoded body (`base64`) or an empty one (`empty`).
pub const BODY_ENCODING_ATTRIBUTE: &str = "x-redrive-body-encoding";

/// Headers sent as attributes of their own first, when not all fit.
pub const PRIORITY_HEADERS: [&str; 3] = ["traceparent", "tracestate", "x-correlation-id"];

/// The prefix of the message group id given to an unkeyed message on a FIFO queue: each
/// gets a group of its own (so unkeyed messages are unordered, as on a standard queue),
/// and the consumer maps such a group back to no key.
pub const UNKEYED_GROUP_PREFIX: &str = "redrive-unkeyed-";

/// The limits of the headers of a received message: room for everything SQS can carry.
pub const RECEIVED_HEADER_LIMITS: HeaderLimits = HeaderLimits {
    max_count: 1024,
    max_bytes: 1024 * 1024,
};

const RESERVED: [&str; 3] = [HEADERS_ATTRIBUTE, KEY_ATTRIBUTE, BODY_ENCODING_ATTRIBUTE];

/// What to do with headers that do not fit in SQS's 10 message attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HeaderOverflow {
    /// Pack them into one JSON attribute, [`HEADERS_ATTRIBUTE`] (the default).
    #[default]
    Pack,
    /// Fail the publish with a clear error.
    Reject,
}

/// A message laid out for SQS.
#[derive(Debug)]
pub(crate) struct Encoded {
    pub(crate) body: String,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
}

/// Whether SQS accepts `c` in a message body or a string attribute value.
fn sqs_char(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{A}' | '\u{D}' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// JSON text with the characters SQS refuses in a string attribute written as JSON
/// escapes: serde_json escapes control characters, but writes U+FFFE and U+FFFF as they
/// are, and SQS would refuse the whole message for them.
fn sqs_json(json: &str) -> String {
    if json.chars().all(sqs_char) {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 12);
    for c in json.chars() {
        if sqs_char(c) {
            out.push(c);
        } else {
            // Only BMP characters are refused (everything from U+10000 is allowed), and
            // JSON's syntax is ASCII: these are inside strings, where `\uXXXX` is valid.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        }
    }
    out
}

fn sqs_text(bytes: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(bytes).ok()?;
    (!s.is_empty() && s.chars().all(sqs_char)).then_some(s)
}

/// Why `name` cannot be an SQS attribute name, if it cannot.
fn invalid_name(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    if name.is_empty() || name.len() > 256 {
        Some("attribute names are 1 to 256 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("attribute names may hold only ASCII letters, digits, `-`, `_` and `.`")
    } else if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        Some("attribute names may not start or end with `.` nor hold `..`")
    } else if lower.starts_with("aws.") || lower.starts_with("amazon.") {
        Some("attribute names starting with `AWS.` or `Amazon.` are reserved by SQS")
    } else if RESERVED.contains(&lower.as_str()) {
        Some("the name is one redrive uses for its own attributes")
    } else {
        None
    }
}

fn string_attribute(value: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("data type is set")
}

fn binary_attribute(value: &[u8]) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("Binary")
        .binary_value(Blob::new(value))
        .build()
        .expect("data type is set")
}

/// The attribute a header value becomes, or why it cannot be one.
fn native_value(value: &HeaderValue) -> std::result::Result<MessageAttributeValue, &'static str> {
    match value {
        _ if value.is_empty() => Err("SQS attribute values may not be empty"),
        HeaderValue::Str(s) if s.chars().all(sqs_char) => Ok(string_attribute(s)),
        HeaderValue::Str(_) => Err("the value holds characters SQS does not accept"),
        HeaderValue::Bytes(b) => Ok(binary_attribute(b)),
    }
}

/// The size SQS counts for one attribute: name, data type and value.
fn attribute_size(name: &str, value: &MessageAttributeValue) -> usize {
    name.len()
        + value.data_type().len()
        + value.string_value().map_or(0, str::len)
        + value.binary_value().map_or(0, |b| b.as_ref().len())
}

/// Checks a key as a FIFO message group id.
pub(crate) fn group_id(key: &[u8]) -> Result<&str> {
    let id = std::str::from_utf8(key)
        .map_err(|_| Error::InvalidKey("a FIFO message group id must be ASCII text".into()))?;
    if id.is_empty() || id.len() > 128 {
        return Err(Error::InvalidKey(format!(
            "a FIFO message group id is 1 to 128 characters; this key has {}",
            id.len()
        )));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidKey(
            "a FIFO message group id may hold only ASCII letters, digits and punctuation".into(),
        ));
    }
    Ok(id)
}

/// Lays out `msg` for SQS. `key_attribute`: whether the key travels as an attribute
/// (standard queues) rather than as the group id (FIFO queues).
pub(crate) fn encode(
    msg: &OutgoingMessage,
    key_attribute: bool,
    overflow: HeaderOverflow,
    max_message_bytes: usize,
) -> Result<Encoded> {
    let mut attributes = HashMap::new();

    let body = match sqs_text(&msg.payload) {
        Some(text) => text.to_owned(),
        None if msg.payload.is_empty() => {
            attributes.insert(
                BODY_ENCODING_ATTRIBUTE.to_owned(),
                string_attribute("empty"),
            );
            "-".to_owned()
        }
        None => {
            attributes.insert(
                BODY_ENCODING_ATTRIBUTE.to_owned(),
                string_attribute("base64"),
            );
            BASE64.encode(&msg.payload)
        }
    };

    if key_attribute && let Some(key) = &msg.key {
        if key.is_empty() {
            return Err(Error::InvalidKey("the key is empty".into()));
        }
        let value = match sqs_text(key) {
            Some(text) => string_attribute(text),
            None => binary_attribute(key),
        };
        attributes.insert(KEY_ATTRIBUTE.to_owned(), value);
    }

    // Sort headers into those that can be attributes (priority first) and those that cannot.
    let mut native: Vec<(usize, &str, MessageAttributeValue)> = Vec::new();
    let mut packed: Vec<usize> = Vec::new();
    let headers: Vec<(&str, &HeaderValue)> = msg.headers.iter().collect();
    let mut seen: Vec<String> = Vec::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        let why_not = if seen.contains(&lower) {
            Err("SQS attributes hold one value per name")
        } else {
            match invalid_name(name) {
                Some(why) => Err(why),
                None => native_value(value),
            }
        };
        seen.push(lower);
        match why_not {
            Ok(v) => native.push((i, name, v)),
            Err(reason) => {
                if overflow == HeaderOverflow::Reject {
                    return Err(Error::InvalidAttribute {
                        name: (*name).to_owned(),
                        reason,
                    });
                }
                packed.push(i);
            }
        }
    }
    native.sort_by_key(|(i, name, _)| {
        let p = PRIORITY_HEADERS
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name));
        (p.unwrap_or(PRIORITY_HEADERS.len()), *i)
    });

    let slots = MAX_ATTRIBUTES - attributes.len();
    if !packed.is_empty() || native.len() > slots {
        if overflow == HeaderOverflow::Reject {
            return Err(Error::TooManyAttributes {
                needed: attributes.len() + native.len(),
                limit: MAX_ATTRIBUTES,
                first_excess: native[slots].1.to_owned(),
            });
        }
        let keep = slots - 1;
        packed.extend(native.drain(keep.min(native.len())..).map(|(i, _, _)| i));
        packed.sort_unstable();
        let json: Vec<serde_json::Value> = packed
            .iter()
            .map(|&i| {
                let (name, value) = headers[i];
                let v = match value {
                    HeaderValue::Str(s) => serde_json::Value::String(s.clone()),
                    HeaderValue::Bytes(b) => serde_json::json!({ "b": BASE64.encode(b) }),
                };
                serde_json::json!([name, v])
            })
            .collect();
        let text = sqs_json(&serde_json::Value::Array(json).to_string());
        attributes.insert(HEADERS_ATTRIBUTE.to_owned(), string_attribute(&text));
    }
    for (_, name, value) in native {
        attributes.insert(name.to_owned(), value);
    }

    let size = body.len()
        + attributes
            .iter()
            .map(|(n, v)| attribute_size(n, v))
            .sum::<usize>();
    if size > max_message_bytes {
        return Err(Error::MessageTooLarge {
            size,
            limit: max_message_bytes,
        });
    }
    Ok(Encoded { body, attributes })
}

/// A received message's payload, headers and key.
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) payload: Bytes,
    pub(crate) headers: Headers,
    pub(crate) key: Option<Bytes>,
}

fn attribute_value(value: &MessageAttributeValue) -> HeaderValue {
    match (value.string_value(), value.binary_value()) {
        (Some(s), _) => HeaderValue::Str(s.to_owned()),
        (None, Some(b)) => HeaderValue::Bytes(Bytes::copy_from_slice(b.as_ref())),
        (None, None) => HeaderValue::Str(String::new()),
    }
}

fn unpack(text: &str) -> Option<Vec<(String, HeaderValue)>> {
    let list: Vec<serde_json::Value> = serde_json::from_str(text).ok()?;
    list.into_iter()
        .map(|entry| {
            let serde_json::Value::Array(pair) = entry else {
                return None;
            };
            let [serde_json::Value::String(name), value] =
                <[serde_json::Value; 2]>::try_from(pair).ok()?
            else {
                return None;
            };
            let value = match value {
                serde_json::Value::String(s) => HeaderValue::Str(s),
                serde_json::Value::Object(o) => {
                    let b = o.get("b")?.as_str()?;
                    HeaderValue::Bytes(BASE64.decode(b).ok()?.into())
                }
                _ => return None,
            };
            Some((name, value))
        })
        .collect()
}

/// Reverses [`encode`]. Anything malformed is kept as it came, as a header, and logged:
/// a received message is never dropped or changed silently.
pub(crate) fn decode(
    body: &str,
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
    group_id: Option<&str>,
) -> Decoded {
    let mut headers = Headers::with_limits(RECEIVED_HEADER_LIMITS);
    let mut payload = Bytes::copy_from_slice(body.as_bytes());
    let mut key = group_id
        .filter(|g| !g.starts_with(UNKEYED_GROUP_PREFIX))
        .map(|g| Bytes::copy_from_slice(g.as_bytes()));
    let mut packed = None;

    let mut names: Vec<&String> = attributes.map(|a| a.keys().collect()).unwrap_or_default();
    names.sort();
    for name in names {
        let value = &attributes.expect("names come from the attributes")[name];
        let header = attribute_value(value);
        let kept = match name.as_str() {
            KEY_ATTRIBUTE if key.is_none() => {
                key = Some(Bytes::copy_from_slice(header.as_bytes()));
                None
            }
            BODY_ENCODING_ATTRIBUTE => match header.as_str() {
                Some("empty") => {
                    payload = Bytes::new();
                    None
                }
                Some("base64") => match BASE64.decode(body) {
                    Ok(bytes) => {
                        payload = bytes.into();
                        None
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "SQS body marked base64 does not decode; delivered as received");
                        Some(header)
                    }
                },
                _ => Some(header),
            },
            HEADERS_ATTRIBUTE => {
                packed = Some(header);
                None
            }
            _ => Some(header),
        };
        if let Some(header) = kept {
            append(&mut headers, name, header);
        }
    }
    if let Some(packed) = packed {
        match packed.as_str().and_then(unpack) {
            Some(list) => {
                for (name, value) in list {
                    append(&mut headers, &name, value);
                }
            }
            None => {
                tracing::warn!(
                    attribute = HEADERS_ATTRIBUTE,
                    "packed headers do not parse; kept as one header"
                );
                append(&mut headers, HEADERS_ATTRIBUTE, packed);
            }
        }
    }
    Decoded {
        payload,
        headers,
        key,
    }
}

fn append(headers: &mut Headers, name: &str, value: HeaderValue) {
    if let Err(e) = headers.append(name, value) {
        tracing::warn!(error = %e, "received header dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> OutgoingMessage {
        let mut m = OutgoingMessage::new("body");
        for i in 0..n {
            m = m.with_header(format!("h{i:02}"), format!("v{i}")).unwrap();
        }
        m
    }

    fn round_trip(m: &OutgoingMessage, key_attribute: bool) -> Decoded {
        let e = encode(m, key_attribute, HeaderOverflow::Pack, 256 * 1024).unwrap();
        assert!(
            e.attributes.len() <= MAX_ATTRIBUTES,
            "{:?}",
            e.attributes.keys()
        );
        decode(&e.body, Some(&e.attributes), None)
    }

    #[test]
    fn ten_headers_are_ten_attributes() {
        let e = encode(&msg(10), false, HeaderOverflow::Reject, 1 << 20).unwrap();
        assert_eq!(e.attributes.len(), 10);
        assert!(!e.attributes.contains_key(HEADERS_ATTRIBUTE));
        let d = round_trip(&msg(10), false);
        assert_eq!(d.headers.len(), 10);
        assert_eq!(d.headers.get_str("h09"), Some("v9"));
    }

    #[test]
    fn more_headers_are_packed_and_come_back_in_order() {
        let mut m = msg(14).with_header("traceparent", "00-abc-def-01").unwrap();
        m.headers.append("h00", "second value").unwrap();
        m.headers.append("bad name", "x").unwrap();
        m.headers.append("empty", "").unwrap();
        m.headers.append("bin", vec![0u8, 255]).unwrap();
        let e = encode(&m, false, HeaderOverflow::Pack, 1 << 20).unwrap();
        assert_eq!(e.attributes.len(), 10);
        assert!(
            e.attributes.contains_key("traceparent"),
            "priority header kept native"
        );
        let d = decode(&e.body, Some(&e.attributes), None);
        assert_eq!(d.headers.len(), m.headers.len());
        for (name, value) in &m.headers {
            assert!(
                d.headers.get_all(name).any(|v| v == value),
                "{name} = {value:?} missing"
            );
        }
        let h00: Vec<_> = d.headers.get_all("h00").collect();
        assert_eq!(
            h00,
            [&HeaderValue::from("v0"), &HeaderValue::from("second value")]
        );
        assert_eq!(d.headers.get("bin").unwrap().as_bytes(), &[0, 255]);
    }

    #[test]
    fn binary_values_stay_binary() {
        let m = OutgoingMessage::new("x")
            .with_header("bin", vec![1u8, 2, 3])
            .unwrap();
        let e = encode(&m, false, HeaderOverflow::Reject, 1 << 20).unwrap();
        assert_eq!(e.attributes["bin"].data_type(), "Binary");
        let d = decode(&e.body, Some(&e.attributes), None);
        assert_eq!(
            d.headers.get("bin"),
            Some(&HeaderValue::from(vec![1u8, 2, 3]))
        );
    }

    #[test]
    fn reject_fails_clearly() {
        let err = encode(&msg(11), false, HeaderOverflow::Reject, 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                Error::TooManyAttributes {
                    needed: 11,
                    limit: 10,
                    ..
                }
            ),
            "{err}"
        );
        let m = OutgoingMessage::new("x")
            .with_key("k")
            .with_header("a", "1")
            .unwrap();
        let err = encode(
            &msg(10).with_key("k"),
            true,
            HeaderOverflow::Reject,
            1 << 20,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`h09` does not fit"), "{err}");
        assert!(encode(&m, true, HeaderOverflow::Reject, 1 << 20).is_ok());
        let m = OutgoingMessage::new("x").with_header("a b", "1").unwrap();
        let err = encode(&m, false, HeaderOverflow::Reject, 1 << 20).unwrap_err();
        assert!(matches!(err, Error::InvalidAttribute { .. }), "{err}");
    }

    #[test]
    fn too_large_fails_clearly() {
        let m = OutgoingMessage::new(vec![b'a'; 100]);
        let err = encode(&m, false, HeaderOverflow::Pack, 99).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MessageTooLarge {
                    size: 100,
                    limit: 99
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn key_and_odd_payloads_round_trip() {
        let m = OutgoingMessage::new(vec![0u8, 159, 146, 150]).with_key(vec![0xffu8, 1]);
        let d = round_trip(&m, true);
        assert_eq!(d.payload, m.payload);
        assert_eq!(d.key, m.key);
        assert!(d.headers.is_empty());
        let d = round_trip(&OutgoingMessage::new("").with_key("user-1"), true);
        assert_eq!(d.payload, "");
        assert_eq!(d.key.as_deref(), Some(&b"user-1"[..]));
    }

    #[test]
    fn group_ids() {
        assert_eq!(group_id(b"user-1").unwrap(), "user-1");
        assert!(group_id(b"").is_err());
        assert!(group_id(b"with space").is_err());
        assert!(group_id(&[b'a'; 129]).is_err());
        let d = decode("x", None, Some("redrive-unkeyed-abc"));
        assert_eq!(d.key, None);
        let d = decode("x", None, Some("g1"));
        assert_eq!(d.key.as_deref(), Some(&b"g1"[..]));
    }
}

/// Property tests: whatever a producer put in a message's body and attributes, decoding
/// neither panics nor returns more than the received header limits; whatever a sender
/// passes to `encode`, it either fails clearly or lays out a message SQS accepts, and
/// decoding that gives the message back.
#[cfg(test)]
mod props {
    use proptest::collection::{hash_map, vec};
    use proptest::prelude::*;

    use super::*;

    /// Names: SQS-valid ones, redrive's own attributes, and anything at all.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_.-]{1,12}",
            Just(HEADERS_ATTRIBUTE.to_owned()),
            Just(KEY_ATTRIBUTE.to_owned()),
            Just(BODY_ENCODING_ATTRIBUTE.to_owned()),
            Just("traceparent".to_owned()),
            ".{0,12}",
        ]
    }

    /// Text, including characters SQS refuses and the JSON and base64 alphabets.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,24}",
            "[A-Za-z0-9+/=]{0,24}",
            Just("base64".to_owned()),
            Just("empty".to_owned()),
            any::<String>(),
            "[\\u{0}-\\u{1f}\\u{fffe}\\u{ffff}\\u{d7ff}-\\u{e000}]{1,4}",
        ]
    }

    /// A packed-headers attribute: well-formed lists (with hostile names and values,
    /// sometimes many entries), JSON of the wrong shape, and no JSON at all.
    fn packed() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            text().prop_map(serde_json::Value::String),
            text().prop_map(|b| serde_json::json!({ "b": b })),
            vec(any::<u8>(), 0..16).prop_map(|b| serde_json::json!({ "b": BASE64.encode(b) })),
            Just(serde_json::json!(42)),
            Just(serde_json::json!(null)),
            Just(serde_json::json!({})),
        ];
        let entry = prop_oneof![
            8 => (name(), value).prop_map(|(n, v)| serde_json::json!([n, v])),
            1 => Just(serde_json::json!(["only a name"])),
            1 => Just(serde_json::json!([1, "x"])),
            1 => Just(serde_json::json!("not a pair")),
        ];
        prop_oneof![
            4 => vec(entry, 0..8).prop_map(|l| serde_json::Value::Array(l).to_string()),
            1 => (1100usize..1500).prop_map(|n| {
                let l: Vec<_> = (0..n).map(|i| serde_json::json!([format!("h{i}"), "v"])).collect();
                serde_json::Value::Array(l).to_string()
            }),
            1 => text(),
        ]
    }

    fn attribute() -> impl Strategy<Value = MessageAttributeValue> {
        prop_oneof![
            text().prop_map(|s| string_attribute(&s)),
            vec(any::<u8>(), 0..24).prop_map(|b| binary_attribute(&b)),
            Just(
                MessageAttributeValue::builder()
                    .data_type("Number")
                    .build()
                    .expect("data type is set")
            ),
        ]
    }

    fn attributes() -> impl Strategy<Value = HashMap<String, MessageAttributeValue>> {
        (
            hash_map(name(), attribute(), 0..12),
            proptest::option::of(packed()),
        )
            .prop_map(|(mut attrs, packed)| {
                if let Some(p) = packed {
                    attrs.insert(HEADERS_ATTRIBUTE.to_owned(), string_attribute(&p));
                }
                attrs
            })
    }

    fn sqs_accepts(text: &str) -> bool {
        text.chars().all(sqs_char)
    }

    fn header_value() -> impl Strategy<Value = HeaderValue> {
        prop_oneof![
            text().prop_map(HeaderValue::Str),
            vec(any::<u8>(), 0..16).prop_map(|b| HeaderValue::Bytes(b.into())),
        ]
    }

    fn outgoing() -> impl Strategy<Value = OutgoingMessage> {
        (
            vec(any::<u8>(), 0..64),
            proptest::option::of(vec(any::<u8>(), 0..16)),
            vec(
                (
                    prop_oneof!["[a-zA-Z0-9_.-]{1,12}", ".{1,12}", name()],
                    header_value(),
                ),
                0..24,
            ),
        )
            .prop_map(|(payload, key, headers)| {
                let mut m = OutgoingMessage::new(payload);
                m.key = key.map(Into::into);
                for (n, v) in headers {
                    // Names core refuses (empty) cannot be in an outgoing message.
                    let _ = m.headers.append(n, v);
                }
                m
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decoding_anything_is_total_and_bounded(
            body in text(),
            attrs in proptest::option::of(attributes()),
            group in proptest::option::of(text()),
        ) {
            let d = decode(&body, attrs.as_ref(), group.as_deref());
            prop_assert!(d.headers.len() <= RECEIVED_HEADER_LIMITS.max_count);
            prop_assert!(d.headers.size() <= RECEIVED_HEADER_LIMITS.max_bytes);
            // Decoding only shrinks: base64 or the empty marker, else the body as it came.
            prop_assert!(d.payload.len() <= body.len());
            let key_bound = attrs
                .iter()
                .flat_map(|a| a.values())
                .map(|v| attribute_value(v).len())
                .chain(group.iter().map(String::len))
                .max()
                .unwrap_or(0);
            prop_assert!(d.key.as_ref().is_none_or(|k| k.len() <= key_bound));
        }

        #[test]
        fn what_encode_lays_out_sqs_accepts_and_decode_gives_back(
            m in outgoing(),
            fifo in any::<bool>(),
        ) {
            let e = match encode(&m, !fifo, HeaderOverflow::Pack, 1 << 20) {
                Ok(e) => e,
                // The only refusal with packing on and room to spare: an empty key.
                Err(Error::InvalidKey(_)) => {
                    prop_assert!(m.key.as_ref().is_some_and(|k| k.is_empty()));
                    return Ok(());
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            prop_assert!(e.attributes.len() <= MAX_ATTRIBUTES);
            prop_assert!(!e.body.is_empty() && sqs_accepts(&e.body));
            for (n, v) in &e.attributes {
                prop_assert!(invalid_name(n).is_none() || RESERVED.contains(&n.as_str()), "{n}");
                if let Some(s) = v.string_value() {
                    prop_assert!(!s.is_empty() && sqs_accepts(s), "attribute {n} = {s:?}");
                }
            }
            let d = decode(&e.body, Some(&e.attributes), None);
            prop_assert_eq!(&d.payload, &m.payload);
            if !fifo {
                prop_assert_eq!(&d.key, &m.key);
            }
            prop_assert_eq!(d.headers.len(), m.headers.len());
            for (n, v) in &m.headers {
                prop_assert!(d.headers.get_all(n).any(|x| x == v), "{} = {:?} lost", n, v);
            }
        }
    }
}
