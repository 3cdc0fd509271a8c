//! A record whose handler aborts the process, in a real process: this test binary runs
//! itself as a child whose Worker aborts on the record, several times, then runs the
//! Worker here and checks the attempt the record arrives with.
//!
//! On librdkafka's mock cluster only: tansu (0.6) answers offset fetches without the
//! committed metadata, where the count is kept.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redrive_core::testkit::unique_name;
use redrive_core::{BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Worker};
use tokio::sync::Notify;

const CHILD: &str = "child_aborts_on_the_record";
const BROKERS: &str = "REDRIVE_TEST_CRASH_BROKERS";
const TOPIC: &str = "REDRIVE_TEST_CRASH_TOPIC";
const GROUP: &str = "REDRIVE_TEST_CRASH_GROUP";

/// The child: a Worker whose handler aborts the process on the record `kills`. Run by
/// the test below, with the broker, topic and group in the environment.
#[test]
#[ignore = "run as a child process by a_record_that_aborts_the_process_is_counted_across_restarts"]
fn child_aborts_on_the_record() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"))
    };
    let (brokers, topic, group) = (var(BROKERS), var(TOPIC), var(GROUP));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let handler = redrive_core::handler_fn(|m: Message| async move {
            if m.payload == "kills" {
                std::process::abort();
            }
            Ok::<_, BoxError>(())
        });
        Worker::builder(common::consumer(&brokers, &group, &topic))
            .service(handler)
            .ordering(OrderingMode::PerPartition)
            .build()
            .expect("worker")
            .run_until(tokio::time::sleep(Duration::from_secs(60)))
            .await;
    });
    panic!("the record never came within 60 s");
}

/// Runs the child once; it must die of its abort.
async fn run_child(brokers: &str, topic: &str, group: &str) {
    let vars = [(BROKERS, brokers), (TOPIC, topic), (GROUP, group)];
    let (status, _) = common::child::run(CHILD, &vars, None).await;
    assert!(
        !status.success() && status.code().is_none(),
        "the child should have been killed by its abort: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_aborts_the_process_is_counted_across_restarts() {
    let env = common::Env::mock();
    let brokers = env.brokers.clone();
    let topic = unique_name("aborts");
    let group = unique_name("g");
    env.create_topic(&topic, 1).await;
    let p = common::publisher(&brokers);
    for body in ["kills", "next"] {
        p.publish(&topic, OutgoingMessage::new(body).with_key("k"))
            .await
            .expect("publish");
    }
    for _ in 0..3 {
        run_child(&brokers, &topic, &group).await;
    }

    // Here the handler lives: it sees the record after three deaths.
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let handler = redrive_core::handler_fn(move |m: Message| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            let mut s = s.lock().unwrap();
            s.push((
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.metadata.attempt,
            ));
            if s.len() == 2 {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let report = Worker::builder(common::consumer(&brokers, &group, &topic))
        .service(handler)
        .ordering(OrderingMode::PerPartition)
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        })
        .await;
    assert_eq!(
        *seen.lock().unwrap(),
        [("kills".to_owned(), 4), ("next".to_owned(), 1)],
        "three deliveries died with their process; the next record is counted afresh: {report:?}"
    );
}
