//! The staging load test: a realistic mix of requests against a running
//! gateway whose pools are echo upstreams, for a bounded time and rate, with
//! Goose (<https://book.goose.rs>) generating the load and reporting
//! throughput and latency percentiles, and every answer checked against
//! what the policy allows:
//!
//! ```text
//! cargo run --release --example load_test -- \
//!     --gateway-config config/gateway.toml \
//!     --api-url http://127.0.0.1:8080 --chat-url http://127.0.0.1:8081 \
//!     --run-time 30s --users 32 --throttle-requests 500
//! ```
//!
//! The mix: the demo accounts' keys (or `--key`, repeatable), anonymous
//! chat, and `--unknown-percent` (3) of unknown keys, across every shipped
//! route, `--stream-percent` (10) of chat requests streamed, each with a
//! spoofed `X-Forwarded-For` and a client-set `x-privacy-training` that
//! must not survive. Every answer is checked (Goose counts a failed check
//! as a failed request, and the run exits non-zero):
//!
//! - **no forbidden pool**: the pool that echoed (and every streamed event's
//!   pool) is one the decision permits;
//! - **no full address**: neither the client's address (`--client-ip`, the
//!   address the gateway sees; default 127.0.0.1) nor the spoofed one
//!   reaches the upstream, nor does the API key;
//! - **stamps equal `explain`'s**: `privacy_gateway::explain` with the
//!   same files (`--gateway-config`), the echoed decision id and pool
//!   reproduces every stamped header exactly, signature included;
//! - **refusals as decided**: a request the gateway answers itself gets the
//!   status and `error.code` that `explain` gives.
//!
//! The gateway must run with echo upstreams for its pools (`privacy-gateway
//! demo`, or pools pointed at them) and the same rules, accounts and
//! signing key as `--gateway-config`. Goose's own options (`--help`) set
//! users, rate and time; defaults: 16 users, 200 requests/s, 20 s.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use goose::config::GooseConfiguration;
use goose::goose::GooseResponse;
use goose::prelude::*;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use privacy_gateway::config::{self, LoadOptions, Snapshot};
use privacy_gateway::explain::{explain, DescribedRequest};
use privacy_gateway::policy::Product;
use privacy_gateway::stamp;
use serde_json::Value;

/// Load the gateway with a realistic mix and check every answer.
#[derive(Parser, Debug)]
#[command(about)]
pub struct Args {
    /// The gateway's `gateway.toml` (same rules, pools, accounts and signing key).
    #[arg(long)]
    pub gateway_config: PathBuf,
    /// Base URL of the gateway's `api` listener.
    #[arg(long)]
    pub api_url: Option<String>,
    /// Base URL of the gateway's `chat` listener.
    #[arg(long)]
    pub chat_url: Option<String>,
    /// The address the gateway sees these requests come from.
    #[arg(long, default_value = "127.0.0.1")]
    pub client_ip: IpAddr,
    /// An API key to send (repeatable; default: the demo accounts' keys).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// Percent of requests with an unknown key (key rotation).
    #[arg(long, default_value_t = 3.0)]
    pub unknown_percent: f64,
    /// Percent of chat requests streamed (`text/event-stream`).
    #[arg(long, default_value_t = 10.0)]
    pub stream_percent: f64,
    /// Goose's options: users, rate, time, reports.
    #[command(flatten)]
    pub goose: GooseConfiguration,
}

/// The demo accounts' keys (README, "Demo accounts").
pub const DEMO_KEYS: [&str; 16] = [
    "demo-api-free",
    "demo-api-free-objected",
    "demo-api-paid",
    "demo-api-zdr",
    "demo-api-no-cerebras",
    "demo-api-eu-only",
    "demo-chat-free",
    "demo-chat-free-optout",
    "demo-chat-pro",
    "demo-chat-student",
    "demo-chat-team",
    "demo-chat-team-optin",
    "demo-chat-no-geo",
    "demo-chat-restricted",
    "demo-api-free-zdr",
    "demo-chat-team-objected",
];

/// The shipped routes, chat three times as often as each other one.
const PATHS: [&str; 10] = [
    "/v1/chat/completions",
    "/v1/chat/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/fine_tuning/jobs",
    "/v1/feedback",
    "/v1/images/generations",
    "/v1/tools/web_search",
    "/v1/tools/code_interpreter",
    "/v1/connectors/gdrive/content",
];

/// What was checked, and what failed, over the whole run.
#[derive(Debug, Default)]
pub struct Tally {
    /// Forwarded answers whose echo passed every check.
    pub forwarded: AtomicU64,
    /// Streams whose every event passed.
    pub streamed: AtomicU64,
    /// Answers of the gateway itself, as `explain` decided them.
    pub refused: AtomicU64,
    /// Failed checks by invariant: how many, and the first few details.
    violations: Mutex<BTreeMap<&'static str, (u64, Vec<String>)>>,
}

impl Tally {
    fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Forwarded => &self.forwarded,
            Outcome::Streamed => &self.streamed,
            Outcome::Refused => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn violate(&self, kind: &'static str, detail: String) {
        if let Ok(mut v) = self.violations.lock() {
            let (count, details) = v.entry(kind).or_default();
            *count += 1;
            if details.len() < 3 {
                details.push(detail);
            }
        }
    }

    /// Answers that passed every check.
    pub fn passed(&self) -> u64 {
        [&self.forwarded, &self.streamed, &self.refused]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Failed checks of `kind` (`forbidden_pool`, `full_address`,
    /// `credentials`, `stamps`, `decision_id`, `refusal`, `stream`, `echo`).
    pub fn violations_of(&self, kind: &str) -> u64 {
        self.violations
            .lock()
            .map_or(0, |v| v.get(kind).map_or(0, |(n, _)| *n))
    }

    /// Failed checks in all.
    pub fn violation_count(&self) -> u64 {
        self.violations
            .lock()
            .map_or(0, |v| v.values().map(|(n, _)| n).sum())
    }

    fn print(&self) {
        println!(
            "\ninvariants: {} forwarded answers (pool permitted, no full address, stamps equal explain's), \
             {} streams (every event from a permitted pool), {} refusals as explain decided; {} violations",
            self.forwarded.load(Ordering::Relaxed),
            self.streamed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.violation_count(),
        );
        if let Ok(v) = self.violations.lock() {
            for (kind, (count, details)) in v.iter() {
                println!("  VIOLATION {kind} x{count}");
                for detail in details {
                    println!("    {detail}");
                }
            }
        }
    }
}

/// Everything the users share.
struct Plan {
    snapshot: Snapshot,
    api_url: Option<String>,
    chat_url: Option<String>,
    client_ip: IpAddr,
    keys: Vec<String>,
    unknown_per_10k: u64,
    stream_per_10k: u64,
    next: AtomicU64,
    tally: Arc<Tally>,
}

/// splitmix64: a well-mixed value of `n`, so the mix is spread and repeatable.
fn mix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How an answer passed.
enum Outcome {
    Forwarded,
    Streamed,
    Refused,
}

/// One request of the mix, and what `explain` decided for it.
struct Drawn {
    name: &'static str,
    url: String,
    described: DescribedRequest,
    body: &'static str,
    stream: bool,
    spoofed: IpAddr,
    expected: Value,
}

impl Plan {
    fn draw(&self) -> Drawn {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let r = mix(n);
        let path = PATHS[(r % PATHS.len() as u64) as usize];
        let chat_path = path == "/v1/chat/completions";
        let unknown = (r >> 8) % 10_000 < self.unknown_per_10k;
        let stream = chat_path && (r >> 24) % 10_000 < self.stream_per_10k;
        // One caller in (keys + 1) is anonymous.
        let who = ((r >> 40) % (self.keys.len() as u64 + 1)) as usize;
        let key = if unknown {
            Some(format!("loadtest-unknown-{n}"))
        } else {
            self.keys.get(who).cloned()
        };
        // Anonymous traffic is chat's; keys go to either listener.
        let (listener, base) = match (&self.api_url, &self.chat_url) {
            (Some(api), Some(chat)) => {
                if key.is_some() && r & (1 << 60) == 0 {
                    (Product::Api, api)
                } else {
                    (Product::Chat, chat)
                }
            }
            (Some(api), None) => (Product::Api, api),
            (None, Some(chat)) => (Product::Chat, chat),
            (None, None) => unreachable!("checked in run()"),
        };
        let spoofed = IpAddr::V4(Ipv4Addr::new(
            198,
            18,
            (r >> 48) as u8,
            1 + (r >> 56) as u8 % 254,
        ));
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(value) = key.and_then(|k| HeaderValue::try_from(format!("Bearer {k}")).ok()) {
            headers.insert(http::header::AUTHORIZATION, value);
        }
        if stream {
            headers.insert(
                http::header::ACCEPT,
                HeaderValue::from_static("text/event-stream"),
            );
        }
        if let Ok(v) = HeaderValue::try_from(spoofed.to_string()) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        headers.insert(
            HeaderName::from_static("x-privacy-training"),
            HeaderValue::from_static("allowed"),
        );
        if (r >> 20).is_multiple_of(10) {
            headers.insert(
                HeaderName::from_static("sec-gpc"),
                HeaderValue::from_static("1"),
            );
        }
        let described = DescribedRequest {
            method: Method::POST,
            path: path.to_string(),
            headers,
            peer: self.client_ip,
            client: None,
            listener_product: listener,
            pool: None,
            decision_id: None,
        };
        let expected = explain(&self.snapshot, &described).unwrap_or(Value::Null);
        Drawn {
            name: match (unknown, stream) {
                (true, _) => "unknown key",
                (false, true) => "chat stream",
                (false, false) => path_name(path),
            },
            url: format!("{}{path}", base.trim_end_matches('/')),
            described,
            body: if stream {
                r#"{"model":"m","stream":true}"#
            } else {
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
            },
            stream,
            spoofed,
            expected,
        }
    }

    /// Checks one answer; `Err` names the invariant it breaks.
    fn check(
        &self,
        drawn: &Drawn,
        status: u16,
        decision_id: Option<&str>,
        body: &str,
    ) -> Result<Outcome, (&'static str, String)> {
        let expected_status = drawn.expected["status"].as_u64().unwrap_or(0);
        if u64::from(status) != expected_status {
            return Err((
                "refusal",
                format!(
                    "{}: status {status}, explain says {expected_status}",
                    drawn.name
                ),
            ));
        }
        let Some(decision_id) = decision_id else {
            return Err((
                "decision_id",
                format!("{}: no decision id answered", drawn.name),
            ));
        };
        if status != 200 {
            let code = serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
            let expected_code = drawn.expected["error"].as_str();
            if code.as_deref() != expected_code {
                return Err((
                    "refusal",
                    format!(
                        "{}: error {code:?}, explain says {expected_code:?}",
                        drawn.name
                    ),
                ));
            }
            return Ok(Outcome::Refused);
        }
        let permitted = |pool: &str| {
            drawn.expected["candidate_tiers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|tier| tier["pools"].as_array())
                .flatten()
                .any(|p| p == pool)
        };
        if drawn.stream {
            let mut events = 0;
            let mut done = false;
            for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let pool = serde_json::from_str::<Value>(data)
                    .ok()
                    .and_then(|v| v["pool"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if !permitted(&pool) {
                    return Err(("forbidden_pool", format!("stream event from `{pool}`")));
                }
                events += 1;
            }
            if events == 0 || !done {
                return Err(("stream", format!("{events} events, [DONE]: {done}")));
            }
            return Ok(Outcome::Streamed);
        }
        let echo: Value = serde_json::from_str(body)
            .map_err(|_| ("echo", format!("{}: the answer is not an echo", drawn.name)))?;
        let pool = echo["pool"].as_str().unwrap_or_default();
        if !permitted(pool) {
            return Err((
                "forbidden_pool",
                format!("{}: answered by `{pool}`", drawn.name),
            ));
        }
        let echoed = echo["headers"].as_object().cloned().unwrap_or_default();
        let client = self.client_ip.to_string();
        let spoofed = drawn.spoofed.to_string();
        let key = drawn
            .described
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        for (name, value) in &echoed {
            let value = value.as_str().unwrap_or_default();
            // The Host header names the gateway, which may share the client's address on loopback.
            if value.contains(&spoofed) || (name != "host" && value.contains(&client)) {
                return Err((
                    "full_address",
                    format!("upstream header `{name}` holds a full address"),
                ));
            }
            // A pool's own credential may be sent; the client's key never.
            if key.is_some_and(|k| value.contains(k)) {
                return Err((
                    "credentials",
                    format!("upstream header `{name}` holds the client's key"),
                ));
            }
        }
        if echoed.get(stamp::DECISION_ID).and_then(Value::as_str) != Some(decision_id) {
            return Err((
                "decision_id",
                "echoed decision id differs from the answer's".into(),
            ));
        }
        let mut replay = drawn.described.clone();
        replay.decision_id = Some(decision_id.to_string());
        replay.pool = Some(pool.to_string());
        let explained = explain(&self.snapshot, &replay)
            .map_err(|e| ("forbidden_pool", format!("{}: {e}", drawn.name)))?;
        let stamped: serde_json::Map<String, Value> = echoed
            .into_iter()
            .filter(|(name, _)| stamp::is_reserved(name) || name == stamp::FORWARDED_FOR)
            .collect();
        if explained["headers"].as_object() != Some(&stamped) {
            return Err((
                "stamps",
                format!(
                    "{} via `{pool}`: stamped {}, explain says {}",
                    drawn.name,
                    Value::Object(stamped),
                    explained["headers"]
                ),
            ));
        }
        Ok(Outcome::Forwarded)
    }
}

/// A short name for a route, for Goose's per-request table.
fn path_name(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/embeddings" => "embeddings",
        "/v1/fine_tuning/jobs" => "fine_tuning",
        "/v1/feedback" => "feedback",
        "/v1/images/generations" => "image_generation",
        "/v1/tools/web_search" => "web_search",
        "/v1/tools/code_interpreter" => "code_interpreter",
        _ => "connector",
    }
}

/// One request of the mix: drawn, sent, checked.
async fn one_request(user: &mut GooseUser, plan: &Plan) -> TransactionResult {
    let drawn = plan.draw();
    let expected_status = drawn.expected["status"]
        .as_u64()
        .and_then(|s| u16::try_from(s).ok())
        .unwrap_or(200);
    let builder = user
        .get_request_builder(&GooseMethod::Post, &drawn.url)?
        .headers(drawn.described.headers.clone())
        .body(drawn.body);
    let request = GooseRequest::builder()
        .method(GooseMethod::Post)
        .path(drawn.url.as_str())
        .name(drawn.name)
        .expect_status_code(expected_status)
        .set_request_builder(builder)
        .build();
    let GooseResponse {
        mut request,
        response,
    } = user.request(request).await?;
    // A request that got no answer is already counted as failed by Goose.
    let Ok(answer) = response else {
        return Ok(());
    };
    let status = answer.status().as_u16();
    let decision_id = answer
        .headers()
        .get(stamp::DECISION_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = answer.text().await.unwrap_or_default();
    match plan.check(&drawn, status, decision_id.as_deref(), &body) {
        Ok(outcome) => {
            plan.tally.count(outcome);
            Ok(())
        }
        Err((kind, detail)) => {
            plan.tally.violate(kind, detail);
            user.set_failure(kind, &mut request, None, None)
        }
    }
}

/// Runs the load test `args` describe; the tally of what was checked.
pub async fn run(args: Args) -> Result<Arc<Tally>, String> {
    let (_, snapshot) = config::load(&args.gateway_config, &LoadOptions::default())
        .map_err(|e| format!("{}: {e}", args.gateway_config.display()))?;
    let Some(host) = args.api_url.clone().or_else(|| args.chat_url.clone()) else {
        return Err("give --api-url, --chat-url or both".into());
    };
    let keys = if args.keys.is_empty() {
        DEMO_KEYS.iter().map(|k| k.to_string()).collect()
    } else {
        args.keys
    };
    let per_10k = |percent: f64| (percent.clamp(0.0, 100.0) * 100.0) as u64;
    let tally = Arc::new(Tally::default());
    let plan = Arc::new(Plan {
        snapshot,
        api_url: args.api_url,
        chat_url: args.chat_url,
        client_ip: args.client_ip,
        keys,
        unknown_per_10k: per_10k(args.unknown_percent),
        stream_per_10k: per_10k(args.stream_percent),
        next: AtomicU64::new(0),
        tally: tally.clone(),
    });
    let unbounded = args.goose.run_time.is_none() && args.goose.iterations.is_none();
    let transaction: TransactionFunction = Arc::new(move |user| {
        let plan = plan.clone();
        Box::pin(async move { one_request(user, &plan).await })
    });
    let scenario =
        scenario!("mix").register_transaction(Transaction::new(transaction).set_name("request"));
    let goose = |e: GooseError| format!("{e:?}");
    let mut attack = GooseAttack::initialize_with_config(args.goose)
        .map_err(goose)?
        .register_scenario(scenario)
        .set_default(GooseDefault::Host, host.as_str())
        .map_err(goose)?
        .set_default(GooseDefault::Users, 16)
        .map_err(goose)?
        .set_default(GooseDefault::IncreaseRate, "16")
        .map_err(goose)?
        .set_default(GooseDefault::ThrottleRequests, 200)
        .map_err(goose)?
        .set_default(GooseDefault::NoTelnet, true)
        .map_err(goose)?;
    if unbounded {
        attack = attack
            .set_default(GooseDefault::RunTime, 20)
            .map_err(goose)?;
    }
    attack.execute().await.map_err(goose)?;
    tally.print();
    Ok(tally)
}

#[allow(dead_code)] // the test harness includes this file and calls `run`
fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("load_test: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(tally) if tally.violation_count() == 0 && tally.passed() > 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("load_test: {e}");
            ExitCode::from(2)
        }
    }
}
