//! TLS on a listener: the certificate and key are part of the configuration
//! snapshot (read and checked with the other files, so a renewed certificate
//! is a reload and a broken one changes nothing), and each handshake takes
//! them from the snapshot serving at that moment, through Pingora's
//! certificate callback. ALPN offers `h2` and `http/1.1`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use pingora::tls::ext;
use pingora::tls::pkey::{PKey, Private};
use pingora::tls::x509::X509;

use crate::config::SnapshotHandle;

/// A listener's certificate chain (leaf first) and private key.
pub struct ServerCertificate {
    chain: Vec<X509>,
    key: PKey<Private>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let subject = self
            .chain
            .first()
            .map(|c| format!("{:?}", c.subject_name()));
        f.debug_struct("ServerCertificate")
            .field("subject", &subject)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertificate {
    /// Reads a PEM chain (leaf first) and a PEM private key, and checks that
    /// the key is the leaf's. Messages name the files, never key material.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, String> {
        let pem = std::fs::read(cert_file)
            .map_err(|e| format!("cannot read certificate {}: {e}", cert_file.display()))?;
        let chain = X509::stack_from_pem(&pem)
            .map_err(|_| format!("{} is not a PEM certificate chain", cert_file.display()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| format!("{} holds no certificate", cert_file.display()))?;
        let pem = std::fs::read(key_file)
            .map_err(|e| format!("cannot read private key {}: {e}", key_file.display()))?;
        let key = PKey::private_key_from_pem(&pem)
            .map_err(|_| format!("{} is not a PEM private key", key_file.display()))?;
        let matches = leaf
            .public_key()
            .map(|public| public.public_eq(&key))
            .unwrap_or(false);
        if !matches {
            return Err(format!(
                "the private key {} is not the key of the certificate {}",
                key_file.display(),
                cert_file.display()
            ));
        }
        Ok(ServerCertificate { chain, key })
    }

    /// Hands the chain and key to one handshake.
    fn apply(&self, ssl: &mut TlsRef) -> Result<(), pingora::tls::error::ErrorStack> {
        let mut certs = self.chain.iter();
        if let Some(leaf) = certs.next() {
            ext::ssl_use_certificate(ssl, leaf)?;
        }
        for intermediate in certs {
            ext::ssl_add_chain_cert(ssl, intermediate)?;
        }
        ext::ssl_use_private_key(ssl, &self.key)
    }
}

/// Gives each handshake on `address` the certificate of the current snapshot.
struct CertificateFromSnapshot {
    snapshots: Arc<SnapshotHandle>,
    address: SocketAddr,
}

#[async_trait]
impl TlsAccept for CertificateFromSnapshot {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let snapshot = self.snapshots.current();
        // Without a certificate the handshake fails: nothing is served in the clear.
        match snapshot.tls_certificate(self.address) {
            Some(certificate) => {
                if let Err(e) = certificate.apply(ssl) {
                    tracing::error!(listener = %self.address, "cannot use the listener's certificate: {e}");
                }
            }
            None => tracing::error!(listener = %self.address, "no certificate for a TLS listener"),
        }
    }
}

/// TLS settings for the listener on `address`: certificates from the
/// current snapshot, ALPN preferring `h2` over `http/1.1`.
pub fn settings(
    snapshots: Arc<SnapshotHandle>,
    address: SocketAddr,
) -> pingora::Result<TlsSettings> {
    let mut settings =
        TlsSettings::with_callbacks(Box::new(CertificateFromSnapshot { snapshots, address }))?;
    settings.enable_h2();
    Ok(settings)
}
