//! Where a request may go (spec §4), through the real proxy: purpose,
//! subprocessor opt-outs, residency and zdr remove pools, an empty candidate
//! set is a 451, the EU tier serves while it is up (the US tier only as a
//! counted exception), and failing pools are retried only among the
//! permitted ones (503 when none is left).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use privacy_gateway::echo::{EchoUpstream, StreamPace};

use reqwest::StatusCode;
use support::{client, ClosedPort, Gateway, TestConfig, Upstreams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = "/v1/chat/completions";

/// Sends `n` chat requests as `key` on the api listener; returns the statuses.
async fn send_chat(gw: &Gateway, key: &str, n: usize) -> Vec<StatusCode> {
    let c = client();
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        statuses.push(support::post_as(&c, &gw.api_url(CHAT), key).await);
    }
    statuses
}

fn per_pool(ups: &Upstreams) -> HashMap<String, usize> {
    ups.echoes
        .iter()
        .map(|(name, e)| (name.clone(), e.requests().len()))
        .collect()
}

/// A gateway whose EU pools point at ports nobody listens on (closed while
/// the returned `ClosedPort` lives), the other pools at their echoes.
async fn eu_pools_on_closed_ports() -> (Upstreams, Gateway, ClosedPort) {
    let ups = Upstreams::start().await;
    let closed = ClosedPort::new();
    let mut addresses = ups.addresses();
    for pool in ["azure-sweden", "gcp-ireland"] {
        addresses.insert(pool.into(), vec![closed.url()]);
    }
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::pools_with_addresses(&addresses);
    let gw = Gateway::start(&config);
    (ups, gw, closed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subprocessor_opt_out_is_never_routed_to() {
    // The opted-out subprocessor (cerebras) is in the US tier: point the EU
    // pools at closed ports so that tier serves, and cerebras is the only
    // other pool there.
    let (ups, gw, _closed) = eu_pools_on_closed_ports().await;
    let statuses = send_chat(&gw, "demo-api-no-cerebras", 200).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = per_pool(&ups);
    assert_eq!(
        counts["cerebras"], 0,
        "an opted-out subprocessor got traffic: {counts:?}"
    );
    assert_eq!(counts["gcp-us"], 200, "{counts:?}");

    // A plain paid account does reach cerebras, by weight.
    let statuses = send_chat(&gw, "demo-api-paid", 100).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert!(
        per_pool(&ups)["cerebras"] > 0,
        "cerebras never chosen for a paid account"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn eu_residency_stays_in_the_eu_and_stamps_the_pool_used() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let statuses = send_chat(&gw, "demo-api-eu-only", 60).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    for (pool, r) in ups.all_requests() {
        assert!(
            pool == "azure-sweden" || pool == "gcp-ireland",
            "eu-only request reached {pool}"
        );
        assert_eq!(r.header("x-privacy-pool"), Some(pool.as_str()));
    }
    let counts = per_pool(&ups);
    assert!(
        counts["azure-sweden"] > 0 && counts["gcp-ireland"] > 0,
        "both eu pools share the load: {counts:?}"
    );
}

/// Sends `POST path` as `key` on the api listener and expects a 451 naming
/// `capability` and exactly `constraints`, with nothing forwarded anywhere.
async fn assert_no_permitted_route(
    gw: &Gateway,
    ups: &Upstreams,
    path: &str,
    key: &str,
    capability: &str,
    constraints: &[&str],
) {
    let before = ups.all_requests().len();
    let resp = client()
        .post(gw.api_url(path))
        .bearer_auth(key)
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "no_permitted_route", "{body}");
    assert_eq!(body["error"]["capability"], capability, "{body}");
    assert_eq!(
        body["error"]["constraints"],
        serde_json::json!(constraints),
        "{body}"
    );
    assert_eq!(
        ups.all_requests().len(),
        before,
        "{key} {path} was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_permitted_pool_at_all_is_a_451_naming_capability_and_constraint() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    assert_no_permitted_route(
        &gw,
        &ups,
        "/v1/images/generations",
        "demo-api-eu-only",
        "image_generation",
        &["7/residency"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_permitted_pool_is_down_it_is_a_503_and_never_a_forbidden_pool() {
    let (ups, gw, _closed) = eu_pools_on_closed_ports().await;

    let statuses = send_chat(&gw, "demo-api-eu-only", 20).await;
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(
        ups.all_requests().is_empty(),
        "an eu-only request reached a us pool"
    );

    let resp = client()
        .post(gw.api_url(CHAT))
        .bearer_auth("demo-api-eu-only")
        .body("{}")
        .send()
        .await
        .expect("request");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "permitted_pools_unavailable");
    assert_eq!(body["error"]["capability"], "chat");
    assert_eq!(
        body["error"]["constraints"],
        serde_json::json!(["7/residency"])
    );

    // Other accounts fail over to the pools that are up, without a visible error.
    let statuses = send_chat(&gw, "demo-api-paid", 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    for (pool, r) in ups.all_requests() {
        assert!(pool == "gcp-us" || pool == "cerebras", "{pool}");
        assert_eq!(
            r.header("x-privacy-pool"),
            Some(pool.as_str()),
            "the stamped pool is the one that answered"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_is_retried_on_another_permitted_address() {
    let ups = Upstreams::start().await;
    let mut addresses = ups.addresses();
    let closed = ClosedPort::new();
    let dead = closed.url();
    // azure-sweden: one dead address and the live echo; gcp-ireland: dead only.
    addresses.insert(
        "azure-sweden".into(),
        vec![dead.clone(), ups.pool("azure-sweden").url()],
    );
    addresses.insert("gcp-ireland".into(), vec![dead]);
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::pools_with_addresses(&addresses);
    let gw = Gateway::start(&config);

    let statuses = send_chat(&gw, "demo-api-eu-only", 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let all = ups.all_requests();
    assert_eq!(all.len(), 20);
    for (pool, r) in all {
        assert_eq!(pool, "azure-sweden");
        assert_eq!(r.header("x-privacy-pool"), Some("azure-sweden"));
        assert_eq!(r.header("x-privacy-subprocessor"), Some("azure"));
    }
}

/// An upstream that answers the first request on each connection and resets
/// the connection as soon as a second request starts arriving on it: a
/// pooled connection the upstream closed (keep-alive timeout, restart) just
/// as the gateway picked it again.
struct ResetsReusedConnections {
    addr: std::net::SocketAddr,
    answered: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ResetsReusedConnections {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (answered, resets) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, r) = (answered.clone(), resets.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Self::serve(stream, a.clone(), r.clone()));
            }
        });
        ResetsReusedConnections {
            addr,
            answered,
            resets,
            task,
        }
    }

    async fn serve(mut stream: TcpStream, answered: Arc<AtomicUsize>, resets: Arc<AtomicUsize>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // The first request: its head, then as many body bytes as it declares.
        let (head_end, length) = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (i + 4, length);
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        while buf.len() < head_end + length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(answer).await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        // The first byte of a second request: reset, unanswered.
        if let Ok(n) = stream.read(&mut chunk).await {
            if n > 0 {
                resets.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_zero_linger();
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ResetsReusedConnections {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_post_on_a_pooled_connection_the_upstream_reset_is_sent_again_on_a_fresh_one() {
    let upstream = ResetsReusedConnections::start().await;
    let addresses: HashMap<String, Vec<String>> = support::shipped_pool_names()
        .into_iter()
        .map(|pool| (pool, vec![upstream.url()]))
        .collect();
    let config = TestConfig::shipped_with_pools(support::pools_with_addresses(&addresses));
    let gw = Gateway::start(&config);
    let requests = 30;
    let statuses = send_chat(&gw, "demo-api-paid", requests).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    // Every request was answered once; each after the first found its
    // pooled connection reset and was sent again on a new one.
    assert_eq!(upstream.answered.load(Ordering::SeqCst), requests);
    let resets = upstream.resets.load(Ordering::SeqCst);
    assert!(
        resets >= requests / 2,
        "pooled connections were not reused: {resets} resets"
    );
}

/// Within `tolerance` of `expected`.
fn near(actual: usize, expected: usize, tolerance: usize) -> bool {
    actual.abs_diff(expected) <= tolerance
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_and_the_addresses_inside_a_pool_share_traffic_by_weight() {
    let ups = Upstreams::start().await;
    let second = EchoUpstream::start("azure-sweden")
        .await
        .expect("second azure echo");
    // azure-sweden (pool weight 2) gets two addresses weighted 3:1.
    let mut pools: toml::Table =
        toml::from_str(&support::pools_with_addresses(&ups.addresses())).expect("pools");
    for pool in pools["pool"].as_array_mut().expect("pools") {
        if pool["name"].as_str() == Some("azure-sweden") {
            let weighted: toml::Value = toml::from_str::<toml::Table>(&format!(
                "a = [{{ url = \"{}\", weight = 3 }}, {{ url = \"{}\", weight = 1 }}]",
                ups.pool("azure-sweden").url(),
                second.url()
            ))
            .expect("weighted addresses")["a"]
                .clone();
            pool["addresses"] = weighted;
        }
    }
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = toml::to_string(&pools).expect("pools");
    let gw = Gateway::start(&config);

    let statuses = send_chat(&gw, "demo-api-paid", 600).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = per_pool(&ups);
    let azure = counts["azure-sweden"] + second.requests().len();
    // Only the EU tier serves while it is up (spec §4, EU first): pool
    // weights 2:1 over 600 requests; addresses 3:1 inside azure-sweden.
    assert!(near(azure, 400, 10), "azure-sweden {azure}: {counts:?}");
    assert!(near(counts["gcp-ireland"], 200, 10), "{counts:?}");
    for pool in ["gcp-us", "cerebras"] {
        assert_eq!(counts[pool], 0, "{pool} is a higher tier: {counts:?}");
    }
    assert!(
        near(counts["azure-sweden"], 300, 10) && near(second.requests().len(), 100, 10),
        "{counts:?} second {}",
        second.requests().len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_pools_fail_closed_for_eu_only_and_over_for_others_and_return_after_health_checks() {
    let mut ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::with_health_checks(&config.pools, 100);
    // A refused connect alone keeps an address out for a minute: only a
    // passing active check can bring it back within this test.
    config.ejection_ms = 60_000;
    let gw = Gateway::start(&config);
    let c = client();

    for key in ["demo-api-eu-only", "demo-api-paid"] {
        assert_eq!(
            support::post_as(&c, &gw.api_url(CHAT), key).await,
            StatusCode::OK
        );
    }

    // Kill both eu pools' servers mid-run.
    let eu = ["azure-sweden", "gcp-ireland"];
    let eu_addrs: Vec<_> = eu.iter().map(|p| ups.pool(p).addr()).collect();
    for pool in eu {
        ups.stop(pool).await;
    }
    for _ in 0..30 {
        assert_eq!(
            support::post_as(&c, &gw.api_url(CHAT), "demo-api-eu-only").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            support::post_as(&c, &gw.api_url(CHAT), "demo-api-paid").await,
            StatusCode::OK,
            "failover must be invisible"
        );
    }
    for (pool, r) in ups.all_requests() {
        if r.header("x-privacy-account") == Some("acct-api-eu-only") {
            panic!("an eu-only request reached {pool}");
        }
    }

    // Restart them on the same addresses: traffic returns once checks pass.
    for (pool, addr) in eu.iter().zip(eu_addrs) {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        let echo =
            EchoUpstream::start_with(pool, listener, StreamPace::Every(Duration::from_millis(10)))
                .expect("restart");
        ups.echoes.insert(pool.to_string(), echo);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::post_as(&c, &gw.api_url(CHAT), "demo-api-eu-only").await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "eu pools did not come back after health checks"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let statuses = send_chat(&gw, "demo-api-eu-only", 20).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let back: usize = eu.iter().map(|p| ups.pool(p).requests().len()).sum();
    assert!(back >= 20, "eu pools received {back} after the restart");
}

/// The pool and the audit line of each request, in order.
async fn audited(gw: &Gateway, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    assert!(
        support::eventually(Duration::from_secs(5), || {
            lines = support::audit_json(gw);
            lines.len() >= n
        })
        .await,
        "{} audit lines, expected {n}",
        lines.len()
    );
    lines
}

#[tokio::test(flavor = "multi_thread")]
async fn route_6_purpose_api_code_interpreter_is_a_451_and_le_chat_reaches_e2b() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    assert_no_permitted_route(
        &gw,
        &ups,
        "/v1/tools/code_interpreter",
        "demo-api-paid",
        "code_interpreter",
        &["6/purpose"],
    )
    .await;
    // Le Chat's code interpreter is what E2B is engaged for.
    let (pool, _) = support::forward(
        &ups,
        &gw.chat_url("/v1/tools/code_interpreter"),
        Some("demo-chat-pro"),
        &[],
    )
    .await;
    assert_eq!(pool, "e2b");
    // The two listeners write their audit lines each from its own thread:
    // the refused API request's line is found by its account, not its place.
    let lines = audited(&gw, 2).await;
    let refused = lines
        .iter()
        .find(|l| l["account"] == "acct-api-paid")
        .unwrap_or_else(|| panic!("no audit line of the API request: {lines:?}"));
    assert_eq!(
        refused["removed_pools"],
        serde_json::json!([{ "pool": "e2b", "basis": "6/purpose" }])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn route_5_zdr_image_generation_is_a_451_and_never_reaches_black_forest_labs() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    for key in ["demo-api-zdr", "demo-api-free-zdr"] {
        assert_no_permitted_route(
            &gw,
            &ups,
            "/v1/images/generations",
            key,
            "image_generation",
            &["5/zdr"],
        )
        .await;
    }
    assert!(
        ups.pool("black-forest-labs").requests().is_empty(),
        "a zdr request reached a pool that keeps input for 15 days"
    );
    // Without zdr, image generation goes there; zdr chat is untouched.
    let (pool, _) = support::forward(
        &ups,
        &gw.api_url("/v1/images/generations"),
        Some("demo-api-paid"),
        &[],
    )
    .await;
    assert_eq!(pool, "black-forest-labs");
    let (_, r) = support::forward(&ups, &gw.api_url(CHAT), Some("demo-api-zdr"), &[]).await;
    assert_eq!(r.header("x-privacy-retention"), Some("zdr"));
}

#[tokio::test(flavor = "multi_thread")]
async fn route_7_eu_first_an_unconstrained_account_stays_in_the_eu_while_it_is_up() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let statuses = send_chat(&gw, "demo-api-paid", 200).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = per_pool(&ups);
    assert_eq!(counts["gcp-us"] + counts["cerebras"], 0, "{counts:?}");
    assert_eq!(counts["azure-sweden"] + counts["gcp-ireland"], 200);
    for line in audited(&gw, 200).await {
        assert_eq!(line["tier"], 0, "{line}");
        assert!(line.get("tier_basis").is_none(), "{line}");
    }
}

/// Requests of `acct-api-paid` per pool (health checks left out).
fn paid_per_pool(ups: &Upstreams) -> HashMap<String, usize> {
    ups.echoes
        .iter()
        .map(|(name, e)| {
            let paid = e
                .requests()
                .iter()
                .filter(|r| r.header("x-privacy-account") == Some("acct-api-paid"))
                .count();
            (name.clone(), paid)
        })
        .collect()
}

/// `privacy_gateway_eu_first_exceptions_total{capability="chat"}`, once it
/// reaches `at_least` (metrics are counted just after the client has its
/// answer) or after a bounded wait.
async fn eu_first_exceptions(gw: &Gateway, at_least: f64) -> f64 {
    let series = r#"privacy_gateway_eu_first_exceptions_total{capability="chat"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = support::metric(&gw.admin_get("/metrics").await.1, series);
        if value >= at_least || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn route_7_eu_first_us_tier_serves_only_while_the_eu_pools_are_down_and_is_counted() {
    let mut ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::with_health_checks(&config.pools, 100);
    config.ejection_ms = 60_000;
    let gw = Gateway::start(&config);
    // Up: the EU tier serves, no exception.
    let statuses = send_chat(&gw, "demo-api-paid", 10).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = paid_per_pool(&ups);
    assert_eq!(counts["azure-sweden"] + counts["gcp-ireland"], 10);

    // Both EU pools' servers go away: the US tier serves, each request an exception.
    let eu = ["azure-sweden", "gcp-ireland"];
    let eu_addrs: Vec<_> = eu.iter().map(|p| ups.pool(p).addr()).collect();
    for pool in eu {
        ups.stop(pool).await;
    }
    let statuses = send_chat(&gw, "demo-api-paid", 30).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let counts = paid_per_pool(&ups);
    assert_eq!(counts["gcp-us"] + counts["cerebras"], 30, "{counts:?}");
    let lines = audited(&gw, 40).await;
    for line in &lines[10..40] {
        assert_eq!(line["tier"], 1, "{line}");
        assert_eq!(line["tier_basis"], "7/eu-first-exception", "{line}");
        assert!(
            line["pool"] == "gcp-us" || line["pool"] == "cerebras",
            "{line}"
        );
    }
    assert_eq!(eu_first_exceptions(&gw, 30.0).await, 30.0);
    // /readyz names what is now served only as an exception, beside what
    // is not served at all (the capabilities only EU pools offer).
    let (status, body) = gw.admin_get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(status, 503, "{ready}");
    assert_eq!(
        ready["capabilities_on_exception_tier"],
        serde_json::json!(["chat", "embeddings"]),
        "{ready}"
    );
    assert_eq!(
        ready["capabilities_without_healthy_pool"],
        serde_json::json!(["fine_tuning", "feedback", "connector"]),
        "{ready}"
    );

    // Back on the same addresses: once checks pass, the EU tier serves again.
    for (pool, addr) in eu.iter().zip(eu_addrs) {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
        let echo =
            EchoUpstream::start_with(pool, listener, StreamPace::Every(Duration::from_millis(10)))
                .expect("restart");
        ups.echoes.insert(pool.to_string(), echo);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let eu_count =
            |ups: &Upstreams| -> usize { eu.iter().map(|p| paid_per_pool(ups)[*p]).sum() };
        let before = eu_count(&ups);
        assert_eq!(
            support::post_as(&client(), &gw.api_url(CHAT), "demo-api-paid").await,
            StatusCode::OK
        );
        let after = eu_count(&ups);
        if after > before {
            break;
        }
        assert!(Instant::now() < deadline, "the EU tier did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = gw.admin_get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(
        ready["capabilities_on_exception_tier"],
        serde_json::json!([]),
        "{ready}"
    );
    let counts = paid_per_pool(&ups);
    let us_before = counts["gcp-us"] + counts["cerebras"];
    let eu_before = counts["azure-sweden"] + counts["gcp-ireland"];
    let audited_before = support::audit_json(&gw).len();
    let counted_before = eu_first_exceptions(&gw, 0.0).await;
    let statuses = send_chat(&gw, "demo-api-paid", 20).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = paid_per_pool(&ups);
    assert_eq!(
        counts["gcp-us"] + counts["cerebras"],
        us_before,
        "{counts:?}"
    );
    assert_eq!(
        counts["azure-sweden"] + counts["gcp-ireland"],
        eu_before + 20,
        "{counts:?}"
    );
    let lines = audited(&gw, audited_before + 20).await;
    assert!(lines[lines.len() - 20..]
        .iter()
        .all(|l| l["tier"] == 0 && l.get("tier_basis").is_none()));
    assert_eq!(
        eu_first_exceptions(&gw, 0.0).await,
        counted_before,
        "no exception while the EU is up"
    );
}
