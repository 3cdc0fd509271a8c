//! The publisher: a producer that waits for the broker's acknowledgement.

use std::fmt;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redrive_core::{OutgoingMessage, Publisher};

use crate::error::{Error, Result};

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
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        Self::from_config(config)
    }

    /// A publisher from a librdkafka producer configuration; `acks=all` and
    /// `enable.idempotence=true` are set unless the configuration sets them.
    ///
    /// # Errors
    /// [`Error::Kafka`] if librdkafka refuses the configuration.
    pub fn from_config(mut config: ClientConfig) -> Result<Self> {
        for (key, value) in [("acks", "all"), ("enable.idempotence", "true")] {
            if config.get(key).is_none() {
                config.set(key, value);
            }
        }
        Ok(KafkaPublisher {
            producer: config.create()?,
            timeout: Duration::from_secs(30),
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
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in message.headers.iter() {
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

impl Publisher for KafkaPublisher {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.send(destination, &message).await?;
        Ok(())
    }
}
