//! One header table value into a [`HeaderValue`], following the table in the module
//! docs, and back.

use bytes::Bytes;
use lapin::types::{AMQPValue, DecimalValue, LongString};
use redrive_core::HeaderValue;

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

pub(super) fn count(value: &AMQPValue) -> Option<u32> {
    integer(value).map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// A header value as an AMQP table value: `Str` → long string, `Bytes` → byte array.
pub fn amqp_value(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(b.as_ref().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, FieldArray};

    use crate::mapping::table;

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
}
