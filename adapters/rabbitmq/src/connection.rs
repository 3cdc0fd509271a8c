//! Connecting, reconnect backoff, and confirmed publishing shared by the consumer,
//! its acker and the publisher.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
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
/// An `amqps://` address needs the `tls` (or `native-tls`) feature, and trusts the
/// platform's root certificates; [`connect_with_ca_file`] trusts a CA of your own too.
///
/// # Errors
/// [`Error::Config`] when `url` is not an AMQP address (the message hides its
/// password) or is `amqps://` in a build without TLS, [`Error::Connect`] when the
/// broker cannot be reached, refuses the login or the TLS handshake fails (the message
/// says whether the scheme does not fit the port, or the server's CA is unknown).
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    open(url, name, None).await
}

/// [`connect`] to an `amqps://` address whose server certificate is signed by the
/// certificate authority in `ca_file` (PEM; one or more certificates), trusted in
/// addition to the platform's root certificates.
///
/// The server's certificate must name the address's host: a DNS name, or for an IP
/// address such as `127.0.0.1`, that address.
///
/// # Errors
/// As [`connect`]; also [`Error::Config`] when `ca_file` cannot be read or holds no PEM
/// certificate, or `url` is not `amqps://`.
pub async fn connect_with_ca_file(
    url: &str,
    name: &str,
    ca_file: impl AsRef<Path>,
) -> Result<Connection> {
    let ca = CaFile::read(ca_file.as_ref())?;
    open(url, name, Some(&ca)).await
}

/// The certificate authority a connection trusts beyond the platform's roots: a PEM
/// file, read once when the consumer or publisher is built and kept for its reconnects.
#[derive(Clone)]
pub(crate) struct CaFile {
    path: PathBuf,
    pem: Arc<str>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CaFile").field(&self.path).finish()
    }
}

impl CaFile {
    /// Reads `path`, which must hold at least one PEM certificate.
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read the CA file `{}`: {e}; give the PEM file of the certificate authority that signed the server's certificate",
                path.display()
            ))
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::Config(format!(
                "the CA file `{}` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`); give the certificate authority's certificate in PEM form",
                path.display()
            )));
        }
        Ok(CaFile {
            path: path.to_owned(),
            pem: pem.into(),
        })
    }
}

/// Parses `url`, refusing what cannot work: an address that is not AMQP (the message
/// hides its password), `amqps://` in a build without TLS (the client would silently
/// speak plaintext), a CA file with a plaintext address.
pub(crate) fn parse_url(url: &str, ca: Option<&CaFile>) -> Result<AMQPUri> {
    // Parsed here, not by lapin: the parser's error quotes the address, password and all.
    let uri = url.parse::<AMQPUri>().map_err(|e| {
        Error::Config(format!(
            "the AMQP address `{}` is invalid ({}); use amqp://user:password@host:port/vhost",
            redact(url),
            e.replace(url, &redact(url)),
        ))
    })?;
    let tls = uri.scheme == AMQPScheme::AMQPS;
    if tls && !cfg!(any(feature = "tls", feature = "native-tls")) {
        return Err(Error::Config(format!(
            "`{}` is an amqps:// address, but this build has no TLS: turn on the `tls` feature of \
             redrive-rabbitmq (`rabbitmq-tls` of redrive), or use amqp:// for a plaintext port",
            redact(url)
        )));
    }
    if let (false, Some(ca)) = (tls, ca) {
        return Err(Error::Config(format!(
            "a CA file (`{}`) is given for `{}`, a plaintext address; use amqps:// for TLS",
            ca.path.display(),
            redact(url)
        )));
    }
    Ok(uri)
}

/// Opens a connection to `url`, trusting `ca` too.
pub(crate) async fn open(url: &str, name: &str, ca: Option<&CaFile>) -> Result<Connection> {
    let uri = parse_url(url, ca)?;
    if uri.scheme == AMQPScheme::AMQPS {
        install_crypto_provider();
    }
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: ca.map(|ca| ca.pem.to_string()),
    };
    Connection::connect_uri_with_config(uri, props, tls)
        .await
        .map_err(|source| Error::Connect {
            url: redact(url),
            source,
        })
}

/// Makes ring rustls's process-wide crypto provider, unless the application installed
/// one: the TLS client asks for the process default, and a build where several crates
/// turn on rustls providers (ring here, aws-lc-rs for the AWS SDK) has none by itself.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // An error means a provider is installed already: the application's choice stays.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(not(feature = "tls"))]
fn install_crypto_provider() {}

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

    /// Without TLS the client would speak plaintext to an `amqps://` address.
    #[cfg(not(any(feature = "tls", feature = "native-tls")))]
    #[tokio::test]
    async fn amqps_without_tls_is_a_configuration_error() {
        let url = "amqps://guest:secret@localhost:5672/%2f";
        let err = connect(url, "redrive-test").await.expect_err(url);
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(text.contains("`tls` feature"), "{text}");
        assert!(!text.contains("secret"), "{text}");
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
