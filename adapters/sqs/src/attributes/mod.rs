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

impl Encoded {
    /// The size SQS counts against its limits: the body and every attribute's name,
    /// data type and value.
    pub(crate) fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(n, v)| attribute_size(n, v))
                .sum::<usize>()
    }
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

    let encoded = Encoded { body, attributes };
    let size = encoded.size();
    if size > max_message_bytes {
        return Err(Error::MessageTooLarge {
            size,
            limit: max_message_bytes,
        });
    }
    Ok(encoded)
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
mod props;
#[cfg(test)]
mod tests;
