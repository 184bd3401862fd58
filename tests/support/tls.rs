//! Certificates made in the test (rcgen) and clients that trust only them:
//! for TLS upstreams and for the gateway's own TLS listeners.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose};

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use super::{TestConfig, CLIENT_V4};

/// The name the gateway's test certificates are issued for.
pub const GATEWAY_NAME: &str = "gateway.test";

/// A certificate authority able to sign leaf certificates.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate and its key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's DER, to recognise it in a handshake.
    pub der: Vec<u8>,
    /// The key's PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl TestCa {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA cert");
        TestCa { issuer }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf for `name` signed by this CA.
    pub fn leaf(&self, name: &str) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let params = CertificateParams::new(vec![name.to_string()]).expect("leaf params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

/// The file names the gateway's certificate and key are written under.
pub const CERT_FILE: &str = "listener.crt";
/// See [`CERT_FILE`].
pub const KEY_FILE: &str = "listener.key";

/// `config` with TLS on its api listener, serving `leaf`.
pub fn serve_tls_on_api(config: &mut TestConfig, leaf: &Leaf) {
    config.api_listener =
        format!("[listener.tls]\ncert_file = \"{CERT_FILE}\"\nkey_file = \"{KEY_FILE}\"\n");
    config
        .attachments
        .push((CERT_FILE.into(), leaf.cert_pem.clone().into_bytes()));
    config
        .attachments
        .push((KEY_FILE.into(), leaf.key_pem.clone().into_bytes()));
}

/// How a client speaks HTTP to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 over TLS (ALPN `http/1.1`).
    Http1OverTls,
    /// HTTP/2 over TLS (ALPN `h2`).
    Http2OverTls,
    /// HTTP/2 in the clear, with prior knowledge.
    H2c,
}

impl Protocol {
    /// The version the client must see in answers.
    pub fn version(self) -> reqwest::Version {
        match self {
            Protocol::Http1OverTls => reqwest::Version::HTTP_11,
            Protocol::Http2OverTls | Protocol::H2c => reqwest::Version::HTTP_2,
        }
    }

    /// The URL of `path` on the listener at `address`.
    pub fn url(self, address: SocketAddr, path: &str) -> String {
        match self {
            Protocol::H2c => format!("http://{address}{path}"),
            _ => format!("https://{GATEWAY_NAME}:{}{path}", address.port()),
        }
    }
}

/// A client from [`CLIENT_V4`] speaking `protocol` to the listener at
/// `address`, trusting only `ca` (for TLS).
pub fn client_for(protocol: Protocol, address: SocketAddr, ca: Option<&TestCa>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .local_address(CLIENT_V4.parse::<IpAddr>().ok())
        .timeout(Duration::from_secs(20))
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .resolve(GATEWAY_NAME, address);
    if let Some(ca) = ca {
        let root = reqwest::Certificate::from_pem(ca.pem().as_bytes()).expect("CA PEM");
        builder = builder.add_root_certificate(root);
    }
    builder = match protocol {
        Protocol::Http1OverTls => builder.http1_only(),
        Protocol::Http2OverTls => builder,
        Protocol::H2c => builder.http2_prior_knowledge(),
    };
    builder.build().expect("client")
}

/// The leaf certificate a TLS listener presents to a new handshake
/// (verified against `ca`).
pub async fn presented_certificate(addr: SocketAddr, ca: &TestCa) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = ca.pem();
    let der = pem_to_der(&pem);
    roots.add(CertificateDer::from(der)).expect("CA root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(GATEWAY_NAME).expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates");
    certs[0].to_vec()
}

/// The DER inside a one-certificate PEM.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("PEM certificate")
        .to_vec()
}
