//! Records other producers can send that redrive cannot take as they are: a header name
//! that is not UTF-8, an empty header name. Each costs that header, never the record
//! or the consumer: the record is handled with the rest of its headers, and the records
//! after it flow on.
//!
//! The records are written byte for byte (`common::raw`), since client APIs only take
//! header names that are strings. Each scenario runs on librdkafka's mock cluster
//! (`mock::…`) and on the real broker started by `scripts/kafka-broker` (`tansu::…`).

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Env;
use common::raw::{self, Record};
use redrive_core::testkit::unique_name;
use redrive_core::{BoxError, Message, OrderingMode, Report, Worker, handler_fn};
use tokio::sync::Notify;

on_both!(
    a_header_name_that_is_not_utf8_costs_only_that_header,
    an_empty_header_name_costs_only_that_header,
);

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// What the handler saw of one record.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    payload: String,
    message_id: Option<String>,
    traceparent: Option<String>,
    header_names: Vec<String>,
}

/// Runs a Worker on `topic`, one record at a time in offset order, until it handled `n` records or 20 s passed; returns what
/// it saw, in order, and its report.
async fn handle(env: &Env, topic: &str, n: usize) -> (Vec<Seen>, Report) {
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let handler = handler_fn(move |m: Message| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            let mut s = s.lock().unwrap();
            s.push(Seen {
                payload: String::from_utf8_lossy(&m.payload).into_owned(),
                message_id: m.metadata.message_id.as_deref().map(str::to_owned),
                traceparent: m.headers.get_str("traceparent").map(str::to_owned),
                header_names: m.headers.iter().map(|(k, _)| k.to_owned()).collect(),
            });
            if s.len() == n {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let report = Worker::builder(common::consumer(&env.brokers, &unique_name("g"), topic))
        .service(handler)
        .ordering(OrderingMode::PerPartition)
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(20)) => {}
            }
        })
        .await;
    let seen = seen.lock().unwrap().clone();
    (seen, report)
}

/// A record whose headers are: `x-before`, then `bad`, then `message-id` and
/// `traceparent`, between two ordinary records.
async fn three_records_with_a_bad_header_in_the_middle(env: &Env, bad: &[u8]) -> String {
    let topic = unique_name("hostile");
    env.create_topic(&topic, 1).await;
    raw::produce(
        &env.brokers,
        &topic,
        0,
        vec![
            Record::new("before").key("k"),
            Record::new("bad")
                .key("k")
                .header(b"x-before", b"1")
                .header(bad, b"the value")
                .header(b"message-id", b"order-7")
                .header(b"traceparent", TRACEPARENT.as_bytes()),
            Record::new("after").key("k"),
        ],
    )
    .await;
    topic
}

fn assert_the_bad_header_alone_was_left_out(seen: &[Seen], report: &Report) {
    let payloads: Vec<&str> = seen.iter().map(|s| s.payload.as_str()).collect();
    assert_eq!(
        payloads,
        ["before", "bad", "after"],
        "every record handled, the consumer kept going: {report:?}"
    );
    let bad = &seen[1];
    assert_eq!(
        bad.header_names,
        ["x-before", "message-id", "traceparent"],
        "only the bad header was left out"
    );
    assert_eq!(bad.message_id.as_deref(), Some("order-7"));
    assert_eq!(bad.traceparent.as_deref(), Some(TRACEPARENT));
    assert_eq!(report.processed, 3, "{report:?}");
}

/// Kafka takes any bytes as a header name; rdkafka's header reader panics on one that
/// is not UTF-8.
async fn a_header_name_that_is_not_utf8_costs_only_that_header(env: &Env) {
    let topic = three_records_with_a_bad_header_in_the_middle(env, b"\xff\xfename").await;
    let (seen, report) = handle(env, &topic, 3).await;
    assert_the_bad_header_alone_was_left_out(&seen, &report);
}

/// Kafka takes an empty header name; redrive's `Headers` refuse one.
async fn an_empty_header_name_costs_only_that_header(env: &Env) {
    let topic = three_records_with_a_bad_header_in_the_middle(env, b"").await;
    let (seen, report) = handle(env, &topic, 3).await;
    assert_the_bad_header_alone_was_left_out(&seen, &report);
}

#[test]
fn crc32c_gives_its_check_value() {
    assert_eq!(raw::crc32c(b"123456789"), 0xE306_9283);
}
