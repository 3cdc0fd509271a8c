//! [`ConsumerLagBuilder`]: the poller's settings, checked when it starts.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rdkafka::ClientConfig;

use super::{ConsumerLag, Inner, LagStatus, TopicLag};
use crate::error::{Error, Result};
use crate::security::{self, SaslMechanism};

/// Settings of a [`ConsumerLag`] poller, from [`ConsumerLag::builder`].
///
/// | setting | default |
/// |---|---|
/// | interval | 15 s |
/// | timeout (one topic's read: its metadata, watermarks and committed offsets) | 5 s |
/// | any librdkafka setting (`security.protocol`, …) | through [`set`](Self::set) |
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until started"]
pub struct ConsumerLagBuilder {
    pub(super) topics: Vec<String>,
    pub(super) config: ClientConfig,
    pub(super) interval: Duration,
    pub(super) timeout: Duration,
}

/// Settings the poller owns: it must never commit, and never join the group.
const OWNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

impl ConsumerLagBuilder {
    pub(super) fn new(brokers: &str, group: &str, topics: Vec<String>) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("client.id", "redrive-consumer-lag");
        let mut builder = ConsumerLagBuilder {
            topics: Vec::new(),
            config,
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
        };
        builder.add(topics);
        builder
    }

    fn add(&mut self, topics: impl IntoIterator<Item = String>) {
        for topic in topics {
            if !self.topics.contains(&topic) {
                self.topics.push(topic);
            }
        }
    }

    /// Also polls `topics`.
    pub fn topics<T: Into<String>>(mut self, topics: impl IntoIterator<Item = T>) -> Self {
        self.add(topics.into_iter().map(Into::into));
        self
    }

    /// How often the topics are read.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The longest wait for the broker to tell one topic's figures: its metadata, the
    /// watermarks of each partition and the group's committed offsets together.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets a librdkafka setting of the poller's client (`security.protocol`,
    /// `sasl.username`, …): the same as the group's consumer needs to reach the brokers.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// TLS to the brokers, trusting the CA certificates in `path` (PEM), as
    /// [`KafkaConsumerBuilder::tls_ca_file`](crate::KafkaConsumerBuilder::tls_ca_file).
    pub fn tls_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        security::tls_ca_file(&mut self.config, path.as_ref());
        self
    }

    /// SASL authentication with `mechanism`, over TLS, as
    /// [`KafkaConsumerBuilder::sasl`](crate::KafkaConsumerBuilder::sasl).
    pub fn sasl(mut self, mechanism: SaslMechanism, username: &str, password: &str) -> Self {
        security::sasl(&mut self.config, mechanism, username, password);
        self
    }

    /// Starts the poller on a thread of its own. A broker that cannot be reached now is
    /// no error: its topics are [`LagStatus::Unavailable`] until it can.
    ///
    /// # Errors
    /// [`Error::Config`] when there is no topic, no group id, the interval or the timeout
    /// is zero, a setting the poller owns (`enable.auto.commit`,
    /// `enable.auto.offset.store`) is set, TLS or SCRAM is set without the `tls`
    /// feature, or the thread cannot be started; [`Error::Kafka`] when librdkafka
    /// refuses the settings.
    pub fn start(mut self) -> Result<ConsumerLag> {
        if self.topics.is_empty() {
            return Err(Error::Config(
                "the consumer lag poller has no topic to read; give it at least one".into(),
            ));
        }
        if self.config.get("group.id").is_none_or(str::is_empty) {
            return Err(Error::Config(
                "the consumer lag poller needs the group id of the group to watch".into(),
            ));
        }
        if self.interval.is_zero() {
            return Err(Error::Config(
                "the consumer lag interval is zero; set one above zero (the default is 15 s)"
                    .into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::Config(
                "the consumer lag timeout is zero; set one above zero (the default is 5 s)".into(),
            ));
        }
        for (key, value) in OWNED {
            if self.config.get(key).is_some_and(|v| v != *value) {
                return Err(Error::Config(format!(
                    "`{key}` is set by the consumer lag poller, which never commits; remove it"
                )));
            }
            self.config.set(*key, *value);
        }
        let consumer = self.config.create().map_err(security::client_error)?;
        let figures = Arc::new(Mutex::new(
            self.topics
                .iter()
                .map(|topic| TopicLag {
                    topic: topic.clone(),
                    status: LagStatus::Pending,
                    partitions: Vec::new(),
                    read_at: None,
                })
                .collect(),
        ));
        let stopped = Arc::new(AtomicBool::new(false));
        let (stop, stop_rx) = mpsc::channel();
        let poller = super::poll::Poller {
            consumer,
            topics: self.topics,
            interval: self.interval,
            timeout: self.timeout,
            figures: figures.clone(),
            stop: stop_rx,
            stopped: stopped.clone(),
        };
        std::thread::Builder::new()
            .name("redrive-kafka-lag".into())
            .spawn(move || poller.run())
            .map_err(|e| {
                Error::Config(format!(
                    "could not start the consumer lag poller's thread: {e}"
                ))
            })?;
        Ok(ConsumerLag {
            inner: Arc::new(Inner {
                figures,
                stop: Mutex::new(Some(stop)),
                stopped,
            }),
        })
    }
}
