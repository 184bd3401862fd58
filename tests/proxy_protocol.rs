//! The PROXY protocol through the real gateway, with raw sockets: a trusted
//! balancer (connecting from 127.10.0.1) names the client in v1 and v2
//! headers, IPv4 and IPv6, before cleartext HTTP/1.1, HTTP/2 and TLS; the
//! header is believed only from it. A header from anyone else, a trusted
//! peer without a header (an L4 balancer passing a client's own
//! X-Forwarded-For), and truncated or garbage headers close the connection
//! before a byte is forwarded.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::tls::{TestCa, GATEWAY_NAME};
use support::{Gateway, TestConfig, Upstreams, CLIENT_V4};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// Where the trusted balancer connects from.
const BALANCER: &str = "127.10.0.1";
const CHAT: &str = "/v1/chat/completions";

/// A gateway whose api listener (cleartext, h2c) and chat listener (TLS)
/// read PROXY headers, trusting 127.10.0.0/16.
async fn setup() -> (Gateway, Upstreams, TestCa) {
    let ups = Upstreams::start().await;
    let ca = TestCa::new("gateway test CA");
    let leaf = ca.leaf(GATEWAY_NAME);
    let mut config = TestConfig::shipped_with(&ups);
    config
        .trust
        .push_str("trusted_proxies = [\"127.10.0.0/16\"]\n");
    config.api_listener = "proxy_protocol = true\nh2c = true\n".into();
    config.chat_listener = "proxy_protocol = true\n[listener.tls]\ncert_file = \"chat.crt\"\nkey_file = \"chat.key\"\n".into();
    config
        .attachments
        .push(("chat.crt".into(), leaf.cert_pem.into_bytes()));
    config
        .attachments
        .push(("chat.key".into(), leaf.key_pem.into_bytes()));
    (Gateway::start(&config), ups, ca)
}

/// A TCP connection to `to` from `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from.parse().expect("ip"), 0))
        .expect("bind");
    socket.connect(to).await.expect("connect")
}

fn v1(source: &str) -> Vec<u8> {
    let family = if source.contains(':') { "TCP6" } else { "TCP4" };
    let destination = if source.contains(':') {
        "2001:db8::2"
    } else {
        "10.0.0.1"
    };
    format!("PROXY {family} {source} {destination} 51234 443\r\n").into_bytes()
}

/// A v2 header: `command` 1 (PROXY) or 0 (LOCAL), source `source` (or none).
fn v2(command: u8, source: Option<std::net::IpAddr>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    let mut payload = Vec::new();
    let family = match source {
        Some(std::net::IpAddr::V4(ip)) => {
            payload.extend_from_slice(&ip.octets());
            payload.extend_from_slice(&[10, 0, 0, 1]);
            0x11
        }
        Some(std::net::IpAddr::V6(ip)) => {
            payload.extend_from_slice(&ip.octets());
            payload.extend_from_slice(
                &"2001:db8::2"
                    .parse::<std::net::Ipv6Addr>()
                    .expect("ip")
                    .octets(),
            );
            0x21
        }
        None => 0x00,
    };
    if source.is_some() {
        payload.extend_from_slice(&51234u16.to_be_bytes());
        payload.extend_from_slice(&443u16.to_be_bytes());
    }
    h.push(family);
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&payload);
    h
}

/// A chat request as `demo-api-paid`, with a spoofed X-Forwarded-For (an L4
/// balancer passes whatever the client wrote).
fn request() -> Vec<u8> {
    format!(
        "POST {CHAT} HTTP/1.1\r\nhost: {GATEWAY_NAME}\r\nauthorization: Bearer demo-api-paid\r\n\
         x-forwarded-for: 198.51.100.23\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    )
    .into_bytes()
}

/// Everything the server sends until it closes (bounded).
async fn read_all<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The headers the echo upstream reports in a 200 answer's body.
fn echoed(answer: &str) -> serde_json::Value {
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").expect("body").1;
    // The echo answers with a JSON object (possibly chunked: take from the first brace).
    let start = body.find('{').expect("JSON");
    let end = body.rfind('}').expect("JSON");
    serde_json::from_str::<serde_json::Value>(&body[start..=end]).expect("echo JSON")["headers"]
        .clone()
}

/// Sends `header` (in two pieces, to cross reads) then a request over
/// cleartext from `from`; the answer.
async fn cleartext(gw: &Gateway, from: &str, header: &[u8]) -> String {
    let mut tcp = connect_from(from, gw.api).await;
    let (a, b) = header.split_at(header.len() / 2);
    tcp.write_all(a).await.expect("write");
    tcp.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(20)).await;
    tcp.write_all(b).await.expect("write");
    let _ = tcp.write_all(&request()).await;
    read_all(&mut tcp).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_balancer_names_the_client_in_v1_and_v2_for_ipv4_and_ipv6() {
    let (gw, ups, _) = setup().await;
    let cases = [
        (v1("203.0.113.77"), "203.0.113.0", "203.0.113.0/24"),
        (
            v1("2001:db8:1234:5678::abcd"),
            "2001:db8:1234::",
            "2001:db8:1234::/48",
        ),
        (
            v2(1, Some("203.0.113.77".parse().expect("ip"))),
            "203.0.113.0",
            "203.0.113.0/24",
        ),
        (
            v2(1, Some("2001:db8:1234:5678::abcd".parse().expect("ip"))),
            "2001:db8:1234::",
            "2001:db8:1234::/48",
        ),
    ];
    for (header, forwarded_for, prefix) in cases {
        let answer = cleartext(&gw, BALANCER, &header).await;
        let headers = echoed(&answer);
        assert_eq!(headers["x-forwarded-for"], forwarded_for, "{headers}");
        assert_eq!(headers["x-privacy-client-prefix"], prefix, "{headers}");
    }
    // The balancer's own connection (v2 LOCAL, e.g. a check): the balancer is the client.
    let mut tcp = connect_from(BALANCER, gw.api).await;
    let own = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-api-paid\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
    );
    tcp.write_all(&[v2(0, None), own.into_bytes()].concat())
        .await
        .expect("write");
    let headers = echoed(&read_all(&mut tcp).await);
    assert_eq!(
        headers["x-privacy-client-prefix"], "127.10.0.0/24",
        "{headers}"
    );
    let bytes = String::from_utf8_lossy(&ups.all_bytes()).into_owned();
    for leaked in ["198.51.100", "203.0.113.77", "5678::abcd", "PROXY", "QUIT"] {
        assert!(!bytes.contains(leaked), "`{leaked}` reached an upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_header_precedes_tls_and_http2_alike() {
    let (gw, _ups, ca) = setup().await;
    // TLS: the header, then the handshake, on the same connection.
    let mut tcp = connect_from(BALANCER, gw.chat).await;
    tcp.write_all(&v2(1, Some("203.0.113.77".parse().expect("ip"))))
        .await
        .expect("header");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(support::tls::pem_to_der(&ca.pem())))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(GATEWAY_NAME).expect("name"), tcp)
        .await
        .expect("TLS handshake after the header");
    tls.write_all(&request()).await.expect("request");
    let headers = echoed(&read_all(&mut tls).await);
    assert_eq!(
        headers["x-privacy-client-prefix"], "203.0.113.0/24",
        "{headers}"
    );

    // HTTP/2 with prior knowledge after the header.
    let mut tcp = connect_from(BALANCER, gw.api).await;
    tcp.write_all(&v1("2001:db8:1234:5678::abcd"))
        .await
        .expect("header");
    let (mut h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let req = http::Request::post(format!("http://{GATEWAY_NAME}{CHAT}"))
        .header("authorization", "Bearer demo-api-paid")
        .header("x-forwarded-for", "198.51.100.23")
        .body(())
        .expect("request");
    let (response, mut body) = h2.send_request(req, false).expect("send");
    body.send_data(bytes::Bytes::from_static(b"{}"), true)
        .expect("body");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    let mut recv = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.expect("data");
        let _ = recv.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let echo: serde_json::Value = serde_json::from_slice(&text).expect("echo JSON");
    assert_eq!(
        echo["headers"]["x-privacy-client-prefix"], "2001:db8:1234::/48",
        "{echo}"
    );
}

/// Sends `bytes` from `from` to the api listener and expects the connection
/// closed without an answer.
async fn refused(gw: &Gateway, from: &str, bytes: &[u8], half_close: bool) {
    let mut tcp = connect_from(from, gw.api).await;
    let _ = tcp.write_all(bytes).await;
    if half_close {
        let _ = tcp.shutdown().await;
    }
    let answer = read_all(&mut tcp).await;
    assert!(answer.is_empty(), "answered: {answer}");
}

fn refusals(metrics: &str, reason: &str) -> f64 {
    let series = format!("privacy_gateway_proxy_headers_refused_total{{reason=\"{reason}\"}}");
    support::metric(metrics, &series)
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_missing_truncated_and_garbage_headers_close_the_connection() {
    let (gw, ups, _) = setup().await;
    // A client claiming another address.
    let spoof = [v1("203.0.113.77"), request()].concat();
    refused(&gw, CLIENT_V4, &spoof, false).await;
    let spoof = [v2(1, Some("203.0.113.77".parse().expect("ip"))), request()].concat();
    refused(&gw, CLIENT_V4, &spoof, false).await;
    // The balancer without a header: the client's own X-Forwarded-For would be believed.
    refused(&gw, BALANCER, &request(), false).await;
    // Truncated, garbage, oversized, and a PROXY command without an IP source.
    refused(&gw, BALANCER, b"PROXY TCP4 203.0.113.77 10.0", true).await;
    refused(
        &gw,
        BALANCER,
        &[b"PROXY GARBAGE\r\n".as_slice(), &request()].concat(),
        false,
    )
    .await;
    refused(
        &gw,
        BALANCER,
        &[b"PROXY TCP4 ".as_slice(), &[b'9'; 150], &request()].concat(),
        false,
    )
    .await;
    let mut oversized = v2(1, Some("203.0.113.77".parse().expect("ip")));
    oversized[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    refused(&gw, BALANCER, &oversized, false).await;
    // Relayed without a client address (v2 unspecified, v1 UNKNOWN).
    refused(&gw, BALANCER, &[v2(1, None), request()].concat(), false).await;
    refused(
        &gw,
        BALANCER,
        &[b"PROXY UNKNOWN\r\n".as_slice(), &request()].concat(),
        false,
    )
    .await;
    let half = v2(1, Some("203.0.113.77".parse().expect("ip")));
    refused(&gw, BALANCER, &half[..20], true).await;

    assert!(
        ups.all_requests().is_empty(),
        "forwarded: {:?}",
        ups.all_requests()
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(refusals(&metrics, "untrusted_peer"), 2.0, "{metrics}");
    assert_eq!(refusals(&metrics, "missing"), 1.0, "{metrics}");
    assert!(refusals(&metrics, "malformed") >= 3.0, "{metrics}");
    assert_eq!(refusals(&metrics, "no_client_address"), 2.0, "{metrics}");
    assert!(refusals(&metrics, "truncated") >= 2.0, "{metrics}");

    // A client without a header is served as itself; its X-Forwarded-For is ignored.
    let mut tcp = connect_from(CLIENT_V4, gw.api).await;
    tcp.write_all(&request()).await.expect("request");
    let headers = echoed(&read_all(&mut tcp).await);
    assert_eq!(
        headers["x-privacy-client-prefix"], "127.45.67.0/24",
        "{headers}"
    );
}
