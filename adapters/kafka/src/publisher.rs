//! The publisher: a producer that waits for the broker's acknowledgement.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redrive_core::{OutgoingMessage, Publisher};

use crate::error::{Error, Result};
use crate::security::{self, SaslMechanism};

/// How long `publish` waits for the broker's acknowledgement unless told otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Publishes records and waits until the broker acknowledged them (`acks=all`,
/// idempotent producer). Used by producers and as the dead-letter sink.
///
/// The message's key becomes the record key, so a dead-lettered record lands in the
/// same partition order as its key; headers are copied in order (string values as
/// UTF-8 bytes).
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    timeout: Duration,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl KafkaPublisher {
    /// A publisher to `brokers` (`host:port,host:port`) with `acks=all` and idempotence on.
    ///
    /// # Errors
    /// [`Error::Kafka`] if librdkafka refuses the configuration.
    pub fn new(brokers: &str) -> Result<Self> {
        Self::builder(brokers).build()
    }

    /// Starts building a publisher to `brokers` (`host:port,host:port`), for TLS, SASL
    /// or other librdkafka settings.
    pub fn builder(brokers: &str) -> KafkaPublisherBuilder {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        KafkaPublisherBuilder {
            config,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A publisher from a librdkafka producer configuration; `acks=all` and
    /// `enable.idempotence=true` are set unless the configuration sets them.
    ///
    /// # Errors
    /// [`Error::Config`] for a TLS or SCRAM setting when librdkafka was built without
    /// TLS (the `tls` feature); [`Error::Kafka`] if librdkafka refuses the configuration.
    pub fn from_config(mut config: ClientConfig) -> Result<Self> {
        for (key, value) in [("acks", "all"), ("enable.idempotence", "true")] {
            if config.get(key).is_none() {
                config.set(key, value);
            }
        }
        Ok(KafkaPublisher {
            producer: config.create().map_err(security::client_error)?,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// How long `publish` waits for a record to be queued and acknowledged (30 s).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The underlying producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Publishes `message` to `topic`; returns its partition and offset once the
    /// broker acknowledged it.
    ///
    /// # Errors
    /// [`Error::Publish`] if the broker did not acknowledge it within the timeout.
    pub async fn send(&self, topic: &str, message: &OutgoingMessage) -> Result<(i32, i64)> {
        self.send_with(topic, message, &[]).await
    }

    /// [`send`](Self::send), with the headers named in `set` given these values (after
    /// the message's others, which keep their order).
    pub(crate) async fn send_with(
        &self,
        topic: &str,
        message: &OutgoingMessage,
        set: &[(&str, String)],
    ) -> Result<(i32, i64)> {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len() + set.len());
        let replaced = |name: &str| set.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
        for (name, value) in message.headers.iter() {
            if replaced(name) {
                continue;
            }
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        for (name, value) in set {
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(&message.payload[..])
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(&key[..]);
        }
        match self.producer.send(record, self.timeout).await {
            Ok(delivery) => Ok((delivery.partition, delivery.offset)),
            Err((source, _)) => Err(Error::Publish {
                topic: topic.to_owned(),
                source,
            }),
        }
    }
}

/// Builds a [`KafkaPublisher`], from [`KafkaPublisher::builder`].
///
/// | setting | default |
/// |---|---|
/// | `timeout` (a publish waits this long for room in the producer's queue) | 30 s |
/// | `message.timeout.ms` (and this long for the acknowledgement) | 300 s |
/// | `acks` | `all` |
/// | `enable.idempotence` | `true` |
/// | any other librdkafka setting | through [`set`](Self::set) |
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until built"]
pub struct KafkaPublisherBuilder {
    config: ClientConfig,
    timeout: Duration,
}

impl KafkaPublisherBuilder {
    /// Sets a librdkafka producer setting (`linger.ms`, `compression.type`, …).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.config.set(key, value);
        self
    }

    /// How long `publish` waits for room in the producer's queue (30 s), as
    /// [`KafkaPublisher::with_timeout`]. The broker's acknowledgement is awaited up to
    /// `message.timeout.ms` (librdkafka's default: 300 s); set it for a shorter bound.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
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

    /// Creates the producer.
    ///
    /// # Errors
    /// [`Error::Config`] for a TLS or SCRAM setting when librdkafka was built without
    /// TLS (the `tls` feature); [`Error::Kafka`] if librdkafka refuses the configuration.
    pub fn build(self) -> Result<KafkaPublisher> {
        Ok(KafkaPublisher::from_config(self.config)?.with_timeout(self.timeout))
    }
}

impl Publisher for KafkaPublisher {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.send(destination, &message).await?;
        Ok(())
    }

    /// A topic name Kafka accepts: 1 to 249 ASCII letters, digits, `.`, `_` and `-`,
    /// and neither `.` nor `..`.
    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        check_topic_name(destination).map_err(redrive_core::Error::config)
    }
}

/// Kafka's rules for a topic name, as its broker checks them.
pub(crate) fn check_topic_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(format!(
            "`{name}` is not a Kafka topic name: it must not be empty, `.` or `..`"
        ));
    }
    if name.len() > 249 {
        return Err(format!(
            "Kafka topic names are at most 249 characters; `{}…` has {}",
            name.chars().take(40).collect::<String>(),
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "`{name}` is not a Kafka topic name: {c:?} is not allowed (only ASCII letters, digits, `.`, `_` and `-`)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod name_tests {
    use super::check_topic_name;

    #[test]
    fn topic_names_follow_kafkas_rules() {
        for ok in ["orders", "orders-dlq", "a.b_c-1", &"x".repeat(249)] {
            check_topic_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            ".",
            "..",
            "orders dlq",
            "orders/dlq",
            "ördersß",
            &"x".repeat(250),
        ] {
            assert!(check_topic_name(bad).is_err(), "{bad}");
        }
    }
}
