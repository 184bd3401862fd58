//! HTTP/2 rapid reset (CVE-2023-44487) against the real gateway: a client
//! opens streams and cancels each at once, so that no concurrency limit
//! holds it back. The flood is bounded in count and time; the gateway's
//! resident memory is sampled from `/proc` throughout, and must stay within
//! a fixed bound and serve an ordinary request afterwards.

mod support;

use std::time::{Duration, Instant};

use support::{client, Gateway, TestConfig, Upstreams};

/// Streams opened and reset in all (bounded).
const STREAMS: usize = 20_000;
/// Longest the flood may run.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);
/// Resident growth allowed over the flood: a leak of even 4 KiB per reset
/// stream would pass 78 MiB.
const GROWTH_LIMIT_KIB: u64 = 64 * 1024;

/// Resident memory of process `pid` in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// What the flood did.
#[derive(Debug, Default)]
struct Flood {
    streams: usize,
    connections: usize,
    /// Connections the gateway ended (GOAWAY or reset) while flooded.
    cut_off: usize,
}

/// Opens connections to `addr` and on each sends request heads, cancelling
/// each stream at once, until `STREAMS` were sent or time is up.
async fn rapid_reset(addr: std::net::SocketAddr) -> Flood {
    let deadline = Instant::now() + FLOOD_LIMIT;
    let mut flood = Flood::default();
    while flood.streams < STREAMS && Instant::now() < deadline {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            break;
        };
        let Ok((h2, connection)) = h2::client::handshake(tcp).await else {
            break;
        };
        let mut h2 = Some(h2);
        flood.connections += 1;
        let driver = tokio::spawn(connection);
        loop {
            if flood.streams >= STREAMS || Instant::now() >= deadline {
                break;
            }
            let Some(sender) = h2.take() else { break };
            let ready = tokio::time::timeout(Duration::from_secs(5), sender.ready()).await;
            let Ok(Ok(mut sender)) = ready else {
                flood.cut_off += 1;
                break;
            };
            let request = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("authorization", "Bearer demo-chat-pro")
                .body(())
                .expect("request");
            match sender.send_request(request, false) {
                Ok((_, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    flood.streams += 1;
                    h2 = Some(sender);
                }
                Err(_) => {
                    flood.cut_off += 1;
                    break;
                }
            }
        }
        drop(h2);
        driver.abort();
    }
    flood
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rapid_reset_flood_keeps_memory_bounded_and_the_gateway_serving() {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.chat_listener = "h2c = true\n".into();
    let gw = Gateway::start(&config);
    // Warm up: connections, pools and allocator arenas exist before measuring.
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            support::post_as(&c, &gw.chat_url("/v1/chat/completions"), "demo-chat-pro").await,
            200
        );
    }
    let before = resident_kib(gw.pid());

    let pid = gw.pid();
    let sampler_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = sampler_stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(resident_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    });
    let started = Instant::now();
    let flood = rapid_reset(gw.chat).await;
    let took = started.elapsed();
    sampler_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.expect("sampler").max(resident_kib(pid));

    // Still serving, over HTTP/1.1 and HTTP/2.
    assert_eq!(
        support::post_as(&c, &gw.chat_url("/v1/chat/completions"), "demo-chat-pro").await,
        200
    );
    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    assert_eq!(
        support::post_as(&h2c, &gw.chat_url("/v1/chat/completions"), "demo-chat-pro").await,
        200
    );
    let after = resident_kib(pid);
    let forwarded = ups.all_requests().len();
    println!(
        "rapid reset: {} streams on {} connections ({} cut off by the gateway) in {took:?}; \
         resident {before} KiB before, peak {peak} KiB, {after} KiB after; {forwarded} requests reached upstreams",
        flood.streams, flood.connections, flood.cut_off
    );
    assert!(flood.streams >= 1000, "the flood did not run: {flood:?}");
    // The gateway ends a flooding connection (GOAWAY) rather than serving it on.
    assert!(
        flood.cut_off > 0,
        "no flooding connection was ended: {flood:?}"
    );
    assert!(
        peak.saturating_sub(before) < GROWTH_LIMIT_KIB,
        "resident memory grew from {before} KiB to {peak} KiB under {flood:?}"
    );
}
