//! Hot reload and graceful upgrade under a steady loop of requests: a changed
//! consent takes effect without a restart, a broken file changes nothing and
//! is reported, rename-over, ConfigMap symlink swaps and `SIGHUP` are picked
//! up, and a binary upgrade loses no request; on a compiled consent snapshot,
//! a change file applies under load, a bad change file or a damaged snapshot
//! is refused whole, and both processes of an upgrade map one snapshot.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{client, eventually, shipped, signal, Gateway, TestConfig, Upstreams};

/// What the client saw of one request of the loop.
#[derive(Clone, Debug)]
struct Outcome {
    status: u16,
    training: Option<String>,
    policy_version: Option<String>,
    client_prefix: Option<String>,
    /// The client's error, when no response came.
    error: Option<String>,
}

/// A bounded request loop in the background: at most `max` requests or
/// `limit` of time, and it stops when asked.
struct RequestLoop {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RequestLoop {
    fn start(url: String, key: Option<&'static str>, fresh_connections: bool) -> Self {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (o, s) = (outcomes.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let c = if fresh_connections {
                reqwest::Client::builder()
                    .local_address(support::CLIENT_V4.parse::<std::net::IpAddr>().ok())
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(10))
                    .build()
                    .expect("client")
            } else {
                client()
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            for _ in 0..20_000 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let mut req = c.post(&url).body("{}");
                if let Some(key) = key {
                    req = req.bearer_auth(key);
                }
                let outcome = match req.send().await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let body: serde_json::Value = resp.json().await.unwrap_or_default();
                        let header = |n: &str| body["headers"][n].as_str().map(str::to_string);
                        Outcome {
                            status,
                            training: header("x-privacy-training"),
                            policy_version: header("x-privacy-policy-version"),
                            client_prefix: header("x-privacy-client-prefix"),
                            error: None,
                        }
                    }
                    Err(e) => Outcome {
                        status: 0,
                        training: None,
                        policy_version: None,
                        client_prefix: None,
                        error: Some(format!("{e:?}")),
                    },
                };
                o.lock().expect("outcomes").push(outcome);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        RequestLoop {
            outcomes,
            stop,
            task,
        }
    }

    fn len(&self) -> usize {
        self.outcomes.lock().expect("outcomes").len()
    }

    fn last(&self) -> Option<Outcome> {
        self.outcomes.lock().expect("outcomes").last().cloned()
    }

    /// Waits until `n` more requests have completed (bounded).
    async fn advance(&self, n: usize) {
        let target = self.len() + n;
        assert!(
            eventually(Duration::from_secs(20), || self.len() >= target).await,
            "the loop stalled"
        );
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("loop task");
        let outcomes = self.outcomes.lock().expect("outcomes").clone();
        outcomes
    }
}

fn assert_none_failed(outcomes: &[Outcome]) {
    let failed: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.status != 200)
        .map(|(i, o)| {
            format!(
                "#{i}: status {} {}",
                o.status,
                o.error.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
}

/// The shipped accounts with `demo-chat-free` opted out of training.
fn accounts_with_chat_free_opted_out() -> String {
    let accounts = shipped("accounts.jsonl");
    let line = accounts
        .lines()
        .find(|l| l.contains("\"acct-chat-free\""))
        .expect("demo-chat-free line");
    let opted_out = line.replacen('{', "{\"training_opt_out\": true, ", 1);
    accounts.replace(line, &opted_out)
}

/// A request loop as `demo-chat-free` on the chat listener, once `n` of its
/// requests were trained on (the account has not opted out yet).
async fn chat_free_loop(gw: &Gateway, n: usize) -> RequestLoop {
    let run = RequestLoop::start(
        gw.chat_url("/v1/chat/completions"),
        Some("demo-chat-free"),
        false,
    );
    run.advance(n).await;
    assert_eq!(
        run.last().and_then(|o| o.training).as_deref(),
        Some("allowed")
    );
    run
}

/// Lets `run` go on until demo-chat-free's requests are denied training (an
/// opt-out applied), and 20 more; none may fail. Its outcomes.
async fn until_denied(run: RequestLoop, gw: &Gateway) -> Vec<Outcome> {
    let applied = eventually(Duration::from_secs(10), || {
        run.last().and_then(|o| o.training).as_deref() == Some("denied")
    })
    .await;
    if applied {
        run.advance(20).await;
    }
    let outcomes = run.finish().await;
    assert!(applied, "the opt-out was not applied; logs:\n{}", gw.logs());
    assert_none_failed(&outcomes);
    outcomes
}

/// Runs `apply`, which opts demo-chat-free out of training, under a request
/// loop as demo-chat-free: the opt-out applies and no request fails; the
/// swap is atomic: once denied, never allowed again.
async fn opt_out_applies_under_load(gw: &Gateway, apply: impl FnOnce()) {
    let run = chat_free_loop(gw, 20).await;
    apply();
    let outcomes = until_denied(run, gw).await;
    let first_denied = outcomes
        .iter()
        .position(|o| o.training.as_deref() == Some("denied"))
        .expect("denied");
    assert!(outcomes[first_denied..]
        .iter()
        .all(|o| o.training.as_deref() == Some("denied")));
    assert!(outcomes[..first_denied]
        .iter()
        .all(|o| o.training.as_deref() == Some("allowed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_opt_out_in_a_new_accounts_file_applies_without_a_restart_or_a_failed_request() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    opt_out_applies_under_load(&gw, || {
        gw.replace_file("accounts.jsonl", &accounts_with_chat_free_opted_out())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_rules_file_changes_nothing_is_reported_and_its_fix_applies() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let run = RequestLoop::start(
        gw.api_url("/v1/chat/completions"),
        Some("demo-api-paid"),
        false,
    );
    run.advance(10).await;
    let before = run.last().expect("outcome");
    assert_eq!(before.client_prefix.as_deref(), Some("127.45.67.0/24"));

    let rules = shipped("rules.toml");
    let broken = rules.replace(
        "ipv4_prefix = 24",
        "ipv4_prefix = 24\nipv4_prefix_typo = 16",
    );
    gw.replace_file("rules.toml", &broken);
    let line = broken
        .lines()
        .position(|l| l.contains("ipv4_prefix_typo"))
        .expect("typo")
        + 1;
    let reported = eventually(Duration::from_secs(10), || {
        gw.logs()
            .contains(&format!("rules.toml:{line}: unknown field"))
    })
    .await;
    assert!(
        reported,
        "the broken file was not reported with file:line; logs:\n{}",
        gw.logs()
    );
    run.advance(20).await;
    let during = run.last().expect("outcome");
    assert_eq!(
        during.policy_version, before.policy_version,
        "a broken file replaced the rules"
    );
    assert_eq!(during.client_prefix, before.client_prefix);

    gw.replace_file(
        "rules.toml",
        &rules.replace("ipv4_prefix = 24", "ipv4_prefix = 16"),
    );
    let fixed = eventually(Duration::from_secs(10), || {
        run.last().and_then(|o| o.client_prefix).as_deref() == Some("127.45.0.0/16")
    })
    .await;
    let outcomes = run.finish().await;
    assert!(
        fixed,
        "the fixed rules were not applied; logs:\n{}",
        gw.logs()
    );
    assert_none_failed(&outcomes);
    let after = outcomes.last().expect("outcome");
    assert_ne!(
        after.policy_version, before.policy_version,
        "the rules revision must change with the rules"
    );
    // Both outcomes are counted, and the served version is the new one.
    let (_, metrics) = gw.admin_get("/metrics").await;
    for line in [
        "privacy_gateway_config_reloads_total{result=\"failure\"} 1",
        "privacy_gateway_config_reloads_total{result=\"success\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let version = after.policy_version.as_deref().expect("version");
    assert!(
        metrics.contains(&format!(
            "privacy_gateway_policy_version_info{{version=\"{version}\"}} 1"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_symlink_swap_is_picked_up() {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config.configmap_layout = true;
    let gw = Gateway::start(&config);
    let run = chat_free_loop(&gw, 10).await;

    let accounts = accounts_with_chat_free_opted_out();
    gw.configmap_swap(
        "..v2",
        &[
            ("rules.toml", config.rules.as_bytes()),
            ("pools.toml", config.pools.as_bytes()),
            ("accounts.jsonl", accounts.as_bytes()),
        ],
    );
    let applied = eventually(Duration::from_secs(10), || {
        run.last().and_then(|o| o.training).as_deref() == Some("denied")
    })
    .await;
    let outcomes = run.finish().await;
    assert!(
        applied,
        "the symlink swap was not picked up; logs:\n{}",
        gw.logs()
    );
    assert_none_failed(&outcomes);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_even_when_no_file_changed() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let reloads = |logs: &str| logs.matches("configuration reloaded").count();
    assert_eq!(reloads(&gw.logs()), 0);
    // Sent before the reload service listens for it, SIGHUP would be
    // ignored and no reload would come.
    assert!(support::handler_installed(gw.pid(), "HUP").await);
    signal(gw.pid(), "HUP");
    assert!(
        eventually(Duration::from_secs(10), || reloads(&gw.logs()) == 1).await,
        "SIGHUP did not reload; logs:\n{}",
        gw.logs()
    );
    let resp = client()
        .post(gw.api_url("/v1/chat/completions"))
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request after SIGHUP");
    assert_eq!(resp.status(), 200);
}

/// Upgrades `gw` under `run`: starts the new process, lets `both_running`
/// look at it (by pid) while the old one still serves, sends the old one
/// `SIGQUIT`, and lets the new one serve 50 requests alone. The new process
/// (killed when dropped) and every outcome; none failed.
async fn upgrade_under_load(
    gw: &mut Gateway,
    run: RequestLoop,
    both_running: impl FnOnce(u32),
) -> (KillOnDrop, Vec<Outcome>) {
    let upgrade_sock = gw.upgrade_sock();
    let new = KillOnDrop(gw.start_upgrade());
    assert!(
        eventually(Duration::from_secs(10), || upgrade_sock.exists()).await,
        "the new process did not open the upgrade socket"
    );
    both_running(new.0.id());
    signal(gw.pid(), "QUIT");
    assert!(
        gw.wait_exit(Duration::from_secs(20)),
        "the old process did not exit"
    );
    // The new process serves alone now.
    run.advance(50).await;
    let outcomes = run.finish().await;
    assert_none_failed(&outcomes);
    (new, outcomes)
}

/// Kills a second gateway process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_upgrade_under_load_loses_no_request() {
    let ups = Upstreams::start().await;
    let mut gw = Gateway::start(&TestConfig::shipped_with(&ups));
    // New connection per request: the new process must accept on the same sockets.
    let run = RequestLoop::start(
        gw.api_url("/v1/chat/completions"),
        Some("demo-api-paid"),
        true,
    );
    run.advance(30).await;

    let (new, outcomes) = upgrade_under_load(&mut gw, run, |_| {}).await;
    let upgrade_log =
        std::fs::read_to_string(gw.dir.path().join("upgrade.log")).unwrap_or_default();
    assert!(outcomes.len() >= 80, "only {} requests ran", outcomes.len());
    drop(new);
    assert!(upgrade_log.contains("listening on"), "{upgrade_log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_account_line_quarantines_that_account_while_every_other_line_applies() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let run = chat_free_loop(&gw, 10).await;
    let c = client();
    let paid = gw.api_url("/v1/chat/completions");
    assert_eq!(support::post_as(&c, &paid, "demo-api-paid").await, 200);

    // One export: demo-chat-free opts out, and demo-api-paid's line gets a
    // plan the rules do not know.
    let accounts = accounts_with_chat_free_opted_out();
    let paid_line = accounts
        .lines()
        .find(|l| l.contains("\"acct-api-paid\""))
        .expect("paid line");
    let bad = accounts.replace(
        paid_line,
        &paid_line.replace("\"plan\": \"paid\"", "\"plan\": \"enterprise\""),
    );
    let bad_line = bad
        .lines()
        .position(|l| l.contains("enterprise"))
        .expect("bad line")
        + 1;
    gw.replace_file("accounts.jsonl", &bad);

    let applied = eventually(Duration::from_secs(10), || {
        run.last().and_then(|o| o.training).as_deref() == Some("denied")
    })
    .await;
    run.advance(10).await;
    let outcomes = run.finish().await;
    assert!(
        applied,
        "the opt-out beside the bad line was held back; logs:\n{}",
        gw.logs()
    );
    assert_none_failed(&outcomes);

    let before = ups.all_requests().len();
    let resp = c
        .post(&paid)
        .bearer_auth("demo-api-paid")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 403);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "consent_record_invalid");
    assert_eq!(ups.all_requests().len(), before, "nothing forwarded");
    // Other accounts of the same file are served.
    assert_eq!(support::post_as(&c, &paid, "demo-api-free").await, 200);

    // Reported: the log names file:line, the gauge counts it, explain names it.
    let location = format!("accounts.jsonl:{bad_line}: account quarantined");
    assert!(
        eventually(Duration::from_secs(5), || gw.logs().contains(&location)).await,
        "{location} not logged:\n{}",
        gw.logs()
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        support::metric(&metrics, "privacy_gateway_accounts_quarantined"),
        1.0,
        "{metrics}"
    );
    assert!(metrics.contains("privacy_gateway_config_reloads_total{result=\"success\"} 1"));
    let out = std::process::Command::new(support::binary())
        .args(["explain", "--path", "/v1/chat/completions", "--header"])
        .arg("Authorization: Bearer demo-api-paid")
        .arg("--config")
        .arg(gw.dir.path().join("gateway.toml"))
        .output()
        .expect("explain");
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(explained["status"], 403);
    assert_eq!(explained["error"], "consent_record_invalid");
    assert_eq!(explained["quarantine"]["account"], "acct-api-paid");
    assert_eq!(explained["quarantine"]["line"], bad_line);
    assert!(
        explained["quarantine"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("plan `enterprise` is not defined")),
        "{explained}"
    );
    // The audit line of the refused request names the quarantine too.
    let audited = eventually(Duration::from_secs(5), || {
        support::audit_json(&gw)
            .iter()
            .any(|l| l["status"] == 403 && l["quarantine"]["line"] == bad_line)
    })
    .await;
    assert!(audited, "{:?}", gw.audit_lines());

    // The fixed line applies on the next reload.
    gw.replace_file("accounts.jsonl", &accounts);
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::post_as(&c, &paid, "demo-api-paid").await != 200 {
        assert!(Instant::now() < deadline, "the fixed line was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        support::metric(&metrics, "privacy_gateway_accounts_quarantined"),
        0.0
    );
}

/// The shipped configuration with its accounts compiled (`accounts.pgcs`)
/// and a change folder, in front of `ups`.
fn compiled_with(ups: &Upstreams) -> TestConfig {
    let mut config = TestConfig::shipped_with(ups);
    config.compiled_accounts = true;
    config
}

/// demo-chat-free's line with `training_opt_out` added.
fn chat_free_opted_out_line() -> String {
    accounts_with_chat_free_opted_out()
        .lines()
        .find(|l| l.contains("\"acct-chat-free\""))
        .expect("line")
        .to_string()
}

/// demo-api-paid's line with a plan the rules do not know.
fn api_paid_on_an_unknown_plan() -> String {
    shipped("accounts.jsonl")
        .lines()
        .find(|l| l.contains("\"acct-api-paid\""))
        .expect("line")
        .replace("\"plan\": \"paid\"", "\"plan\": \"enterprise\"")
}

async fn reload_counts(gw: &Gateway) -> (f64, f64) {
    let (_, metrics) = gw.admin_get("/metrics").await;
    (
        support::metric(
            &metrics,
            "privacy_gateway_config_reloads_total{result=\"success\"}",
        ),
        support::metric(
            &metrics,
            "privacy_gateway_config_reloads_total{result=\"failure\"}",
        ),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_file_applies_on_a_compiled_snapshot_under_load_without_a_failed_request() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&compiled_with(&ups));
    opt_out_applies_under_load(&gw, || {
        gw.write_change("1.jsonl", &(chat_free_opted_out_line() + "\n"))
    })
    .await;

    // Its audit lines say which change decided, under which revision.
    let audited = eventually(Duration::from_secs(5), || {
        support::audit_json(&gw).iter().any(|l| {
            l["training"] == "denied"
                && l["consent_revision"]
                    .as_str()
                    .is_some_and(|r| r.ends_with("+1"))
                && l["consent_source"]["change"] == 1
                && l["consent_source"]["line"] == 1
                && l["consent_source"]["file"]
                    .as_str()
                    .is_some_and(|f| f.ends_with("changes/1.jsonl"))
        })
    })
    .await;
    assert!(audited, "{:?}", gw.audit_lines().last());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_change_file_is_refused_whole_and_a_bad_line_in_one_quarantines_only_its_account() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&compiled_with(&ups));
    let run = chat_free_loop(&gw, 10).await;
    let c = client();
    let paid = gw.api_url("/v1/chat/completions");

    // A torn line: the whole file is refused, the opt-out beside it too.
    let opted_out = chat_free_opted_out_line();
    gw.write_change(
        "1.jsonl",
        &format!("{opted_out}\n{{\"id\": \"acct-torn\", \"product\"\n"),
    );
    let reported = eventually(Duration::from_secs(10), || {
        gw.logs().contains("1.jsonl:2: not a JSON object")
    })
    .await;
    assert!(reported, "{}", gw.logs());
    run.advance(10).await;
    assert_eq!(
        run.last().and_then(|o| o.training).as_deref(),
        Some("allowed"),
        "a refused change file applied"
    );
    assert_eq!(reload_counts(&gw).await, (0.0, 1.0));

    // Fixed, with one line the gateway cannot understand: that account is
    // quarantined, the opt-out applies.
    gw.write_change(
        "1.jsonl",
        &format!("{opted_out}\n{}\n", api_paid_on_an_unknown_plan()),
    );
    until_denied(run, &gw).await;
    let before = ups.all_requests().len();
    assert_eq!(support::post_as(&c, &paid, "demo-api-paid").await, 403);
    assert_eq!(ups.all_requests().len(), before, "nothing forwarded");
    assert_eq!(support::post_as(&c, &paid, "demo-api-free").await, 200);
    assert!(
        eventually(Duration::from_secs(5), || gw
            .logs()
            .contains("1.jsonl:2: account quarantined"))
        .await,
        "{}",
        gw.logs()
    );
    let (_, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(
        support::metric(&metrics, "privacy_gateway_accounts_quarantined"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_compiled_snapshot_is_refused_and_the_last_good_one_keeps_serving() {
    let ups = Upstreams::start().await;
    let gw = Gateway::start(&compiled_with(&ups));
    let run = chat_free_loop(&gw, 10).await;

    let compiled = std::fs::read(gw.dir.path().join("accounts.pgcs")).expect("read");
    gw.replace_file_bytes("accounts.pgcs", &compiled[..compiled.len() / 2]);
    let reported = eventually(Duration::from_secs(10), || {
        gw.logs().contains("accounts.pgcs: the file is")
    })
    .await;
    assert!(reported, "{}", gw.logs());
    run.advance(20).await;
    assert_eq!(reload_counts(&gw).await, (0.0, 1.0));

    // A bit flipped in the header: refused as well.
    let mut flipped = compiled.clone();
    flipped[300] ^= 1;
    gw.replace_file_bytes("accounts.pgcs", &flipped);
    assert!(
        eventually(Duration::from_secs(10), || gw.logs().contains("damaged")).await,
        "{}",
        gw.logs()
    );
    run.advance(10).await;
    assert_eq!(
        run.last().and_then(|o| o.training).as_deref(),
        Some("allowed")
    );

    // A good snapshot, compiled from a new export, applies.
    std::fs::write(
        gw.dir.path().join("export.jsonl"),
        accounts_with_chat_free_opted_out(),
    )
    .expect("export");
    support::compile_accounts(gw.dir.path(), "export.jsonl", "accounts.pgcs");
    until_denied(run, &gw).await;
}

/// The `/proc/PID/maps` lines mapping `accounts.pgcs`, as `(device, inode)`.
fn mapped_snapshot(pid: u32) -> Option<(String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    maps.lines()
        .find(|l| l.ends_with("/accounts.pgcs"))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields[3].to_string(), fields[4].to_string())
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn old_and_new_process_share_one_compiled_snapshot_through_an_upgrade() {
    let ups = Upstreams::start().await;
    let mut gw = Gateway::start(&compiled_with(&ups));
    let run = RequestLoop::start(
        gw.api_url("/v1/chat/completions"),
        Some("demo-api-paid"),
        true,
    );
    run.advance(30).await;
    let old = mapped_snapshot(gw.pid()).expect("the running process maps the snapshot");

    // Both map the same file (one copy in the page cache), while the old
    // one still serves.
    let (new, outcomes) = upgrade_under_load(&mut gw, run, |new| {
        assert_eq!(mapped_snapshot(new), Some(old));
    })
    .await;
    assert!(outcomes.len() >= 80, "only {} requests ran", outcomes.len());
    drop(new);
}
