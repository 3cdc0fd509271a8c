//! Connecting, reconnect backoff, and confirmed publishing shared by the consumer,
//! its acker and the publisher.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use redrive_core::{Backoff, Jitter};

use crate::error::{Error, Result, redact};

/// The AMQP address tests and examples use when `AMQP_URL` is not set.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How the consumer waits between reconnect attempts: exponential from `initial` to
/// `max`, with equal jitter (each wait is drawn from ½·d ..= d).
///
/// | field | default |
/// |---|---|
/// | `initial` | 100 ms |
/// | `max` | 30 s |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    initial: Duration,
    max: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Reconnect {
    /// Exponential backoff from `initial` to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Reconnect { initial, max }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.initial.is_zero() || self.max < self.initial {
            return Err(Error::Config(format!(
                "reconnect backoff from {:?} to {:?} is invalid; the initial wait must be above zero and at most the max",
                self.initial, self.max
            )));
        }
        Ok(())
    }

    /// The wait before reconnect attempt `n` (0-based).
    pub(crate) fn delay(&self, n: u32) -> Duration {
        Backoff::exponential(self.initial, self.max)
            .with_jitter(Jitter::Equal)
            .delay_for(n.saturating_add(1))
    }
}

/// Opens a lapin connection on the current tokio runtime, named `name` in the broker's
/// connection list (`rabbitmqctl list_connections name client_properties`): for
/// [`Topology::declare`](crate::Topology::declare) and for direct use of lapin.
///
/// # Errors
/// [`Error::Config`] when `url` is not an AMQP address (the message hides its
/// password), [`Error::Connect`] when the broker cannot be reached or refuses the login.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    // Parsed here, not by lapin: the parser's error quotes the address, password and all.
    let uri = url.parse::<AMQPUri>().map_err(|e| {
        Error::Config(format!(
            "the AMQP address `{}` is invalid ({}); use amqp://user:password@host:port/vhost",
            redact(url),
            e.replace(url, &redact(url)),
        ))
    })?;
    Connection::connect_uri(uri, props)
        .await
        .map_err(|source| Error::Connect {
            url: redact(url),
            source,
        })
}

/// A channel in confirm mode.
pub(crate) async fn confirm_channel(connection: &Connection) -> Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes with `mandatory` on a confirm channel and waits for the broker's confirm.
///
/// A message the broker returns (no queue takes it) is [`Error::Unroutable`], a nack
/// [`Error::PublishNacked`].
pub(crate) async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<()> {
    let confirm = channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            payload,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(Error::Unroutable {
                exchange: returned.delivery.exchange.to_string(),
                routing_key: returned.delivery.routing_key.to_string(),
                reply: format!("{} {}", returned.reply_code, returned.reply_text),
            })
        }
        Confirmation::Nack(None) => Err(Error::PublishNacked {
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::NotRequested => Err(Error::Config(
            "publisher confirms are off on this channel; the adapter needs them".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_malformed_url_is_an_error_without_its_password() {
        for url in [
            "amqp:guest:secret@localhost",
            "amqp://guest:secret@local host",
            "http://guest:secret@localhost",
        ] {
            let err = connect(url, "redrive-test").await.expect_err(url);
            let text = format!("{err} {err:?}");
            assert!(!text.contains("secret"), "{url}: {text}");
        }
    }

    #[test]
    fn reconnect_backoff_grows_to_its_max_with_jitter() {
        let r = Reconnect::new(Duration::from_millis(100), Duration::from_secs(1));
        for n in 0..40 {
            let d = r.delay(n);
            let full = (Duration::from_millis(100) * (1 << n.min(10))).min(Duration::from_secs(1));
            assert!(d >= full / 2 && d <= full, "{n}: {d:?}");
        }
        assert!(
            Reconnect::new(Duration::ZERO, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            Reconnect::new(Duration::from_secs(2), Duration::from_secs(1))
                .validate()
                .is_err()
        );
    }
}
