//! TLS and SASL settings shared by the consumer, the publisher and the lag poller, and
//! the error of a client built without them.

use std::path::Path;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use crate::error::Error;

/// A SASL mechanism for [`KafkaConsumerBuilder::sasl`](crate::KafkaConsumerBuilder::sasl)
/// and [`KafkaPublisherBuilder::sasl`](crate::KafkaPublisherBuilder::sasl): its
/// librdkafka `sasl.mechanisms` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaslMechanism {
    /// `PLAIN`: the password itself goes to the broker, so only over TLS.
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanisms`.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The current `security.protocol`, lower-cased (librdkafka takes either case).
fn protocol(config: &ClientConfig) -> String {
    config
        .get("security.protocol")
        .unwrap_or("plaintext")
        .to_ascii_lowercase()
}

/// TLS with `path` as the CA certificates (PEM): `security.protocol` becomes `ssl`, or
/// `sasl_ssl` when SASL is on.
pub(crate) fn tls_ca_file(config: &mut ClientConfig, path: &Path) {
    let tls = if protocol(config).starts_with("sasl") {
        "sasl_ssl"
    } else {
        "ssl"
    };
    config
        .set("security.protocol", tls)
        .set("ssl.ca.location", path.to_string_lossy());
}

/// SASL with `mechanism`: `security.protocol` becomes `sasl_ssl`, unless it was set to
/// `sasl_plaintext`.
pub(crate) fn sasl(
    config: &mut ClientConfig,
    mechanism: SaslMechanism,
    username: &str,
    password: &str,
) {
    if protocol(config) != "sasl_plaintext" {
        config.set("security.protocol", "sasl_ssl");
    }
    config
        .set("sasl.mechanisms", mechanism.as_str())
        .set("sasl.username", username)
        .set("sasl.password", password);
}

/// The error of creating a client: a setting librdkafka was built without (TLS and
/// SCRAM need the `tls` feature) becomes an [`Error::Config`] that says so.
pub(crate) fn client_error(e: KafkaError) -> Error {
    const ENABLE: &str = "enable redrive-kafka's `tls` feature (`kafka-tls` of the `redrive` \
                          crate), which builds librdkafka with OpenSSL";
    match &e {
        // A `security.protocol` or other setting of a missing part: refused when set.
        KafkaError::ClientConfig(_, desc, key, value)
            if desc.contains("not available at build time") =>
        {
            Error::Config(format!(
                "`{key}={value}` is not available in this build of librdkafka ({desc}): {ENABLE}"
            ))
        }
        // A SASL mechanism without its provider: refused when the client starts.
        KafkaError::ClientCreation(msg) if msg.contains("recompile librdkafka") => {
            Error::Config(format!("{msg}; {ENABLE}"))
        }
        _ => Error::Kafka(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KafkaConsumer, KafkaPublisher};

    const MECHANISMS: [SaslMechanism; 3] = [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
    ];

    #[test]
    fn the_publisher_builder_debug_hides_the_password() {
        let builder =
            KafkaPublisher::builder("127.0.0.1:9").sasl(SaslMechanism::Plain, "svc", "hunter2");
        let text = format!("{builder:?}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    /// librdkafka takes every mechanism over `sasl_ssl` (none is "not available at
    /// build time"), for the publisher and the consumer.
    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn every_mechanism_builds_over_tls() {
        for mechanism in MECHANISMS {
            KafkaPublisher::builder("127.0.0.1:9")
                .sasl(mechanism, "svc", "secret")
                .build()
                .unwrap_or_else(|e| panic!("publisher with {mechanism:?}: {e}"));
            let consumer = KafkaConsumer::builder("127.0.0.1:9", "g", ["t"])
                .sasl(mechanism, "svc", "secret")
                .build()
                .unwrap_or_else(|e| panic!("consumer with {mechanism:?}: {e}"));
            drop(consumer);
        }
    }

    /// Without the `tls` feature, TLS and SCRAM are refused when the client is made,
    /// with an error that names the feature.
    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn tls_or_scram_without_the_feature_says_to_enable_it() {
        let says_so = |e: Error| {
            assert!(
                matches!(e, Error::Config(ref m) if m.contains("`tls` feature")),
                "{e}"
            );
        };
        says_so(
            KafkaPublisher::builder("127.0.0.1:9")
                .tls_ca_file("/ca.pem")
                .build()
                .expect_err("no TLS in this build"),
        );
        says_so(
            KafkaConsumer::builder("127.0.0.1:9", "g", ["t"])
                .tls_ca_file("/ca.pem")
                .build()
                .expect_err("no TLS in this build"),
        );
        for mechanism in MECHANISMS {
            says_so(
                KafkaPublisher::builder("127.0.0.1:9")
                    .sasl(mechanism, "svc", "secret")
                    .build()
                    .expect_err("no sasl_ssl in this build"),
            );
        }
        // Over plaintext, as a local broker may offer it, SCRAM needs the feature too.
        says_so(
            KafkaPublisher::builder("127.0.0.1:9")
                .set("security.protocol", "sasl_plaintext")
                .sasl(SaslMechanism::ScramSha512, "svc", "secret")
                .build()
                .expect_err("no SCRAM in this build"),
        );
    }

    #[test]
    fn tls_and_sasl_pick_the_protocol_in_either_order() {
        let mut a = ClientConfig::new();
        tls_ca_file(&mut a, Path::new("/ca.pem"));
        assert_eq!(a.get("security.protocol"), Some("ssl"));
        sasl(&mut a, SaslMechanism::ScramSha512, "u", "p");
        assert_eq!(a.get("security.protocol"), Some("sasl_ssl"));

        let mut b = ClientConfig::new();
        sasl(&mut b, SaslMechanism::Plain, "u", "p");
        tls_ca_file(&mut b, Path::new("/ca.pem"));
        assert_eq!(b.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(b.get("ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(b.get("sasl.mechanisms"), Some("PLAIN"));

        let mut c = ClientConfig::new();
        c.set("security.protocol", "SASL_PLAINTEXT");
        sasl(&mut c, SaslMechanism::ScramSha256, "u", "p");
        assert_eq!(c.get("security.protocol"), Some("SASL_PLAINTEXT"));
    }
}
