//! Through the real proxy: an `https://` pool is reached over TLS, with the
//! pool's `tls_server_name` sent as SNI and its certificate verified against
//! the pool's `tls_ca_file`; a certificate the configured CA did not sign
//! stops the request before a single byte of it is sent.

mod support;

use std::sync::{Arc, Mutex};

use privacy_gateway::echo::{EchoUpstream, StreamPace};
use reqwest::StatusCode;
use support::tls::TestCa;
use support::{client, shipped, Gateway, TestConfig};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// The name the upstream's certificate is issued for, and the pool's `tls_server_name`.
const SERVER_NAME: &str = "inference.test";

/// The CA file's name in the gateway's configuration folder.
const CA_FILE: &str = "ca.pem";

const CHAT: &str = "/v1/chat/completions";

/// What the TLS upstream saw of the handshakes attempted with it.
#[derive(Default)]
struct Handshakes {
    /// Connections accepted, before any handshake.
    connections: usize,
    /// The SNI of each completed handshake (`""` when none was sent).
    server_names: Vec<String>,
    /// Why each failed handshake failed.
    failures: Vec<String>,
}

/// An echo upstream speaking TLS with a certificate for [`SERVER_NAME`] signed by `ca`.
struct TlsUpstream {
    echo: EchoUpstream,
    handshakes: Arc<Mutex<Handshakes>>,
}

impl TlsUpstream {
    async fn start(ca: &TestCa) -> Self {
        let leaf = ca.leaf(SERVER_NAME);
        // The leaf alone: trust must come from the gateway's CA file.
        let chain = vec![CertificateDer::from(leaf.der)];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let handshakes = Arc::new(Mutex::new(Handshakes::default()));
        let seen = handshakes.clone();
        let accept = move |tcp| {
            let acceptor = acceptor.clone();
            let seen = seen.clone();
            async move {
                seen.lock().expect("handshakes").connections += 1;
                let result = acceptor.accept(tcp).await;
                let mut seen = seen.lock().expect("handshakes");
                match &result {
                    Ok(tls) => {
                        let sni = tls.get_ref().1.server_name().unwrap_or_default();
                        seen.server_names.push(sni.to_string());
                    }
                    Err(e) => seen.failures.push(e.to_string()),
                }
                result
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind TLS listener");
        let echo = EchoUpstream::start_accepting(
            "tls-upstream",
            listener,
            StreamPace::Every(std::time::Duration::from_millis(200)),
            accept,
        )
        .expect("start TLS echo upstream");
        TlsUpstream { echo, handshakes }
    }

    fn handshakes(&self) -> std::sync::MutexGuard<'_, Handshakes> {
        self.handshakes.lock().expect("handshakes")
    }
}

/// The shipped pools, every chat pool pointing at `upstream` over TLS and
/// verified with [`CA_FILE`].
fn tls_pools(upstream: &TlsUpstream) -> String {
    let mut pools: toml::Table =
        toml::from_str(&shipped("pools.toml")).expect("shipped pools.toml parses");
    let address = format!("https://{}", upstream.echo.addr());
    let mut chat_pools = 0;
    for pool in pools["pool"].as_array_mut().expect("pools") {
        let serves_chat = pool["capabilities"]
            .as_array()
            .expect("capabilities")
            .iter()
            .any(|c| c.as_str() == Some("chat"));
        if !serves_chat {
            continue;
        }
        let pool = pool.as_table_mut().expect("pool table");
        pool.insert("addresses".into(), vec![address.clone()].into());
        pool.insert("tls_server_name".into(), SERVER_NAME.into());
        pool.insert("tls_ca_file".into(), CA_FILE.into());
        chat_pools += 1;
    }
    assert!(chat_pools > 0, "the shipped pools serve chat");
    toml::to_string(&pools).expect("serialize pools")
}

/// A gateway whose chat pools are `upstream`, trusting `trusted_ca` for them.
fn gateway(upstream: &TlsUpstream, trusted_ca: &TestCa) -> Gateway {
    Gateway::start(&TestConfig {
        trust: String::new(),
        attachments: vec![(CA_FILE.into(), trusted_ca.pem().into_bytes())],
        ..TestConfig::shipped_with_pools(tls_pools(upstream))
    })
}

/// Sends a chat request as `demo-api-paid`; returns status, decision id and body.
async fn chat(gw: &Gateway) -> (StatusCode, Option<String>, String) {
    let resp = client()
        .post(gw.api_url(CHAT))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request");
    let status = resp.status();
    let decision_id = support::decision_id(&resp);
    let body = resp.text().await.expect("body");
    (status, decision_id, body)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_reaches_an_https_pool_stamped() {
    let ca = TestCa::new("test CA");
    let upstream = TlsUpstream::start(&ca).await;
    let gw = gateway(&upstream, &ca);

    let (status, decision_id, body) = chat(&gw).await;
    assert_eq!(status, StatusCode::OK, "body: {body}\n{}", gw.logs());
    let answer: serde_json::Value = serde_json::from_str(&body).expect("echo answer is JSON");
    assert_eq!(
        answer["pool"], "tls-upstream",
        "answered by the TLS upstream"
    );

    let requests = upstream.echo.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    let r = &requests[0];
    assert_eq!(r.path, CHAT);
    assert_eq!(
        r.header("x-privacy-decision-id"),
        decision_id.as_deref(),
        "{r:?}"
    );
    assert_eq!(
        r.header_values("x-privacy-training"),
        vec!["denied"],
        "{r:?}"
    );
    assert_eq!(
        r.header_values("x-privacy-training-basis"),
        vec!["3.4.2/paid"],
        "{r:?}"
    );
    assert_eq!(r.header_values("x-privacy-retention"), vec!["30d"], "{r:?}");
    assert!(r.header("x-privacy-pool").is_some(), "{r:?}");
    assert!(r.header("authorization").is_none(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_server_name_is_sent_as_sni() {
    let ca = TestCa::new("test CA");
    let upstream = TlsUpstream::start(&ca).await;
    let gw = gateway(&upstream, &ca);

    let (status, _, body) = chat(&gw).await;
    assert_eq!(status, StatusCode::OK, "body: {body}\n{}", gw.logs());
    let handshakes = upstream.handshakes();
    assert!(
        !handshakes.server_names.is_empty(),
        "no completed handshake; failures: {:?}",
        handshakes.failures
    );
    for name in &handshakes.server_names {
        assert_eq!(name, SERVER_NAME, "SNI of every handshake");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_another_ca_is_refused_and_nothing_is_forwarded() {
    let upstream_ca = TestCa::new("upstream CA");
    let other_ca = TestCa::new("another CA");
    let upstream = TlsUpstream::start(&upstream_ca).await;
    let gw = gateway(&upstream, &other_ca);

    let (status, decision_id, body) = chat(&gw).await;
    assert!(
        status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE,
        "status {status}, body: {body}"
    );
    let error: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    let code = error["error"]["code"].as_str().unwrap_or_default();
    assert!(
        code == "upstream_error" || code == "permitted_pools_unavailable",
        "error code: {error}"
    );
    assert_eq!(
        error["error"]["decision_id"].as_str(),
        decision_id.as_deref(),
        "{error}"
    );

    assert!(
        upstream.echo.requests().is_empty(),
        "the upstream received a request: {:?}",
        upstream.echo.requests()
    );
    let handshakes = upstream.handshakes();
    assert!(
        handshakes.connections > 0,
        "the gateway never connected to the upstream: the refusal proves nothing"
    );
    assert!(
        handshakes.server_names.is_empty(),
        "a handshake completed with an untrusted certificate (SNI {:?})",
        handshakes.server_names
    );
    // The gateway itself rejected the certificate: it told the upstream so.
    assert!(
        handshakes.failures.iter().all(|f| f.contains("UnknownCA")),
        "handshakes failed for another reason: {:?}",
        handshakes.failures
    );
}
