//! Through the real proxy: every training and retention row of the spec
//! (spec §1, spec §2), the client address (spec §3), the header contract
//! (spec §6), what a client can never decide (spec §7) and the answers the
//! gateway gives itself (spec §8).

mod support;

use privacy_gateway::echo::Recorded;
use reqwest::StatusCode;
use support::{client, Gateway, TestConfig, Upstreams, CLIENT_V4};

/// A started gateway with its upstreams.
struct Setup {
    gw: Gateway,
    ups: Upstreams,
}

async fn setup_with(edit: impl FnOnce(&mut TestConfig)) -> Setup {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    edit(&mut config);
    let gw = Gateway::start(&config);
    Setup { gw, ups }
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

/// Which listener a request goes to.
#[derive(Clone, Copy)]
enum On {
    Api,
    Chat,
}

impl Setup {
    fn url(&self, on: On, path: &str) -> String {
        match on {
            On::Api => self.gw.api_url(path),
            On::Chat => self.gw.chat_url(path),
        }
    }

    /// Sends `POST path` with an optional API key and extra headers; expects
    /// it to be forwarded, and returns what the one upstream that got it received.
    async fn forwarded(
        &self,
        on: On,
        key: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (String, Recorded) {
        support::forward(&self.ups, &self.url(on, path), key, headers).await
    }
}

/// Asserts the training and retention headers a row produces.
fn assert_decision(r: &Recorded, training: &str, training_basis: &str, retention: &str) {
    assert_eq!(
        r.header_values("x-privacy-training"),
        vec![training],
        "{r:?}"
    );
    assert_eq!(
        r.header_values("x-privacy-training-basis"),
        vec![training_basis],
        "{r:?}"
    );
    assert_eq!(
        r.header_values("x-privacy-retention"),
        vec![retention],
        "{r:?}"
    );
    let zdr = r.header_values("x-zero-data-retention");
    if retention == "zdr" {
        assert_eq!(zdr, vec!["1"]);
    } else {
        assert!(zdr.is_empty(), "x-zero-data-retention only with zdr: {r:?}");
    }
}

const CHAT: &str = "/v1/chat/completions";

/// An account line for accounts the demo set does not have.
fn extra_account(config: &mut TestConfig, line: &str) {
    config.accounts.push_str(line);
    config.accounts.push('\n');
}

fn key_hash(key: &str) -> String {
    hex::encode(privacy_gateway::config::hash_api_key(key.as_bytes()))
}

// ---- spec §1: training, one test per row ----

#[tokio::test(flavor = "multi_thread")]
async fn t1_restricted_account_is_never_trained_on() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-restricted"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "8/limitation", "conversation");
}

#[tokio::test(flavor = "multi_thread")]
async fn t2_connector_content_is_never_trained_on() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(
            On::Api,
            Some("demo-api-free"),
            "/v1/connectors/drive/content",
            &[],
        )
        .await;
    assert_decision(&r, "denied", "3.4.4/third-party", "30d");
    let (_, r) = s
        .forwarded(
            On::Chat,
            Some("demo-chat-free"),
            "/v1/connectors/drive/content",
            &[],
        )
        .await;
    assert_decision(&r, "denied", "3.4.4/third-party", "account-lifetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn t2w_web_search_output_is_never_trained_on() {
    let s = setup().await;
    let (pool, r) = s
        .forwarded(
            On::Chat,
            Some("demo-chat-free"),
            "/v1/tools/web_search",
            &[],
        )
        .await;
    assert_eq!(pool, "brave");
    assert_decision(&r, "denied", "2.3/third-party", "account-lifetime");
    let (_, r) = s
        .forwarded(On::Chat, None, "/v1/tools/web_search", &[])
        .await;
    assert_decision(&r, "denied", "2.3/third-party", "conversation");
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-free"), "/v1/tools/web_search", &[])
        .await;
    assert_decision(&r, "denied", "2.3/third-party", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn t3_paid_api_is_never_trained_on() {
    let s = setup().await;
    let (_, r) = s.forwarded(On::Api, Some("demo-api-paid"), CHAT, &[]).await;
    assert_decision(&r, "denied", "3.4.2/paid", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn tz_zero_data_retention_leaves_nothing_to_train_on() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-free-zdr"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "5/zdr", "zdr");
    assert_eq!(r.header("x-privacy-account"), Some("acct-api-free-zdr"));
    // The same plan without zdr is trained on (T5).
    let (_, r) = s.forwarded(On::Api, Some("demo-api-free"), CHAT, &[]).await;
    assert_decision(&r, "allowed", "3.4.2/free", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn t4_free_api_objection_is_honoured() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-free-objected"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "3.4.2/objection", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn t5_free_api_is_trained_on() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-free"), "/v1/embeddings", &[])
        .await;
    assert_decision(&r, "allowed", "3.4.2/free", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn t6_team_opt_in_allows_training() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-team-optin"), CHAT, &[])
        .await;
    assert_decision(&r, "allowed", "3.4.3/team-opt-in", "account-lifetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn t6_an_objection_beats_a_team_opt_in() {
    let s = setup().await;
    for path in [CHAT, "/v1/feedback"] {
        let (_, r) = s
            .forwarded(On::Chat, Some("demo-chat-team-objected"), path, &[])
            .await;
        assert_decision(&r, "denied", "3.4.3/team", "account-lifetime");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t7_team_is_not_trained_on_feedback_included() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-team"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "3.4.3/team", "account-lifetime");
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-team"), "/v1/feedback", &[])
        .await;
    assert_decision(&r, "denied", "3.4.3/team", "account-lifetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn t8_feedback_is_used_even_after_opt_out() {
    let s = setup().await;
    for key in [
        "demo-chat-free",
        "demo-chat-free-optout",
        "demo-chat-pro",
        "demo-chat-student",
    ] {
        let (_, r) = s.forwarded(On::Chat, Some(key), "/v1/feedback", &[]).await;
        assert_decision(&r, "allowed", "3.4.3/feedback", "account-lifetime");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t9_chat_opt_out_is_honoured() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-free-optout"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "3.4.3/opt-out", "account-lifetime");
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_anonymous_global_privacy_control_is_honoured() {
    let s = setup().await;
    let (_, r) = s.forwarded(On::Chat, None, CHAT, &[("Sec-GPC", "1")]).await;
    assert_decision(&r, "denied", "3.4.3/gpc", "conversation");
    assert_eq!(r.header("x-privacy-account"), Some("anonymous"));
    assert_eq!(r.header("x-privacy-plan"), Some("anonymous"));
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_individual_and_anonymous_chat_are_trained_on_by_default() {
    let s = setup().await;
    for key in ["demo-chat-free", "demo-chat-pro", "demo-chat-student"] {
        let (_, r) = s.forwarded(On::Chat, Some(key), CHAT, &[]).await;
        assert_decision(&r, "allowed", "3.4.3/default", "account-lifetime");
    }
    let (_, r) = s.forwarded(On::Chat, None, CHAT, &[]).await;
    assert_decision(&r, "allowed", "3.4.3/default", "conversation");
}

#[tokio::test(flavor = "multi_thread")]
async fn t0_an_account_with_an_unknown_plan_is_quarantined_never_trained_on() {
    // The table's fail-closed row is reached only by a plan the rules do not
    // know; such an account line is quarantined (spec §8): its requests are
    // answered 403 and nothing is forwarded, nor is any decision guessed.
    // (The row itself is tested on the pure decision in policy_rows.)
    let s = setup_with(|c| {
        c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n");
        extra_account(
            c,
            &format!(
                r#"{{"id":"acct-enterprise","product":"api","plan":"enterprise","api_key_sha256":["{}"]}}"#,
                key_hash("test-enterprise")
            ),
        )
    })
    .await;
    for on in [On::Api, On::Chat] {
        let resp = client()
            .post(s.url(on, CHAT))
            .bearer_auth("test-enterprise")
            .body("{}")
            .send()
            .await
            .expect("request");
        let body = refusal(resp, StatusCode::FORBIDDEN, "consent_record_invalid").await;
        assert!(!body.to_string().contains("test-enterprise"), "{body}");
    }
    // Named by a trusted front service, it is refused the same way.
    let resp = client()
        .post(s.url(On::Chat, CHAT))
        .header("x-authenticated-account", "acct-enterprise")
        .body("{}")
        .send()
        .await
        .expect("request");
    refusal(resp, StatusCode::FORBIDDEN, "consent_record_invalid").await;
    assert!(
        s.ups.all_requests().is_empty(),
        "a quarantined account was forwarded"
    );
    // Everyone else is served.
    s.forwarded(On::Api, Some("demo-api-paid"), CHAT, &[]).await;
}

// ---- spec §2: retention, one test per row ----

#[tokio::test(flavor = "multi_thread")]
async fn r0_restricted_gets_the_shortest_retention() {
    let s = setup_with(|c| {
        extra_account(
            c,
            &format!(
                r#"{{"id":"acct-api-restricted","product":"api","plan":"paid","restricted":true,"api_key_sha256":["{}"]}}"#,
                key_hash("test-api-restricted")
            ),
        )
    })
    .await;
    let (_, r) = s
        .forwarded(
            On::Api,
            Some("test-api-restricted"),
            "/v1/fine_tuning/jobs",
            &[],
        )
        .await;
    assert_decision(&r, "denied", "8/limitation", "zdr");
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-restricted"), CHAT, &[])
        .await;
    assert_decision(&r, "denied", "8/limitation", "conversation");
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_fine_tuning_files_are_kept_until_deleted_even_with_zdr() {
    let s = setup().await;
    for key in ["demo-api-paid", "demo-api-zdr"] {
        let (_, r) = s
            .forwarded(On::Api, Some(key), "/v1/fine_tuning/jobs", &[])
            .await;
        assert_decision(&r, "denied", "3.4.2/paid", "until-deleted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn r2_zero_data_retention() {
    let s = setup().await;
    let (_, r) = s.forwarded(On::Api, Some("demo-api-zdr"), CHAT, &[]).await;
    assert_decision(&r, "denied", "3.4.2/paid", "zdr");
}

#[tokio::test(flavor = "multi_thread")]
async fn r3_api_keeps_thirty_days() {
    let s = setup().await;
    let (_, r) = s.forwarded(On::Api, Some("demo-api-free"), CHAT, &[]).await;
    assert_decision(&r, "allowed", "3.4.2/free", "30d");
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_anonymous_chat_keeps_the_conversation_only() {
    let s = setup().await;
    let (_, r) = s.forwarded(On::Chat, None, CHAT, &[]).await;
    assert_eq!(r.header("x-privacy-retention"), Some("conversation"));
}

#[tokio::test(flavor = "multi_thread")]
async fn r5_chat_account_keeps_for_the_account_lifetime() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-pro"), CHAT, &[])
        .await;
    assert_eq!(r.header("x-privacy-retention"), Some("account-lifetime"));
}

// ---- spec §6: the header contract ----

#[tokio::test(flavor = "multi_thread")]
async fn every_contract_header_is_stamped_and_the_decision_id_is_returned() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
    let id = resp.headers()["x-privacy-decision-id"]
        .to_str()
        .expect("id")
        .to_string();
    let all = s.ups.all_requests();
    assert_eq!(all.len(), 1);
    let (pool, r) = &all[0];
    assert_eq!(r.header("x-privacy-decision-id"), Some(id.as_str()));
    let version = r
        .header("x-privacy-policy-version")
        .expect("policy version");
    assert!(
        version.starts_with("2025-02-06+r") && version.len() == "2025-02-06+r".len() + 7,
        "{version}"
    );
    assert_eq!(r.header("x-privacy-product"), Some("api"));
    assert_eq!(r.header("x-privacy-plan"), Some("paid"));
    assert_eq!(r.header("x-privacy-account"), Some("acct-api-paid"));
    assert_eq!(r.header("x-privacy-pool"), Some(pool.as_str()));
    let expected_subprocessor = match pool.as_str() {
        "azure-sweden" => "azure",
        "gcp-ireland" | "gcp-us" => "gcp",
        other => other,
    };
    assert_eq!(
        r.header("x-privacy-subprocessor"),
        Some(expected_subprocessor)
    );
    assert_eq!(r.header("x-forwarded-for"), Some("127.45.67.0"));
    assert_eq!(r.header("x-privacy-client-prefix"), Some("127.45.67.0/24"));
    assert!(
        r.header("x-privacy-signature").is_none(),
        "no signing key configured"
    );
    assert!(
        r.header("authorization").is_none(),
        "the API key stays at the gateway"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stamped_headers_are_signed_when_a_key_is_configured() {
    let key = b"0123456789abcdef-test-signing-key".to_vec();
    let s = setup_with(|c| {
        c.extra_tables = "[signing]\nkey_file = \"signing.key\"\n".into();
        c.attachments.push(("signing.key".into(), key.clone()));
    })
    .await;
    let (_, r) = s.forwarded(On::Api, Some("demo-api-free"), CHAT, &[]).await;
    let signature = r.header("x-privacy-signature").expect("signature");
    let signed = support::signed_headers(&r);
    assert!(signed.len() >= 12, "{signed:?}");
    let expected = privacy_gateway::stamp::signature(
        &privacy_gateway::stamp::SigningKey::new(key),
        signed.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    assert_eq!(signature.as_bytes(), expected);
}

// ---- spec §7: what a client can never decide ----

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_privacy_headers_in_any_case_and_number_have_no_effect() {
    let s = setup().await;
    let spoof = [
        ("X-Privacy-Training", "allowed"),
        ("x-privacy-training", "allowed"),
        ("X-PRIVACY-TRAINING", "allowed"),
        ("X-Privacy-Training-Basis", "3.4.2/free"),
        ("X-Privacy-Retention", "account-lifetime"),
        ("X-Zero-Data-Retention", "1"),
        ("X-Privacy-Account", "acct-somebody-else"),
        ("X-Privacy-Pool", "cerebras"),
        ("X-Privacy-Country", "FR"),
        ("X-Privacy-Whatever", "x"),
    ];
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-paid"), CHAT, &spoof)
        .await;
    assert_decision(&r, "denied", "3.4.2/paid", "30d");
    assert_eq!(r.header_values("x-privacy-account"), vec!["acct-api-paid"]);
    assert!(r.header("x-privacy-country").is_none());
    assert!(r.header("x-privacy-whatever").is_none());
    assert_eq!(r.header_values("x-privacy-pool").len(), 1);
}

/// The upstream request is rebuilt from the client's (the stamps go into its
/// header map directly): the target, query and all, leaves byte for byte;
/// a header the client sent twice, in any case, leaves with both values in
/// order; each stamp once; the key and the spoofed stamp not at all.
#[tokio::test(flavor = "multi_thread")]
async fn the_rewritten_request_keeps_the_target_and_the_clients_other_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let target = "/v1/chat/completions?q=%2F%C3%A9&x=1&x=2";
    let request = format!(
        "POST {target} HTTP/1.1\r\nHost: gw\r\nX-Trace: first\r\nAuthorization: Bearer demo-api-paid\r\n\
         x-TRACE: second\r\nX-Privacy-Training: allowed\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    let mut tcp = tokio::net::TcpStream::connect(s.gw.api)
        .await
        .expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, r) = s
        .ups
        .all_requests()
        .into_iter()
        .find(|(_, r)| r.header("x-trace").is_some())
        .expect("forwarded");
    assert_eq!(r.path, target);
    assert_eq!(r.header_values("x-trace"), vec!["first", "second"]);
    assert_decision(&r, "denied", "3.4.2/paid", "30d");
    for stamp in [
        "x-privacy-decision-id",
        "x-privacy-policy-version",
        "x-privacy-account",
        "x-privacy-training",
        "x-forwarded-for",
        "x-privacy-client-prefix",
        "x-privacy-pool",
    ] {
        assert_eq!(r.header_values(stamp).len(), 1, "{stamp}");
    }
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(
        bytes.contains(&format!("POST {target} HTTP/1.1\r\n")),
        "{bytes}"
    );
    assert!(!bytes.contains("demo-api-paid"), "the key reached upstream");
    assert!(
        !bytes.to_ascii_lowercase().contains("authorization"),
        "{bytes}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_headers_from_an_untrusted_peer_are_ignored_and_removed() {
    let s = setup().await;
    let spoof = [
        ("X-Forwarded-For", "198.51.100.23"),
        ("Forwarded", "for=198.51.100.23"),
        ("X-Real-IP", "198.51.100.23"),
        ("True-Client-IP", "198.51.100.23"),
        ("CF-Connecting-IP", "198.51.100.23"),
    ];
    let (_, r) = s
        .forwarded(On::Api, Some("demo-api-paid"), CHAT, &spoof)
        .await;
    assert_eq!(r.header_values("x-forwarded-for"), vec!["127.45.67.0"]);
    assert_eq!(r.header("x-privacy-client-prefix"), Some("127.45.67.0/24"));
    for name in [
        "forwarded",
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
    ] {
        assert!(r.header(name).is_none(), "{name} was forwarded");
    }
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(
        !bytes.contains("198.51.100"),
        "spoofed address reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_header_from_an_untrusted_peer_is_ignored() {
    let s = setup().await;
    // On the api listener it does not stand in for a key.
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .header("x-authenticated-account", "acct-api-free")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // On the chat listener the caller stays anonymous, and the header is removed.
    let (_, r) = s
        .forwarded(
            On::Chat,
            None,
            CHAT,
            &[("x-authenticated-account", "acct-chat-team-optin")],
        )
        .await;
    assert_eq!(r.header("x-privacy-account"), Some("anonymous"));
    assert!(r.header("x-authenticated-account").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trusted_proxy_names_the_client_and_the_account() {
    let s = setup_with(|c| c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n")).await;
    let (_, r) = s
        .forwarded(
            On::Chat,
            None,
            CHAT,
            &[
                ("x-forwarded-for", "203.0.113.77, 127.45.1.1"),
                ("x-authenticated-account", "acct-chat-team"),
            ],
        )
        .await;
    assert_eq!(r.header("x-privacy-account"), Some("acct-chat-team"));
    assert_eq!(r.header("x-forwarded-for"), Some("203.0.113.0"));
    assert_eq!(r.header("x-privacy-client-prefix"), Some("203.0.113.0/24"));
    assert!(r.header("x-authenticated-account").is_none());
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(
        !bytes.contains("203.0.113.77") && !bytes.contains("127.45.1.1"),
        "a full address reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_forwarded_for_from_a_trusted_proxy_is_a_400() {
    let s = setup_with(|c| c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n")).await;
    let resp = client()
        .post(s.gw.chat_url(CHAT))
        .header("x-forwarded-for", "not-an-address")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "malformed_forwarded_for");
    assert!(s.ups.all_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_header_cannot_remove_stamped_headers() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(
            On::Api,
            Some("demo-api-zdr"),
            CHAT,
            &[(
                "Connection",
                "x-privacy-training, x-zero-data-retention, x-privacy-retention",
            )],
        )
        .await;
    assert_decision(&r, "denied", "3.4.2/paid", "zdr");
    let connection = r.header_values("connection").join(",").to_ascii_lowercase();
    assert!(
        !connection.contains("x-privacy") && !connection.contains("x-zero"),
        "{connection}"
    );
}

// ---- spec §3: the client's address ----

#[tokio::test(flavor = "multi_thread")]
async fn the_full_ipv4_address_reaches_no_upstream_byte() {
    let s = setup().await;
    for key in ["demo-api-paid", "demo-api-free"] {
        s.forwarded(On::Api, Some(key), CHAT, &[]).await;
    }
    s.forwarded(On::Chat, None, CHAT, &[]).await;
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(bytes.contains("127.45.67.0"), "the prefix is forwarded");
    assert!(
        !bytes.contains(CLIENT_V4),
        "the full address reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_ipv6_address_reaches_no_upstream_byte() {
    let s = setup_with(|c| c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n")).await;
    let (_, r) = s
        .forwarded(
            On::Chat,
            Some("demo-chat-pro"),
            CHAT,
            &[("x-forwarded-for", "2001:db8:1234:5678::abcd")],
        )
        .await;
    assert_eq!(r.header("x-forwarded-for"), Some("2001:db8:1234::"));
    assert_eq!(
        r.header("x-privacy-client-prefix"),
        Some("2001:db8:1234::/48")
    );
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    for part in support::V6_CLIENT_PARTS {
        assert!(
            !bytes.contains(part),
            "{part}: the full address reached upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_ipv6_client_is_truncated() {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.listen_host = "::1".into();
    let gw = Gateway::start(&config);
    let resp = reqwest::Client::new()
        .post(format!("http://{}{CHAT}", gw.chat))
        .header("host", "gateway.test")
        .body("{}")
        .send()
        .await
        .expect("request over IPv6 loopback");
    assert_eq!(resp.status(), StatusCode::OK);
    let all = ups.all_requests();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].1.header("x-privacy-client-prefix"), Some("::/48"));
    assert_eq!(all[0].1.header("x-forwarded-for"), Some("::"));
    let bytes = String::from_utf8_lossy(&ups.all_bytes()).into_owned();
    assert!(!bytes.contains("::1"), "the full address reached upstream");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ipv4_mapped_address_is_treated_as_ipv4() {
    let s = setup_with(|c| c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n")).await;
    let (_, r) = s
        .forwarded(
            On::Chat,
            Some("demo-chat-pro"),
            CHAT,
            &[("x-forwarded-for", "::ffff:198.51.100.23")],
        )
        .await;
    assert_eq!(r.header("x-forwarded-for"), Some("198.51.100.0"));
    assert_eq!(r.header("x-privacy-client-prefix"), Some("198.51.100.0/24"));
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    assert!(
        !bytes.contains("198.51.100.23"),
        "the full address reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ipv6_address_carrying_an_ipv4_client_is_truncated_as_that_client() {
    // 6to4, NAT64 and Teredo forms of 203.0.113.77, from a trusted proxy:
    // truncated as IPv6, their /48 (6to4) would be the whole IPv4 address.
    let s = setup_with(|c| c.trust.push_str("trusted_proxies = [\"127.45.0.0/16\"]\n")).await;
    for carrier in [
        "2002:cb00:714d::1",
        "2002:cb00:714d:1234::abcd",
        "64:ff9b::cb00:714d",
        "[64:ff9b::cb00:714d]:443",
        "2001:0:4136:e378:8000:63bf:34ff:8eb2",
    ] {
        let (_, r) = s
            .forwarded(
                On::Chat,
                Some("demo-chat-pro"),
                CHAT,
                &[("x-forwarded-for", carrier)],
            )
            .await;
        assert_eq!(
            r.header("x-forwarded-for"),
            Some("203.0.113.0"),
            "{carrier}"
        );
        assert_eq!(
            r.header("x-privacy-client-prefix"),
            Some("203.0.113.0/24"),
            "{carrier}"
        );
    }
    // Each searched with a colon: a bare "cb00" turns up by chance in the
    // random hex of a decision id about once in a hundred runs.
    let bytes = String::from_utf8_lossy(&s.ups.all_bytes()).into_owned();
    for part in [
        "2002:cb00",
        "cb00:714d",
        "64:ff9b",
        "34ff:8eb2",
        "203.0.113.77",
    ] {
        assert!(!bytes.contains(part), "{part} reached upstream");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ip_personalization_opt_out_forwards_no_part_of_the_address() {
    let s = setup().await;
    let (_, r) = s
        .forwarded(On::Chat, Some("demo-chat-no-geo"), CHAT, &[])
        .await;
    assert!(r.header("x-forwarded-for").is_none());
    assert!(r.header("x-privacy-client-prefix").is_none());
    assert!(r.header("x-privacy-country").is_none());
    assert!(!String::from_utf8_lossy(&s.ups.all_bytes()).contains("127.45.67"));
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_lengths_come_from_the_rules() {
    let s = setup_with(|c| c.rules = c.rules.replace("ipv4_prefix = 24", "ipv4_prefix = 16")).await;
    let (_, r) = s.forwarded(On::Api, Some("demo-api-paid"), CHAT, &[]).await;
    assert_eq!(r.header("x-privacy-client-prefix"), Some("127.45.0.0/16"));
}

// ---- spec §8: answers the gateway gives itself ----

async fn refusal(resp: reqwest::Response, status: StatusCode, code: &str) -> serde_json::Value {
    assert_eq!(resp.status(), status);
    let id = support::decision_id(&resp);
    let text = resp.text().await.expect("body");
    assert!(
        !text.contains(CLIENT_V4),
        "an error body names the client address: {text}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).expect("JSON body");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(
        body["error"]["decision_id"].as_str(),
        id.as_deref(),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_api_key_is_a_401_and_is_never_echoed() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .bearer_auth("sk-not-a-real-key-123")
        .body("{}")
        .send()
        .await
        .expect("request");
    let body = refusal(resp, StatusCode::UNAUTHORIZED, "unknown_api_key").await;
    assert!(!body.to_string().contains("sk-not-a-real-key-123"));
    assert!(
        !s.gw.logs().contains("sk-not-a-real-key-123"),
        "the key reached a log"
    );
    assert!(s.ups.all_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_malformed_credentials_on_the_api_are_a_401() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .body("{}")
        .send()
        .await
        .expect("request");
    refusal(resp, StatusCode::UNAUTHORIZED, "missing_api_key").await;
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .body("{}")
        .send()
        .await
        .expect("request");
    refusal(resp, StatusCode::UNAUTHORIZED, "malformed_authorization").await;
    assert!(s.ups.all_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_route_is_a_404() {
    let s = setup().await;
    let resp = client()
        .post(s.gw.api_url("/v1/unknown"))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request");
    refusal(resp, StatusCode::NOT_FOUND, "unknown_route").await;
    assert!(s.ups.all_requests().is_empty());
}

/// The refusals come in one order whatever else is wrong with the request:
/// the target, then the caller, then the route. A caller who is not known
/// learns nothing of which routes exist, though `evaluate` looks the route up
/// before the account (to overlap the account's memory miss).
#[tokio::test(flavor = "multi_thread")]
async fn refusals_keep_their_order_target_then_caller_then_route() {
    let s = setup().await;
    let send = |path: &'static str, authorization: &'static str| {
        client()
            .post(s.gw.api_url(path))
            .header("authorization", authorization)
            .body("{}")
            .send()
    };
    let resp = send("/v1/unknown", "Bearer sk-not-a-real-key-123")
        .await
        .expect("request");
    refusal(resp, StatusCode::UNAUTHORIZED, "unknown_api_key").await;
    let resp = send("/v1/unknown", "Basic Zm9vOmJhcg==")
        .await
        .expect("request");
    refusal(resp, StatusCode::UNAUTHORIZED, "malformed_authorization").await;
    let resp = send(
        "/v1/connectors/..%2F..%2Fv1%2Ffine_tuning%2Fjobs/content",
        "Bearer sk-not-a-real-key-123",
    )
    .await
    .expect("request");
    refusal(resp, StatusCode::BAD_REQUEST, "invalid_path").await;
    // A known caller on an unknown route is still told the route is unknown.
    let resp = send("/v1/unknown", "Bearer demo-api-paid")
        .await
        .expect("request");
    refusal(resp, StatusCode::NOT_FOUND, "unknown_route").await;
    assert!(s.ups.all_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_log_line_holds_the_full_client_address() {
    let s = setup().await;
    s.forwarded(On::Api, Some("demo-api-paid"), CHAT, &[]).await;
    let resp = client()
        .post(s.gw.api_url(CHAT))
        .bearer_auth("bad")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // Access lines are written after the answer: wait (bounded) for both.
    let written = support::eventually(std::time::Duration::from_secs(5), || {
        s.gw.logs().matches("decision_id=").count() >= 2
    })
    .await;
    let logs = s.gw.logs();
    assert!(
        written && logs.contains("127.45.67.0/24"),
        "the access log names the prefix: {logs}"
    );
    assert!(
        !logs.contains(CLIENT_V4),
        "a log line holds the full address:\n{logs}"
    );
}
