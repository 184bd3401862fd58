//! The admin listener: with `[admin] token_file`, `/metrics` answers only a
//! bearer of the token (and a rotated token applies without a restart),
//! while the probes `/healthz` and `/readyz` stay open; `/readyz` and the
//! metrics name the same policy version, so a rollout can check that every
//! replica serves the one it shipped.

mod support;

use std::time::Duration;

use support::{eventually_async, Gateway, TestConfig, Upstreams};

const TOKEN: &str = "admin-token-4c1f0e9b77";
const ROTATED: &str = "admin-token-rotated-9d2a61";

/// `GET path` on the admin listener with an optional bearer token.
async fn admin(gw: &Gateway, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://{}{path}", gw.admin));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

fn with_token(ups: &Upstreams) -> TestConfig {
    let mut config = TestConfig::shipped_with(ups);
    config.admin = "token_file = \"admin.token\"\n".into();
    config
        .attachments
        .push(("admin.token".into(), format!("{TOKEN}\n").into_bytes()));
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_need_the_token_and_probes_do_not() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&with_token(&ups));

    let (status, body) = admin(&gw, "/metrics", None).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("privacy_gateway_"), "{body}");
    assert_eq!(
        admin(&gw, "/metrics", Some("wrong-token-000000")).await.0,
        401
    );
    assert_eq!(admin(&gw, "/metrics", Some(&TOKEN[..10])).await.0, 401);
    let (status, body) = admin(&gw, "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(
        body.contains("privacy_gateway_policy_version_info"),
        "{body}"
    );

    assert_eq!(admin(&gw, "/healthz", None).await.0, 200);
    assert_eq!(admin(&gw, "/readyz", None).await.0, 200);

    // Rotation: the new token applies without a restart, the old one stops working.
    gw.replace_file("admin.token", ROTATED);
    let rotated = eventually_async(Duration::from_secs(10), || async {
        admin(&gw, "/metrics", Some(ROTATED)).await.0 == 200
    })
    .await;
    assert!(rotated, "the rotated token was not applied:\n{}", gw.logs());
    assert_eq!(admin(&gw, "/metrics", Some(TOKEN)).await.0, 401);

    // A token too short to be one is refused; the rotated token keeps working.
    gw.replace_file("admin.token", "short");
    gw.expect_log("shorter than 16 bytes").await;
    assert_eq!(admin(&gw, "/metrics", Some(ROTATED)).await.0, 200);
    for token in [TOKEN, ROTATED] {
        assert!(!gw.logs().contains(token), "a log line holds the token");
    }
}

/// The version `/readyz` names, and the one the metrics name.
async fn versions(gw: &Gateway) -> (String, String) {
    let (_, ready) = admin(gw, "/readyz", None).await;
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("readyz JSON");
    let (_, metrics) = admin(gw, "/metrics", None).await;
    let line = metrics
        .lines()
        .find(|l| l.starts_with("privacy_gateway_policy_version_info{"))
        .expect("version metric");
    let version = line.split('"').nth(1).expect("version label").to_string();
    (
        ready["policy_version"].as_str().expect("version").into(),
        version,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_on_the_same_files_report_the_same_policy_version_and_a_change_shows() {
    let ups = Upstreams::start().await;
    let config = TestConfig::shipped_with(&ups);
    let a = Gateway::start(&config);
    let b = Gateway::start(&config);
    let (ready_a, metric_a) = versions(&a).await;
    let (ready_b, metric_b) = versions(&b).await;
    assert_eq!(ready_a, metric_a);
    assert_eq!(
        ready_a, ready_b,
        "two replicas of one configuration disagree"
    );
    assert_eq!(metric_a, metric_b);

    // One replica gets new rules: both endpoints of that one move, together.
    let rules = config.rules.replace("ipv4_prefix = 24", "ipv4_prefix = 16");
    assert_ne!(rules, config.rules);
    b.replace_file("rules.toml", &rules);
    let moved = std::sync::Mutex::new((ready_b.clone(), metric_b.clone()));
    eventually_async(Duration::from_secs(10), || async {
        let now = versions(&b).await;
        let changed = now.0 != ready_b;
        *moved.lock().expect("versions") = now;
        changed
    })
    .await;
    let moved = moved.into_inner().expect("versions");
    assert_ne!(
        moved.0, ready_a,
        "the changed replica still reports the old version"
    );
    assert_eq!(
        moved.0, moved.1,
        "readyz and metrics disagree after a reload"
    );
}
