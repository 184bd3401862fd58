//! Where a request may go (spec §4), through the real proxy: subprocessor
//! opt-outs and residency remove pools, an empty candidate set is a 451, and
//! failing pools are retried only among the permitted ones (503 when none is left).

mod support;

use std::collections::HashMap;

use reqwest::StatusCode;
use support::{client, free_port, Gateway, TestConfig, Upstreams};

const CHAT: &str = "/v1/chat/completions";

/// Sends `n` chat requests as `key` on the api listener; returns the statuses.
async fn send_chat(gw: &Gateway, key: &str, n: usize) -> Vec<StatusCode> {
    let c = client();
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        let resp = c
            .post(gw.api_url(CHAT))
            .bearer_auth(key)
            .body("{}")
            .send()
            .await
            .expect("request");
        statuses.push(resp.status());
    }
    statuses
}

fn per_pool(ups: &Upstreams) -> HashMap<String, usize> {
    ups.echoes
        .iter()
        .map(|(name, e)| (name.clone(), e.requests().len()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subprocessor_opt_out_is_never_routed_to() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let statuses = send_chat(&gw, "demo-api-no-cerebras", 200).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    let counts = per_pool(&ups);
    assert_eq!(
        counts["cerebras"], 0,
        "an opted-out subprocessor got traffic: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), 200);

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

#[tokio::test(flavor = "multi_thread")]
async fn no_permitted_pool_at_all_is_a_451_naming_capability_and_constraint() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let resp = client()
        .post(gw.api_url("/v1/images/generations"))
        .bearer_auth("demo-api-eu-only")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::UNAVAILABLE_FOR_LEGAL_REASONS);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "no_permitted_route");
    assert_eq!(body["error"]["capability"], "image_generation");
    assert_eq!(
        body["error"]["constraints"],
        serde_json::json!(["7/residency"])
    );
    assert!(ups.all_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn when_every_permitted_pool_is_down_it_is_a_503_and_never_a_forbidden_pool() {
    let ups = Upstreams::start().await;
    let mut addresses = ups.addresses();
    // The eu pools point at ports nobody listens on.
    for pool in ["azure-sweden", "gcp-ireland"] {
        addresses.insert(
            pool.into(),
            vec![format!("http://127.0.0.1:{}", free_port())],
        );
    }
    let mut config = TestConfig::shipped_with(&ups);
    config.pools = support::pools_with_addresses(&addresses);
    let gw = Gateway::start(&config);

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
    let dead = format!("http://127.0.0.1:{}", free_port());
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
