//! Raw HTTP/1 over TCP from the test client address, and what to check on
//! the upstream side of each exchange.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use privacy_gateway::echo::Recorded;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{Gateway, TestConfig, Upstreams, CLIENT_V4};

/// A started gateway with its recording upstreams.
pub struct Setup {
    pub gw: Gateway,
    pub ups: Upstreams,
}

/// Starts the shipped configuration (trusting nobody), edited by `edit`.
pub async fn setup_with(edit: impl FnOnce(&mut TestConfig)) -> Setup {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    edit(&mut config);
    let gw = Gateway::start(&config);
    Setup { gw, ups }
}

/// Trusts the test client's network as a front proxy.
pub fn trusting_the_client(config: &mut TestConfig) {
    config
        .trust
        .push_str("trusted_proxies = [\"127.45.0.0/16\"]\n");
}

/// An answer as it came off the socket.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// `error.code` of a JSON refusal, after checking its shape: a decision
    /// id in the body equal to the one in the header.
    pub fn error_code(&self) -> String {
        let body = self.json();
        let id = body["error"]["decision_id"].as_str().unwrap_or_default();
        assert!(
            !id.is_empty() && self.header("x-privacy-decision-id") == Some(id),
            "a refusal names its decision id: {self:?}"
        );
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The headers the upstream received, from the echo's JSON answer.
    pub fn echoed(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_string)
    }
}

/// A TCP connection from [`CLIENT_V4`].
pub async fn connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(
            CLIENT_V4.parse().expect("client address"),
            0,
        ))
        .expect("bind the client address");
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Sends `request` on a new connection and reads one answer.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = connect(addr).await;
    stream.write_all(request).await.expect("send");
    read_reply(&mut stream)
        .await
        .unwrap_or_else(|| panic!("no answer to {}", String::from_utf8_lossy(request)))
}

/// Reads one answer (`None` when the connection closes first), within 10 s.
pub async fn read_reply(stream: &mut TcpStream) -> Option<Reply> {
    tokio::time::timeout(Duration::from_secs(10), read_reply_untimed(stream))
        .await
        .expect("an answer or a close within 10 s")
}

async fn read_reply_untimed(stream: &mut TcpStream) -> Option<Reply> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[head_end..].to_vec();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(length) => {
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(length);
        }
        None => {
            let _ = stream.read_to_end(&mut body).await;
        }
    }
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// Waits (within `limit`) for the peer to close; whatever it sent meanwhile.
pub async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    match read {
        Ok(_) => Some(out),
        Err(_) => None,
    }
}

/// `POST path` on HTTP/1.1 with `Host: gateway.test`, the extra header
/// lines given, and body `{}`.
pub fn post(path: &str, headers: &[&str]) -> Vec<u8> {
    let mut text = format!("POST {path} HTTP/1.1\r\nHost: gateway.test\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str("Content-Length: 2\r\n\r\n{}");
    text.into_bytes()
}

/// Names a client may have sent that reach the upstream unchanged.
const PASSED_THROUGH: [&str; 4] = ["content-length", "content-type", "accept", "user-agent"];

/// Asserts that `r` is the sanitised form of a request to `path`: the
/// pool's Host, the normalised path, no underscore or address header but
/// the gateway's own truncated `x-forwarded-for`, no key, nothing but the
/// header contract and what passes through.
pub fn assert_sanitised(r: &Recorded, pool_host: &str, path: &str, extra_allowed: &[&str]) {
    assert_eq!(r.path, path, "{r:?}");
    assert_eq!(r.header_values("host"), vec![pool_host], "{r:?}");
    let allowed: HashSet<&str> = PASSED_THROUGH
        .iter()
        .chain(extra_allowed)
        .copied()
        .chain(["host", "x-forwarded-for", "x-zero-data-retention"])
        .collect();
    for (name, _) in &r.headers {
        let name = name.to_ascii_lowercase();
        assert!(
            name.starts_with("x-privacy-") || allowed.contains(name.as_str()),
            "`{name}` reached the upstream: {r:?}"
        );
    }
    for name in [
        "x-privacy-decision-id",
        "x-privacy-training",
        "x-privacy-pool",
    ] {
        assert_eq!(r.header_values(name).len(), 1, "{name} once: {r:?}");
    }
    let prefix = r.header_values("x-forwarded-for");
    assert!(prefix.len() <= 1, "{r:?}");
    if let Some(p) = prefix.first() {
        let ip: std::net::IpAddr = p.parse().expect("x-forwarded-for is an address");
        let stamped = r
            .header("x-privacy-client-prefix")
            .expect("prefix beside it");
        assert!(stamped.starts_with(&ip.to_string()), "{r:?}");
    }
}

/// The `host` an upstream of `ups` sees for pool `pool`: its own address.
pub fn pool_host(ups: &Upstreams, pool: &str) -> String {
    ups.pool(pool).addr().to_string()
}

/// The one request all upstreams received, with its pool.
pub fn only_request(ups: &Upstreams) -> (String, Recorded) {
    let mut all = ups.all_requests();
    assert_eq!(all.len(), 1, "exactly one upstream request: {all:?}");
    all.remove(0)
}

/// Asserts that no upstream received a single byte.
pub fn assert_nothing_forwarded(ups: &Upstreams, what: &str) {
    let bytes = ups.all_bytes();
    assert!(
        bytes.is_empty(),
        "{what}: an upstream received {}",
        String::from_utf8_lossy(&bytes)
    );
}

/// Everything the upstreams received, as text.
pub fn upstream_text(ups: &Upstreams) -> String {
    String::from_utf8_lossy(&ups.all_bytes()).into_owned()
}

/// The value of a Prometheus sample such as `name{label="x"}`, 0 when absent.
pub async fn metric(gw: &Gateway, sample: &str) -> f64 {
    let (_, text) = gw.admin_get("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}
