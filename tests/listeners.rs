//! Through the real proxy, on its own listeners: TLS (ALPN `h2` and
//! `http/1.1`) and cleartext HTTP/2 with prior knowledge. What the gateway
//! enforces holds identically whatever the client speaks: the header
//! contract, spoofed headers, the truncated address, the key kept back.
//! A renewed certificate is served without a restart; a broken one changes
//! nothing; cleartext bytes sent to a TLS listener reach no upstream, and
//! the failed handshake is logged without the client's address.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::tls::{
    client_for, presented_certificate, serve_tls_on_api, Protocol, TestCa, CERT_FILE, GATEWAY_NAME,
    KEY_FILE,
};
use support::{client, eventually, eventually_async, Gateway, TestConfig, Upstreams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

/// A gateway whose api listener serves TLS (a leaf of `ca`) and whose chat
/// listener accepts HTTP/2 with prior knowledge.
struct Setup {
    gw: Gateway,
    ups: Upstreams,
    ca: TestCa,
}

impl Setup {
    async fn start() -> Setup {
        let ups = Upstreams::start().await;
        let ca = TestCa::new("gateway test CA");
        let mut config = TestConfig::shipped_with(&ups);
        serve_tls_on_api(&mut config, &ca.leaf(GATEWAY_NAME));
        config.chat_listener = "h2c = true\n".into();
        let gw = Gateway::start(&config);
        Setup { gw, ups, ca }
    }

    /// The listener a protocol is served on here.
    fn listener(&self, protocol: Protocol) -> SocketAddr {
        match protocol {
            Protocol::H2c => self.gw.chat,
            _ => self.gw.api,
        }
    }

    fn client(&self, protocol: Protocol) -> reqwest::Client {
        client_for(protocol, self.listener(protocol), Some(&self.ca))
    }

    fn url(&self, protocol: Protocol, path: &str) -> String {
        protocol.url(self.listener(protocol), path)
    }
}

const PROTOCOLS: [Protocol; 3] = [
    Protocol::Http2OverTls,
    Protocol::Http1OverTls,
    Protocol::H2c,
];

#[tokio::test(flavor = "multi_thread")]
async fn each_protocol_is_negotiated_and_answered_with_the_decision_id() {
    let s = Setup::start().await;
    for protocol in PROTOCOLS {
        let resp =
            support::send_as(&s.client(protocol), &s.url(protocol, CHAT), "demo-api-paid").await;
        assert_eq!(resp.status(), 200, "{protocol:?}");
        assert_eq!(resp.version(), protocol.version(), "{protocol:?}");
        let id = support::decision_id(&resp).expect("decision id");
        let (_, r) = s.ups.by_decision(&id).expect("forwarded");
        assert_eq!(r.header("x-privacy-decision-id"), Some(id.as_str()));
    }
    // An h2c listener still speaks HTTP/1.1 to clients without prior knowledge.
    let resp = client()
        .post(s.gw.chat_url(CHAT))
        .body("{}")
        .send()
        .await
        .expect("HTTP/1.1 on the h2c listener");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_header_contract_and_spoofing_rules_hold_over_h2_and_tls() {
    let s = Setup::start().await;
    let hostile = [
        ("x-privacy-training", "allowed"),
        ("x-privacy-training-basis", "3.4.2/free"),
        ("x-privacy-account", "acct-somebody-else"),
        ("x-zero-data-retention", "1"),
        ("x-privacy-whatever", "x"),
        ("x-forwarded-for", "198.51.100.23"),
        ("forwarded", "for=198.51.100.23"),
        ("x-real-ip", "198.51.100.23"),
        ("true-client-ip", "198.51.100.23"),
        ("cf-connecting-ip", "198.51.100.23"),
        ("x-authenticated-account", "acct-chat-team-optin"),
    ];
    for protocol in PROTOCOLS {
        let c = s.client(protocol);
        let url = s.url(protocol, CHAT);
        let (_, r) = support::forward_with(&c, &s.ups, &url, Some("demo-api-paid"), &hostile).await;
        let one = |name: &str| r.header_values(name);
        assert_eq!(
            one("x-privacy-training"),
            vec!["denied"],
            "{protocol:?} {r:?}"
        );
        assert_eq!(
            one("x-privacy-training-basis"),
            vec!["3.4.2/paid"],
            "{protocol:?}"
        );
        assert_eq!(one("x-privacy-retention"), vec!["30d"], "{protocol:?}");
        assert_eq!(
            one("x-privacy-account"),
            vec!["acct-api-paid"],
            "{protocol:?}"
        );
        assert_eq!(one("x-forwarded-for"), vec!["127.45.67.0"], "{protocol:?}");
        assert_eq!(
            one("x-privacy-client-prefix"),
            vec!["127.45.67.0/24"],
            "{protocol:?}"
        );
        for absent in [
            "x-zero-data-retention",
            "x-privacy-whatever",
            "forwarded",
            "x-real-ip",
            "true-client-ip",
            "cf-connecting-ip",
            "x-authenticated-account",
            "authorization",
        ] {
            assert!(
                r.header(absent).is_none(),
                "{protocol:?}: {absent} forwarded: {r:?}"
            );
        }
        // Anonymous chat, with a trusted-only identity header from an untrusted peer.
        if protocol == Protocol::H2c {
            let (_, r) = support::forward_with(&c, &s.ups, &url, None, &hostile).await;
            assert_eq!(r.header("x-privacy-account"), Some("anonymous"), "{r:?}");
        }
    }
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    for leaked in [
        "198.51.100",
        "demo-api-paid",
        "acct-somebody-else",
        support::CLIENT_V4,
    ] {
        assert!(!bytes.contains(leaked), "`{leaked}` reached an upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_changes_nothing() {
    let ups = Upstreams::start().await;
    let ca = TestCa::new("gateway test CA");
    let first = ca.leaf(GATEWAY_NAME);
    let mut config = TestConfig::shipped_with(&ups);
    serve_tls_on_api(&mut config, &first);
    let gw = Gateway::start(&config);
    assert_eq!(presented_certificate(gw.api, &ca).await, first.der);

    // A connection opened before the renewal keeps working after it.
    let early = client_for(Protocol::Http2OverTls, gw.api, Some(&ca));
    let url = Protocol::Http2OverTls.url(gw.api, CHAT);
    assert_eq!(support::post_as(&early, &url, "demo-api-paid").await, 200);

    let renewed = ca.leaf(GATEWAY_NAME);
    gw.replace_file(KEY_FILE, &renewed.key_pem);
    gw.replace_file(CERT_FILE, &renewed.cert_pem);
    let renewed_served = eventually_async(Duration::from_secs(10), || async {
        presented_certificate(gw.api, &ca).await == renewed.der
    })
    .await;
    assert!(
        renewed_served,
        "the renewed certificate is not served:\n{}",
        gw.logs()
    );
    assert_eq!(support::post_as(&early, &url, "demo-api-paid").await, 200);

    // A key that is not the certificate's: refused, the renewed pair serves on.
    let stray = ca.leaf(GATEWAY_NAME);
    gw.replace_file(KEY_FILE, &stray.key_pem);
    gw.expect_log("is not the key of the certificate").await;
    assert_eq!(presented_certificate(gw.api, &ca).await, renewed.der);
    let fresh = client_for(Protocol::Http2OverTls, gw.api, Some(&ca));
    assert_eq!(support::post_as(&fresh, &url, "demo-api-paid").await, 200);
    assert!(
        !gw.logs().contains("PRIVATE KEY"),
        "key material in a log line"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cleartext_sent_to_a_tls_listener_reaches_no_upstream() {
    let s = Setup::start().await;
    let mut tcp = tokio::net::TcpStream::connect(s.gw.api)
        .await
        .expect("connect");
    let request = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-api-paid\r\ncontent-length: 2\r\n\r\n{}";
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "a cleartext request was answered"
    );
    // A client that does not trust the gateway's CA gets no answer either.
    let stranger = client_for(
        Protocol::Http2OverTls,
        s.gw.api,
        Some(&TestCa::new("other CA")),
    );
    let refused = stranger
        .post(s.url(Protocol::Http2OverTls, CHAT))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(
        s.ups.all_requests().is_empty(),
        "{:?}",
        s.ups.all_requests()
    );
    // Pingora logs each failed handshake with its peer: the line is written
    // without the client's address (the gateway's drop checks every log line).
    assert!(
        eventually(Duration::from_secs(10), || s
            .gw
            .logs()
            .contains("Downstream handshake error from <address>"))
        .await,
        "{}",
        s.gw.logs()
    );
}
