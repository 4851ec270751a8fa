//! TLS settings for `wss://` listeners ([`crate::server::Builder::tls`] and
//! [`crate::server::Builder::tls_addr`]): from PEM files, or a ready `rustls::ServerConfig`
//! for SNI, client certificates or a resolver of one's own.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS server configuration for a listener.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub(crate) rustls: Arc<rustls::ServerConfig>,
}

impl TlsConfig {
    /// A certificate chain and its private key from PEM files (the chain leaf first; the key
    /// PKCS#8, PKCS#1 or SEC1), TLS 1.2 and 1.3, ALPN `http/1.1`, the `ring` provider.
    ///
    /// # Errors
    /// A file that cannot be read or holds no certificate or key (the error names the file),
    /// or a key that does not match the certificate.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        private_key: impl AsRef<Path>,
    ) -> io::Result<TlsConfig> {
        let (cert_path, key_path) = (cert_chain.as_ref(), private_key.as_ref());
        let named = |path: &Path, what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} {}: {e}", path.display()),
            )
        };
        let certs = CertificateDer::pem_file_iter(cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| named(cert_path, "cannot read the certificate chain", &e))?;
        if certs.is_empty() {
            let e = "no CERTIFICATE block";
            return Err(named(cert_path, "cannot read the certificate chain", &e));
        }
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| named(key_path, "cannot read the private key", &e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            let what = format!(
                "the key does not fit the certificate in {}",
                cert_path.display()
            );
            named(key_path, &what, &e)
        })?;
        Ok(TlsConfig::from_rustls(Arc::new(config)))
    }

    /// A ready rustls configuration (SNI, client certificates, a resolver, other versions or
    /// providers). An empty ALPN list gets `http/1.1`; any other is used as given.
    pub fn from_rustls(config: Arc<rustls::ServerConfig>) -> TlsConfig {
        let config = if config.alpn_protocols.is_empty() {
            let mut with_alpn = (*config).clone();
            with_alpn.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(with_alpn)
        } else {
            config
        };
        TlsConfig { rustls: config }
    }

    /// The rustls configuration in use.
    pub fn rustls(&self) -> &Arc<rustls::ServerConfig> {
        &self.rustls
    }
}
