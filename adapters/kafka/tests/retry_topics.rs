//! Retry topics: a failed record waits in a delay topic, not in the process, and comes
//! back as its origin record with the next attempt once due. Each scenario runs on
//! librdkafka's mock cluster and on tansu, every record a batch of its own: tansu 0.6.0 as
//! released (the `cargo install` fallback) answers a fetch from inside a batch of several
//! records at the next batch, and a retry topic's partition resumes inside its batches.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Env;
use redrive_core::testkit::unique_name;
use redrive_core::{
    BoxError, Message, OrderingMode, OutgoingMessage, Publisher, Redelivery, Report, Worker,
};
use redrive_kafka::retry::{DUE, ORIGIN_OFFSET, ORIGIN_TOPIC};
use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};
use tokio::sync::Notify;

/// A call of the handler: what it saw, and when.
#[derive(Clone, Debug)]
struct Call {
    body: String,
    attempt: u32,
    /// `source.destination` and `source.offset`.
    topic: String,
    offset: Option<i64>,
    origin_topic: Option<String>,
    origin_offset: Option<String>,
    message_id: String,
    at: Instant,
}

impl Call {
    fn of(m: &Message) -> Self {
        let header = |name| m.headers.get_str(name).map(str::to_owned);
        Call {
            body: String::from_utf8_lossy(&m.payload).into_owned(),
            attempt: m.attempt(),
            topic: m.metadata.source.destination.to_string(),
            offset: m.metadata.source.offset,
            origin_topic: header(ORIGIN_TOPIC),
            origin_offset: header(ORIGIN_OFFSET),
            message_id: m
                .metadata
                .message_id
                .as_deref()
                .unwrap_or_default()
                .to_owned(),
            at: Instant::now(),
        }
    }
}

type Seen = Arc<Mutex<Vec<Call>>>;

/// The retry topics of a test, created, with one delay.
async fn retry_topics(env: &Env, topic: &str, group: &str, delay: Duration) -> RetryTopics {
    let publisher = KafkaPublisher::builder(&env.brokers)
        .set("batch.num.messages", "1")
        .build()
        .expect("publisher");
    let retries = RetryTopics::new(publisher, [delay]);
    for t in retries.topics(topic, group) {
        env.create_topic(&t, 1).await;
    }
    retries
}

/// A consumer of `topic` in `group` retrying through `retries`, with `settings`.
fn consumer(
    env: &Env,
    group: &str,
    topic: &str,
    retries: RetryTopics,
    settings: &[(&str, &str)],
) -> KafkaConsumer {
    let mut builder = KafkaConsumer::builder(&env.brokers, group, [topic])
        .commit_interval(Duration::from_millis(100))
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .retry_topics(retries);
    for (key, value) in settings {
        builder = builder.set(key, *value);
    }
    builder.build().expect("consumer")
}

/// Runs an `Unordered` Worker of `consumer` around `handler`, retrying after `delay`,
/// until `done` is notified or `within` passed.
async fn run<S>(
    consumer: KafkaConsumer,
    handler: S,
    delay: Duration,
    done: Arc<Notify>,
    within: Duration,
) -> Report
where
    S: tower::Service<Message> + Send + 'static,
    S::Response: Into<redrive_core::Outcome> + Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
    S::Future: Send + 'static,
{
    Worker::builder(consumer)
        .service(handler)
        .ordering(OrderingMode::Unordered)
        .redelivery(Redelivery::constant(delay))
        .build()
        .expect("worker")
        .run_until(async move {
            tokio::select! {
                () = done.notified() => {}
                () = tokio::time::sleep(within) => {}
            }
        })
        .await
}

/// A record failing once waits out its delay in the retry topic while the records after
/// it flow, and comes back as attempt 2 of its origin record. The delay is longer than
/// `max.poll.interval.ms`: the consumer polls on, paused, and stays in its group.
async fn a_failed_record_waits_in_the_retry_topic_while_others_flow(env: &Env) {
    let (topic, group) = (unique_name("rt"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    // A short session timeout the broker takes (the mock cluster takes 3 s; at 1 s the
    // consumer was never given the partition; tansu, as Kafka, 6 s at least), and the
    // poll interval as short: librdkafka wants it no shorter.
    let (session, delay) = match env.mock {
        Some(_) => ("3000", Duration::from_secs(4)),
        None => ("6000", Duration::from_secs(8)),
    };
    let retries = retry_topics(env, &topic, &group, delay).await;
    let p = common::publisher(&env.brokers);
    p.publish(&topic, OutgoingMessage::new("fails-once").with_key("a"))
        .await
        .expect("publish");

    let seen: Seen = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d, p2, t2) = (seen.clone(), done.clone(), p.clone(), topic.clone());
    let handler = redrive_core::handler_fn(move |m: Message| {
        let (s, d, p2, t2) = (s.clone(), d.clone(), p2.clone(), t2.clone());
        async move {
            let call = Call::of(&m);
            let body = call.body.clone();
            s.lock().unwrap().push(call);
            if body == "fails-once" && m.attempt() == 1 {
                // A record after it, while it waits.
                p2.publish(&t2, OutgoingMessage::new("later").with_key("b"))
                    .await
                    .expect("publish");
                return Err::<(), BoxError>("fails once".into());
            }
            if body == "fails-once" {
                d.notify_one();
            }
            Ok(())
        }
    });
    let consumer = consumer(
        env,
        &group,
        &topic,
        retries,
        &[
            ("session.timeout.ms", session),
            ("heartbeat.interval.ms", "300"),
            ("max.poll.interval.ms", session),
        ],
    );
    let report = run(consumer, handler, delay, done, Duration::from_secs(60)).await;
    let seen = seen.lock().unwrap().clone();
    let summary: Vec<_> = seen
        .iter()
        .map(|c| {
            (
                &*c.body,
                c.attempt,
                &*c.topic,
                c.offset,
                c.origin_topic.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("fails-once", 1, &*topic, Some(0), None),
            ("later", 1, &*topic, Some(1), None),
            ("fails-once", 2, &*topic, Some(0), Some(&*topic)),
        ],
        "the later record ran while the failed one waited; the retry is the origin record: {report:?}"
    );
    let waited = seen[2].at - seen[0].at;
    assert!(
        waited >= delay,
        "retried after {waited:?}, before its delay"
    );
    assert_eq!(
        (report.processed, report.nacked, report.parked),
        (2, 1, 0),
        "{report:?}"
    );
}

/// A record retried twice keeps the message id made from its origin record, and its
/// copies name the origin offset.
async fn a_retried_record_keeps_its_message_id_and_origin(env: &Env) {
    let (topic, group) = (unique_name("rt-id"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    let delay = Duration::from_millis(300);
    let retries = retry_topics(env, &topic, &group, delay).await;
    let p = common::publisher(&env.brokers);
    p.publish(&topic, OutgoingMessage::new("x"))
        .await
        .expect("publish");
    let seen: Seen = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let handler = redrive_core::handler_fn(move |m: Message| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            s.lock().unwrap().push(Call::of(&m));
            if m.attempt() < 3 {
                return Err::<(), BoxError>("fails twice".into());
            }
            d.notify_one();
            Ok(())
        }
    });
    let consumer = consumer(env, &group, &topic, retries, &[]);
    run(consumer, handler, delay, done, Duration::from_secs(60)).await;
    let seen = seen.lock().unwrap().clone();
    let first_id = seen[0].message_id.clone();
    assert!(first_id.starts_with(&format!("{topic}-0-0@")), "{seen:?}");
    let ids: Vec<_> = seen
        .iter()
        .map(|c| (c.attempt, &*c.message_id, c.origin_offset.as_deref()))
        .collect();
    assert_eq!(
        ids,
        [
            (1, &*first_id, None),
            (2, &*first_id, Some("0")),
            (3, &*first_id, Some("0")),
        ]
    );
}

/// A record in a delay topic whose due time lies far ahead (written by hand, or by a
/// producer whose clock is wrong) holds its partition no longer than the topic's delay
/// after it was published: it cannot stop the retries behind it for good.
async fn a_due_time_past_the_topics_delay_waits_the_delay_alone(env: &Env) {
    let (topic, group) = (unique_name("rt-far"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    let delay = Duration::from_secs(1);
    let retries = retry_topics(env, &topic, &group, delay).await;
    let delay_topic = retries.topics(&topic, &group).remove(0);
    let p = common::publisher(&env.brokers);
    let in_2100 = "4102444800000";
    for body in ["far", "next"] {
        let record = OutgoingMessage::new(body)
            .with_header(DUE, in_2100)
            .expect("header");
        p.publish(&delay_topic, record).await.expect("publish");
    }
    let published = Instant::now();
    let seen: Seen = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let handler = redrive_core::handler_fn(move |m: Message| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            let mut s = s.lock().unwrap();
            s.push(Call::of(&m));
            if s.len() == 2 {
                d.notify_one();
            }
            Ok::<_, BoxError>(())
        }
    });
    let consumer = consumer(env, &group, &topic, retries, &[]);
    run(consumer, handler, delay, done, Duration::from_secs(20)).await;
    let seen = seen.lock().unwrap().clone();
    let bodies: Vec<&str> = seen.iter().map(|c| &*c.body).collect();
    assert_eq!(
        bodies,
        ["far", "next"],
        "records due in 2100 are handed out after the topic's delay: {seen:?}"
    );
    let waited = seen[0].at - published;
    assert!(
        waited >= delay - Duration::from_millis(100),
        "handed out after {waited:?}, before the delay"
    );
}

/// A republish the broker refuses (here the first three) is tried again in the
/// background until the retry topic takes it: the record is not left holding its
/// partition until a restart. On the mock cluster, which can refuse requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_republish_is_tried_again_until_the_retry_topic_takes_it() {
    use redrive_kafka::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let env = Env::mock();
    let (topic, group) = (unique_name("rt-refused"), unique_name("g"));
    env.create_topic(&topic, 1).await;
    let delay = Duration::from_millis(200);
    let retries = retry_topics(&env, &topic, &group, delay)
        .await
        .with_timeout(Duration::from_secs(2));
    let p = common::publisher(&env.brokers);
    p.publish(&topic, OutgoingMessage::new("x"))
        .await
        .expect("publish");
    // The next three produce requests, the republishes, are refused.
    let refused = RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED;
    env.mock
        .as_ref()
        .expect("the mock cluster")
        .request_errors(RDKafkaApiKey::Produce, &[refused; 3]);
    let seen: Seen = Arc::default();
    let done = Arc::new(Notify::new());
    let (s, d) = (seen.clone(), done.clone());
    let handler = redrive_core::handler_fn(move |m: Message| {
        let (s, d) = (s.clone(), d.clone());
        async move {
            s.lock().unwrap().push(Call::of(&m));
            if m.attempt() == 1 {
                return Err::<(), BoxError>("fails once".into());
            }
            d.notify_one();
            Ok(())
        }
    });
    let consumer = consumer(&env, &group, &topic, retries, &[]);
    let report = run(consumer, handler, delay, done, Duration::from_secs(30)).await;
    let attempts: Vec<u32> = seen.lock().unwrap().iter().map(|c| c.attempt).collect();
    assert_eq!(
        attempts,
        [1, 2],
        "the retry topic took the copy at last: {report:?}"
    );
}

/// The builder creates the delay topics that are missing, with the origin topic's
/// partition count, and none twice. On tansu: the mock cluster has no CreateTopics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_creates_the_missing_retry_topics() {
    let env = Env::real();
    let (topic, group) = (unique_name("rt-create"), unique_name("g"));
    env.create_topic(&topic, 3).await;
    let publisher = KafkaPublisher::new(&env.brokers).expect("publisher");
    let retries = RetryTopics::new(publisher, [Duration::from_secs(1), Duration::from_secs(30)]);
    let names = retries.topics(&topic, &group);
    env.create_topic(&names[0], 3).await;
    let builder =
        KafkaConsumer::builder(&env.brokers, &group, [topic.as_str()]).retry_topics(retries);
    let created = builder.create_retry_topics().await.expect("create");
    assert_eq!(created, [names[1].clone()], "the one that was missing");
    let metadata = common::metadata(&env.brokers);
    let partitions = |name: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map(|t| t.partitions().len())
    };
    assert_eq!(
        partitions(&names[1]),
        Some(3),
        "the origin's partition count"
    );
    assert_eq!(
        builder.create_retry_topics().await.expect("create again"),
        Vec::<String>::new(),
        "none created twice"
    );
    let missing = KafkaConsumer::builder(&env.brokers, &group, ["no-such-topic-here"])
        .retry_topics(RetryTopics::new(
            KafkaPublisher::new(&env.brokers).expect("publisher"),
            [Duration::from_secs(1)],
        ))
        .create_retry_topics()
        .await
        .expect_err("the origin topic does not exist");
    assert!(
        missing.to_string().contains("no-such-topic-here"),
        "{missing}"
    );
}

on_both!(
    a_due_time_past_the_topics_delay_waits_the_delay_alone,
    a_failed_record_waits_in_the_retry_topic_while_others_flow,
    a_retried_record_keeps_its_message_id_and_origin,
);
