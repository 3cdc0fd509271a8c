//! The builder: the settings with their defaults and checks, and the start of the
//! consumer's tasks.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::retry::{RetryTopics, Routes};
use crate::security::{self, SaslMechanism};
use crate::watermark::{DEFAULT_MAX_OPEN, Watermarks};

use super::KafkaConsumer;
use super::batch::{BATCH, Batch, Spare};
use super::blocking::off_runtime;
use super::commit::commit_every;
use super::poll::poll;
use super::rebalance::Context;

/// Settings the adapter owns; setting them through [`KafkaConsumerBuilder::set`] is an
/// error, because offsets are committed from the watermark and nowhere else.
const OWNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
];

/// Builds a [`KafkaConsumer`].
///
/// | setting | default |
/// |---|---|
/// | `commit_interval` (how often moved watermarks are committed) | 1 s |
/// | `buffer` (records polled ahead of the Worker before partitions pause) | 256 |
/// | `close_timeout` (the final commit and leaving the group, at most) | 10 s |
/// | `revoke_timeout` (a revoke waits this long for running records) | 10 s |
/// | `max_open_per_partition` (records open behind a partition's oldest incomplete one before it pauses) | 100 000 |
/// | `retry_topics` (failed records retried through delay topics, not in the process) | off |
/// | `auto.offset.reset` | `earliest` |
/// | any other librdkafka setting | through [`set`](Self::set) |
#[derive(Clone, Debug)]
#[must_use]
pub struct KafkaConsumerBuilder {
    topics: Vec<String>,
    config: ClientConfig,
    commit_interval: Duration,
    close_timeout: Duration,
    revoke_timeout: Duration,
    buffer: usize,
    max_open: usize,
    pause_for_metadata: bool,
    retry: Option<RetryTopics>,
}

impl KafkaConsumerBuilder {
    /// How many records are polled ahead of the Worker (at least 1; rounded up to whole
    /// batches of up to 64 records, one batch per poll; up to about twice this many are
    /// held). When that stays full (for a third of `max.poll.interval.ms`, at most
    /// 10 s), the assigned partitions are paused and polling goes on, so the consumer
    /// keeps its group membership however long the Worker holds back
    /// (`max.poll.interval.ms` is never exceeded); they resume when there is room.
    pub fn buffer(mut self, records: usize) -> Self {
        self.buffer = records;
        self
    }

    /// How many records of one partition may be open, from its oldest incomplete record
    /// on (at least 1; default 100 000, 16 bytes each). A record that does not complete
    /// (a handler that hangs without a timeout layer, a record parked for good) holds
    /// its partition's committed offset, and every record received after it is kept
    /// until it completes. At the bound the partition is paused, with a warning naming
    /// its oldest incomplete record: its records already received are still handed
    /// out, none is lost, and the other partitions flow on. It resumes, where it
    /// stopped, once completions bring it down to half the bound. Read the counts
    /// through [`KafkaConsumer::open_records`].
    ///
    /// Keep it well above the records in flight in a healthy flow (about twice the
    /// [`buffer`](Self::buffer) plus the Worker's concurrency and waiting records), or
    /// partitions pause under normal load.
    pub fn max_open_per_partition(mut self, records: usize) -> Self {
        self.max_open = records;
        self
    }

    /// Whether a partition pauses when the records completed past its oldest incomplete
    /// one are scattered in more runs (128) than the committed offset's metadata can
    /// keep (default: it does). Paused, the runs merge as the records between them
    /// complete, and a restart redoes none of the completed records. Not paused, the
    /// runs past the metadata's bound (4,000 bytes, about 280 runs at worst) are not
    /// kept, with a warning once per assignment, and a restart processes them again:
    /// for a reader that leaves records incomplete on purpose, as a dead-letter tool
    /// replaying a selection does.
    pub fn pause_when_metadata_full(mut self, pause: bool) -> Self {
        self.pause_for_metadata = pause;
        self
    }

    /// Retries through retry topics instead of in the process: a nacked record is
    /// republished to a delay topic of this consumer group, with its next attempt, when
    /// it is due and where it came from in headers, and completes once the broker
    /// acknowledged the copy. The consumer reads the delay topics too, and hands each
    /// record out, as its origin record, once it is due. See [`RetryTopics`] and the
    /// [crate docs](crate#retry-topics).
    ///
    /// The Worker nacks failed records only with [`OrderingMode::Unordered`]: a retried
    /// record is no longer in order with its key. With an ordered mode it parks them,
    /// as without retry topics. The consumer declares the longest delay as its largest
    /// nack delay, so the Worker's [`Redelivery`] must not exceed it.
    ///
    /// [`OrderingMode::Unordered`]: redrive_core::OrderingMode::Unordered
    /// [`Redelivery`]: redrive_core::Redelivery
    pub fn retry_topics(mut self, retry: RetryTopics) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Creates the delay topics of the [`retry_topics`](Self::retry_topics) that do not
    /// exist yet, each with its origin topic's partition count and the broker's default
    /// replication, through an admin client with this builder's connection and security
    /// settings (`bootstrap.servers`, `security.protocol`, `ssl.*`, `sasl.*`,
    /// `client.id`); returns the ones it created. Call it before
    /// [`build`](Self::build), or create the topics with the cluster's own tools.
    ///
    /// # Errors
    /// [`Error::Config`] without retry topics, for retry topics Kafka cannot name, or
    /// for an origin topic that does not exist; [`Error::Kafka`] if the broker did not
    /// answer within 10 s or refused a topic (no permission to create topics).
    pub async fn create_retry_topics(&self) -> Result<Vec<String>> {
        let Some(retry) = &self.retry else {
            return Err(Error::Config(
                "no retry topics to create: set them with `retry_topics` first".into(),
            ));
        };
        let group = self.config.get("group.id").unwrap_or_default();
        let routes = Routes::new(retry.clone(), &self.topics, group)?;
        let mut config = ClientConfig::new();
        for key in self.config.config_map().keys() {
            let connection = ["bootstrap.servers", "security.protocol", "client.id"].contains(key)
                || key.starts_with("ssl.")
                || key.starts_with("sasl.");
            if let Some(value) = self.config.get(key).filter(|_| connection) {
                config.set(*key, value);
            }
        }
        let admin: AdminClient<DefaultClientContext> =
            config.create().map_err(security::client_error)?;
        let admin = Arc::new(admin);
        let reader = admin.clone();
        let metadata =
            off_runtime(move || reader.inner().fetch_metadata(None, Duration::from_secs(10)))
                .await
                .ok_or_else(|| Error::Config("reading the topics' metadata panicked".into()))??;
        let partitions = |name: &str| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len())
        };
        let mut missing = Vec::new();
        for topic in &self.topics {
            let Some(count) = partitions(topic) else {
                return Err(Error::Config(format!(
                    "topic `{topic}` does not exist: create it before its retry topics, \
                     which take its partition count"
                )));
            };
            let count = i32::try_from(count).unwrap_or(i32::MAX);
            for name in routes.delay_topics_of(topic) {
                if partitions(name).is_none() {
                    missing.push((name.to_owned(), count));
                }
            }
        }
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|(name, count)| NewTopic::new(name, *count, TopicReplication::Fixed(-1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &options).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(Error::Kafka(KafkaError::AdminOp(code))),
            }
        }
        Ok(missing.into_iter().map(|(name, _)| name).collect())
    }

    /// Sets a librdkafka consumer setting (`session.timeout.ms`, `security.protocol`, …).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// TLS to the brokers, trusting the CA certificates in `path` (PEM):
    /// `security.protocol=ssl` (`sasl_ssl` with [`sasl`](Self::sasl)) and
    /// `ssl.ca.location`. Needs the `tls` feature. See the [crate docs](crate#tls-and-sasl).
    pub fn tls_ca_file(mut self, path: impl AsRef<Path>) -> Self {
        security::tls_ca_file(&mut self.config, path.as_ref());
        self
    }

    /// SASL authentication with `mechanism`, over TLS: `security.protocol=sasl_ssl`
    /// (unless set to `sasl_plaintext`), `sasl.mechanisms`, `sasl.username` and
    /// `sasl.password`. Needs the `tls` feature. See the [crate docs](crate#tls-and-sasl).
    pub fn sasl(mut self, mechanism: SaslMechanism, username: &str, password: &str) -> Self {
        security::sasl(&mut self.config, mechanism, username, password);
        self
    }

    /// How often watermarks that moved are committed (at least 10 ms). The last ones
    /// are committed by [`close`](redrive_core::Consumer::close) and when partitions
    /// are revoked.
    pub fn commit_interval(mut self, interval: Duration) -> Self {
        self.commit_interval = interval;
        self
    }

    /// The longest [`close`](redrive_core::Consumer::close) waits for the final commit
    /// and for the consumer to leave its group; past it, close returns and logs.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// How long a rebalance that takes partitions away waits for their records that are
    /// running in a handler (zero: not at all). Records of those partitions not yet
    /// started are handed back unrun at once, parked ones are dropped; the running ones
    /// complete, and the watermark committed for the new owner covers them, so they are
    /// not processed twice. Past the deadline the rest is delivered again to the new
    /// owner. Keep it well under `max.poll.interval.ms`: the poll waits with it.
    ///
    /// The wait needs a multi-thread tokio runtime (the Worker completes records while
    /// the poll task waits); on a current-thread runtime the revoke does not wait.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// Checks the settings, creates the consumer and subscribes it.
    ///
    /// # Errors
    /// [`Error::Config`] for settings that cannot work (an owned setting changed, no
    /// topic, a commit interval under 10 ms, TLS or SCRAM without the `tls` feature,
    /// retry topics Kafka cannot name),
    /// [`Error::Kafka`] if librdkafka refuses
    /// the configuration or the subscription.
    pub fn build(self) -> Result<KafkaConsumer> {
        for (key, value) in OWNED {
            if let Some(v) = self.config.get(key).filter(|v| v != value) {
                return Err(Error::Config(format!(
                    "`{key}={v}` is not supported: the adapter commits offsets itself, from the \
                     watermark of completed records; leave `{key}` unset"
                )));
            }
        }
        if self.topics.is_empty() || self.topics.iter().any(String::is_empty) {
            return Err(Error::Config("name at least one topic, none empty".into()));
        }
        if self.commit_interval < Duration::from_millis(10) {
            return Err(Error::Config(format!(
                "commit interval {:?} is under 10 ms; commits that often load the broker for nothing",
                self.commit_interval
            )));
        }
        if self.buffer == 0 {
            return Err(Error::Config(
                "the buffer must hold at least 1 record".into(),
            ));
        }
        if self.max_open == 0 {
            return Err(Error::Config(
                "max_open_per_partition must allow at least 1 record".into(),
            ));
        }
        if self.config.get("group.id").is_none_or(str::is_empty) {
            return Err(Error::Config("a group id is required".into()));
        }
        // librdkafka's default max.poll.interval.ms is 300 s.
        let max_poll = self
            .config
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis);
        let pause_after = (max_poll / 3).min(Duration::from_secs(10));
        let group: Arc<str> = self.config.get("group.id").unwrap_or_default().into();
        let routes = self
            .retry
            .map(|retry| Routes::new(retry, &self.topics, &group))
            .transpose()?
            .map(Arc::new);
        let mut config = self.config;
        for (key, value) in OWNED {
            config.set(*key, *value);
        }
        let mut watermarks = Watermarks::new(self.max_open);
        if !self.pause_for_metadata {
            watermarks = watermarks.without_runs_bound();
        }
        let state = Arc::new(Mutex::new(watermarks));
        let context = Context {
            state: state.clone(),
            revoke_timeout: self.revoke_timeout,
        };
        let consumer: StreamConsumer<Context> = config
            .create_with_context(context)
            .map_err(security::client_error)?;
        let mut topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        if let Some(routes) = &routes {
            topics.extend(routes.delay_topics());
        }
        consumer.subscribe(&topics)?;
        let consumer = Arc::new(consumer);
        let committer = tokio::spawn(commit_every(
            Arc::downgrade(&consumer),
            state.clone(),
            self.commit_interval,
        ));
        // Records travel in batches of what one poll found, so the channel's costs are
        // paid per batch; a batch holds at most the buffer, so the buffer still bounds
        // what is polled ahead (rounded up to whole batches).
        let batch_max = self.buffer.min(BATCH);
        let (tx, rx) = mpsc::channel(self.buffer.div_ceil(batch_max));
        let spare = Arc::new(Spare::new(tx.max_capacity()));
        let poller = tokio::spawn(poll(
            consumer.clone(),
            group,
            state.clone(),
            tx,
            spare.clone(),
            batch_max,
            pause_after,
            routes.clone(),
        ));
        Ok(KafkaConsumer {
            consumer: Some(consumer),
            rx,
            ready: Batch::new(),
            spare,
            state,
            tasks: vec![committer, poller],
            close_timeout: self.close_timeout,
            topics: self.topics,
            max_nack_delay: routes.map(|r| r.max_delay()),
        })
    }
}
impl KafkaConsumer {
    /// Starts building a consumer in group `group_id` of `topics` at `brokers`
    /// (`host:port,host:port`).
    pub fn builder<T: Into<String>>(
        brokers: &str,
        group_id: &str,
        topics: impl IntoIterator<Item = T>,
    ) -> KafkaConsumerBuilder {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        KafkaConsumerBuilder {
            topics: topics.into_iter().map(Into::into).collect(),
            config,
            commit_interval: Duration::from_secs(1),
            close_timeout: Duration::from_secs(10),
            revoke_timeout: Duration::from_secs(10),
            buffer: 256,
            max_open: DEFAULT_MAX_OPEN,
            pause_for_metadata: true,
            retry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_debug_hides_sasl_and_ssl_secrets() {
        let builder = KafkaConsumer::builder("127.0.0.1:9092", "g", ["t"])
            .set("security.protocol", "SASL_SSL")
            .set("sasl.username", "svc")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "k3y-s3cret");
        let text = format!("{builder:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("k3y-s3cret"), "{text}");
    }

    #[test]
    fn a_bound_of_no_open_record_is_refused() {
        let err = KafkaConsumer::builder("127.0.0.1:9092", "g", ["t"])
            .max_open_per_partition(0)
            .build()
            .expect_err("no record could ever be open");
        assert!(
            matches!(err, Error::Config(ref m) if m.contains("max_open_per_partition")),
            "{err}"
        );
    }
}
