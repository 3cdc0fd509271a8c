//! What survives a consumer killed with SIGKILL: the records completed past a stuck one
//! (none is processed again), the deliveries of a record retried in place (its attempt
//! goes on, so `max_attempts` holds across the kill), and a record on its way through
//! the retry topics (it reaches the DLQ after exactly `max_attempts`).
//!
//! This test binary runs itself as a child process whose Worker the test kills. The
//! first two run on librdkafka's mock cluster, in the parent: its offsets are exact and
//! it keeps the committed metadata (tansu 0.6 answers offset fetches without it, and
//! resumes a fetch at a record batch's start). The retry topics one runs on tansu: its
//! attempt travels in a header, and every record is a batch of its own.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::try_join_all;
use redrive_core::testkit::unique_name;
use redrive_core::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Worker,
};
use redrive_kafka::{KafkaPublisher, RetryTopics};
use redrive_middleware::dead_letter::{self, DeadLetterConfig, DeadLetterLayer};
use tokio::sync::Notify;
use tower::Layer as _;

const CHILD: &str = "child_worker";
const BROKERS: &str = "REDRIVE_TEST_RESTART_BROKERS";
const TOPIC: &str = "REDRIVE_TEST_RESTART_TOPIC";
const GROUP: &str = "REDRIVE_TEST_RESTART_GROUP";
const MODE: &str = "REDRIVE_TEST_RESTART_MODE";

/// The retry topics' delay in the `retry-topics` mode.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Records completed past the stuck one before the kill.
const DONE: usize = 10_000;

/// The retry topics of the `retry-topics` mode: one delay, records in batches of one.
fn retry_topics(brokers: &str) -> RetryTopics {
    let publisher = KafkaPublisher::builder(brokers)
        .set("batch.num.messages", "1")
        .build()
        .expect("publisher");
    RetryTopics::new(publisher, [RETRY_DELAY])
}

/// The Worker of the `retry-topics` mode around `handler`: records retried through the
/// retry topics, dead-lettered to `<topic>-dlq` at attempt 4.
macro_rules! retry_worker {
    ($brokers:expr, $group:expr, $topic:expr, $handler:expr) => {{
        let (brokers, group, topic): (&str, &str, &str) = ($brokers, $group, $topic);
        let consumer = redrive_kafka::KafkaConsumer::builder(brokers, group, [topic])
            .commit_interval(Duration::from_millis(100))
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .retry_topics(retry_topics(brokers))
            .build()
            .expect("consumer");
        let service = DeadLetterLayer::new(
            Arc::new(common::publisher(brokers)),
            DeadLetterConfig::default()
                .with_destination(format!("{topic}-dlq"))
                .with_max_attempts(4),
        )
        .expect("dead-letter config")
        .layer($handler);
        Worker::builder(consumer)
            .service(service)
            .ordering(OrderingMode::Unordered)
            .redelivery(Redelivery::constant(RETRY_DELAY))
            .build()
            .expect("worker")
    }};
}

/// The child: a Worker run until it is killed, in one of two modes.
/// - `stuck`: the record `stuck` never completes; every other one does. Once all
///   [`DONE`] did and a commit had time to go out, it prints `READY`.
/// - `fails`: every record fails and is retried in place; it prints `ATTEMPT <n>`
///   before each run fails.
/// - `retry-topics`: the same, retried through retry topics.
#[test]
#[ignore = "run as a child process by the tests below"]
fn child_worker() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"))
    };
    let (brokers, topic, group, mode) = (var(BROKERS), var(TOPIC), var(GROUP), var(MODE));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let handler = redrive_core::handler_fn(move |m: Message| {
            let (done, mode) = (done.clone(), mode.clone());
            async move {
                if mode != "stuck" {
                    println!("ATTEMPT {}", m.metadata.attempt);
                    return Err::<(), BoxError>("always fails".into());
                }
                if m.payload == "stuck" {
                    std::future::pending::<()>().await;
                }
                if done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == DONE {
                    tokio::spawn(async {
                        // Commits go out every 100 ms.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        println!("READY");
                    });
                }
                Ok(())
            }
        });
        let until = tokio::time::sleep(Duration::from_secs(120));
        match var(MODE).as_str() {
            "retry-topics" => {
                retry_worker!(&brokers, &group, &topic, handler)
                    .run_until(until)
                    .await;
            }
            mode => {
                let ordering = if mode == "fails" {
                    OrderingMode::PerKey
                } else {
                    OrderingMode::Unordered
                };
                Worker::builder(common::consumer(&brokers, &group, &topic))
                    .service(handler)
                    .ordering(ordering)
                    .concurrency(32)
                    .redelivery(Redelivery::constant(Duration::from_millis(200)))
                    .build()
                    .expect("worker")
                    .run_until(until)
                    .await;
            }
        }
    });
    panic!("the child was not killed within 120 s");
}

/// Runs the child in `mode`, and kills it (SIGKILL) `after` it printed `line`; returns
/// what it printed.
async fn run_child_until(
    brokers: &str,
    topic: &str,
    group: &str,
    mode: &str,
    line: &str,
    after: Duration,
) -> Vec<String> {
    let vars = [
        (BROKERS, brokers),
        (TOPIC, topic),
        (GROUP, group),
        (MODE, mode),
    ];
    let (status, printed) = common::child::run(CHILD, &vars, Some((line, after))).await;
    assert!(
        status.code().is_none(),
        "the child ended before printing {line:?}, not killed: {status}; it printed {printed:?}"
    );
    printed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_redoes_none_of_the_records_completed_past_a_stuck_one() {
    let env = common::Env::mock();
    let brokers = env.brokers.clone();
    let (topic, group) = (unique_name("restart"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    let p = common::publisher(&brokers);
    p.publish(&topic, OutgoingMessage::new("stuck"))
        .await
        .expect("publish");
    for chunk in (0..DONE).collect::<Vec<_>>().chunks(1000) {
        try_join_all(
            chunk
                .iter()
                .map(|i| p.publish(&topic, OutgoingMessage::new(format!("r{i}")))),
        )
        .await
        .expect("publish");
    }
    run_child_until(&brokers, &topic, &group, "stuck", "READY", Duration::ZERO).await;
    p.publish(&topic, OutgoingMessage::new("fresh"))
        .await
        .expect("publish");

    // The next consumer of the group: the stuck record, now on its second delivery,
    // and the fresh one; none of the completed ones.
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
            if s.iter().any(|(b, _)| b == "stuck") && s.iter().any(|(b, _)| b == "fresh") {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let consumer = common::consumer(&brokers, &group, &topic);
    let open = consumer.open_records();
    let report = Worker::builder(consumer)
        .service(handler)
        .ordering(OrderingMode::Unordered)
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        })
        .await;
    let seen = seen.lock().unwrap();
    let again = seen.iter().filter(|(b, _)| b.starts_with('r')).count();
    assert_eq!(
        again, 0,
        "records completed before the kill were processed again: {again} of {DONE} ({report:?})"
    );
    let mut seen = seen.clone();
    seen.sort();
    assert_eq!(
        seen,
        [("fresh".to_owned(), 1), ("stuck".to_owned(), 2)],
        "the stuck record comes again, counted; {report:?}"
    );
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_retried_in_place_keeps_its_attempts_across_a_kill() {
    let env = common::Env::mock();
    let brokers = env.brokers.clone();
    let (topic, group) = (unique_name("retried"), unique_name("g"));
    let dlq = format!("{topic}-dlq");
    env.create_topic(&topic, 1).await;
    env.create_topic(&dlq, 1).await;
    let p = common::publisher(&brokers);
    p.publish(&topic, OutgoingMessage::new("poison").with_key("k"))
        .await
        .expect("publish");
    let printed = run_child_until(
        &brokers,
        &topic,
        &group,
        "fails",
        "ATTEMPT 2",
        Duration::ZERO,
    )
    .await;
    assert_eq!(attempts_printed(&printed), ["ATTEMPT 1", "ATTEMPT 2"]);

    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let handler = always_fails(attempts.clone(), done.clone());
    let service = DeadLetterLayer::new(
        Arc::new(p.clone()),
        DeadLetterConfig::default()
            .with_destination(&dlq)
            .with_max_attempts(4),
    )
    .expect("dead-letter config")
    .layer(handler);
    let report = Worker::builder(common::consumer(&brokers, &group, &topic))
        .service(service)
        .ordering(OrderingMode::PerKey)
        .redelivery(Redelivery::constant(Duration::from_millis(200)))
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => tokio::time::sleep(Duration::from_millis(500)).await,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        })
        .await;
    assert_eq!(
        *attempts.lock().unwrap(),
        [3, 4],
        "two deliveries before the kill, two after: {report:?}"
    );
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(
        letter_attempts(&brokers, &dlq).await.as_deref(),
        Some("4"),
        "dead-lettered after exactly max_attempts deliveries"
    );
}

/// A handler that fails every call, noting each attempt in `attempts`, and notifies
/// `fourth` from attempt 4 on.
fn always_fails(
    attempts: Arc<Mutex<Vec<u32>>>,
    fourth: Arc<Notify>,
) -> redrive_core::handler::HandlerFn<
    impl Fn(Message) -> std::future::Ready<Result<(), BoxError>> + Clone + Send + Sync + 'static,
> {
    redrive_core::handler_fn(move |m: Message| {
        attempts.lock().unwrap().push(m.metadata.attempt);
        if m.metadata.attempt >= 4 {
            fourth.notify_one();
        }
        std::future::ready(Err("always fails".into()))
    })
}

/// The `ATTEMPT <n>` lines a child printed.
fn attempts_printed(printed: &[String]) -> Vec<&str> {
    printed
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("ATTEMPT"))
        .collect()
}

/// The attempts the first dead letter in `dlq` says its record had.
async fn letter_attempts(brokers: &str, dlq: &str) -> Option<String> {
    let mut c = common::consumer(brokers, &unique_name("dlq-reader"), dlq);
    let letter = tokio::time::timeout(
        Duration::from_secs(20),
        redrive_core::Consumer::receive(&mut c),
    )
    .await
    .expect("the dead letter within 20 s")
    .expect("receive")
    .expect("delivery");
    letter
        .message
        .headers
        .get_str(dead_letter::ATTEMPTS)
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_through_the_retry_topics_is_dead_lettered_after_max_attempts_across_a_kill() {
    let env = common::Env::real();
    let brokers = env.brokers.clone();
    let (topic, group) = (unique_name("retry-kill"), unique_name("g"));
    let dlq = format!("{topic}-dlq");
    for t in [&topic, &dlq] {
        env.create_topic(t, 1).await;
    }
    for t in retry_topics(&brokers).topics(&topic, &group) {
        env.create_topic(&t, 1).await;
    }
    let p = common::publisher(&brokers);
    p.publish(&topic, OutgoingMessage::new("poison").with_key("k"))
        .await
        .expect("publish");
    // Killed a second after attempt 2 failed: its copy, attempt 3, waits in the delay
    // topic (due a second later), and attempt 2's record was committed done.
    let printed = run_child_until(
        &brokers,
        &topic,
        &group,
        "retry-topics",
        "ATTEMPT 2",
        RETRY_DELAY / 2,
    )
    .await;
    assert_eq!(attempts_printed(&printed), ["ATTEMPT 1", "ATTEMPT 2"]);
    // The killed member stays in the group until its session expires; the new one's
    // join waits for that.

    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let done = Arc::new(Notify::new());
    let handler = always_fails(attempts.clone(), done.clone());
    let report = retry_worker!(&brokers, &group, &topic, handler)
        .run_until(async move {
            tokio::select! {
                // Time for anything that would come after the dead letter.
                () = done.notified() => tokio::time::sleep(RETRY_DELAY * 2).await,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        })
        .await;
    assert_eq!(
        *attempts.lock().unwrap(),
        [3, 4],
        "two attempts before the kill, two after, none again: {report:?}"
    );
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(
        letter_attempts(&brokers, &dlq).await.as_deref(),
        Some("4"),
        "dead-lettered after exactly max_attempts deliveries"
    );
}
