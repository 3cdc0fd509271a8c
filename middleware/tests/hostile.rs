//! Hostile input: property tests over everything that turns broker bytes into what the
//! layers read (headers, the dead-letter envelope, trace context and correlation ids,
//! JSON payloads). Each property: no panic, a bounded result, and a message that still
//! has a fate. The case counts keep the whole file within a few seconds; raise
//! `PROPTEST_CASES` to search longer.
#![cfg(all(feature = "dead-letter", feature = "trace"))]

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use redrive_core::{
    BoxError, HeaderLimits, HeaderValue, Headers, Message, Outcome, OutgoingMessage, Publisher,
    classify, handler,
};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterError, DeadLetterLayer};
use redrive_middleware::trace::TraceLayer;
use tower::{Layer, ServiceExt, service_fn};

/// Names as a producer may send them: any text, empty, envelope and trace names, and
/// case variants of them.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        Just(String::new()),
        prop::sample::select(vec![
            dead_letter::TRACEPARENT,
            dead_letter::TRACESTATE,
            dead_letter::CORRELATION_ID,
            dead_letter::FIRST_FAILURE_AT,
            dead_letter::ERROR_KIND,
            dead_letter::ATTEMPTS,
            "X-Correlation-ID",
            "message-id",
            "idempotency-key",
        ])
        .prop_map(str::to_owned),
    ]
}

fn value() -> impl Strategy<Value = HeaderValue> {
    prop_oneof![
        ".{0,200}".prop_map(HeaderValue::from),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(HeaderValue::from),
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,4})?Z?"
            .prop_map(HeaderValue::from),
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-9]".prop_map(HeaderValue::from),
        Just(HeaderValue::from("x".repeat(5_000))),
    ]
}

fn headers(max: usize) -> impl Strategy<Value = Vec<(String, HeaderValue)>> {
    prop::collection::vec((name(), value()), 0..max)
}

/// Kafka's limits, the tightest of the adapters'.
fn kafka_limits() -> HeaderLimits {
    HeaderLimits {
        max_count: 128,
        max_bytes: 64 * 1024,
    }
}

fn message(pairs: &[(String, HeaderValue)], payload: Vec<u8>) -> Message {
    let mut headers = Headers::with_limits(kafka_limits());
    for (n, v) in pairs {
        // A header over the limits is refused with an error, as the adapters skip it.
        let _ = headers.insert(n.as_str(), v.clone());
    }
    let mut msg = Message::new(payload).with_headers(headers);
    msg.metadata.source.destination = "orders".into();
    msg.metadata.attempt = 1;
    msg
}

#[derive(Default)]
struct Recorder(Mutex<Vec<OutgoingMessage>>);

impl Publisher for Recorder {
    async fn publish(&self, _: &str, message: OutgoingMessage) -> redrive_core::Result<()> {
        self.0.lock().unwrap().push(message);
        Ok(())
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn headers_stay_within_their_limits(pairs in headers(300)) {
        let limits = HeaderLimits { max_count: 64, max_bytes: 4096 };
        let mut h = Headers::with_limits(limits);
        for (n, v) in &pairs {
            let _ = h.insert(n.as_str(), v.clone());
        }
        prop_assert!(h.len() <= limits.max_count);
        let bytes: usize = h.iter().map(|(n, v)| n.len() + v.len()).sum();
        prop_assert!(bytes <= limits.max_bytes);
    }

    #[test]
    fn a_poison_message_with_hostile_headers_still_has_a_fate(
        pairs in headers(160),
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let dlq = Arc::new(Recorder::default());
        let svc = DeadLetterLayer::new(dlq.clone(), DeadLetterConfig::default())
            .unwrap()
            .layer(service_fn(|_m: Message| async {
                Err::<Outcome, BoxError>(classify::permanent("bad"))
            }));
        match block_on(svc.oneshot(message(&pairs, payload.clone()))) {
            Ok(outcome) => {
                prop_assert_eq!(outcome, Outcome::DeadLettered);
                let published = dlq.0.lock().unwrap();
                prop_assert_eq!(published.len(), 1);
                prop_assert_eq!(&published[0].payload[..], &payload[..]);
                prop_assert_eq!(published[0].headers.get_str(dead_letter::ERROR_KIND), Some("permanent"));
            }
            // Not dead-lettered: the error says why, and the Worker nacks it (no loss).
            Err(e) => {
                let mut chain: Option<&(dyn std::error::Error + 'static)> = Some(&*e);
                let mut found = false;
                while let Some(err) = chain {
                    found |= err.is::<DeadLetterError>();
                    chain = err.source();
                }
                prop_assert!(found, "{e}");
            }
        }
    }

    #[test]
    fn the_trace_layer_takes_any_trace_context_and_correlation_id(pairs in headers(40)) {
        let svc = TraceLayer::new().layer(handler::handler_fn(|_m: Message| async {
            Ok::<_, BoxError>(())
        }));
        let outcome = block_on(svc.oneshot(message(&pairs, Vec::new())));
        prop_assert_eq!(outcome.unwrap(), Outcome::Processed);
    }

    #[test]
    fn a_json_handler_fails_bad_bytes_permanently_and_never_panics(
        payload in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            "[\\[{\"a-z0-9:,.\\]} ]{0,64}".prop_map(String::into_bytes),
        ]
    ) {
        let svc = handler::json(|_v: serde_json::Value, _m: Message| async { Ok::<_, BoxError>(()) });
        match block_on(svc.oneshot(Message::new(payload))) {
            Ok(outcome) => prop_assert_eq!(outcome, Outcome::Processed),
            Err(e) => prop_assert!(redrive_core::Classifier::default().classify(&*e).is_permanent(), "{e}"),
        }
    }
}
