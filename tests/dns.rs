//! Pool host names through the real proxy, against a DNS server the test
//! runs on loopback (answers with a one-second TTL, changed by the test):
//! a new answer moves new requests to the new address while a stream in
//! flight on the old one finishes; an address that refuses connections is
//! left out on its own while its sibling serves every request; a name that
//! does not resolve fails `check` with its file.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use privacy_gateway::echo::{EchoUpstream, StreamPace, STREAM_EVENTS};
use support::{client, Gateway, TestConfig, Upstreams};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;

const NAME: &str = "inference.test.";
const CHAT: &str = "/v1/chat/completions";

/// A DNS server answering A queries for [`NAME`] with whatever the test set.
struct TestDns {
    addr: SocketAddr,
    answers: Arc<Mutex<Vec<Ipv4Addr>>>,
    queries: Arc<Mutex<usize>>,
}

impl TestDns {
    async fn start(first: Vec<Ipv4Addr>) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind DNS");
        let addr = socket.local_addr().expect("DNS address");
        let answers = Arc::new(Mutex::new(first));
        let queries = Arc::new(Mutex::new(0));
        let (a, q) = (answers.clone(), queries.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut response = Message::response(request.metadata.id, request.metadata.op_code);
                response.metadata.recursion_desired = request.metadata.recursion_desired;
                response.metadata.recursion_available = true;
                response.metadata.authoritative = true;
                response.add_queries(request.queries.clone());
                if let Some(query) = request.queries.first() {
                    if query.name().to_ascii().eq_ignore_ascii_case(NAME) {
                        *q.lock().expect("queries") += 1;
                        if query.query_type() == RecordType::A {
                            for ip in a.lock().expect("answers").iter() {
                                response.add_answer(Record::from_rdata(
                                    query.name().clone(),
                                    1,
                                    RData::A(A(*ip)),
                                ));
                            }
                        }
                    } else {
                        response.metadata.response_code = ResponseCode::NXDomain;
                    }
                }
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        TestDns {
            addr,
            answers,
            queries,
        }
    }

    fn answer(&self, ips: Vec<Ipv4Addr>) {
        *self.answers.lock().expect("answers") = ips;
    }

    fn queries(&self) -> usize {
        *self.queries.lock().expect("queries")
    }
}

/// Binds `ip:port`, or `ip:0` when `port` is 0.
async fn bind(ip: [u8; 4], port: u16) -> Option<TcpListener> {
    TcpListener::bind(SocketAddr::from((ip, port))).await.ok()
}

/// Two echoes on one port: `first` on 127.0.0.1 (its streams gated by
/// `gate`), `second` on 127.0.0.2.
async fn two_echoes(gate: &Arc<Semaphore>) -> (EchoUpstream, EchoUpstream, u16) {
    for _ in 0..20 {
        let first = bind([127, 0, 0, 1], 0).await.expect("bind first");
        let port = first.local_addr().expect("port").port();
        if let Some(second) = bind([127, 0, 0, 2], port).await {
            let first = EchoUpstream::start_with("first", first, StreamPace::Gate(gate.clone()))
                .expect("first echo");
            let second = EchoUpstream::start_with(
                "second",
                second,
                StreamPace::Every(Duration::from_millis(10)),
            )
            .expect("second echo");
            return (first, second, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// The shipped configuration, the eu pools at `http://inference.test:port`,
/// names resolved by `dns`.
fn config_with_named_eu_pools(ups: &Upstreams, port: u16, dns: SocketAddr) -> TestConfig {
    let mut config = TestConfig::shipped_with(ups);
    let mut pools: toml::Table = toml::from_str(&config.pools).expect("pools");
    for pool in pools["pool"].as_array_mut().expect("pools") {
        if pool["region"].as_str() == Some("eu") {
            pool["addresses"] = vec![format!("http://inference.test:{port}")].into();
        }
    }
    config.pools = toml::to_string(&pools).expect("pools");
    config.upstream = format!("dns_servers = [\"{dns}\"]\ndns_refresh_ms = 500\n");
    config
}

/// Sends a chat request as demo-api-eu-only (eu pools only); the pool name
/// the echo answered with.
async fn answered_by(c: &reqwest::Client, gw: &Gateway) -> String {
    let resp = support::send_as(c, &gw.api_url(CHAT), "demo-api-eu-only").await;
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("echo JSON");
    body["pool"].as_str().expect("pool").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_answer_moves_new_requests_and_a_stream_in_flight_finishes() {
    let gate = Arc::new(Semaphore::new(0));
    let (first, second, port) = two_echoes(&gate).await;
    let dns = TestDns::start(vec![Ipv4Addr::new(127, 0, 0, 1)]).await;
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&config_with_named_eu_pools(&ups, port, dns.addr));
    let c = client();
    assert_eq!(answered_by(&c, &gw).await, "first");

    // A stream through the first address, held after its first event.
    let mut stream = c
        .post(gw.api_url(CHAT))
        .bearer_auth("demo-api-eu-only")
        .header("accept", "text/event-stream")
        .body(r#"{"stream":true}"#)
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), 200);
    let mut received = String::new();
    while !received.contains("\"index\":0") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
            .await
            .expect("first event in time")
            .expect("read")
            .expect("more body");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(received.contains("\"pool\":\"first\""), "{received}");

    // The name moves: new requests follow within a few TTLs.
    dns.answer(vec![Ipv4Addr::new(127, 0, 0, 2)]);
    let moved = support::eventually_async(Duration::from_secs(10), || async {
        answered_by(&c, &gw).await == "second"
    })
    .await;
    assert!(
        moved,
        "requests never followed the new answer:\n{}",
        gw.logs()
    );
    for _ in 0..10 {
        assert_eq!(answered_by(&c, &gw).await, "second");
    }

    // The stream in flight on the old address was not dropped.
    gate.add_permits(STREAM_EVENTS);
    let rest = tokio::time::timeout(Duration::from_secs(10), stream.text())
        .await
        .expect("the stream ends")
        .expect("the rest of the stream");
    received.push_str(&rest);
    for index in 0..STREAM_EVENTS {
        assert!(
            received.contains(&format!("{{\"pool\":\"first\",\"index\":{index}}}")),
            "event {index} missing: {received}"
        );
    }
    assert!(received.contains("data: [DONE]"), "{received}");
    assert!(dns.queries() > 1, "the name was never re-resolved");
    assert!(second.requests().iter().all(|r| r.path == CHAT));
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_that_refuses_is_left_out_alone_and_its_sibling_serves() {
    let gate = Arc::new(Semaphore::new(0));
    let (_first, second, port) = two_echoes(&gate).await;
    // Nothing listens on 127.0.0.3.
    let dns = TestDns::start(vec![
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
    ])
    .await;
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&config_with_named_eu_pools(&ups, port, dns.addr));
    let c = client();
    for _ in 0..30 {
        assert_eq!(answered_by(&c, &gw).await, "second");
    }
    assert_eq!(second.requests().len(), 30);
    // The refusing address was tried (and ejected) at most a few times, not on every request.
    let refusals = gw.logs().matches("127.0.0.3").count();
    assert!(
        (1..=6).contains(&refusals),
        "{refusals} refusals:\n{}",
        gw.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_does_not_resolve_fails_check_with_its_file() {
    let dns = TestDns::start(vec![Ipv4Addr::new(127, 0, 0, 2)]).await;
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&config_with_named_eu_pools(&ups, 9, dns.addr));
    let pools = std::fs::read_to_string(gw.dir.path().join("pools.toml")).expect("pools");
    std::fs::write(
        gw.dir.path().join("pools.toml"),
        pools.replace("inference.test", "missing.test"),
    )
    .expect("write");
    let (ok, err) = gw.check();
    assert!(!ok);
    assert!(
        err.contains("pools.toml") && err.contains("missing.test"),
        "{err}"
    );
}
