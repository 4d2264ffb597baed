//! TLS for the relay's streaming replication connection, as libpq means `sslmode` (the rest of
//! Ferry's connections are sqlx's, which means it the same way):
//!
//! | `sslmode` | asks for TLS | without it | verifies |
//! |---|---|---|---|
//! | `disable`, `allow` | no | plaintext | nothing |
//! | `prefer` (the default) | yes | plaintext, if the server says it has no TLS | nothing |
//! | `require` | yes | **refused** | nothing; the chain when `sslrootcert` is given (as libpq) |
//! | `verify-ca` | yes | **refused** | the chain, against `sslrootcert` |
//! | `verify-full` | yes | **refused** | the chain and that the certificate names the host |
//!
//! `sslrootcert` is a PEM file of the certificate authorities to trust (`system`: the public
//! web PKI's roots). A server that refuses TLS under `require` and above is left before a
//! single byte of the login (user name, password answers) is sent.

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::postgres::PgSslMode;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore,
    SignatureScheme,
};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// `disable`.
    Disable,
    /// `allow`.
    Allow,
    /// `prefer`.
    Prefer,
    /// `require`.
    Require,
    /// `verify-ca`.
    VerifyCa,
    /// `verify-full`.
    VerifyFull,
}

impl From<PgSslMode> for SslMode {
    fn from(mode: PgSslMode) -> Self {
        match mode {
            PgSslMode::Disable => SslMode::Disable,
            PgSslMode::Allow => SslMode::Allow,
            PgSslMode::Prefer => SslMode::Prefer,
            PgSslMode::Require => SslMode::Require,
            PgSslMode::VerifyCa => SslMode::VerifyCa,
            PgSslMode::VerifyFull => SslMode::VerifyFull,
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// What the connection's URL asks of TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: the authorities to trust (`None`: the web PKI's, for `verify-*`).
    pub root_cert: Option<PathBuf>,
}

impl TlsSettings {
    /// Whether to ask the server for TLS at all.
    pub fn asks(&self) -> bool {
        !matches!(self.mode, SslMode::Disable | SslMode::Allow)
    }

    /// Whether a server without TLS must be refused.
    pub fn requires(&self) -> bool {
        matches!(
            self.mode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// The rustls configuration for this mode.
    pub fn client_config(&self) -> Result<ClientConfig, String> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let verify_chain = match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: `require` with a root certificate given verifies like `verify-ca`.
            SslMode::Require => self.root_cert.is_some(),
            _ => false,
        };
        let verifier: Arc<dyn ServerCertVerifier> = if verify_chain {
            let roots = Arc::new(self.roots()?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .map_err(|e| e.to_string())?;
            if self.mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(Unverified(provider))
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match self.root_cert.as_deref() {
            Some(path) if path.as_os_str() != "system" => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "sslrootcert {}: no certificate in it",
                        path.display()
                    ));
                }
            }
            _ => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

/// The name the certificate must carry (`verify-full`), and the TLS server name indication.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("host {host:?}: {e}"))
}

/// `verify-ca`: the chain to a trusted authority, whatever name the certificate carries.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` without `sslrootcert`: encrypted, the certificate not checked (as
/// libpq); the handshake's signatures still are.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: SslMode) -> TlsSettings {
        TlsSettings {
            mode,
            root_cert: None,
        }
    }

    #[test]
    fn each_mode_asks_and_requires_as_libpq() {
        use SslMode::*;
        // (mode, asks for TLS, refuses a server without it)
        for (mode, asks, requires) in [
            (Disable, false, false),
            (Allow, false, false),
            (Prefer, true, false),
            (Require, true, true),
            (VerifyCa, true, true),
            (VerifyFull, true, true),
        ] {
            let s = settings(mode);
            assert_eq!((s.asks(), s.requires()), (asks, requires), "{mode:?}");
            s.client_config().expect("a configuration for every mode");
        }
    }

    #[test]
    fn a_root_certificate_file_that_is_missing_or_empty_is_a_clear_error() {
        // Inputs tried: a path that does not exist, and a file with no certificate in it.
        let empty = std::env::temp_dir().join(format!("ferry-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        for path in [PathBuf::from("/nonexistent/root.crt"), empty.clone()] {
            let s = TlsSettings {
                mode: SslMode::VerifyFull,
                root_cert: Some(path.clone()),
            };
            let err = s.client_config().unwrap_err();
            assert!(err.starts_with("sslrootcert "), "{}: {err}", path.display());
        }
        std::fs::remove_file(empty).unwrap();
    }
}
