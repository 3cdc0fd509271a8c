//! Redis clients for the idempotency store and the rate limit: plaintext or TLS from the
//! URL's scheme, a CA file of the user's, the crypto provider TLS needs, and connection
//! errors that say what to change.
//!
//! TLS is the redis crate's rustls (feature `redis-tls`). redis builds its rustls
//! config on the process-wide crypto provider and enables none, so a build with no
//! provider, or with both of rustls's (another crate of the application may enable
//! aws-lc-rs), would panic at the first `rediss://` connection. Before a TLS client is
//! built, ring is installed as that provider unless the application installed one of
//! its own: its choice stays.

use std::fmt;
use std::path::{Path, PathBuf};

use redis::{ConnectionAddr, RedisError};

/// The URL schemes that ask for TLS.
const TLS_SCHEMES: [&str; 2] = ["rediss", "valkeys"];

/// Where a client connects, for error messages: its address (never its password), and
/// how it trusts the server's certificate.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    tls: bool,
    /// `rediss://host:port`, `redis://host:port` or the socket's path.
    shown: String,
    /// The CA file the server's certificate is checked against, if not the platform's
    /// roots.
    #[cfg_attr(not(feature = "redis-tls"), allow(dead_code))]
    ca_file: Option<PathBuf>,
    /// The constructor that takes a CA file, for the hint when the platform's roots do
    /// not know the server's CA.
    #[cfg_attr(not(feature = "redis-tls"), allow(dead_code))]
    with_ca: &'static str,
}

impl Target {
    /// The target of `client`. When it connects with TLS, installs the crypto provider
    /// first (see the module's docs).
    pub(crate) fn of(
        client: &redis::Client,
        ca_file: Option<&Path>,
        with_ca: &'static str,
    ) -> Self {
        let (tls, shown) = match &client.get_connection_info().addr {
            ConnectionAddr::Tcp(host, port) => (false, format!("redis://{host}:{port}")),
            ConnectionAddr::TcpTls { host, port, .. } => (true, format!("rediss://{host}:{port}")),
            ConnectionAddr::Unix(path) => (false, format!("unix://{}", path.display())),
        };
        if tls {
            install_provider();
        }
        Target {
            tls,
            shown,
            ca_file: ca_file.map(Path::to_path_buf),
            with_ca,
        }
    }

    /// The message for `error`, from connecting to the target, with what to change when
    /// the error tells: a plaintext URL to a TLS port, a TLS URL to a plaintext port, a
    /// server certificate the CA does not vouch for.
    pub(crate) fn cannot_connect(&self, error: &RedisError) -> String {
        match self.hint(error) {
            Some(hint) => format!("cannot connect to Redis at {self}: {error}; {hint}"),
            None => format!("cannot connect to Redis at {self}: {error}"),
        }
    }

    fn hint(&self, error: &RedisError) -> Option<String> {
        if !self.tls {
            // A TLS server answers the client's first command, which is no TLS
            // handshake, by closing the connection.
            return error.is_connection_dropped().then(|| {
                "the server closed the connection without answering: if that port takes \
                 TLS only, use a rediss:// URL"
                    .to_owned()
            });
        }
        if error.is_timeout() {
            return Some(self.plaintext_port_hint());
        }
        #[cfg(feature = "redis-tls")]
        if let Some(hint) = self.tls_hint(error) {
            return Some(hint);
        }
        // A plaintext server may also answer the handshake by closing the connection.
        error
            .is_connection_dropped()
            .then(|| self.plaintext_port_hint())
    }

    /// The hint for a TLS connection that got no TLS answer.
    pub(crate) fn plaintext_port_hint(&self) -> String {
        "the server did not answer the TLS handshake: if that port is plaintext, use a \
         redis:// URL"
            .to_owned()
    }

    /// Whether the target is reached with TLS.
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    #[cfg(feature = "redis-tls")]
    fn tls_hint(&self, error: &RedisError) -> Option<String> {
        use rustls::CertificateError as Cert;

        let io = std::error::Error::source(error)?.downcast_ref::<std::io::Error>()?;
        match io.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidMessage(_) => Some(self.plaintext_port_hint()),
            rustls::Error::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature) => {
                Some(match &self.ca_file {
                    Some(ca) => format!(
                        "the server's certificate is not signed by the CA in {}",
                        ca.display()
                    ),
                    None => format!(
                        "the server's certificate is not signed by a CA this machine \
                         trusts: give its CA with {}",
                        self.with_ca
                    ),
                })
            }
            rustls::Error::InvalidCertificate(
                Cert::NotValidForName | Cert::NotValidForNameContext { .. },
            ) => Some(
                "the server's certificate is not for the URL's host: connect by a name \
                 (or IP address) the certificate holds"
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A client for `url`: TLS when its scheme is `rediss://`, with the roots of `ca_file`
/// when given, else the platform's.
///
/// # Errors
/// A message that names what to change: the URL (shown without its password), the
/// `redis-tls` feature a `rediss://` URL needs, a CA file that cannot be read or holds
/// no certificate, or a CA file given with a plaintext URL.
pub(crate) fn open(
    url: &str,
    ca_file: Option<&Path>,
    with_ca: &'static str,
) -> Result<(redis::Client, Target), String> {
    let tls = wants_tls(url);
    if tls && !cfg!(feature = "redis-tls") {
        return Err(needs_feature(url));
    }
    let client = match ca_file {
        None => redis::Client::open(url),
        Some(ca_file) => {
            if !tls {
                return Err(format!(
                    "a CA file ({}) is for TLS, but `{}` is a plaintext URL: use rediss://",
                    ca_file.display(),
                    redact(url)
                ));
            }
            with_roots(url, ca_file)?
        }
    }
    .map_err(|e| format!("invalid Redis URL `{}`: {e}", redact(url)))?;
    let target = Target::of(&client, ca_file, with_ca);
    Ok((client, target))
}

#[cfg(feature = "redis-tls")]
fn with_roots(url: &str, ca_file: &Path) -> Result<redis::RedisResult<redis::Client>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let pem = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read the CA file {}: {e}", ca_file.display()))?;
    if CertificateDer::pem_slice_iter(&pem).next().is_none() {
        return Err(format!(
            "the CA file {} holds no PEM certificate",
            ca_file.display()
        ));
    }
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Ok(redis::Client::build_with_tls(url, certs))
}

#[cfg(not(feature = "redis-tls"))]
fn with_roots(url: &str, _ca_file: &Path) -> Result<redis::RedisResult<redis::Client>, String> {
    Err(needs_feature(url))
}

fn needs_feature(url: &str) -> String {
    format!(
        "`{}` asks for TLS, which needs redrive's `redis-tls` feature; turn it on (or use a \
         redis:// URL for a plaintext port)",
        redact(url)
    )
}

/// Whether `url`'s scheme asks for TLS.
fn wants_tls(url: &str) -> bool {
    url.trim_start()
        .split_once("://")
        .is_some_and(|(scheme, _)| TLS_SCHEMES.iter().any(|s| scheme.eq_ignore_ascii_case(s)))
}

/// Installs ring as the process's crypto provider, unless one is installed already;
/// tries once per process.
fn install_provider() {
    #[cfg(feature = "redis-tls")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // An error means a provider is installed already: the application's own.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
    }
}

/// `url` with its password, if any, replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let Some((user, _password)) = rest[..at].split_once(':') else {
        return url.to_owned();
    };
    format!("{scheme}://{user}:***{}", &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:hunter2@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(
            redact("rediss://app:p@ss:w@rd@cache:6380"),
            "rediss://app:***@cache:6380"
        );
        assert_eq!(
            redact("redis://localhost:6379/0?x=a@b"),
            "redis://localhost:6379/0?x=a@b"
        );
        assert_eq!(redact("redis://app@cache"), "redis://app@cache");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn tls_comes_from_the_scheme() {
        assert!(wants_tls("rediss://localhost"));
        assert!(wants_tls("RediSS://localhost"));
        assert!(wants_tls("valkeys://localhost"));
        assert!(!wants_tls("redis://localhost"));
        assert!(!wants_tls("redis+unix:///tmp/redis.sock"));
    }

    #[test]
    fn a_tls_url_without_the_feature_names_it() {
        let err = needs_feature("rediss://:hunter2@localhost:6380");
        assert!(err.contains("`redis-tls` feature"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[cfg(not(feature = "redis-tls"))]
    #[test]
    fn a_tls_url_fails_without_the_feature() {
        let err = open("rediss://localhost:6380", None, "").unwrap_err();
        assert!(err.contains("`redis-tls` feature"), "{err}");
    }

    #[test]
    fn a_ca_file_with_a_plaintext_url_is_refused() {
        let err = open(
            "redis://:hunter2@localhost:6379",
            Some(Path::new("ca.pem")),
            "",
        )
        .unwrap_err();
        assert!(
            err.contains("rediss://") && !err.contains("hunter2"),
            "{err}"
        );
    }
}
