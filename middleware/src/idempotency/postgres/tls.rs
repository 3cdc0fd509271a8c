//! How [`PostgresStore::connect`](super::PostgresStore::connect) connects: plaintext
//! or TLS from `sslmode` and `sslrootcert`, and connection errors that say what to
//! change.
//!
//! TLS is rustls with its ring crypto provider (feature `postgres-tls`), through
//! tokio-postgres-rustls. The configuration names its provider itself, so the
//! process-wide default is neither needed nor touched.

use std::path::PathBuf;

use deadpool_postgres::{Manager, ManagerConfig};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::params::{self, RootCert, SslMode};

/// How the store's connections were asked to be made, for error hints.
#[derive(Clone, Debug, Default)]
pub(super) struct Setting {
    /// The CA file the server's certificate is checked against.
    #[cfg_attr(not(feature = "postgres-tls"), allow(dead_code))]
    ca_file: Option<PathBuf>,
}

/// What `sslmode` and `sslrootcert` come to.
enum Mode {
    Plaintext,
    /// TLS when the server takes it, any certificate.
    Prefer,
    /// TLS, any certificate.
    Require,
    /// TLS, a certificate signed by `RootCert`'s CAs, for any name.
    VerifyCa(RootCert),
    /// TLS, a certificate signed by `RootCert`'s CAs, for the host connected to.
    VerifyFull(RootCert),
}

/// The pool's connection manager for `params`, and how it connects.
///
/// # Errors
/// A message that says what to change: invalid parameters (shown without a password),
/// a TLS mode that needs the `postgres-tls` feature, an unreadable CA file.
pub(super) fn manager(
    params: &str,
    manager_config: ManagerConfig,
) -> Result<(Manager, Setting), String> {
    let invalid = |e: &dyn std::fmt::Display| match params::redact(params) {
        Some(shown) => format!("invalid PostgreSQL connection parameters `{shown}`: {e}"),
        None => format!("invalid PostgreSQL connection parameters: {e}"),
    };
    let split = params::split(params).map_err(|e| invalid(&e))?;
    let mut config: tokio_postgres::Config = split
        .rest
        .parse()
        .map_err(|e| invalid(&super::describe(&e)))?;
    let mode = mode(split.ssl_mode, split.root_cert)?;
    let ca_file = match &mode {
        Mode::VerifyCa(RootCert::File(f)) | Mode::VerifyFull(RootCert::File(f)) => Some(f.clone()),
        _ => None,
    };
    let setting = Setting { ca_file };
    let manager = match mode {
        Mode::Plaintext => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            Manager::from_config(config, NoTls, manager_config)
        }
        Mode::Prefer => {
            config.ssl_mode(tokio_postgres::config::SslMode::Prefer);
            with_tls(config, mode, manager_config)?
        }
        _ => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            with_tls(config, mode, manager_config)?
        }
    };
    Ok((manager, setting))
}

/// `sslmode` and `sslrootcert` together, as libpq reads them.
fn mode(ssl_mode: Option<SslMode>, root_cert: Option<RootCert>) -> Result<Mode, String> {
    Ok(match (ssl_mode, root_cert) {
        (None, Some(RootCert::System)) | (Some(SslMode::VerifyFull), Some(RootCert::System)) => {
            Mode::VerifyFull(RootCert::System)
        }
        (Some(weak), Some(RootCert::System)) => {
            return Err(format!(
                "sslmode={weak} may not be used with sslrootcert=system (use sslmode=verify-full)"
            ));
        }
        (None, Some(RootCert::File(file))) => {
            return Err(format!(
                "sslrootcert={} is for TLS, but no sslmode asks for it: add \
                 sslmode=verify-full (or verify-ca)",
                file.display()
            ));
        }
        (None | Some(SslMode::Disable), _) => Mode::Plaintext,
        // As libpq: prefer never checks the certificate.
        (Some(SslMode::Prefer), _) => Mode::Prefer,
        (Some(SslMode::Require), None) => Mode::Require,
        // As libpq: require with a CA file checks the certificate against it.
        (Some(SslMode::Require | SslMode::VerifyCa), Some(file)) => Mode::VerifyCa(file),
        (Some(SslMode::VerifyCa), None) => Mode::VerifyCa(RootCert::System),
        (Some(SslMode::VerifyFull), root_cert) => {
            Mode::VerifyFull(root_cert.unwrap_or(RootCert::System))
        }
    })
}

impl Mode {
    #[cfg_attr(feature = "postgres-tls", allow(dead_code))]
    fn name(&self) -> &'static str {
        match self {
            Mode::Plaintext => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa(_) => "verify-ca",
            Mode::VerifyFull(_) => "verify-full",
        }
    }
}

#[cfg(not(feature = "postgres-tls"))]
fn with_tls(
    config: tokio_postgres::Config,
    mode: Mode,
    manager_config: ManagerConfig,
) -> Result<Manager, String> {
    if let Mode::Prefer = mode {
        // Without TLS, tokio-postgres's prefer is plaintext.
        return Ok(Manager::from_config(config, NoTls, manager_config));
    }
    Err(format!(
        "sslmode={} needs TLS, which needs redrive's `postgres-tls` feature; turn it on",
        mode.name()
    ))
}

#[cfg(feature = "postgres-tls")]
fn with_tls(
    config: tokio_postgres::Config,
    mode: Mode,
    manager_config: ManagerConfig,
) -> Result<Manager, String> {
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_tls::client_config(mode)?);
    Ok(Manager::from_config(config, tls, manager_config))
}

/// What to change, when `error` (from opening a connection) tells.
pub(super) fn hint(error: &tokio_postgres::Error, setting: &Setting) -> Option<String> {
    if let Some(db) = error.as_db_error() {
        let message = db.message();
        let plaintext_refused = db.code() == &SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            && (message.ends_with("no encryption") || message.ends_with("SSL off"));
        if plaintext_refused {
            let feature = if cfg!(feature = "postgres-tls") {
                ""
            } else {
                " with redrive's `postgres-tls` feature"
            };
            return Some(format!(
                "the server takes TLS connections only: add sslmode=require or \
                 sslmode=verify-full (with sslrootcert=<CA file>) to the connection \
                 parameters{feature}"
            ));
        }
        return None;
    }
    if super::describe(error).contains("server does not support TLS") {
        return Some(
            "the server has TLS turned off (ssl = off): turn it on, or connect with \
             sslmode=disable or prefer"
                .to_owned(),
        );
    }
    #[cfg(feature = "postgres-tls")]
    if let Some(hint) = rustls_tls::hint(error, setting) {
        return Some(hint);
    }
    #[cfg(not(feature = "postgres-tls"))]
    let _ = setting;
    None
}

#[cfg(feature = "postgres-tls")]
mod rustls_tls {
    use std::error::Error as StdError;
    use std::fmt;
    use std::sync::Arc;

    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::WebPkiSupportedAlgorithms;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{
        CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    };

    use super::{Mode, RootCert, Setting};

    /// The rustls configuration for `mode`, on ring.
    pub(super) fn client_config(mode: Mode) -> Result<ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("configuring TLS: {e}"))?;
        let any_certificate = || AnyCertificate(provider.signature_verification_algorithms);
        let config = match mode {
            Mode::Plaintext | Mode::Prefer | Mode::Require => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(any_certificate())),
            Mode::VerifyCa(root_cert) => {
                let verifier = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots(&root_cert)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("configuring TLS: {e}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(verifier)))
            }
            Mode::VerifyFull(root_cert) => builder.with_root_certificates(roots(&root_cert)?),
        };
        Ok(config.with_no_client_auth())
    }

    /// The CAs of `root_cert`.
    fn roots(root_cert: &RootCert) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match root_cert {
            RootCert::File(file) => {
                let shown = file.display();
                let pem = std::fs::read(file)
                    .map_err(|e| format!("cannot read the CA file {shown} (sslrootcert): {e}"))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("the CA file {shown}: {e}"))?;
                    roots.add(cert).map_err(|e| {
                        format!("the CA file {shown} holds a certificate rustls refuses: {e}")
                    })?;
                }
                if roots.is_empty() {
                    return Err(format!("the CA file {shown} holds no PEM certificate"));
                }
            }
            RootCert::System => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    let why = found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default();
                    return Err(format!(
                        "found no CA certificates this machine trusts{why}: give the \
                         server's CA with sslrootcert=<file>"
                    ));
                }
            }
        }
        Ok(roots)
    }

    /// The hint for a TLS error in `error`'s causes.
    pub(super) fn hint(error: &tokio_postgres::Error, setting: &Setting) -> Option<String> {
        match find_rustls_error(error)? {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Some(match &setting.ca_file {
                Some(ca) => format!(
                    "the server's certificate is not signed by the CA in {} (sslrootcert)",
                    ca.display()
                ),
                None => "the server's certificate is not signed by a CA this machine \
                         trusts: give its CA with sslrootcert=<file>"
                    .to_owned(),
            }),
            // rustls's message names the host and the certificate's names.
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => Some(
                "connect by a name the server's certificate holds, or use \
                 sslmode=verify-ca, which checks the CA alone"
                    .to_owned(),
            ),
            _ => None,
        }
    }

    /// The rustls error among `error`'s causes (tokio-rustls wraps it in an
    /// `io::Error`, whose `source` skips it).
    fn find_rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
        let mut cause: Option<&(dyn StdError + 'static)> = error.source();
        while let Some(c) = cause {
            if let Some(found) = c.downcast_ref::<rustls::Error>() {
                return Some(found);
            }
            let wrapped = c
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if wrapped.is_some() {
                return wrapped;
            }
            cause = c.source();
        }
        None
    }

    /// `sslmode=prefer` and `require`: any certificate, as libpq takes it; the
    /// handshake's signatures are still checked, so the session is with the
    /// certificate's holder.
    #[derive(Debug)]
    struct AnyCertificate(WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    /// `sslmode=verify-ca`: webpki's checks but the name's, which it makes last.
    struct AnyName(Arc<WebPkiServerVerifier>);

    impl fmt::Debug for AnyName {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_tuple("AnyName").finish_non_exhaustive()
        }
    }

    impl ServerCertVerifier for AnyName {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            match self.0.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(params: &str) -> String {
        match manager(params, ManagerConfig::default()) {
            Ok(_) => panic!("`{params}` was taken"),
            Err(e) => e,
        }
    }

    #[test]
    fn system_roots_ask_for_verify_full() {
        assert!(matches!(
            mode(None, Some(RootCert::System)),
            Ok(Mode::VerifyFull(RootCert::System))
        ));
        for weak in ["disable", "prefer", "require", "verify-ca"] {
            let err = refused(&format!("host=db sslmode={weak} sslrootcert=system"));
            assert!(err.contains("use sslmode=verify-full"), "{err}");
        }
    }

    #[test]
    fn a_ca_file_without_sslmode_is_refused() {
        let err = refused("postgresql://db/shop?sslrootcert=/etc/ca.pem");
        assert!(
            err.contains("/etc/ca.pem") && err.contains("sslmode=verify-full"),
            "{err}"
        );
    }

    #[test]
    fn require_with_a_ca_file_checks_the_ca() {
        let file = || RootCert::File("ca.pem".into());
        assert!(matches!(
            mode(Some(SslMode::Require), Some(file())),
            Ok(Mode::VerifyCa(RootCert::File(_)))
        ));
        assert!(matches!(
            mode(Some(SslMode::Prefer), Some(file())),
            Ok(Mode::Prefer)
        ));
    }

    #[test]
    fn invalid_parameters_do_not_show_the_password() {
        for params in [
            "host=db password=hunter2 sslmode=sometimes",
            "host=db password=hunter2 port=many",
            "postgresql://app:hunter2@db/shop?sslmode=sometimes",
            "postgresql://app:hunter2@db:many/shop",
        ] {
            let err = refused(params);
            assert!(
                err.contains("invalid PostgreSQL connection parameters"),
                "{err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[cfg(not(feature = "postgres-tls"))]
    #[test]
    fn tls_modes_name_the_feature() {
        for mode in ["require", "verify-ca", "verify-full"] {
            let err = refused(&format!("host=db sslmode={mode}"));
            assert!(err.contains("`postgres-tls` feature"), "{err}");
        }
        assert!(manager("host=db sslmode=prefer", ManagerConfig::default()).is_ok());
    }

    #[cfg(feature = "postgres-tls")]
    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let err = refused("host=db sslmode=verify-full sslrootcert=Cargo.toml");
        assert!(err.contains("Cargo.toml holds no PEM certificate"), "{err}");
    }
}
