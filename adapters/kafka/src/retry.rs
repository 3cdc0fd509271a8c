//! Retry topics: a failed record is republished to a delay topic of its consumer group,
//! with its next attempt and when it is due in headers, and completes; the consumer
//! reads the delay topics beside its own and hands each record out once it is due.
//!
//! Opt in with [`KafkaConsumerBuilder::retry_topics`](crate::KafkaConsumerBuilder::retry_topics).
//! See the [crate docs](crate#retry-topics) for when to use them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redrive_core::names::{ATTEMPT, MESSAGE_ID};
use redrive_core::{Message, OutgoingMessage};

use crate::error::{Error, Result};
use crate::publisher::{KafkaPublisher, check_topic_name};

/// When a record of a delay topic is due: milliseconds since the Unix epoch.
pub const DUE: &str = "x-redrive-due";
/// The topic a record of a delay topic was first consumed from.
pub const ORIGIN_TOPIC: &str = "x-redrive-origin-topic";
/// Its partition there.
pub const ORIGIN_PARTITION: &str = "x-redrive-origin-partition";
/// Its offset there.
pub const ORIGIN_OFFSET: &str = "x-redrive-origin-offset";

/// How long a nack waits for the broker to acknowledge the republished record, unless
/// told otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Retry topics for a [`KafkaConsumer`](crate::KafkaConsumer): the publisher that
/// republishes failed records, and the delays, one delay topic each.
///
/// A record nacked with a delay goes to the topic of the smallest delay at least as
/// long (the longest, for a longer one), named
/// `<topic>.retry.<group>.<delay in ms>ms` ([`RetryTopics::topic`]); it is handed out
/// again once its own delay has passed, not before, and at most the topic's delay after
/// it was nacked. The delay topics must exist:
/// [`KafkaConsumerBuilder::create_retry_topics`](crate::KafkaConsumerBuilder::create_retry_topics)
/// creates the missing ones.
///
/// ```no_run
/// use std::time::Duration;
/// use redrive_kafka::{KafkaConsumer, KafkaPublisher, RetryTopics};
///
/// # fn main() -> Result<(), redrive_kafka::Error> {
/// let retries = RetryTopics::new(
///     KafkaPublisher::new("127.0.0.1:9092")?,
///     [Duration::from_secs(1), Duration::from_secs(30), Duration::from_secs(600)],
/// );
/// // Delay topics `orders.retry.billing.1000ms`, `….30000ms` and `….600000ms`.
/// let consumer = KafkaConsumer::builder("127.0.0.1:9092", "billing", ["orders"])
///     .retry_topics(retries)
///     .build()?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct RetryTopics {
    publisher: KafkaPublisher,
    /// Sorted, whole milliseconds, no repeats.
    delays: Vec<Duration>,
    timeout: Duration,
}

impl RetryTopics {
    /// Retry topics with these delays, republished through `publisher` (give it the
    /// consumer's TLS and SASL settings, and a `message.timeout.ms` no longer than the
    /// [timeout](Self::with_timeout), so a copy the wait gave up on is not delivered
    /// later beside the one tried again). Delays are taken in whole milliseconds; a
    /// delay repeated counts once. [`build`](crate::KafkaConsumerBuilder::build) refuses
    /// an empty list and a delay under 1 ms.
    pub fn new(publisher: KafkaPublisher, delays: impl IntoIterator<Item = Duration>) -> Self {
        let mut delays: Vec<Duration> = delays
            .into_iter()
            .map(|d| Duration::from_millis(millis(d)))
            .collect();
        delays.sort_unstable();
        delays.dedup();
        RetryTopics {
            publisher,
            delays,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How long a nack waits for the broker to acknowledge the republished record
    /// (default 5 s). Past it, or when the broker refuses it, the republish is tried
    /// again in the background (from 1 s, doubling to 30 s) until the retry topic takes
    /// it; meanwhile the record holds its partition's committed offset. A copy the
    /// broker took after the wait ended may then be in the delay topic twice: at least
    /// once, as ever. Keep it under the Worker's `settle_timeout` (10 s by default),
    /// which bounds the whole nack: a nack cut short there leaves the record holding
    /// its partition's committed offset until a restart or a rebalance.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The delays, shortest first.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// The delay topic of `topic` for consumer group `group` and `delay`:
    /// `<topic>.retry.<group>.<delay in ms>ms`.
    pub fn topic(topic: &str, group: &str, delay: Duration) -> String {
        let mut name = String::with_capacity(topic.len() + group.len() + 20);
        let _ = write!(name, "{topic}.retry.{group}.{}ms", millis(delay));
        name
    }

    /// Every delay topic of `topic` for consumer group `group`, shortest delay first.
    pub fn topics(&self, topic: &str, group: &str) -> Vec<String> {
        self.delays
            .iter()
            .map(|&d| Self::topic(topic, group, d))
            .collect()
    }
}

/// A duration in whole milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The retry topics of one consumer: where each of its topics' records goes when
/// nacked, and which of the topics it reads are delay topics.
#[derive(Debug)]
pub(crate) struct Routes {
    retry: RetryTopics,
    /// A delay topic's origin topic and delay.
    origin: HashMap<String, DelayTopic>,
    /// An origin topic's delay topics, in the order of the delays.
    delay_topics: HashMap<String, Vec<String>>,
}

impl Routes {
    /// The routes of a consumer of `topics` in `group`.
    ///
    /// # Errors
    /// [`Error::Config`] for no delay, a delay under 1 ms, a topic pattern, or a delay
    /// topic name Kafka would refuse (a group id with characters a topic name cannot
    /// have, or a name too long).
    pub(crate) fn new(retry: RetryTopics, topics: &[String], group: &str) -> Result<Self> {
        if retry.delays.is_empty() {
            return Err(Error::Config("retry topics need at least one delay".into()));
        }
        if retry.delays[0].is_zero() {
            return Err(Error::Config(
                "retry topic delays are at least 1 ms; a record that is due at once needs no retry topic".into(),
            ));
        }
        let mut origin = HashMap::new();
        let mut delay_topics = HashMap::new();
        for topic in topics {
            if topic.starts_with('^') {
                return Err(Error::Config(format!(
                    "retry topics need topic names, not the pattern `{topic}`: each topic has delay topics of its own"
                )));
            }
            let names = retry.topics(topic, group);
            for (name, &delay) in names.iter().zip(&retry.delays) {
                check_topic_name(name).map_err(|e| {
                    Error::Config(format!(
                        "the retry topic of `{topic}` for group `{group}` cannot be named \
                         `<topic>.retry.<group>.<delay>ms`: {e}"
                    ))
                })?;
                if topics.contains(name) {
                    return Err(Error::Config(format!(
                        "`{name}` is a retry topic of `{topic}`; subscribe to `{topic}` alone"
                    )));
                }
                let origin_topic = Arc::from(topic.as_str());
                origin.insert(
                    name.clone(),
                    DelayTopic {
                        origin: origin_topic,
                        delay,
                    },
                );
            }
            delay_topics.insert(topic.clone(), names);
        }
        Ok(Routes {
            retry,
            origin,
            delay_topics,
        })
    }

    /// The delay topics, to subscribe to beside the origin topics.
    pub(crate) fn delay_topics(&self) -> impl Iterator<Item = &str> {
        self.origin.keys().map(String::as_str)
    }

    /// The delay topics of `origin`, in the order of the delays.
    pub(crate) fn delay_topics_of(&self, origin: &str) -> impl Iterator<Item = &str> {
        self.delay_topics
            .get(origin)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// The origin topic and delay of a delay topic; `None` for any other topic.
    pub(crate) fn delay_topic_of(&self, topic: &str) -> Option<&DelayTopic> {
        self.origin.get(topic)
    }

    /// The longest delay.
    pub(crate) fn max_delay(&self) -> Duration {
        self.retry.delays.last().copied().unwrap_or_default()
    }

    /// The delay topic a record of `origin` nacked with `delay` goes to.
    fn delay_topic(&self, origin: &str, delay: Duration) -> Option<&str> {
        let names = self.delay_topics.get(origin)?;
        let i = self
            .retry
            .delays
            .iter()
            .position(|&d| d >= delay)
            .unwrap_or(names.len() - 1);
        names.get(i).map(String::as_str)
    }
}

/// A delay topic: the topic its records came from, and its delay.
#[derive(Debug)]
pub(crate) struct DelayTopic {
    pub(crate) origin: Arc<str>,
    pub(crate) delay: Duration,
}

/// What a nack republishes: a copy of the record as received, and where it came from.
#[derive(Clone)]
pub(crate) struct RetryCopy {
    routes: Arc<Routes>,
    message: OutgoingMessage,
    message_id: Option<Arc<str>>,
    origin: Arc<str>,
    partition: Option<i32>,
    offset: Option<i64>,
}

impl RetryCopy {
    /// A copy of `message` (its `source` naming its origin, as [`as_origin`] leaves it).
    pub(crate) fn new(routes: Arc<Routes>, message: &Message) -> Self {
        let source = &message.metadata.source;
        RetryCopy {
            routes,
            message: message.to_outgoing(),
            message_id: message.metadata.message_id.clone(),
            origin: source.destination.clone(),
            partition: source.partition,
            offset: source.offset,
        }
    }

    /// Publishes the copy to its delay topic for `delay`, as attempt `attempt`; returns
    /// once the broker acknowledged it.
    ///
    /// # Errors
    /// [`Error::Publish`] if the broker refused it, [`Error::Retry`] without an
    /// acknowledgement within the timeout or without a delay topic.
    pub(crate) async fn republish(&self, attempt: u32, delay: Duration) -> Result<()> {
        let Some(topic) = self.routes.delay_topic(&self.origin, delay) else {
            return Err(Error::Retry {
                topic: self.origin.to_string(),
                reason: "the record's topic has no delay topics".into(),
            });
        };
        let due = SystemTime::now()
            .checked_add(delay)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, millis);
        let mut set: Vec<(&str, String)> = vec![
            (ATTEMPT, attempt.to_string()),
            (DUE, due.to_string()),
            (ORIGIN_TOPIC, self.origin.to_string()),
        ];
        if let Some(id) = &self.message_id {
            set.push((MESSAGE_ID, id.to_string()));
        }
        if let Some(p) = self.partition {
            set.push((ORIGIN_PARTITION, p.to_string()));
        }
        if let Some(o) = self.offset {
            set.push((ORIGIN_OFFSET, o.to_string()));
        }
        let timeout = self.routes.retry.timeout;
        let publisher = &self.routes.retry.publisher;
        match tokio::time::timeout(timeout, publisher.send_with(topic, &self.message, &set)).await {
            Ok(sent) => sent.map(drop),
            Err(_) => Err(Error::Retry {
                topic: topic.to_owned(),
                reason: format!("no acknowledgement within {timeout:?}"),
            }),
        }
    }
}

/// When a record of a delay topic with `delay` is due: at its [`DUE`] header, but no
/// later than `delay` after it was published (its timestamp), so a due time far ahead
/// (written by hand, or by a producer whose clock is wrong) cannot hold the partition
/// for longer. `None` without a due time that reads (it is due at once).
pub(crate) fn due(message: &Message, delay: Duration) -> Option<SystemTime> {
    let ms: u64 = message.headers.get_str(DUE)?.parse().ok()?;
    let due = UNIX_EPOCH.checked_add(Duration::from_millis(ms))?;
    let latest = message
        .metadata
        .enqueued_at
        .and_then(|t| t.checked_add(delay));
    Some(latest.map_or(due, |latest| due.min(latest)))
}

/// Makes `message`, read from a delay topic of `origin`, the origin record's: its
/// `source` names the origin topic, and the partition and offset its headers name.
pub(crate) fn as_origin(message: &mut Message, origin: &Arc<str>) {
    let headers = &message.headers;
    let partition = headers
        .get_str(ORIGIN_PARTITION)
        .and_then(|p| p.parse().ok());
    let offset = headers.get_str(ORIGIN_OFFSET).and_then(|o| o.parse().ok());
    let source = &mut message.metadata.source;
    source.destination = origin.clone();
    source.partition = partition;
    source.offset = offset;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(delays: &[u64]) -> Routes {
        let publisher = KafkaPublisher::new("127.0.0.1:1").expect("publisher");
        let retry = RetryTopics::new(
            publisher,
            delays.iter().map(|&ms| Duration::from_millis(ms)),
        );
        Routes::new(retry, &["orders".to_owned()], "billing").expect("routes")
    }

    #[test]
    fn a_nack_goes_to_the_smallest_delay_at_least_as_long() {
        let r = routes(&[30_000, 1_000, 1_000, 600_000]);
        let to = |ms| r.delay_topic("orders", Duration::from_millis(ms));
        assert_eq!(to(0), Some("orders.retry.billing.1000ms"));
        assert_eq!(to(1_000), Some("orders.retry.billing.1000ms"));
        assert_eq!(to(1_001), Some("orders.retry.billing.30000ms"));
        assert_eq!(to(600_000), Some("orders.retry.billing.600000ms"));
        assert_eq!(to(3_600_000), Some("orders.retry.billing.600000ms"));
        assert_eq!(to(10), Some("orders.retry.billing.1000ms"));
        assert_eq!(r.delay_topic("other", Duration::ZERO), None);
        assert_eq!(r.max_delay(), Duration::from_secs(600));
        let mut subscribed: Vec<&str> = r.delay_topics().collect();
        subscribed.sort_unstable();
        assert_eq!(
            subscribed,
            [
                "orders.retry.billing.1000ms",
                "orders.retry.billing.30000ms",
                "orders.retry.billing.600000ms"
            ]
        );
        let of = |t| r.delay_topic_of(t).map(|d| (&*d.origin, d.delay));
        assert_eq!(
            of("orders.retry.billing.30000ms"),
            Some(("orders", Duration::from_secs(30)))
        );
        assert_eq!(of("orders"), None);
    }

    #[test]
    fn settings_that_cannot_work_are_refused_with_what_to_change() {
        let publisher = KafkaPublisher::new("127.0.0.1:1").expect("publisher");
        let refused = |delays: &[Duration], topics: &[&str], group: &str| {
            let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
            match Routes::new(
                RetryTopics::new(publisher.clone(), delays.iter().copied()),
                &topics,
                group,
            ) {
                Err(Error::Config(m)) => m,
                other => panic!("{delays:?} {topics:?} {group}: {other:?}"),
            }
        };
        let second = [Duration::from_secs(1)];
        assert!(refused(&[], &["t"], "g").contains("at least one delay"));
        assert!(refused(&[Duration::from_micros(10)], &["t"], "g").contains("at least 1 ms"));
        assert!(refused(&second, &["^t.*"], "g").contains("pattern"));
        assert!(refused(&second, &["t"], "billing team").contains("' ' is not allowed"));
        assert!(
            refused(&second, &["t", "t.retry.g.1000ms"], "g").contains("subscribe to `t` alone")
        );
    }

    #[test]
    fn a_record_of_a_delay_topic_is_delivered_as_its_origin_record() {
        let mut m = Message::new("x");
        m.headers.insert(ORIGIN_PARTITION, "2").expect("header");
        m.headers.insert(ORIGIN_OFFSET, "41").expect("header");
        m.headers.insert(DUE, "1700000000123").expect("header");
        m.metadata.source.destination = "orders.retry.billing.1000ms".into();
        as_origin(&mut m, &Arc::from("orders"));
        let s = &m.metadata.source;
        assert_eq!(
            (&*s.destination, s.partition, s.offset),
            ("orders", Some(2), Some(41))
        );
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        let second = Duration::from_secs(1);
        m.metadata.enqueued_at = None;
        assert_eq!(due(&m, second), Some(at(1_700_000_000_123)));
        m.metadata.enqueued_at = Some(at(1_700_000_000_000));
        assert_eq!(due(&m, second), Some(at(1_700_000_000_123)));
        m.metadata.enqueued_at = Some(at(1_600_000_000_000));
        assert_eq!(
            due(&m, second),
            Some(at(1_600_000_001_000)),
            "no later than the topic's delay after it was published"
        );
        m.headers.insert(DUE, "soon").expect("header");
        assert_eq!(
            due(&m, second),
            None,
            "a due time that is not a number: due at once"
        );
    }
}
