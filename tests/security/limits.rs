//! What a connection may cost (finding 4): slowloris heads, idle
//! connections, the connection limit, oversized heads, slow and large
//! bodies. Loads are a few hundred connections, bounded in time; timings
//! are asserted only as "cut, and not before the limit".

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{
    assert_sanitised, connect, exchange, metric, pool_host, post, read_reply, setup_with,
    until_closed, Setup,
};
use crate::support;

const CHAT: &str = "/v1/chat/completions";

async fn with_limits(limits: &str) -> Setup {
    let limits = limits.to_string();
    setup_with(move |c| {
        c.extra_tables.push_str("[limits]\n");
        c.extra_tables.push_str(&limits);
    })
    .await
}

/// The `connections_open` gauge of the chat listener.
async fn open_connections(s: &Setup) -> f64 {
    let sample = format!(
        "privacy_gateway_connections_open{{listener=\"{}\"}}",
        s.gw.chat
    );
    metric(&s.gw, &sample).await
}

/// Waits (bounded) until the chat listener holds exactly `n` connections.
async fn until_open(s: &Setup, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_connections(s).await != n {
        assert!(
            Instant::now() < deadline,
            "expected {n} open connections, have {}",
            open_connections(s).await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits (bounded) until `sample` reaches `n`: metrics are written just
/// after the client has its answer.
async fn counted(s: &Setup, sample: &str, n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s.gw, sample).await < n as f64 {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

/// A slowloris client: a request line, then a header a byte every 200 ms,
/// until the gateway answers or closes (at most 12 s). Returns when it was
/// cut and what it got.
async fn slowloris(addr: std::net::SocketAddr) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut stream = connect(addr).await;
    let _ = stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-Slow: ")
        .await;
    let mut got = Vec::new();
    while started.elapsed() < Duration::from_secs(12) {
        let mut buf = [0u8; 1024];
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stream.write_all(b"a").await.is_err() {
                    break;
                }
            }
        }
    }
    (started.elapsed(), got)
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_heads_are_cut_at_the_header_deadline_while_a_normal_client_is_answered() {
    let s = with_limits("header_timeout_ms = 2000\nkeepalive_timeout_ms = 2000\n").await;
    const SLOW: usize = 200;
    let clients: Vec<_> = (0..SLOW)
        .map(|_| tokio::spawn(slowloris(s.gw.chat)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reply = exchange(s.gw.chat, &post(CHAT, &[])).await;
    assert_eq!(
        reply.status, 200,
        "a normal client during the attack: {reply:?}"
    );
    let mut timed_out = 0;
    for client in clients {
        let (after, got) = client.await.expect("slowloris task");
        let text = String::from_utf8_lossy(&got);
        assert!(
            after < Duration::from_secs(12),
            "a slowloris head was never cut"
        );
        assert!(
            after >= Duration::from_millis(1900),
            "cut before the deadline: {after:?}"
        );
        if text.starts_with("HTTP/1.1 408") && text.contains("\"header_timeout\"") {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, SLOW, "each slow head is answered 408");
    let sample = "privacy_gateway_rejected_total{reason=\"header_timeout\"}";
    assert!(counted(&s, sample, SLOW).await, "{sample}");
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), 1, "only the normal request went upstream");
    assert_sanitised(
        &requests[0].1,
        &pool_host(&s.ups, &requests[0].0),
        CHAT,
        &[],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_at_their_timeouts_while_a_normal_client_is_answered() {
    let s = with_limits("header_timeout_ms = 1500\nkeepalive_timeout_ms = 1500\n").await;
    const EACH: usize = 150;
    let started = Instant::now();
    // Silent from the start, and silent after one request (kept alive).
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..EACH {
        idle.push(connect(s.gw.chat).await);
    }
    let kept_since = Instant::now();
    for _ in 0..EACH {
        let mut stream = connect(s.gw.chat).await;
        stream.write_all(&post(CHAT, &[])).await.expect("send");
        let reply = read_reply(&mut stream).await.expect("an answer");
        assert_eq!(reply.status, 200);
        idle.push(stream);
    }
    let reply = exchange(s.gw.chat, &post(CHAT, &[])).await;
    assert_eq!(reply.status, 200, "a normal client beside them");
    for (i, stream) in idle.iter_mut().enumerate() {
        let closed = until_closed(stream, Duration::from_secs(10)).await;
        assert_eq!(closed, Some(Vec::new()), "connection {i} closed silently");
    }
    let elapsed = started.elapsed();
    assert!(
        kept_since.elapsed() >= Duration::from_millis(1400),
        "{elapsed:?}"
    );
    let sample = "privacy_gateway_connections_closed_total{reason=\"idle_timeout\"}";
    assert!(counted(&s, sample, 2 * EACH).await, "{sample}");
    until_open(&s, 0.0).await;
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), EACH + 1);
    for (pool, r) in &requests {
        assert_sanitised(r, &pool_host(&s.ups, pool), CHAT, &[]);
    }
}

/// A request whose body is still arriving: the head and one byte sent.
async fn busy_upload(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = connect(addr).await;
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n\r\n{")
        .await
        .expect("send");
    stream
}

/// Finishes a [`busy_upload`] and reads its answer.
async fn finish_upload(stream: &mut TcpStream) -> u16 {
    stream.write_all(b"}").await.expect("send the rest");
    read_reply(stream).await.map_or(0, |r| r.status)
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_max_connections_idle_ones_are_shed_and_work_in_progress_is_unharmed() {
    let s = with_limits(
        "max_connections = 40\nheader_timeout_ms = 30000\nkeepalive_timeout_ms = 30000\nbody_timeout_ms = 30000\n",
    )
    .await;
    let mut busy = Vec::new();
    for _ in 0..10 {
        busy.push(busy_upload(s.gw.chat).await);
    }
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(connect(s.gw.chat).await);
    }
    until_open(&s, 40.0).await;
    // Ten more clients, each kept open after its answer: each sheds one idle connection.
    let mut kept = Vec::new();
    for _ in 0..10 {
        let mut stream = connect(s.gw.chat).await;
        stream.write_all(&post(CHAT, &[])).await.expect("send");
        let reply = read_reply(&mut stream).await.expect("an answer");
        assert_eq!(reply.status, 200, "{reply:?}");
        kept.push(stream);
    }
    let mut shed = 0;
    for stream in &mut idle {
        if until_closed(stream, Duration::from_millis(300))
            .await
            .is_some()
        {
            shed += 1;
        }
    }
    assert_eq!(shed, 10, "the ten longest-idle connections were shed");
    let sample = "privacy_gateway_connections_closed_total{reason=\"shed\"}";
    assert_eq!(metric(&s.gw, sample).await, 10.0);
    for stream in &mut busy {
        assert_eq!(
            finish_upload(stream).await,
            200,
            "work in progress unharmed"
        );
    }
    drop((busy, idle, kept));
    until_open(&s, 0.0).await;

    // Full of work in progress: a new connection is refused, the work goes on.
    let mut busy = Vec::new();
    for _ in 0..40 {
        busy.push(busy_upload(s.gw.chat).await);
    }
    until_open(&s, 40.0).await;
    let reply = exchange(s.gw.chat, &post(CHAT, &[])).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (503, "too_many_connections")
    );
    for stream in &mut busy {
        assert_eq!(finish_upload(stream).await, 200);
    }
    let sample = "privacy_gateway_rejected_total{reason=\"too_many_connections\"}";
    assert_eq!(metric(&s.gw, sample).await, 1.0);
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), 10 + 10 + 40);
    for (pool, r) in &requests {
        assert_sanitised(r, &pool_host(&s.ups, pool), CHAT, &[]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn heads_over_the_size_limit_are_431_on_every_connection_at_once() {
    let s = with_limits("max_header_bytes = 32768\n").await;
    let big = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(40_000)
    );
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let (addr, big) = (s.gw.chat, big.clone());
            tokio::spawn(async move { exchange(addr, big.as_bytes()).await })
        })
        .collect();
    for client in clients {
        let reply = client.await.expect("client task");
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (431, "header_too_large")
        );
    }
    // Just under the limit is served.
    let fits = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(30_000)
    );
    let reply = exchange(s.gw.chat, fits.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), 1);
    assert_sanitised(
        &requests[0].1,
        &pool_host(&s.ups, &requests[0].0),
        CHAT,
        &["x-big"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_body_is_408_and_a_large_one_413() {
    let s = with_limits("body_timeout_ms = 1000\nmax_body_bytes = 100\n").await;
    let mut stream = busy_upload(s.gw.chat).await;
    let reply = read_reply(&mut stream).await.expect("an answer");
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (408, "body_timeout")
    );

    let declared = b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 101\r\n\r\n";
    let reply = exchange(s.gw.chat, declared).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (413, "body_too_large")
    );

    let mut stream = connect(s.gw.chat).await;
    stream
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n5a\r\n")
        .await
        .expect("send");
    stream.write_all(&[b'a'; 90]).await.expect("send");
    stream.write_all(b"\r\n").await.expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stream.write_all(b"3c\r\n").await;
    let _ = stream.write_all(&[b'Z'; 60]).await;
    let _ = stream.write_all(b"\r\n0\r\n\r\n").await;
    let reply = read_reply(&mut stream).await.expect("an answer");
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (413, "body_too_large")
    );
    // Streamed bodies reach the upstream up to the limit, never past it.
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(!bytes.contains('Z'), "{bytes}");
    for (pool, r) in s.ups.all_requests() {
        assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &["transfer-encoding"]);
    }
    let audited =
        support::eventually(Duration::from_secs(5), || s.gw.audit_lines().len() >= 3).await;
    assert!(audited, "each refusal audited: {:?}", s.gw.audit_lines());
}
