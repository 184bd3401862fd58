//! One test (or more) per numbered finding of issue 8, each replaying the
//! finding with raw sockets and checking the answer and the upstream bytes.

use std::time::Duration;

use privacy_gateway::stamp::ADDRESS_HEADERS;

use crate::raw::{
    assert_nothing_forwarded, assert_sanitised, connect, exchange, metric, only_request, pool_host,
    post, read_reply, setup_with, trusting_the_client, upstream_text,
};
use crate::support::{self, CLIENT_V4};

const CHAT: &str = "/v1/chat/completions";

/// The list of spec §7 (e2), written out so that shortening
/// `ADDRESS_HEADERS` fails here.
const SPEC_ADDRESS_HEADERS: [&str; 18] = [
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "True-Client-IP",
    "CF-Connecting-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "X-Original-Forwarded-For",
    "Forwarded-For",
    "X-Forwarded",
    "X-Envoy-External-Address",
    "CloudFront-Viewer-Address",
    "X-Azure-ClientIP",
    "X-Azure-SocketIP",
    "Fastly-Client-IP",
    "CF-Connecting-IPv6",
    "CF-Pseudo-IPv4",
    "X-ProxyUser-Ip",
];

/// A distinct full address for the `i`th header (v4 and v6 alternately).
fn spoofed(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("198.51.100.{}", 10 + i)
    } else {
        format!("2001:db8:77:88::{:x}", 0xa0 + i)
    }
}

/// Every address header, each with its own full address, plus a configured one.
fn address_header_lines() -> (Vec<String>, Vec<String>) {
    let names: Vec<String> = SPEC_ADDRESS_HEADERS
        .iter()
        .map(|n| n.to_string())
        .chain(ADDRESS_HEADERS.iter().map(|n| n.to_string()))
        .chain(["X-Cdn-Client-Addr".to_string()])
        .collect();
    let lines = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n}: {}", spoofed(i)))
        .collect();
    let addresses = (0..names.len()).map(spoofed).collect();
    (lines, addresses)
}

fn strip_cdn_header(config: &mut support::TestConfig) {
    config
        .trust
        .push_str("strip_headers = [\"x-cdn-client-addr\"]\n");
}

// ---- 1. full client addresses in headers the gateway did not strip ----

#[tokio::test(flavor = "multi_thread")]
async fn f1_no_address_header_reaches_an_upstream_under_ip_opt_out() {
    let s = setup_with(strip_cdn_header).await;
    let (lines, addresses) = address_header_lines();
    let mut headers: Vec<&str> = lines.iter().map(String::as_str).collect();
    headers.push("Authorization: Bearer demo-chat-no-geo");
    let reply = exchange(s.gw.chat, &post(CHAT, &headers)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &[]);
    assert!(r.header("x-forwarded-for").is_none() && r.header("x-privacy-client-prefix").is_none());
    let bytes = upstream_text(&s.ups);
    for address in addresses
        .iter()
        .map(String::as_str)
        .chain([CLIENT_V4, "127.45.67"])
    {
        assert!(
            !bytes.contains(address),
            "{address} reached upstream:\n{bytes}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn f1_behind_a_trusted_proxy_only_the_truncated_address_goes_upstream() {
    let s = setup_with(|c| {
        trusting_the_client(c);
        strip_cdn_header(c);
    })
    .await;
    let (lines, addresses) = address_header_lines();
    // The first line is X-Forwarded-For: the client the trusted proxy names.
    assert!(lines[0].starts_with("X-Forwarded-For: 198.51.100.10"));
    let mut headers: Vec<&str> = lines.iter().map(String::as_str).collect();
    headers.push("Authorization: Bearer demo-chat-pro");
    let reply = exchange(s.gw.chat, &post(CHAT, &headers)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &[]);
    assert_eq!(r.header_values("x-forwarded-for"), vec!["198.51.100.0"]);
    let bytes = upstream_text(&s.ups);
    for address in &addresses {
        assert!(
            !bytes.contains(address.as_str()),
            "{address} reached upstream:\n{bytes}"
        );
    }
}

#[test]
fn f1_strip_headers_must_be_header_names_forwarding_does_not_need() {
    for (value, message) in [
        ("[\"host\"]", "is needed to forward a request"),
        ("[\"not a name\"]", "is not a header name"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["rules.toml", "pools.toml", "accounts.jsonl"] {
            std::fs::write(dir.path().join(name), support::shipped(name)).expect("write");
        }
        let gateway = support::shipped("gateway.toml")
            .replace("strip_headers = []", &format!("strip_headers = {value}"));
        std::fs::write(dir.path().join("gateway.toml"), gateway).expect("write");
        let out = std::process::Command::new(support::binary())
            .args(["check", "--config"])
            .arg(dir.path().join("gateway.toml"))
            .output()
            .expect("run check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{stderr}"
        );
    }
}

// ---- 2. underscore spellings ----

#[tokio::test(flavor = "multi_thread")]
async fn f2_underscore_names_are_dropped_before_the_decision_and_never_forwarded() {
    // Trusted, so that an underscore identity header would be believed if read.
    let s = setup_with(trusting_the_client).await;
    let spoof = [
        "x_privacy_training: allowed",
        "X_Privacy_Training_Basis: 3.4.3/default",
        "x_zero_data_retention: 0",
        "x_forwarded_for: 203.0.113.77",
        "x_authenticated_account: acct-chat-team-optin",
        "HTTP_X_PRIVACY_TRAINING: allowed",
        "x_client_ip: 198.51.100.23",
        "Sec_GPC: 0",
    ];
    let mut headers = spoof.to_vec();
    headers.push("Sec-GPC: 1");
    let reply = exchange(s.gw.chat, &post(CHAT, &headers)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &["sec-gpc"]);
    assert_eq!(r.header("x-privacy-account"), Some("anonymous"));
    assert_eq!(r.header("x-privacy-training"), Some("denied"));
    assert_eq!(r.header("x-privacy-training-basis"), Some("3.4.3/gpc"));
    let bytes = upstream_text(&s.ups).to_ascii_lowercase();
    for value in ["203.0.113.77", "198.51.100.23", "acct-chat-team-optin"] {
        assert!(!bytes.contains(value), "{value} reached upstream");
    }
}

// ---- 3. a path that reaches another capability than the one decided ----

#[tokio::test(flavor = "multi_thread")]
async fn f3_an_encoded_path_cannot_reach_another_capability() {
    let s = setup_with(|_| {}).await;
    for path in [
        "/v1/connectors/..%2F..%2Fv1%2Ffine_tuning%2Fjobs/content",
        "/v1/connectors/%2e%2e/content",
        "/v1/connectors/..;x/content",
        "/v1/connectors/a%5Cb/content",
        "/v1/connectors/a%252Fb/content",
        "/v1/connectors/a%00b/content",
        "/v1/chat/./completions",
        "/v1/chat/../chat/completions",
    ] {
        let reply = exchange(
            s.gw.api,
            &post(path, &["Authorization: Bearer demo-api-paid"]),
        )
        .await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (400, "invalid_path"),
            "{path}"
        );
    }
    let raw_nul = b"POST /v1/chat/\0completions HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n";
    let reply = exchange(s.gw.api, raw_nul).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_nothing_forwarded(&s.ups, "refused paths");
}

#[tokio::test(flavor = "multi_thread")]
async fn f3_the_matched_path_is_the_forwarded_path_and_the_query_is_kept() {
    let s = setup_with(|_| {}).await;
    let reply = exchange(
        s.gw.api,
        &post(
            "/v1/ch%61t/completions?stream=%2F..%00&x=1",
            &["Authorization: Bearer demo-api-paid"],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(
        &r,
        &pool_host(&s.ups, &pool),
        "/v1/chat/completions?stream=%2F..%00&x=1",
        &[],
    );
    assert!(upstream_text(&s.ups)
        .starts_with("POST /v1/chat/completions?stream=%2F..%00&x=1 HTTP/1.1\r\n"));
}

// ---- 5. the client's Host and request target ----

#[tokio::test(flavor = "multi_thread")]
async fn f5_the_pool_s_host_and_an_origin_form_target_go_upstream() {
    let s = setup_with(|_| {}).await;
    let absolute = b"POST http://finetune.internal/v1/chat/completions HTTP/1.1\r\nHost: finetune.internal\r\nAuthorization: Bearer demo-api-paid\r\nContent-Length: 2\r\n\r\n{}";
    let reply = exchange(s.gw.api, absolute).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(&r, &pool_host(&s.ups, &pool), CHAT, &[]);
    let bytes = upstream_text(&s.ups);
    assert!(
        bytes.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{bytes}"
    );
    assert!(!bytes.contains("finetune.internal"), "{bytes}");
}

#[tokio::test(flavor = "multi_thread")]
async fn f5_a_pool_s_configured_host_is_sent() {
    let s = setup_with(|c| {
        let mut pools: toml::Table = toml::from_str(&c.pools).expect("pools");
        for pool in pools["pool"].as_array_mut().expect("pools") {
            let name = pool["name"].as_str().expect("name").to_string();
            let table = pool.as_table_mut().expect("table");
            table.insert("host".into(), format!("{name}.inference.internal").into());
        }
        c.pools = toml::to_string(&pools).expect("pools");
    })
    .await;
    let request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: finetune.internal\r\nAuthorization: Bearer demo-api-paid\r\nContent-Length: 2\r\n\r\n{}";
    let reply = exchange(s.gw.api, request).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let (pool, r) = only_request(&s.ups);
    assert_sanitised(&r, &format!("{pool}.inference.internal"), CHAT, &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn f5_a_missing_or_invalid_host_is_a_400() {
    let s = setup_with(|_| {}).await;
    for (request, code) in [
        (
            &b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"[..],
            "missing_host",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}",
            "invalid_host",
        ),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: user@finetune.internal\r\nContent-Length: 2\r\n\r\n{}",
            "invalid_host",
        ),
        (
            b"POST http://finetune.internal/v1/chat/completions HTTP/1.1\r\nHost: other\r\nContent-Length: 2\r\n\r\n{}",
            "invalid_host",
        ),
    ] {
        let reply = exchange(s.gw.chat, request).await;
        assert_eq!((reply.status, reply.error_code()), (400, code.to_string()));
    }
    assert_nothing_forwarded(&s.ups, "requests without a valid Host");
}

// ---- 6. protocol upgrades ----

#[tokio::test(flavor = "multi_thread")]
async fn f6_protocol_upgrades_are_refused_on_inference_routes() {
    let s = setup_with(|_| {}).await;
    for upgrade in [
        &[
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        ][..],
        &[
            "Upgrade: h2c",
            "Connection: Upgrade, HTTP2-Settings",
            "HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
        ],
        &["upgrade: anything/1"],
    ] {
        let reply = exchange(s.gw.chat, &post(CHAT, upgrade)).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (400, "upgrade_not_allowed")
        );
        assert_ne!(reply.status, 101);
    }
    let get = b"GET /v1/chat/completions HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let reply = exchange(s.gw.chat, get).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_nothing_forwarded(&s.ups, "upgrade requests");
}

// ---- 7. Content-Length with Transfer-Encoding, duplicate Content-Length ----

#[tokio::test(flavor = "multi_thread")]
async fn f7_ambiguous_framing_is_a_400_before_anything_is_forwarded() {
    let s = setup_with(|_| {}).await;
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n";
    for (framing, body, code) in [
        (
            "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
            "2\r\n{}\r\n0\r\n\r\n",
            "ambiguous_length",
        ),
        (
            "Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
            "2\r\n{}\r\n0\r\n\r\n",
            "ambiguous_length",
        ),
        (
            "Content-Length: 2\r\nContent-Length: 2\r\n",
            "{}",
            "ambiguous_length",
        ),
        ("Content-Length: 2,2\r\n", "{}", "ambiguous_length"),
        ("Content-Length: 2, 2\r\n", "{}", "ambiguous_length"),
        (
            "Transfer-Encoding: gzip, chunked\r\n",
            "2\r\n{}\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "2\r\n{}\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
    ] {
        let request = format!("{head}{framing}\r\n{body}");
        let reply = exchange(s.gw.chat, request.as_bytes()).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (400, code),
            "{framing}"
        );
    }
    assert_nothing_forwarded(&s.ups, "ambiguous framing");
}

// ---- 8. repeated signals ----

#[tokio::test(flavor = "multi_thread")]
async fn f8_global_privacy_control_is_on_if_any_value_is_1() {
    let s = setup_with(|_| {}).await;
    for gpc in [
        &["Sec-GPC: 0", "Sec-GPC: 1"][..],
        &["Sec-GPC: 1, 1"],
        &["Sec-GPC: 0, 1"],
        &["Sec-GPC: 1", "Sec-GPC: 0"],
    ] {
        let reply = exchange(s.gw.chat, &post(CHAT, gpc)).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.echoed("x-privacy-training-basis").as_deref(),
            Some("3.4.3/gpc"),
            "{gpc:?}"
        );
        assert_eq!(
            reply.echoed("x-privacy-training").as_deref(),
            Some("denied")
        );
    }
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), 4);
    for (pool, r) in &requests {
        assert_sanitised(r, &pool_host(&s.ups, pool), CHAT, &["sec-gpc"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn f8_more_than_one_identity_or_key_is_refused() {
    let s = setup_with(trusting_the_client).await;
    for identity in [
        &[
            "x-authenticated-account: acct-chat-free",
            "x-authenticated-account: acct-chat-team-optin",
        ][..],
        &["x-authenticated-account: acct-chat-free, acct-chat-team-optin"],
        &[
            "x-authenticated-account: acct-chat-team-optin",
            "X-Authenticated-Account: acct-chat-team-optin",
        ],
    ] {
        let reply = exchange(s.gw.chat, &post(CHAT, identity)).await;
        assert_eq!(
            (reply.status, reply.error_code().as_str()),
            (400, "ambiguous_identity")
        );
    }
    let two_keys = [
        "Authorization: Bearer demo-api-zdr",
        "Authorization: Bearer demo-api-free",
    ];
    let reply = exchange(s.gw.api, &post(CHAT, &two_keys)).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (401, "malformed_authorization")
    );
    assert_nothing_forwarded(&s.ups, "ambiguous callers");
}

// ---- 10. what is rejected is visible ----

#[tokio::test(flavor = "multi_thread")]
async fn f10_refusals_are_counted_audited_and_logged_at_default_settings_without_error_lines() {
    // No RUST_LOG: the process's default log settings.
    let ups = support::Upstreams::start().await;
    let gw =
        support::Gateway::start_at_default_log_settings(&support::TestConfig::shipped_with(&ups));
    let s = crate::raw::Setup { gw, ups };
    let refused: [(&[u8], u16, &str); 6] = [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "ambiguous_length"),
        (b"GET / HTTP/1.2\r\nHost: g\r\n\r\n", 400, "malformed_request"),
        (b"GET /\r\n\r\n", 400, "malformed_request"),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405, "method_not_allowed"),
        (b"POST /v1/chat/%2e%2e/x HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n", 400, "invalid_path"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n", 400, "upgrade_not_allowed"),
    ];
    let mut ids = Vec::new();
    for (request, status, code) in refused {
        let reply = exchange(s.gw.chat, request).await;
        assert_eq!((reply.status, reply.error_code().as_str()), (status, code));
        ids.push((
            reply
                .header("x-privacy-decision-id")
                .unwrap_or_default()
                .to_string(),
            status,
            code,
        ));
    }
    // Clients that hang up: mid-head, mid-body, before reading the answer.
    for _ in 0..20 {
        for request in [
            &b"POST /v1/chat/completions HTTP/1.1\r\nHo"[..],
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\n{\"a\"",
            &post(CHAT, &[]),
        ] {
            let mut stream = connect(s.gw.chat).await;
            tokio::io::AsyncWriteExt::write_all(&mut stream, request)
                .await
                .expect("send");
            drop(stream);
        }
    }
    let reply = exchange(s.gw.chat, &post(CHAT, &[])).await;
    assert_eq!(reply.status, 200, "still serving");
    let all_written = support::eventually(Duration::from_secs(5), || {
        let audit = s.gw.audit_lines().join("\n");
        let logs = s.gw.logs();
        ids.iter()
            .all(|(id, _, _)| audit.contains(id.as_str()) && logs.contains(id.as_str()))
    })
    .await;
    assert!(
        all_written,
        "audit:\n{}\nlogs:\n{}",
        s.gw.audit_lines().join("\n"),
        s.gw.logs()
    );
    let audit = s.gw.audit_lines();
    for (id, status, code) in &ids {
        let line = audit
            .iter()
            .find(|l| l.contains(id.as_str()))
            .expect("audit line");
        let line: serde_json::Value = serde_json::from_str(line).expect("JSON audit line");
        assert_eq!(line["status"], *status);
        assert_eq!(line["error"], *code);
        let sample = format!("privacy_gateway_rejected_total{{reason=\"{code}\"}}");
        assert!(metric(&s.gw, &sample).await >= 1.0, "{sample}");
    }
    let logs = s.gw.logs();
    assert!(
        logs.contains("access"),
        "access lines at default settings:\n{logs}"
    );
    assert!(
        !logs.contains("ERROR"),
        "client hang-ups logged as errors:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn f10_a_keep_alive_connection_serves_requests_one_after_another() {
    // The listener reads heads itself; a kept-alive connection must go on working.
    let s = setup_with(|_| {}).await;
    let mut stream = connect(s.gw.chat).await;
    for _ in 0..3 {
        tokio::io::AsyncWriteExt::write_all(&mut stream, &post(CHAT, &[]))
            .await
            .expect("send");
        let reply = read_reply(&mut stream).await.expect("an answer");
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    let requests = s.ups.all_requests();
    assert_eq!(requests.len(), 3);
    for (pool, r) in &requests {
        assert_sanitised(r, &pool_host(&s.ups, pool), CHAT, &[]);
    }
}
