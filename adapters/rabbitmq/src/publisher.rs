//! The publisher: confirmed, mandatory publishing; reconnects lazily.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lapin::{BasicProperties, Channel, Connection};
use redrive_core::{OutgoingMessage, Publisher};
use tokio::sync::Mutex;

use crate::connection::{CaFile, confirm_channel, open, parse_url, publish_confirmed};
use crate::error::Result;
use crate::mapping;

/// Publishes to RabbitMQ with publisher confirms and the `mandatory` flag: a publish
/// returns once the broker has confirmed the message, and a message no queue takes is
/// an error ([`Error::Unroutable`](crate::Error::Unroutable); through the [`Publisher`]
/// trait, [`redrive_core::Error::UnknownDestination`]).
///
/// Clones share one connection and one confirm channel. When the connection is lost
/// the next publish opens a new one; a publish in flight at that moment fails, and
/// the caller decides (the dead-letter layer nacks the message, so nothing is lost).
///
/// Through the [`Publisher`] trait, `destination` is a queue name, reached through the
/// default exchange; [`publish_to`](Self::publish_to) takes any exchange and routing key.
/// Headers map onto AMQP properties as the [`mapping`](crate::mapping) module says. A
/// message without a `message-id` header is given a `message_id` of its own (a random
/// UUID), so a consumer's idempotency layer can tell its deliveries apart from other
/// messages with the same body, and recognise a redelivery of it;
/// [`publish_raw`](Self::publish_raw) sends the properties as given.
#[derive(Clone)]
pub struct RabbitPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    name: String,
    ca: Option<CaFile>,
    state: Mutex<Option<(Connection, Channel)>>,
    connects: AtomicU64,
}

impl fmt::Debug for RabbitPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitPublisher")
            .field("name", &self.inner.name)
            .field("connects", &self.inner.connects.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RabbitPublisher {
    /// Connects to `url`, naming the connection `redrive:publisher`.
    ///
    /// # Errors
    /// [`Error::Connect`](crate::Error::Connect) when the broker cannot be reached.
    pub async fn connect(url: impl Into<String>) -> Result<Self> {
        Self::connect_named(url, "redrive:publisher").await
    }

    /// Connects to `url`, naming the connection `name`.
    ///
    /// # Errors
    /// [`Error::Connect`](crate::Error::Connect) when the broker cannot be reached.
    pub async fn connect_named(url: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        Self::start(url.into(), name.into(), None).await
    }

    /// Connects to an `amqps://` address whose server certificate is signed by the
    /// certificate authority in `ca_file` (PEM), trusted in addition to the platform's
    /// root certificates, naming the connection `name`. The file is read once, here;
    /// reconnects use the same CA. See [`connect_with_ca_file`](crate::connect_with_ca_file)
    /// for the host the certificate must name.
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) when `ca_file` cannot be read or holds no
    /// PEM certificate, or `url` is not `amqps://`;
    /// [`Error::Connect`](crate::Error::Connect) when the broker cannot be reached or the
    /// TLS handshake fails.
    pub async fn connect_with_ca_file(
        url: impl Into<String>,
        name: impl Into<String>,
        ca_file: impl AsRef<Path>,
    ) -> Result<Self> {
        let ca = CaFile::read(ca_file.as_ref())?;
        Self::start(url.into(), name.into(), Some(ca)).await
    }

    async fn start(url: String, name: String, ca: Option<CaFile>) -> Result<Self> {
        parse_url(&url, ca.as_ref())?;
        let publisher = RabbitPublisher {
            inner: Arc::new(Inner {
                url,
                name,
                ca,
                state: Mutex::new(None),
                connects: AtomicU64::new(0),
            }),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The confirm channel, reconnecting first if the connection or channel was lost.
    async fn channel(&self) -> Result<Channel> {
        let mut state = self.inner.state.lock().await;
        if let Some((conn, ch)) = state.as_ref() {
            if conn.status().connected() && ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let conn = match state.take() {
            Some((conn, _)) if conn.status().connected() => conn,
            _ => {
                let n = self.inner.connects.fetch_add(1, Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(name = %self.inner.name, "RabbitMQ publisher reconnecting");
                }
                open(&self.inner.url, &self.inner.name, self.inner.ca.as_ref()).await?
            }
        };
        let ch = confirm_channel(&conn).await?;
        *state = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Publishes `message` to `exchange` with `routing_key` and waits for the confirm.
    ///
    /// # Errors
    /// [`Error::Unroutable`](crate::Error::Unroutable) when no queue takes it,
    /// [`Error::PublishNacked`](crate::Error::PublishNacked) when the broker refuses it,
    /// [`Error::Connect`](crate::Error::Connect) or [`Error::Amqp`](crate::Error::Amqp)
    /// when the broker cannot be reached.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        message: &OutgoingMessage,
    ) -> Result<()> {
        let properties = mapping::publish_properties(message);
        self.publish_raw(exchange, routing_key, &message.payload, properties)
            .await
    }

    /// Publishes a payload with AMQP properties exactly as given, and waits for the
    /// confirm. For producers that need typed header values.
    ///
    /// # Errors
    /// As [`publish_to`](Self::publish_to).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let channel = self.channel().await?;
        publish_confirmed(&channel, exchange, routing_key, payload, properties).await
    }

    /// Closes the connection. Clones that publish afterwards open a new one.
    pub async fn close(&self) {
        if let Some((conn, _)) = self.inner.state.lock().await.take() {
            let _ = conn.close(200, "publisher closed").await;
        }
    }
}

impl Publisher for RabbitPublisher {
    async fn publish(
        &self,
        destination: &str,
        message: OutgoingMessage,
    ) -> redrive_core::Result<()> {
        self.publish_to("", destination, &message)
            .await
            .map_err(Into::into)
    }

    /// A queue the default exchange can route to: a name of 1 to 255 bytes (an AMQP
    /// short string).
    fn check_destination(&self, destination: &str) -> redrive_core::Result<()> {
        match destination.len() {
            0 => Err(redrive_core::Error::config(
                "an empty queue name routes nowhere through the default exchange; name the queue",
            )),
            n if n > 255 => Err(redrive_core::Error::config(format!(
                "RabbitMQ queue names are at most 255 bytes; this one has {n}"
            ))),
            _ => Ok(()),
        }
    }
}
