//! Property tests: whatever a producer put in a message's body and attributes, decoding
//! neither panics nor returns more than the received header limits; whatever a sender
//! passes to `encode`, it either fails clearly or lays out a message SQS accepts, and
//! decoding that gives the message back.

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
