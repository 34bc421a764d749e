//! TLS to PostgreSQL through rustls (ring): `require` encrypts without checking the
//! certificate (libpq's meaning), `verify-full` checks the chain and the host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::url::Tls;
use super::PgError;

pub fn connector(tls: &Tls, url: &str) -> Result<MakeRustlsConnect, PgError> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PgError::Tls { url: url.into(), what: e.to_string() })?;
    let config = match tls {
        Tls::Off | Tls::Unverified { .. } => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
        Tls::VerifyFull { root_cert } => {
            let mut roots = RootCertStore::empty();
            let default_root = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".postgresql/root.crt"));
            let file = root_cert.clone().or(default_root.filter(|p| p.exists()));
            match file {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(&path)
                        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                        .map_err(|e| PgError::Tls {
                        url: url.into(),
                        what: format!("cannot read sslrootcert {}: {e}", path.display()),
                    })?;
                    roots.add_parsable_certificates(certs);
                }
                None => {
                    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                }
            }
            if roots.is_empty() {
                return Err(PgError::Tls {
                    url: url.into(),
                    what: "sslmode=verify-full but no root certificate found: add sslrootcert=/path/to/ca.pem".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// libpq's `sslmode=require`: encryption, no identity check (signatures still checked).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

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
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
