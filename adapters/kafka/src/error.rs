//! The adapter's error type.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// What can go wrong in the Kafka adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration that cannot work; the message says what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The client could not be created, or the broker refused an operation. A failed
    /// TLS handshake or SASL authentication says what to check.
    #[error("kafka error: {0}{hint}", hint = hint(.0))]
    Kafka(#[from] KafkaError),
    /// The producer did not get the broker's acknowledgement within its timeout.
    #[error("kafka did not acknowledge the message to `{topic}`: {source}")]
    Publish {
        /// The topic.
        topic: String,
        /// rdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// A nacked record could not be republished to its retry topic (see
    /// [`RetryTopics`](crate::RetryTopics)) within the wait; it is tried again in the
    /// background.
    #[error("the record could not be republished to retry topic `{topic}`: {reason}")]
    Retry {
        /// The delay topic (or the record's topic, when it has none).
        topic: String,
        /// What went wrong.
        reason: String,
    },
    /// A synchronous offset commit did not complete.
    #[error("the offset commit did not complete: {0}")]
    Commit(String),
    /// The consumer was closed.
    #[error("the kafka consumer is closed")]
    Closed,
}

/// What to check after a failed TLS handshake or SASL authentication: librdkafka's
/// error code alone does not tell (its log line has the cause).
fn hint(e: &KafkaError) -> &'static str {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::SSL) => {
            "; the TLS handshake with a broker failed: check that the CA file \
             (`tls_ca_file`, `ssl.ca.location`) holds the CA that issued the broker's \
             certificate, and that the port speaks TLS (librdkafka logs the cause)"
        }
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            "; SASL authentication failed: check the mechanism, user name and password \
             (`sasl`, `sasl.mechanisms`, `sasl.username`, `sasl.password`)"
        }
        _ => "",
    }
}

/// The adapter's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for redrive_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Config(msg) => redrive_core::Error::Config(msg),
            other => redrive_core::Error::Broker(Box::new(other)),
        }
    }
}
