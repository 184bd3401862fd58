//! Through the real proxy: a pool's credential (a header and a secret file)
//! reaches that pool and no other; a hostile client sending the same header
//! names has its values removed whatever pool is chosen; an upstream that
//! reflects the credential does not show it to the client; a rotated secret
//! file applies without a restart, a broken one changes nothing; and the
//! secret appears in no log line (even at `trace`), audit line, error body,
//! `check` message or `explain` output.

mod support;

use std::time::Duration;

use support::{client, eventually_async, send_as, Gateway, TestConfig, Upstreams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";
const IMAGES: &str = "/v1/images/generations";

const AZURE_SECRET: &str = "azure-operator-secret-7f3a9c";
const IMAGES_SECRET: &str = "images-operator-token-51be02";
const ROTATED_SECRET: &str = "azure-operator-secret-rotated-e4d1";
/// What the hostile client sends in the credential headers.
const FORGED: &str = "client-forged-credential";

/// `pools` with a `[pool.credential]` table on pool `name`.
fn with_credential(pools: &str, name: &str, header: &str, prefix: &str, file: &str) -> String {
    let mut table: toml::Table = toml::from_str(pools).expect("pools parse");
    let pool = table["pool"]
        .as_array_mut()
        .expect("pools")
        .iter_mut()
        .find(|p| p["name"].as_str() == Some(name))
        .expect("pool exists");
    let credential: toml::Table = toml::from_str(&format!(
        "header = \"{header}\"\nprefix = \"{prefix}\"\nsecret_file = \"{file}\"\n"
    ))
    .expect("credential table");
    pool.as_table_mut()
        .expect("pool table")
        .insert("credential".into(), toml::Value::Table(credential));
    toml::to_string(&table).expect("serialize pools")
}

/// The shipped configuration with `api-key` credentials on azure-sweden and
/// a bearer token on black-forest-labs (images), their secret files ending
/// in a newline; gcp-ireland, azure-sweden's peer for eu chat, has none.
fn credentialed(ups: &Upstreams) -> TestConfig {
    let mut config = TestConfig::shipped_with(ups);
    let pools = with_credential(&config.pools, "azure-sweden", "api-key", "", "azure.key");
    config.pools = with_credential(
        &pools,
        "black-forest-labs",
        "Authorization",
        "Bearer ",
        "images.token",
    );
    config
        .attachments
        .push(("azure.key".into(), format!("{AZURE_SECRET}\n").into_bytes()));
    config.attachments.push((
        "images.token".into(),
        format!("{IMAGES_SECRET}\n").into_bytes(),
    ));
    config
}

/// Fails the test if a secret is in the gateway's logs or audit lines.
fn assert_no_secret_in_logs(gw: &Gateway) {
    let logs = format!("{}\n{}", gw.logs(), gw.audit_lines().join("\n"));
    for secret in [AZURE_SECRET, IMAGES_SECRET, ROTATED_SECRET] {
        assert!(!logs.contains(secret), "a log or audit line holds a secret");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_pool_gets_its_own_credential_and_a_client_can_neither_set_nor_see_one() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start_logging(&credentialed(&ups), "trace");
    let c = client();
    for i in 0..24 {
        // Chat goes to the eu pools (azure-sweden, gcp-ireland), images to black-forest-labs.
        let path = if i % 3 == 0 { IMAGES } else { CHAT };
        let resp = c
            .post(gw.api_url(path))
            .bearer_auth("demo-api-paid")
            .header("api-key", FORGED)
            .header("API-Key", "second-forged-value")
            .body("{}")
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        for (name, value) in resp.headers() {
            let value = value.to_str().unwrap_or_default();
            assert!(
                name != "api-key"
                    && !value.contains(AZURE_SECRET)
                    && !value.contains(IMAGES_SECRET),
                "the client saw {name}: {value}"
            );
        }
    }
    let mut by_pool = std::collections::BTreeMap::<String, usize>::new();
    for (pool, r) in ups.all_requests() {
        *by_pool.entry(pool.clone()).or_default() += 1;
        let (api_key, authorization) =
            (r.header_values("api-key"), r.header_values("authorization"));
        match pool.as_str() {
            "azure-sweden" => {
                assert_eq!(api_key, vec![AZURE_SECRET], "{r:?}");
                assert!(authorization.is_empty(), "{r:?}");
            }
            "black-forest-labs" => {
                assert!(api_key.is_empty(), "{r:?}");
                assert_eq!(
                    authorization,
                    vec![format!("Bearer {IMAGES_SECRET}")],
                    "{r:?}"
                );
            }
            _ => {
                assert!(
                    api_key.is_empty() && authorization.is_empty(),
                    "{pool}: {r:?}"
                );
            }
        }
    }
    // Both credentialed pools and an uncredentialed one received traffic.
    for pool in ["azure-sweden", "gcp-ireland", "black-forest-labs"] {
        assert!(
            by_pool.get(pool).is_some_and(|n| *n > 0),
            "{pool}: {by_pool:?}"
        );
    }
    let bytes = String::from_utf8_lossy(&ups.all_bytes()).into_owned();
    for forged in [FORGED, "second-forged-value", "demo-api-paid"] {
        assert!(!bytes.contains(forged), "an upstream received `{forged}`");
    }
    assert_no_secret_in_logs(&gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_reflecting_the_credential_does_not_show_it_to_the_client() {
    // A raw upstream that answers with the `api-key` it received.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let reflecting = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                // The body is read too: closing with bytes unread would reset
                // the connection and could lose the answer.
                let end = text.find("\r\n\r\n").map_or(0, |i| i + 4);
                let length: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_string)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = head.len() - end;
                while body < length {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => body += n,
                    }
                }
                let received = text
                    .lines()
                    .find_map(|l| l.strip_prefix("api-key: "))
                    .unwrap_or("none")
                    .to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\napi-key: {received}\r\nx-reflected: {received}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    let ups = Upstreams::start().await;
    let mut config = credentialed(&ups);
    let mut pools: toml::Table = toml::from_str(&config.pools).expect("pools");
    for pool in pools["pool"].as_array_mut().expect("pools") {
        if pool["name"].as_str() == Some("azure-sweden") {
            pool["addresses"] = vec![format!("http://{reflecting}")].into();
        }
    }
    config.pools = toml::to_string(&pools).expect("pools");
    let gw = Gateway::start(&config);

    // demo-api-eu-only reaches azure-sweden or gcp-ireland; ask until azure answered.
    let mut reflected = None;
    for _ in 0..20 {
        let resp = send_as(&client(), &gw.api_url(CHAT), "demo-api-eu-only").await;
        assert_eq!(resp.status(), 200);
        if let Some(v) = resp.headers().get("x-reflected") {
            assert!(
                resp.headers().get("api-key").is_none(),
                "{:?}",
                resp.headers()
            );
            reflected = Some(v.to_str().unwrap_or_default().to_string());
            break;
        }
    }
    // The upstream did get the secret (it reflected it under another name,
    // which the gateway cannot know): the credential header itself is removed.
    assert_eq!(reflected.as_deref(), Some(AZURE_SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_secret_applies_without_a_restart_and_a_broken_one_changes_nothing() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&credentialed(&ups));
    let azure = ups.pool("azure-sweden");
    let latest_key = || {
        azure
            .requests()
            .last()
            .and_then(|r| r.header("api-key").map(str::to_string))
    };
    let c = client();
    let send = || async {
        let status = support::post_as(&c, &gw.api_url(CHAT), "demo-api-eu-only").await;
        assert_eq!(status, 200);
    };
    while latest_key().is_none() {
        send().await;
    }
    assert_eq!(latest_key().as_deref(), Some(AZURE_SECRET));

    gw.replace_file("azure.key", &format!("{ROTATED_SECRET}\n"));
    let rotated = eventually_async(Duration::from_secs(10), || async {
        send().await;
        latest_key().as_deref() == Some(ROTATED_SECRET)
    })
    .await;
    assert!(
        rotated,
        "the rotated secret was not applied:\n{}",
        gw.logs()
    );

    // An empty secret file is refused: the rotated secret keeps serving.
    gw.replace_file("azure.key", "\n");
    gw.expect_log("azure.key is empty").await;
    let before = azure.requests().len();
    while azure.requests().len() < before + 2 {
        send().await;
    }
    assert_eq!(latest_key().as_deref(), Some(ROTATED_SECRET));
    assert_no_secret_in_logs(&gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_redacts_the_credential_and_check_names_a_broken_file_without_its_contents() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&credentialed(&ups));
    let config = gw.dir.path().join("gateway.toml");
    let explain = std::process::Command::new(support::binary())
        .arg("explain")
        .arg("--config")
        .arg(&config)
        .args([
            "--path",
            CHAT,
            "--pool",
            "azure-sweden",
            "-H",
            "Authorization: Bearer demo-api-paid",
        ])
        .output()
        .expect("run explain");
    let out = String::from_utf8_lossy(&explain.stdout).into_owned();
    assert!(explain.status.success(), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["headers"]["api-key"], "<redacted>", "{json}");
    assert!(
        !out.contains(AZURE_SECRET) && !out.contains(IMAGES_SECRET),
        "{out}"
    );

    // A secret with a line break would inject a header: refused, and the
    // message names the file, not what is in it.
    let injected = format!("{AZURE_SECRET}\r\nx-privacy-training: allowed");
    std::fs::write(gw.dir.path().join("azure.key"), injected).expect("write");
    let (ok, err) = gw.check();
    assert!(!ok);
    assert!(
        err.contains("azure.key") && err.contains("not a valid header value"),
        "{err}"
    );
    assert!(!err.contains(AZURE_SECRET), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_body_from_a_credentialed_pool_holds_no_secret() {
    let ups = Upstreams::start().await;
    let mut config = credentialed(&ups);
    // Every eu pool refuses connections: demo-api-eu-only gets a 503.
    let closed = support::ClosedPort::new();
    let mut pools: toml::Table = toml::from_str(&config.pools).expect("pools");
    for pool in pools["pool"].as_array_mut().expect("pools") {
        if pool["region"].as_str() == Some("eu") {
            pool["addresses"] = vec![closed.url()].into();
        }
    }
    config.pools = toml::to_string(&pools).expect("pools");
    let gw = Gateway::start_logging(&config, "trace");
    let resp = send_as(&client(), &gw.api_url(CHAT), "demo-api-eu-only").await;
    assert_eq!(resp.status(), 503);
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.expect("body");
    assert!(body.contains("permitted_pools_unavailable"), "{body}");
    for secret in [AZURE_SECRET, IMAGES_SECRET] {
        assert!(
            !body.contains(secret) && !headers.contains(secret),
            "{headers} {body}"
        );
    }
    assert_no_secret_in_logs(&gw);
}
