use std::sync::{Arc, Once};

use proptest::prelude::*;
use rdkafka::message::{Header, Headers as KafkaHeaders, OwnedHeaders};
use redrive_core::HeaderLimits;

use super::{LeftOut, Parts, from_parts, headers, payload_and_key, record_id};

/// Headers as a producer sent them: any bytes as names. Read the way rdkafka reads
/// a consumed record's headers, which panics on a name that is not UTF-8.
struct Sent(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl KafkaHeaders for Sent {
    fn count(&self) -> usize {
        self.0.len()
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        self.0.get(idx).map(|(name, value)| Header {
            key: std::str::from_utf8(name).unwrap(),
            value: value.as_deref(),
        })
    }
}

/// Keeps the panics `Sent` raises on purpose out of the test output.
fn quiet_utf8_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let expected = info.location().is_some_and(|l| l.file() == file!())
                && info.to_string().contains("Utf8Error");
            if !expected {
                previous(info);
            }
        }));
    });
}

fn parts<'a>(headers: &'a Sent, payload: &'a [u8], key: Option<&'a [u8]>) -> Parts<'a, Sent> {
    Parts {
        topic: Arc::from("orders"),
        group: Arc::from("billing"),
        partition: 0,
        offset: 7,
        payload,
        key,
        headers: Some(headers),
        timestamp_ms: Some(-1),
    }
}

#[test]
fn a_header_rdkafka_cannot_read_is_left_out_alone() {
    quiet_utf8_panics();
    let sent = Sent(vec![
        (b"\xffname".to_vec(), Some(b"v".to_vec())),
        (b"message-id".to_vec(), Some(b"order-7".to_vec())),
    ]);
    let (kept, left_out) = headers(&sent);
    assert_eq!(kept.get_str("message-id"), Some("order-7"));
    assert_eq!(kept.len(), 1);
    assert_eq!(
        left_out,
        LeftOut {
            count: 1,
            first: Some("a header name that is not UTF-8".to_owned())
        }
    );
}

#[test]
fn an_empty_header_name_is_left_out_alone() {
    let owned = OwnedHeaders::new()
        .insert(Header {
            key: "",
            value: Some("x"),
        })
        .insert(Header {
            key: "traceparent",
            value: Some("tp"),
        })
        .insert(Header {
            key: "message-id",
            value: None::<&str>,
        });
    let (kept, left_out) = headers(&owned);
    let names: Vec<&str> = kept.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["traceparent", "message-id"]);
    assert_eq!(left_out.count, 1);
    assert_eq!(left_out.first.as_deref(), Some("an empty header name"));
}

#[test]
fn headers_past_the_count_limit_are_counted_not_read() {
    quiet_utf8_panics();
    let max = HeaderLimits::DEFAULT.max_count;
    let mut sent: Vec<_> = (0..max + 10)
        .map(|i| (format!("h{i}").into_bytes(), None))
        .collect();
    // Past the limit: never read, so rdkafka never panics on it.
    sent.push((b"\xff".to_vec(), None));
    let (kept, left_out) = headers(&Sent(sent));
    assert_eq!(kept.len(), max);
    assert_eq!(left_out.count, 11);
    assert_eq!(left_out.first, Some(format!("more than {max} headers")));
}

/// Counts the headers read.
struct Counted(Sent, std::cell::Cell<usize>);

impl KafkaHeaders for Counted {
    fn count(&self) -> usize {
        self.0.count()
    }

    fn try_get(&self, idx: usize) -> Option<Header<'_, &[u8]>> {
        self.1.set(self.1.get() + 1);
        self.0.try_get(idx)
    }
}

#[test]
fn a_record_of_countless_bad_names_is_read_only_so_far() {
    quiet_utf8_panics();
    let max = HeaderLimits::DEFAULT.max_count;
    let sent = Counted(
        Sent(vec![(b"\xff".to_vec(), None); 100_000]),
        std::cell::Cell::new(0),
    );
    let (kept, left_out) = headers(&sent);
    assert!(kept.is_empty());
    assert_eq!(left_out.count, 100_000, "every header accounted for");
    assert_eq!(
        sent.1.get(),
        2 * max,
        "read no further than twice the limit"
    );
}

/// A header name: empty, well known, short ASCII, any bytes, or long.
fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(b"message-id".to_vec()),
        Just(b"x-redrive-attempt".to_vec()),
        Just(b"traceparent".to_vec()),
        "[a-z-]{1,12}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 1..8),
        long(200..2000),
    ]
}

/// A value: null, short bytes, or long enough to pass the size limit in a few dozen.
fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        Just(None),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
        proptest::option::of("[0-9]{1,3}".prop_map(String::into_bytes)),
        proptest::option::of(long(1000..4000)),
    ]
}

/// One byte repeated: long input, cheap to make (a vector of random bytes makes a
/// value tree per byte).
fn long(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), len).prop_map(|(byte, n)| vec![byte; n])
}

proptest! {
    // 64 cases of up to 400 headers: about 2.5 s in a debug build on 2 cores.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever headers a record carries, the mapping does not panic, stays within
    /// the header limits, accounts for every header, and keeps exactly the
    /// readable ones in order when they fit.
    #[test]
    fn any_record_maps_to_a_bounded_message(
        sent in proptest::collection::vec((name(), value()), 0..400),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
    ) {
        quiet_utf8_panics();
        let sent = Sent(sent);
        let (kept, left_out) = headers(&sent);
        let limits = HeaderLimits::DEFAULT;
        prop_assert!(kept.len() <= limits.max_count);
        prop_assert!(kept.size() <= limits.max_bytes);
        prop_assert_eq!(kept.len() + left_out.count, sent.0.len());
        prop_assert_eq!(left_out.count == 0, left_out.first.is_none());
        prop_assert!(left_out.first.as_ref().is_none_or(|f| f.len() < 200));

        let readable: Vec<(&str, &[u8])> = sent
            .0
            .iter()
            .filter_map(|(n, v)| {
                let n = std::str::from_utf8(n).ok().filter(|n| !n.is_empty())?;
                Some((n, v.as_deref().unwrap_or_default()))
            })
            .collect();
        let fits = readable.len() <= limits.max_count
            && readable.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>()
                <= limits.max_bytes;
        if fits {
            let got: Vec<(&str, &[u8])> =
                kept.iter().map(|(n, v)| (n, v.as_bytes())).collect();
            prop_assert_eq!(got, readable);
        }

        let msg = from_parts(parts(&sent, &payload, key.as_deref()));
        prop_assert!(msg.metadata.attempt >= 1);
        let id = msg.metadata.message_id.as_deref().unwrap_or_default();
        prop_assert!(!id.is_empty() || msg.headers.get_str("message-id") == Some(""));
        prop_assert!(id.len() <= limits.max_bytes);
        prop_assert_eq!(&msg.payload[..], &payload[..]);
        prop_assert_eq!(msg.key.as_deref(), key.as_deref());
        prop_assert_eq!(msg.metadata.enqueued_at, None);
        prop_assert_eq!(msg.headers.len(), kept.len());
    }
}

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
fn record_ids_name_topic_partition_offset_and_timestamp() {
    assert_eq!(
        &*record_id("orders", 3, 42, Some(1_700_000_000_123)),
        "orders-3-42@1700000000123"
    );
    assert_eq!(&*record_id("orders", 3, 42, None), "orders-3-42");
    assert_eq!(
        &*record_id("t", -1, i64::MIN, Some(i64::MIN)),
        format!("t--1-{}@{}", i64::MIN, i64::MIN)
    );
    let longest = "x".repeat(249);
    assert_eq!(
        &*record_id(&longest, i32::MAX, i64::MAX, Some(i64::MIN)),
        format!("{longest}-{}-{}@{}", i32::MAX, i64::MAX, i64::MIN)
    );
    // Longer than any Kafka topic name: built on the heap instead.
    let long = "y".repeat(400);
    assert_eq!(&*record_id(&long, 0, 1, Some(5)), format!("{long}-0-1@5"));
}

/// A record without a `message-id` header, at offset 7 of partition 0 of `orders`,
/// written at `timestamp_ms`.
fn unnamed_record(timestamp_ms: Option<i64>, group: &str) -> super::Message {
    let no_headers = Sent(Vec::new());
    from_parts(Parts {
        timestamp_ms,
        group: Arc::from(group),
        ..parts(&no_headers, b"body", None)
    })
}

#[test]
fn a_record_keeps_its_id_across_deliveries_and_groups_but_not_across_topic_incarnations() {
    let first = unnamed_record(Some(1_700_000_000_000), "billing");
    let again = unnamed_record(Some(1_700_000_000_000), "shipping");
    assert_eq!(first.metadata.message_id, again.metadata.message_id);
    // The topic deleted and created again: offset 7 holds another record.
    let recreated = unnamed_record(Some(1_700_000_060_000), "billing");
    assert_ne!(first.metadata.message_id, recreated.metadata.message_id);
}

#[test]
fn the_source_names_the_consumer_group() {
    let msg = unnamed_record(Some(1), "billing");
    assert_eq!(msg.metadata.source.group.as_deref(), Some("billing"));
    assert_eq!(&*msg.metadata.source.destination, "orders");
    assert_eq!(
        (msg.metadata.source.partition, msg.metadata.source.offset),
        (Some(0), Some(7))
    );
}
