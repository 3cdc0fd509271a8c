//! The adapter's error type.

use std::time::Duration;

/// What can go wrong in the RabbitMQ adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration that cannot work; the message says what to change.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The broker could not be reached, refused the connection, or the TLS handshake
    /// failed. The message ends with what to check: an `amqp://` address whose port
    /// takes TLS only, an `amqps://` address whose port is plaintext, a server
    /// certificate of an unknown certificate authority.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}; {}",
        connect_hint(url, source)
    )]
    Connect {
        /// The address, without its password.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// An existing queue was declared with different arguments.
    #[error(
        "queue `{queue}` exists with a different `{argument}` than this topology declares ({reply}); \
         make the topology match the queue, or delete the queue so it can be declared again{}",
        migration_hint(argument)
    )]
    TopologyMismatch {
        /// The queue.
        queue: String,
        /// The argument that differs (`x-queue-type`, `x-dead-letter-exchange`, `durable`, …).
        argument: String,
        /// The broker's reply text.
        reply: String,
    },
    /// The broker returned a mandatory message because no queue is bound to take it.
    #[error(
        "message to exchange `{exchange}` with routing key `{routing_key}` is unroutable ({reply}): no queue takes it"
    )]
    Unroutable {
        /// The exchange (empty: the default exchange).
        exchange: String,
        /// The routing key (on the default exchange: the queue name).
        routing_key: String,
        /// The broker's reply text.
        reply: String,
    },
    /// The broker nacked a publish (it could not take responsibility for the message).
    #[error("the broker refused (nacked) the message published to `{routing_key}`")]
    PublishNacked {
        /// The routing key.
        routing_key: String,
    },
    /// The channel a delivery came on is closed (connection lost, consumer closed): it can
    /// no longer be settled, and the broker delivers the message again.
    #[error(
        "the channel this delivery came on is closed (the connection was lost or the consumer closed); \
         it cannot be settled on another channel, and the broker will deliver it again"
    )]
    ChannelClosed,
    /// A nack asked for a longer delay than the topology's delay queues support.
    #[error("a nack delay of {requested:?} is above the largest supported delay of {max:?}")]
    DelayTooLong {
        /// The delay asked for.
        requested: Duration,
        /// The largest delay the topology supports.
        max: Duration,
    },
    /// The broker did not answer in time: a republish it did not confirm within the
    /// consumer's [`publish_timeout`](crate::ConsumerBuilder::publish_timeout), or
    /// connections it did not close within its
    /// [`close_timeout`](crate::ConsumerBuilder::close_timeout).
    #[error("{what} did not finish within {after:?}{}", timeout_hint(*blocked))]
    Timeout {
        /// What did not finish.
        what: String,
        /// The time it had.
        after: Duration,
        /// Whether RabbitMQ had blocked the connection (`connection.blocked`: a
        /// resource alarm).
        blocked: bool,
    },
    /// Any other error of the AMQP client.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

impl Error {
    /// Whether this error means the broker will deliver the message again by itself.
    pub fn is_redelivered_by_broker(&self) -> bool {
        matches!(self, Error::ChannelClosed)
    }
}

impl From<Error> for redrive_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Config(msg) => redrive_core::Error::Config(msg),
            Error::Unroutable {
                ref exchange,
                ref routing_key,
                ..
            } if exchange.is_empty() => {
                redrive_core::Error::UnknownDestination(routing_key.clone())
            }
            other => redrive_core::Error::Broker(Box::new(other)),
        }
    }
}

/// For an argument of the quorum queue's delivery-limit guard, how to migrate a queue
/// declared without it.
fn migration_hint(argument: &str) -> &'static str {
    if crate::topology::GUARD_ARGUMENTS.contains(&argument) {
        "; a quorum queue declared before its topology had a delivery limit lacks it: \
         keep it with Topology::without_delivery_limit and set the guard in a policy, \
         or drain and delete the queue (see the topology module's docs, \"Migrating an \
         existing quorum queue\")"
    } else {
        ""
    }
}

/// Why an operation may have timed out.
fn timeout_hint(blocked: bool) -> &'static str {
    if blocked {
        "; RabbitMQ blocked the connection because a resource alarm (memory or disk) is on \
         (`rabbitmqctl status` lists it under Alarms), and reads nothing more from it until the \
         alarm ends"
    } else {
        "; the broker is slow or unreachable (if it is only slow, raise the timeout on the \
         ConsumerBuilder)"
    }
}

/// What to check when connecting to `url` failed with `source`.
fn connect_hint(url: &str, source: &lapin::Error) -> &'static str {
    use std::io::ErrorKind as Io;
    const BROKER: &str =
        "is the broker running (`rabbitmq-server -detached`) and the address right?";
    let lapin::ErrorKind::IOError(io) = source.kind() else {
        return BROKER;
    };
    let amqps = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("amqps://"));
    if !amqps {
        return match io.kind() {
            Io::ConnectionReset | Io::ConnectionAborted | Io::UnexpectedEof | Io::BrokenPipe => {
                "the server closed the connection before the AMQP handshake: if this port takes \
                 TLS only (RabbitMQ's TLS port is 5671), use amqps://"
            }
            _ => BROKER,
        };
    }
    #[cfg(feature = "tls")]
    if let Some(hint) = tls_hint(io) {
        return hint;
    }
    match io.kind() {
        Io::InvalidData | Io::ConnectionReset | Io::UnexpectedEof => {
            "the TLS handshake failed: if this port is plaintext (RabbitMQ's is 5672), use \
             amqp://; if the server's certificate is signed by a private certificate authority, \
             trust it with a CA file"
        }
        _ => BROKER,
    }
}

/// What a rustls handshake error means, found in the I/O error's sources.
#[cfg(feature = "tls")]
fn tls_hint(io: &std::io::Error) -> Option<&'static str> {
    use rustls::{CertificateError, InvalidMessage};
    let mut next: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(e) = next {
        match e.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                return Some(
                    "the server's certificate is signed by an unknown certificate authority: \
                     trust that CA with a CA file (ConsumerBuilder::tls_ca_file, \
                     RabbitPublisher::connect_with_ca_file, connect_with_ca_file), or point \
                     SSL_CERT_FILE at a PEM bundle that holds it",
                );
            }
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                return Some(
                    "the server's certificate does not name this host (an IP address host \
                     needs that address in the certificate): give the host the certificate names",
                );
            }
            Some(rustls::Error::InvalidCertificate(CertificateError::BadSignature)) => {
                return Some(
                    "the server's certificate does not verify against the trusted CA of its \
                     issuer's name: is the CA file that of the CA that signed it?",
                );
            }
            Some(rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)) => {
                return Some(
                    "the server did not answer TLS: for a plaintext port (RabbitMQ's is 5672), \
                     use amqp://",
                );
            }
            Some(_) => return None,
            None => next = e.source(),
        }
    }
    None
}

/// `Result` with the adapter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The address without its password, for messages, logs and `Debug`.
///
/// `scheme://user:password@host…` keeps everything but the password. An address that is
/// not of that form (a missing `//`, as in `amqp:user:password@host`) cannot be told
/// apart from one with a password in it, so everything after its scheme is hidden.
pub(crate) fn redact(url: &str) -> String {
    const HIDDEN: &str = "***";
    let Some(scheme) = url.find("://") else {
        return match url.find(':') {
            Some(colon) => format!("{}:{HIDDEN}", &url[..colon]),
            None => HIDDEN.to_owned(),
        };
    };
    let (head, rest) = url.split_at(scheme + 3);
    if let Some(at) = rest.rfind('@') {
        let userinfo = &rest[..at];
        return match userinfo.find(':') {
            Some(colon) => format!("{head}{}:{HIDDEN}{}", &userinfo[..colon], &rest[at..]),
            None => url.to_owned(),
        };
    }
    // No `@`: a `:` in the authority must be followed by a port; anything else may be a
    // password whose `@` is missing.
    let authority = rest.find(['/', '?', '#']).map_or(rest, |end| &rest[..end]);
    match authority.rfind(':') {
        Some(colon)
            if !authority[colon + 1..].is_empty()
                && !authority[colon + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{head}{}:{HIDDEN}", &authority[..colon])
        }
        _ => url.to_owned(),
    }
}

/// The argument a `PRECONDITION_FAILED - inequivalent arg 'x' …` reply names.
pub(crate) fn mismatch(queue: &str, err: lapin::Error) -> Error {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    if let lapin::ErrorKind::ProtocolError(amqp) = err.kind() {
        if matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        ) {
            let reply = amqp.get_message().to_string();
            let argument = reply
                .split_once("inequivalent arg '")
                .and_then(|(_, rest)| rest.split_once('\''))
                .map_or_else(|| "arguments".to_owned(), |(arg, _)| arg.to_owned());
            return Error::TopologyMismatch {
                queue: queue.to_owned(),
                argument,
                reply,
            };
        }
    }
    Error::Amqp(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        assert_eq!(
            redact("amqp://guest:secret@localhost:5672/%2f"),
            "amqp://guest:***@localhost:5672/%2f"
        );
        assert_eq!(redact("amqp://localhost"), "amqp://localhost");
    }

    #[test]
    fn redacts_the_password_of_a_malformed_url() {
        for url in [
            "amqp:guest:secret@localhost",
            "amqp:/guest:secret@localhost",
            "guest:secret@localhost",
            "amqp//guest:secret@localhost",
        ] {
            let r = redact(url);
            assert!(!r.contains("secret"), "{url} -> {r}");
        }
        assert_eq!(redact("amqp:guest:secret@localhost"), "amqp:***");
        assert_eq!(redact("amqp://guest:secret"), "amqp://guest:***");
        assert_eq!(
            redact("amqp://localhost:5672/%2f"),
            "amqp://localhost:5672/%2f"
        );
        assert_eq!(
            redact("amqp://guest@localhost/%2f"),
            "amqp://guest@localhost/%2f"
        );
    }
}
