//! Requests per second and latency through the real gateway binary, against
//! the same requests sent straight to the upstream.
//!
//! ```text
//! cargo bench --bench end_to_end
//! ```
//!
//! On loopback only: one echo upstream (`privacy_gateway::echo`) stands in
//! for every pool of the shipped `pools.toml`; the gateway binary built by
//! cargo for this bench (`target/release/privacy-gateway` under `cargo
//! bench`) runs with the shipped rules and accounts, as deployed: access
//! log to a file, audit lines to a file, admin listener (metrics) on. Its
//! upgrade socket and pid file are in a temporary folder, so it clashes with
//! no other gateway on the machine. Three phases, each of
//! `E2E_REQUESTS` (default 20,000) `POST /v1/chat/completions` over
//! `E2E_CONCURRENCY` (default 32) keep-alive connections:
//!
//! - (a) straight to the echo upstream;
//! - (b) through the gateway's `api` listener as `demo-api-paid`;
//! - (c) through the gateway's `chat` listener, anonymous.
//!
//! It prints requests/s and p50/p99 latency per phase and the ratios
//! gateway/direct. Client, echo and gateway share the machine's cores, so
//! read the ratios, not the absolute figures. All phases together stop
//! after 60 s whatever the counts; the gateway is killed on exit, panic
//! included. `E2E_GATEWAY_THREADS` sets the gateway's worker threads per
//! listener (default 2, as shipped). Without `--bench` (`cargo test
//! --benches`) it runs a 200-request smoke test instead.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use privacy_gateway::echo::EchoUpstream;

/// All phases together stop after this long.
const TIME_CAP: Duration = Duration::from_secs(60);
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const PATH: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"bench","messages":[{"role":"user","content":"Hello"}]}"#;

struct Settings {
    requests: usize,
    concurrency: usize,
    warmup: usize,
    gateway_threads: usize,
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

fn settings() -> Settings {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    let bench = std::env::args().any(|a| a == "--bench");
    let (requests, concurrency) = if bench { (20_000, 32) } else { (200, 4) };
    let requests = env_number("E2E_REQUESTS", requests);
    let concurrency = env_number("E2E_CONCURRENCY", concurrency);
    Settings {
        requests,
        concurrency,
        warmup: (concurrency * 20).min(requests),
        gateway_threads: env_number("E2E_GATEWAY_THREADS", 2),
    }
}

// ---------------------------------------------------------------- gateway

/// The gateway process; killed when dropped, panics included.
struct GatewayProcess {
    child: Child,
    dir: tempfile::TempDir,
    api: SocketAddr,
    chat: SocketAddr,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The shipped `pools.toml` with every pool's addresses replaced by `url`.
fn pools_pointing_at(url: &str) -> String {
    let mut pools: toml::Table = toml::from_str(&shipped("pools.toml")).expect("pools.toml");
    for pool in pools["pool"].as_array_mut().expect("[[pool]]") {
        pool["addresses"] = toml::Value::Array(vec![toml::Value::String(url.to_string())]);
    }
    toml::to_string(&pools).expect("serialize pools")
}

/// Three different free loopback ports (all held until all are chosen).
fn free_ports() -> [u16; 3] {
    let held: [TcpListener; 3] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("a free loopback port"));
    held.map(|l| l.local_addr().expect("a bound socket").port())
}

impl GatewayProcess {
    /// Writes a configuration (shipped rules and accounts, every pool at
    /// `upstream`), starts the binary, and waits until both listeners accept.
    fn start(upstream: &str, threads: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let [api, chat, admin] = free_ports().map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        // As deployed: audit lines and metrics on. Upgrade socket and pid
        // file in the temporary folder, clear of any other gateway.
        let gateway = format!(
            "threads = {threads}\n\n\
             [[listener]]\naddress = \"{api}\"\nproduct = \"api\"\n\n\
             [[listener]]\naddress = \"{chat}\"\nproduct = \"chat\"\n\n\
             [files]\nrules = \"rules.toml\"\npools = \"pools.toml\"\naccounts = \"accounts.jsonl\"\n\n\
             [upstream]\nconnect_timeout_ms = 1000\nread_timeout_ms = 10000\n\n\
             [process]\nupgrade_sock = \"{}\"\npid_file = \"{}\"\n\n\
             [admin]\naddress = \"{admin}\"\n\n\
             [audit]\npath = \"audit.jsonl\"\n",
            // In a folder of its own, which `run` creates owner-only.
            dir.path().join("run").join("upgrade.sock").display(),
            dir.path().join("gateway.pid").display(),
        );
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write config")
        };
        write("gateway.toml", &gateway);
        write("rules.toml", &shipped("rules.toml"));
        write("pools.toml", &pools_pointing_at(upstream));
        write("accounts.jsonl", &shipped("accounts.jsonl"));
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log file");
        let child = Command::new(binary())
            .arg("run")
            .arg("--config")
            .arg(dir.path().join("gateway.toml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary().display()));
        let mut gateway = GatewayProcess {
            child,
            dir,
            api,
            chat,
        };
        gateway.wait_ready();
        gateway
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [self.api, self.chat] {
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("gateway exited with {status}:\n{}", self.logs());
                }
                assert!(
                    Instant::now() < deadline,
                    "gateway did not listen on {addr}:\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The end of what the gateway printed.
    fn logs(&self) -> String {
        let bytes = std::fs::read(self.dir.path().join("gateway.log")).unwrap_or_default();
        let tail = bytes.len().saturating_sub(4000);
        String::from_utf8_lossy(&bytes[tail..]).into_owned()
    }
}

/// The gateway binary cargo built beside this bench (release under `cargo bench`).
fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_privacy-gateway"))
}

// ---------------------------------------------------------------- load

/// One phase: where to send, and as whom.
struct Phase {
    name: &'static str,
    url: String,
    headers: HeaderMap,
    /// The `x-privacy-account` the upstream must see (`None`: direct).
    account: Option<&'static str>,
}

struct PhaseResult {
    name: &'static str,
    ok: usize,
    errors: usize,
    wall: Duration,
    /// Sorted.
    latencies: Vec<Duration>,
    capped: bool,
}

impl PhaseResult {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.latencies.len() as f64).ceil() as usize;
        self.latencies[rank.clamp(1, self.latencies.len()) - 1]
    }
}

fn client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(concurrency)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client")
}

/// Checks one request goes through as expected before measuring.
async fn check(client: &reqwest::Client, phase: &Phase) -> Result<(), String> {
    let response = client
        .post(&phase.url)
        .headers(phase.headers.clone())
        .body(BODY)
        .send()
        .await
        .map_err(|e| format!("{}: {e}", phase.name))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status != 200 {
        return Err(format!("{}: status {status}: {body}", phase.name));
    }
    if let Some(expected) = phase.account {
        let echoed: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        let seen = echoed["headers"]["x-privacy-account"].as_str();
        if seen != Some(expected) {
            return Err(format!(
                "{}: upstream saw x-privacy-account {seen:?}, expected {expected}",
                phase.name
            ));
        }
    }
    Ok(())
}

/// Sends `total` requests over `concurrency` connections, stopping early at
/// `deadline`.
async fn load(
    client: &reqwest::Client,
    phase: &Phase,
    total: usize,
    concurrency: usize,
    deadline: Instant,
) -> PhaseResult {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = phase.url.clone();
        let headers = phase.headers.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total / concurrency + 1);
            let mut errors = 0;
            while next.fetch_add(1, Ordering::Relaxed) < total && Instant::now() < deadline {
                let sent = Instant::now();
                let answered = match client
                    .post(&url)
                    .headers(headers.clone())
                    .body(BODY)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                if answered {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                }
            }
            (latencies, errors)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0;
    for task in tasks {
        let (l, e) = task.await.expect("load task");
        latencies.extend(l);
        errors += e;
    }
    let wall = started.elapsed();
    latencies.sort_unstable();
    PhaseResult {
        name: phase.name,
        ok: latencies.len(),
        errors,
        wall,
        capped: latencies.len() + errors < total,
        latencies,
    }
}

async fn measure(phases: &[Phase], settings: &Settings) -> Vec<PhaseResult> {
    let cap = Instant::now() + TIME_CAP;
    let mut results = Vec::new();
    for (i, phase) in phases.iter().enumerate() {
        // Each phase may use an equal share of what is left of the cap.
        let now = Instant::now();
        let share = cap.saturating_duration_since(now) / (phases.len() - i) as u32;
        let deadline = now + share;
        let client = client(settings.concurrency);
        if let Err(e) = check(&client, phase).await {
            panic!("{e}");
        }
        let warm = load(
            &client,
            phase,
            settings.warmup,
            settings.concurrency,
            deadline,
        )
        .await;
        assert_eq!(warm.errors, 0, "{}: errors while warming up", phase.name);
        let result = load(
            &client,
            phase,
            settings.requests,
            settings.concurrency,
            deadline,
        )
        .await;
        eprintln!(
            "  {}: {} ok, {} errors in {:.2?}{}",
            result.name,
            result.ok,
            result.errors,
            result.wall,
            if result.capped {
                " (stopped by the time cap)"
            } else {
                ""
            }
        );
        results.push(result);
    }
    results
}

// ---------------------------------------------------------------- main

fn main() {
    let settings = settings();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let echo = runtime
        .block_on(EchoUpstream::start("bench-echo"))
        .expect("start echo upstream");
    let gateway = GatewayProcess::start(&echo.url(), settings.gateway_threads);
    eprintln!(
        "end_to_end: {} requests per phase, {} connections, gateway {} ({} threads per listener), echo {}",
        settings.requests,
        settings.concurrency,
        binary().display(),
        settings.gateway_threads,
        echo.url()
    );

    let json = |h: &mut HeaderMap| {
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    };
    let mut direct = HeaderMap::new();
    json(&mut direct);
    let mut paid = direct.clone();
    paid.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer demo-api-paid"),
    );
    let phases = [
        Phase {
            name: "(a) direct to echo",
            url: format!("{}{PATH}", echo.url()),
            headers: direct.clone(),
            account: None,
        },
        Phase {
            name: "(b) gateway, api-paid",
            url: format!("http://{}{PATH}", gateway.api),
            headers: paid,
            account: Some("acct-api-paid"),
        },
        Phase {
            name: "(c) gateway, chat anonymous",
            url: format!("http://{}{PATH}", gateway.chat),
            headers: direct,
            account: Some("anonymous"),
        },
    ];
    let results = runtime.block_on(measure(&phases, &settings));
    drop(gateway);
    drop(echo);

    println!();
    println!(
        "{:<30} {:>9} {:>7} {:>10} {:>10} {:>10}",
        "phase", "ok", "errors", "req/s", "p50", "p99"
    );
    for r in &results {
        println!(
            "{:<30} {:>9} {:>7} {:>10.0} {:>10.2?} {:>10.2?}",
            r.name,
            r.ok,
            r.errors,
            r.rps(),
            r.percentile(50.0),
            r.percentile(99.0)
        );
    }
    let base = &results[0];
    println!();
    println!("ratios gateway / direct (throughput < 1 and latency > 1 mean slower):");
    for r in &results[1..] {
        println!(
            "{:<30} req/s x{:.2}   p50 x{:.2}   p99 x{:.2}   (p50 +{:.0?})",
            r.name,
            r.rps() / base.rps(),
            ratio(r.percentile(50.0), base.percentile(50.0)),
            ratio(r.percentile(99.0), base.percentile(99.0)),
            r.percentile(50.0).saturating_sub(base.percentile(50.0)),
        );
    }
    assert!(
        results.iter().all(|r| r.errors == 0),
        "some requests failed; see the table above"
    );
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
