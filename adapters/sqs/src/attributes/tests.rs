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
