//! Explaining decisions: `explain` agrees byte for byte with what upstreams
//! receive; the audit log, shadow rules, Prometheus metrics and health
//! endpoints report what happened. (Every gateway these tests start also
//! fails its test if a log or audit line holds a full client address.)

mod support;

use std::process::Command;

use privacy_gateway::echo::Recorded;
use reqwest::StatusCode;
use support::{client, shipped, Gateway, TestConfig, Upstreams, CLIENT_V4};

const ROUTES: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fine_tuning/jobs",
    "/v1/feedback",
    "/v1/images/generations",
    "/v1/tools/web_search",
    "/v1/tools/code_interpreter",
    "/v1/connectors/drive/content",
];

/// Every demo API key of the shipped accounts file.
fn demo_keys() -> Vec<String> {
    shipped("accounts.jsonl")
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("account line");
            format!("demo-{}", &v["id"].as_str().expect("id")["acct-".len()..])
        })
        .collect()
}

/// The headers of the contract, as an upstream received them.
fn stamped(r: &Recorded) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(n, _)| {
            n.starts_with("x-privacy-") || n == "x-zero-data-retention" || n == "x-forwarded-for"
        })
        .cloned()
        .collect()
}

/// The headers `explain` says it would stamp, in its order.
fn explained_headers(explained: &serde_json::Value) -> Vec<(String, String)> {
    explained["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(n, v)| (n.clone(), v.as_str().expect("string").to_string()))
        .collect()
}

fn explain(gw: &Gateway, args: &[&str]) -> serde_json::Value {
    let out = Command::new(support::binary())
        .arg("explain")
        .arg("--config")
        .arg(gw.dir.path().join("gateway.toml"))
        .args(args)
        .output()
        .expect("run explain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain prints JSON")
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_agrees_with_the_proxy_for_every_demo_account_and_route() {
    let (ups, gw) =
        support::start_with(|c| c.sign_with(b"explain-test-signing-key-0123456789")).await;
    let c = client();
    let mut compared = 0;
    let mut decision_ids = Vec::new();
    let mut explanations = std::collections::HashMap::new();
    let mut callers: Vec<Option<String>> = demo_keys().into_iter().map(Some).collect();
    callers.push(None);
    for caller in &callers {
        for route in ROUTES {
            let listener = if caller.as_deref().is_some_and(|k| k.starts_with("demo-api")) {
                "api"
            } else {
                "chat"
            };
            let url = if listener == "api" {
                gw.api_url(route)
            } else {
                gw.chat_url(route)
            };
            let mut req = c.post(url).body("{}");
            let mut args = vec![
                "--path",
                route,
                "--client-ip",
                CLIENT_V4,
                "--listener",
                listener,
            ];
            let auth;
            if let Some(key) = caller {
                req = req.bearer_auth(key);
                auth = format!("Authorization: Bearer {key}");
                args.extend(["--header", auth.as_str()]);
            }
            let before = ups.all_requests().len();
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            let id = resp.headers()["x-privacy-decision-id"]
                .to_str()
                .expect("id")
                .to_string();
            args.extend(["--decision-id", id.as_str()]);
            let all = ups.all_requests();
            let what = format!("{caller:?} {route}");
            decision_ids.push(id.clone());
            let explained = if status == 200 {
                assert_eq!(all.len(), before + 1, "{what}");
                let (pool, received) = ups.by_decision(&id).expect("the forwarded request");
                args.extend(["--pool", pool.as_str()]);
                let explained = explain(&gw, &args);
                let received = &received;
                assert_eq!(explained["status"], 200, "{what}");
                assert_eq!(explained["pool"], pool.as_str(), "{what}");
                // Same names, values and order, signature included.
                assert_eq!(explained_headers(&explained), stamped(received), "{what}");
                explained
            } else {
                assert_eq!(all.len(), before, "{what}: refused requests go nowhere");
                let explained = explain(&gw, &args);
                assert_eq!(explained["status"], status, "{what}");
                explained
            };
            explanations.insert(id, (what, explained));
            compared += 1;
        }
    }
    assert_eq!(compared, callers.len() * ROUTES.len());

    // The audit line of each request is the view explain printed for it:
    // every audit field but the time and durations, same name, same value.
    let mut lines = Vec::new();
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || {
            lines = gw.audit_lines();
            lines.len() >= decision_ids.len()
        })
        .await,
        "audit lines: {}",
        lines.len()
    );
    for line in &lines {
        let audit: serde_json::Value = serde_json::from_str(line).expect("audit JSON");
        let id = audit["decision_id"].as_str().expect("decision id");
        let (what, explained) = &explanations[id];
        let audit = audit.as_object().expect("object");
        for (field, value) in audit {
            if ["ts", "upstream_ms", "total_ms"].contains(&field.as_str()) {
                continue;
            }
            assert_eq!(&explained[field], value, "{what}: audit field {field}");
        }
        for field in ["account", "training_basis", "status"] {
            if explained.get(field).is_some() {
                assert!(audit.contains_key(field), "{what}: {field} not audited");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_names_removed_pools_with_their_basis() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let v = explain(
        &gw,
        &[
            "--path",
            "/v1/chat/completions",
            "--header",
            "Authorization: Bearer demo-api-no-cerebras",
        ],
    );
    assert_eq!(
        v["candidate_tiers"],
        serde_json::json!([
            { "priority": 0, "pools": ["azure-sweden", "gcp-ireland"] },
            { "priority": 1, "pools": ["gcp-us"] },
        ])
    );
    // The pool explain stamps by default is of the lowest tier: no exception.
    assert_eq!(v["pool"], "azure-sweden");
    assert_eq!(v["tier"], 0);
    assert!(v.get("tier_basis").is_none(), "{v}");
    assert_eq!(
        v["removed_pools"],
        serde_json::json!([{ "pool": "cerebras", "basis": "6/opt-out" }])
    );
    assert_eq!(v["training_basis"], "3.4.2/paid");
    assert_eq!(v["retention_basis"], "5/api-30d");
    let v = explain(
        &gw,
        &[
            "--path",
            "/v1/images/generations",
            "--header",
            "Authorization: Bearer demo-api-eu-only",
        ],
    );
    assert_eq!(v["status"], 451);
    assert_eq!(
        v["removed_pools"],
        serde_json::json!([{ "pool": "black-forest-labs", "basis": "7/residency" }])
    );
    assert!(ups.all_requests().is_empty(), "explain sends nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_shows_the_tier_and_names_an_eu_first_exception() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let paid = "Authorization: Bearer demo-api-paid";
    let chat = "/v1/chat/completions";
    let v = explain(&gw, &["--path", chat, "--header", paid]);
    assert_eq!(
        (v["pool"].as_str(), v["tier"].as_u64()),
        (Some("azure-sweden"), Some(0))
    );
    assert!(v.get("tier_basis").is_none(), "{v}");
    // Served from the US tier, the same request would be an exception.
    let v = explain(
        &gw,
        &["--path", chat, "--header", paid, "--pool", "cerebras"],
    );
    assert_eq!(v["tier"], 1);
    assert_eq!(v["tier_basis"], "7/eu-first-exception");
    assert_eq!(v["headers"]["x-privacy-pool"], "cerebras");
    // For a us-resident account the US tier is its lowest: no exception.
    let mut config = TestConfig::shipped_with(&ups);
    config.accounts.push_str(&format!(
        "{{\"id\":\"acct-us\",\"product\":\"api\",\"plan\":\"paid\",\"residency\":\"us\",\"api_key_sha256\":[\"{}\"]}}\n",
        hex::encode(privacy_gateway::config::hash_api_key(b"test-us-only"))
    ));
    let us = Gateway::start(&config);
    let v = explain(
        &us,
        &[
            "--path",
            chat,
            "--header",
            "Authorization: Bearer test-us-only",
            "--pool",
            "cerebras",
        ],
    );
    assert_eq!(v["tier"], 1);
    assert!(v.get("tier_basis").is_none(), "{v}");
    assert!(ups.all_requests().is_empty(), "explain sends nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_writes_one_audit_line_without_address_key_or_body() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let c = client();
    let secret_body = r#"{"messages":[{"role":"user","content":"BODY-SECRET-7f3a"}]}"#;
    let ok = c
        .post(gw.api_url("/v1/chat/completions"))
        .bearer_auth("demo-api-paid")
        .body(secret_body)
        .send()
        .await
        .expect("request");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        support::post_as(&c, &gw.api_url("/v1/chat/completions"), "sk-live-audit-key").await,
        StatusCode::UNAUTHORIZED
    );
    let lines = {
        let mut lines = Vec::new();
        let found = support::eventually(std::time::Duration::from_secs(5), || {
            lines = gw.audit_lines();
            lines.len() >= 2
        })
        .await;
        assert!(found, "audit lines: {lines:?}");
        lines
    };
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON line");
    for field in [
        "ts",
        "decision_id",
        "policy_version",
        "consent_revision",
        "geo_revision",
        "account",
        "product",
        "plan",
        "capability",
        "training",
        "training_basis",
        "retention",
        "retention_basis",
        "pool",
        "subprocessor",
        "status",
        "upstream_ms",
        "total_ms",
        "client_prefix",
    ] {
        assert!(
            first.get(field).is_some(),
            "audit line lacks {field}: {first}"
        );
    }
    assert_eq!(first["account"], "acct-api-paid");
    assert_eq!(first["training_basis"], "3.4.2/paid");
    assert_eq!(first["client_prefix"], "127.45.67.0/24");
    assert_eq!(first["status"], 200);
    assert_eq!(first["tier"], 0);
    assert!(first["geo_revision"].is_null(), "no geo database: {first}");
    let consents = first["consent_revision"]
        .as_str()
        .expect("consent revision");
    assert_eq!(consents.len(), 7);
    let second: serde_json::Value = serde_json::from_str(&lines[1]).expect("JSON line");
    assert_eq!(second["status"], 401);
    assert_eq!(second["error"], "unknown_api_key");
    // Every line names the revisions it was decided under, refused or not.
    for field in ["policy_version", "consent_revision", "geo_revision"] {
        assert_eq!(second[field], first[field], "{field}");
    }
    let all = lines.join("\n");
    for secret in [
        "BODY-SECRET-7f3a",
        "sk-live-audit-key",
        "demo-api-paid",
        CLIENT_V4,
    ] {
        assert!(!all.contains(secret), "an audit line holds {secret}: {all}");
    }
}

/// Checks Prometheus text exposition line by line; returns the samples.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        samples.push((series.to_string(), value));
    }
    samples
}

fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map_or(0.0, |(_, v)| *v)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_as_requests_pass() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let (status, before) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let before = parse_prometheus(&before);
    let c = client();
    for _ in 0..5 {
        let status = support::post_as(
            &c,
            &gw.api_url("/v1/chat/completions"),
            "demo-api-no-cerebras",
        )
        .await;
        assert_eq!(status, 200);
    }
    let status = support::post_as(
        &c,
        &gw.api_url("/v1/images/generations"),
        "demo-api-eu-only",
    )
    .await;
    assert_eq!(status, 451);
    // Metrics are counted when a request's last phase ends, just after the
    // client has its answer: wait (bounded) for the last one, by the last
    // metric a request updates (the overhead histogram).
    let basis = r#"privacy_gateway_decisions_total{basis="3.4.2/paid",part="training"}"#;
    let overhead = "privacy_gateway_overhead_seconds_count";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let after = loop {
        let after = parse_prometheus(&gw.admin_get("/metrics").await.1);
        if sample(&after, overhead) >= 6.0 || std::time::Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let requests = r#"privacy_gateway_requests_total{capability="chat",plan="paid",product="api",status="200",training="denied"}"#;
    assert_eq!(
        sample(&after, requests) - sample(&before, requests),
        5.0,
        "{after:?}"
    );
    assert_eq!(sample(&after, basis), 6.0, "{after:?}");
    let removed = r#"privacy_gateway_routes_removed_total{pool="cerebras",reason="6/opt-out"}"#;
    assert_eq!(sample(&after, removed), 5.0);
    let residency =
        r#"privacy_gateway_routes_removed_total{pool="black-forest-labs",reason="7/residency"}"#;
    assert_eq!(sample(&after, residency), 1.0);
    assert_eq!(
        sample(&after, "privacy_gateway_upstream_seconds_count"),
        5.0
    );
    assert_eq!(
        sample(&after, "privacy_gateway_overhead_seconds_count"),
        6.0
    );
    assert!(after.iter().any(|(s, v)| s
        .starts_with("privacy_gateway_policy_version_info{version=\"2025-02-06+r")
        && *v == 1.0));
    assert_eq!(
        sample(&after, "privacy_gateway_audit_lines_dropped_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_rule_counts_disagreements_and_changes_nothing_upstream() {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.rules.push_str("\n[shadow]\nname = \"team-trains-by-default\"\n\n[shadow.plans.chat]\nteam = \"chat-individual\"\n");
    let gw = Gateway::start(&config);
    let c = client();
    for _ in 0..3 {
        assert_eq!(
            support::post_as(&c, &gw.chat_url("/v1/chat/completions"), "demo-chat-team").await,
            StatusCode::OK
        );
    }
    support::post_as(&c, &gw.chat_url("/v1/chat/completions"), "demo-chat-pro").await;
    for (_, r) in ups.all_requests() {
        if r.header("x-privacy-account") == Some("acct-chat-team") {
            assert_eq!(
                r.header("x-privacy-training"),
                Some("denied"),
                "the shadow rule changed the request"
            );
            assert_eq!(r.header("x-privacy-training-basis"), Some("3.4.3/team"));
        }
    }
    // Audit lines are written after metrics are counted: once all four are
    // there, so are the counts.
    let mut lines = Vec::new();
    assert!(
        support::eventually(std::time::Duration::from_secs(5), || {
            lines = gw.audit_lines();
            lines.len() >= 4
        })
        .await
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    let samples = parse_prometheus(&metrics);
    let series = r#"privacy_gateway_shadow_disagreements_total{candidate="3.4.3/default",enforced="3.4.3/team",field="training",shadow="team-trains-by-default"}"#;
    assert_eq!(sample(&samples, series), 3.0, "{metrics}");
    assert_eq!(
        samples
            .iter()
            .filter(|(s, _)| s.starts_with("privacy_gateway_shadow_disagreements_total"))
            .map(|(_, v)| v)
            .sum::<f64>(),
        3.0,
        "only the team requests disagree: {metrics}"
    );
    let team: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
    assert_eq!(
        team["shadow"],
        serde_json::json!([{ "rules": "team-trains-by-default", "field": "training", "enforced": "3.4.3/team", "shadow": "3.4.3/default" }])
    );
    let pro: serde_json::Value = serde_json::from_str(&lines[3]).expect("JSON");
    assert!(pro.get("shadow").is_none(), "{pro}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_report_process_and_pools() {
    let mut ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::with_health_checks(&config.pools, 100);
    let gw = Gateway::start(&config);
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    // Ready once every listener serves: the test may connect to the admin
    // listener a moment before the last listener's service has started.
    let mut last = (0, String::new());
    let ready = support::eventually(std::time::Duration::from_secs(10), || {
        last = gw.admin_get_blocking("/readyz");
        last.0 == 200
    })
    .await;
    assert!(ready, "readyz never became ready: {last:?}");
    // The only image pool goes down: not ready, and it says for what.
    ups.stop("black-forest-labs").await;
    let unready = support::eventually(std::time::Duration::from_secs(10), || {
        last = gw.admin_get_blocking("/readyz");
        last.0 == 503
    })
    .await;
    assert!(unready, "readyz stayed {last:?}");
    let body: serde_json::Value = serde_json::from_str(&last.1).expect("JSON");
    assert_eq!(
        body["capabilities_without_healthy_pool"],
        serde_json::json!(["image_generation"])
    );
    assert_eq!(
        gw.admin_get("/healthz").await.0,
        200,
        "the process is still up"
    );
    assert_eq!(gw.admin_get("/nope").await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_are_json_lines_when_configured() {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.extra_tables = "[log]\nformat = \"json\"\n".into();
    let gw = Gateway::start(&config);
    assert_eq!(
        support::post_as(
            &client(),
            &gw.api_url("/v1/chat/completions"),
            "demo-api-paid"
        )
        .await,
        StatusCode::OK
    );
    let mut logs = String::new();
    let logged = support::eventually(std::time::Duration::from_secs(5), || {
        logs = gw.logs();
        logs.contains("\"decision_id\"")
    })
    .await;
    assert!(logged, "no JSON access line:\n{logs}");
    // Every diagnostic line is one JSON object, start-up lines included.
    assert!(logs.contains("listening on"), "{logs}");
    let lines: Vec<&str> = logs.lines().collect();
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_audit_writer_drops_and_counts_lines_and_never_blocks_requests() {
    use std::os::unix::fs::OpenOptionsExt;
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    // The audit log is a pipe that nobody reads: once the kernel's pipe
    // buffer is full, the writer thread blocks for good.
    let fifo_dir = tempfile::tempdir().expect("tempdir");
    let fifo = fifo_dir.path().join("audit.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    const O_NONBLOCK: i32 = 0o4000;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(&fifo)
        .expect("open the pipe's reading end");
    config.audit = format!("path = \"{}\"\nbuffer = 4\n", fifo.display());
    let gw = Gateway::start(&config);
    let c = client();
    // Each request must still be answered (the client gives up after 20 s).
    for _ in 0..600 {
        assert_eq!(
            support::post_as(&c, &gw.api_url("/v1/chat/completions"), "demo-api-paid").await,
            StatusCode::OK
        );
    }
    let mut dropped = 0.0;
    let counted = support::eventually(std::time::Duration::from_secs(5), || {
        dropped = dropped_audit_lines(&gw);
        dropped > 0.0
    })
    .await;
    assert!(counted, "no audit line was counted as dropped");
}

/// `privacy_gateway_audit_lines_dropped_total`, read from a synchronous poll.
fn dropped_audit_lines(gw: &Gateway) -> f64 {
    let text = gw.admin_get_blocking("/metrics").1;
    sample(
        &parse_prometheus(&text),
        "privacy_gateway_audit_lines_dropped_total",
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_audit_line_holds_what_explain_needs_to_rebuild_the_decision() {
    let (ups, gw) =
        support::start_with(|c| c.sign_with(b"audit-rebuild-signing-key-0123456789")).await;
    // A query string may carry anything; it is never recorded.
    let url = gw.chat_url("/v1/chat/completions?user=alice%40example.com");
    let resp = client()
        .post(url)
        .bearer_auth("demo-chat-pro")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    let id = support::decision_id(&resp).expect("decision id");
    let mut lines = Vec::new();
    assert!(
        support::eventually(std::time::Duration::from_secs(5), || {
            lines = gw.audit_lines();
            !lines.is_empty()
        })
        .await
    );
    assert!(!lines[0].contains("alice"), "{}", lines[0]);
    let line: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["path"], "/v1/chat/completions");
    assert_eq!(line["listener"], "chat");
    assert_eq!(line["decision_id"], id.as_str());
    // The explain command rebuilt from the line alone (the prefix's address
    // stands in for the client's) stamps exactly what the upstream received.
    let prefix = line["client_prefix"].as_str().expect("prefix");
    let address = prefix.split('/').next().expect("address");
    let field = |name: &str| line[name].as_str().expect(name).to_string();
    let explained = explain(
        &gw,
        &[
            "--method",
            &field("method"),
            "--path",
            &field("path"),
            "--listener",
            &field("listener"),
            "--header",
            "Authorization: Bearer demo-chat-pro",
            "--client-ip",
            address,
            "--decision-id",
            &field("decision_id"),
            "--pool",
            &field("pool"),
        ],
    );
    let (_, received) = ups.by_decision(&id).expect("forwarded");
    assert_eq!(explained_headers(&explained), stamped(&received));
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_addresses_and_the_process_have_their_metrics() {
    let mut ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let address = |pool: &str| ups.pool(pool).addr().to_string();
    let (azure, ireland) = (address("azure-sweden"), address("gcp-ireland"));
    let samples = parse_prometheus(&gw.admin_get("/metrics").await.1);
    // Present from the start, at 0, so that the first reload is an increase.
    for result in ["success", "failure"] {
        let series = format!("privacy_gateway_config_reloads_total{{result=\"{result}\"}}");
        assert!(
            samples.iter().any(|(s, v)| *s == series && *v == 0.0),
            "{series}"
        );
    }
    assert!(samples
        .iter()
        .any(|(s, _)| s == "process_cpu_seconds_total"));
    for series in ["process_resident_memory_bytes", "process_open_fds"] {
        assert!(
            sample(&samples, series) > 0.0,
            "{series} missing: {samples:?}"
        );
    }
    let c = client();
    let chat = gw.api_url("/v1/chat/completions");
    for _ in 0..4 {
        assert_eq!(
            support::post_as(&c, &chat, "demo-api-eu-only").await,
            StatusCode::OK
        );
    }
    let ready = |pool: &str, subprocessor: &str, region: &str| {
        format!("privacy_gateway_pool_ready{{capability=\"chat\",pool=\"{pool}\",region=\"{region}\",subprocessor=\"{subprocessor}\"}}")
    };
    let requests = |pool: &str, address: &str| {
        format!("privacy_gateway_pool_requests_total{{address=\"{address}\",pool=\"{pool}\"}}")
    };
    let samples = parse_prometheus(&gw.admin_get("/metrics").await.1);
    assert_eq!(
        sample(&samples, &requests("azure-sweden", &azure))
            + sample(&samples, &requests("gcp-ireland", &ireland)),
        4.0,
        "{samples:?}"
    );
    assert_eq!(sample(&samples, &ready("azure-sweden", "azure", "eu")), 1.0);

    // Every eu pool goes down: the residency-constrained account gets 503
    // although chat as a whole is still served (by the us pools); the
    // per-pool series show it, by region.
    ups.stop("azure-sweden").await;
    ups.stop("gcp-ireland").await;
    assert_eq!(
        support::post_as(&c, &chat, "demo-api-eu-only").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let samples = parse_prometheus(&gw.admin_get("/metrics").await.1);
    for (pool, address, subprocessor) in [
        ("azure-sweden", &azure, "azure"),
        ("gcp-ireland", &ireland, "gcp"),
    ] {
        let errors = format!("privacy_gateway_pool_errors_total{{address=\"{address}\",kind=\"connect\",pool=\"{pool}\"}}");
        assert_eq!(sample(&samples, &errors), 1.0, "{errors}: {samples:?}");
        assert_eq!(sample(&samples, &ready(pool, subprocessor, "eu")), 0.0);
        let up =
            format!("privacy_gateway_pool_address_up{{address=\"{address}\",pool=\"{pool}\"}}");
        assert!(samples.iter().any(|(s, v)| *s == up && *v == 0.0), "{up}");
    }
    assert_eq!(sample(&samples, &ready("gcp-us", "gcp", "us")), 1.0);
}
