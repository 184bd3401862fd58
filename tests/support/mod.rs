//! Test harness: starts the real `privacy-gateway` binary on loopback with a
//! generated configuration, in front of recording echo upstreams, one per pool.
#![allow(dead_code)]

pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use privacy_gateway::echo::{EchoUpstream, Recorded};

/// The client address tests connect from: loopback, but distinct from the
/// gateway's own 127.0.0.1, so that finding it anywhere upstream is a leak.
pub const CLIENT_V4: &str = "127.45.67.89";
/// Parts of the IPv6 client `2001:db8:1234:5678::abcd` beyond its /48, each
/// with a colon, so that none can turn up by chance in the random hex of a
/// decision id or signature, or in a port number.
pub const V6_CLIENT_PARTS: [&str; 3] = ["1234:5678", "5678:", ":abcd"];

/// The repository's shipped example configuration file `name`.
pub fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A loopback address that refuses every connection for as long as it is
/// held: bound but never listening, so no other test (or suite running
/// beside this one) can take the port and answer on it, as a port merely
/// found free could.
pub struct ClosedPort(tokio::net::TcpSocket);

impl ClosedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("a loopback port");
        ClosedPort(socket)
    }

    /// `http://127.0.0.1:PORT`, for a pool's `addresses`.
    pub fn url(&self) -> String {
        format!("http://{}", self.0.local_addr().expect("a bound socket"))
    }
}

/// A free port (bound, read, released): free on every address, so that a
/// test may bind it on 0.0.0.0 or any loopback address.
pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` different free ports. Each is held until all are chosen: a port
/// released at once may be handed out again by the very next bind, and a
/// gateway given one port for two listeners refuses its configuration.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: [TcpListener; N] = std::array::from_fn(|_| {
        TcpListener::bind("0.0.0.0:0").expect("a free port on every address")
    });
    held.map(|l| l.local_addr().expect("a bound socket").port())
}

/// One echo upstream per pool of the shipped `pools.toml`.
pub struct Upstreams {
    pub echoes: HashMap<String, EchoUpstream>,
}

impl Upstreams {
    /// Starts an echo for each shipped pool.
    pub async fn start() -> Self {
        let mut echoes = HashMap::new();
        for name in shipped_pool_names() {
            let echo = EchoUpstream::start(&name)
                .await
                .expect("start echo upstream");
            echoes.insert(name, echo);
        }
        Upstreams { echoes }
    }

    /// The echo of pool `name`.
    pub fn pool(&self, name: &str) -> &EchoUpstream {
        &self.echoes[name]
    }

    /// Addresses for each pool: its echo.
    pub fn addresses(&self) -> HashMap<String, Vec<String>> {
        self.echoes
            .iter()
            .map(|(name, echo)| (name.clone(), vec![echo.url()]))
            .collect()
    }

    /// Every request received by any pool, with the pool's name.
    pub fn all_requests(&self) -> Vec<(String, Recorded)> {
        let mut out = Vec::new();
        for (name, echo) in &self.echoes {
            for r in echo.requests() {
                out.push((name.clone(), r));
            }
        }
        out
    }

    /// The request carrying decision id `id`, with the pool that received it.
    pub fn by_decision(&self, id: &str) -> Option<(String, Recorded)> {
        self.all_requests()
            .into_iter()
            .find(|(_, r)| r.header("x-privacy-decision-id") == Some(id))
    }

    /// Stops `pool`'s upstream: once this returns, connects to it are
    /// refused and its kept-alive connections are closed.
    pub async fn stop(&mut self, pool: &str) {
        let echo = self.echoes.remove(pool).expect("a running pool");
        echo.stop().await;
    }

    /// Every byte any pool received.
    pub fn all_bytes(&self) -> Vec<u8> {
        self.echoes
            .values()
            .flat_map(|e| e.received_bytes())
            .collect()
    }
}

/// The names of the shipped pools.
pub fn shipped_pool_names() -> Vec<String> {
    let pools: toml::Table =
        toml::from_str(&shipped("pools.toml")).expect("shipped pools.toml parses");
    pools["pool"]
        .as_array()
        .expect("pools")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect()
}

/// The shipped `pools.toml` with each pool's addresses replaced.
pub fn pools_with_addresses(addresses: &HashMap<String, Vec<String>>) -> String {
    let mut pools: toml::Table =
        toml::from_str(&shipped("pools.toml")).expect("shipped pools.toml parses");
    for pool in pools["pool"].as_array_mut().expect("pools") {
        let name = pool["name"].as_str().expect("name").to_string();
        if let Some(addrs) = addresses.get(&name) {
            pool["addresses"] =
                toml::Value::Array(addrs.iter().cloned().map(toml::Value::String).collect());
        }
    }
    toml::to_string(&pools).expect("serialize pools")
}

/// `pools` with an active HTTP health check on every pool. A stopped echo
/// refuses the check's connect at once; the generous timeout and the second
/// failure needed keep a test process that stalls for a moment from taking
/// a live pool out.
pub fn with_health_checks(pools: &str, interval_ms: u64) -> String {
    let mut table: toml::Table = toml::from_str(pools).expect("pools parse");
    for pool in table["pool"].as_array_mut().expect("pools") {
        let check: toml::Table = toml::from_str(&format!(
            "kind = \"http\"\npath = \"/healthz\"\ninterval_ms = {interval_ms}\ntimeout_ms = 2000\nhealthy_threshold = 1\nunhealthy_threshold = 2\n"
        ))
        .expect("health check table");
        pool.as_table_mut()
            .expect("pool table")
            .insert("health_check".into(), toml::Value::Table(check));
    }
    toml::to_string(&table).expect("serialize pools")
}

/// What to write into the gateway's configuration folder.
#[derive(Clone)]
pub struct TestConfig {
    pub rules: String,
    pub pools: String,
    pub accounts: String,
    /// Lines for the `[trust]` table.
    pub trust: String,
    /// Lines for the `[files]` table beyond rules/pools/accounts (e.g. `geo = ...`).
    pub extra_files: String,
    /// Other tables appended to gateway.toml (e.g. `[signing]`).
    pub extra_tables: String,
    /// Extra files to place beside the configuration: (name, bytes).
    pub attachments: Vec<(String, Vec<u8>)>,
    /// Address of the chat listener (default 127.0.0.1).
    pub listen_host: String,
    /// `[upstream] ejection_ms`: how long a refusing address is left out.
    pub ejection_ms: u64,
    /// The body of the `[audit]` table.
    pub audit: String,
    /// Lay the files out as a Kubernetes ConfigMap volume does: each a
    /// symlink through `..data` to a timestamped folder.
    pub configmap_layout: bool,
    /// Lines for the `[admin]` table beyond its address (e.g. `token_file = ...`).
    pub admin: String,
    /// Lines for the api `[[listener]]` beyond address and product (e.g. TLS).
    pub api_listener: String,
    /// Lines for the chat `[[listener]]` beyond address and product.
    pub chat_listener: String,
    /// Lines for the `[upstream]` table beyond timeouts and ejection (e.g. DNS).
    pub upstream: String,
    /// Serve `accounts` compiled (`compile-accounts` into `accounts.pgcs`),
    /// with change files in `changes/`.
    pub compiled_accounts: bool,
}

impl TestConfig {
    /// The shipped rules and accounts, pools pointing at `upstreams`.
    pub fn shipped_with(upstreams: &Upstreams) -> Self {
        Self::shipped_with_pools(pools_with_addresses(&upstreams.addresses()))
    }

    /// The shipped rules and accounts with `pools`.
    pub fn shipped_with_pools(pools: String) -> Self {
        TestConfig {
            rules: shipped("rules.toml"),
            pools,
            accounts: shipped("accounts.jsonl"),
            trust: "identity_header = \"x-authenticated-account\"\n".into(),
            extra_files: String::new(),
            extra_tables: String::new(),
            attachments: Vec::new(),
            listen_host: "127.0.0.1".into(),
            ejection_ms: 5000,
            configmap_layout: false,
            compiled_accounts: false,
            audit: "path = \"audit.jsonl\"\n".into(),
            admin: String::new(),
            api_listener: String::new(),
            chat_listener: String::new(),
            upstream: String::new(),
        }
    }
}

impl TestConfig {
    /// Signs stamped headers with `key`, written as the key file `signing.key`.
    pub fn sign_with(&mut self, key: &[u8]) {
        self.extra_tables
            .push_str("\n[signing]\nkey_file = \"signing.key\"\n");
        self.attachments.push(("signing.key".into(), key.to_vec()));
    }
}

/// Echo upstreams for every shipped pool, and a gateway in front of them on
/// the shipped configuration as `edit` changes it.
pub async fn start_with(edit: impl FnOnce(&mut TestConfig)) -> (Upstreams, Gateway) {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    edit(&mut config);
    let gw = Gateway::start(&config);
    (ups, gw)
}

/// A running gateway process; killed when dropped.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    /// The `api` listener.
    pub api: SocketAddr,
    /// The `chat` listener.
    pub chat: SocketAddr,
    /// The admin listener (metrics, health).
    pub admin: SocketAddr,
}

/// Full client addresses the tests send from or claim; none may ever appear
/// in a log or audit line of the gateway.
pub const FULL_ADDRESSES: [&str; 10] = [
    CLIENT_V4,
    "198.51.100.23",
    "198.51.100.200",
    "203.0.113.77",
    "2001:db8:1234:5678::abcd",
    "127.45.1.1",
    // 203.0.113.77 carried by 6to4, NAT64 and Teredo addresses (spec §3).
    "2002:cb00:714d",
    "64:ff9b::cb00:714d",
    "34ff:8eb2",
    // 198.51.100.23 over 6to4.
    "2002:c633:6417",
];

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what the gateway logged (the logs hold no full
        // address, key or body), so a failure in CI can be read from its output.
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- the gateway's last log lines ---\n{}", tail.join("\n"));
        }
        // Every test that starts a gateway is also a log-capture test.
        if !std::thread::panicking() {
            let logs = format!(
                "{}\n{}\n{}",
                self.logs(),
                self.stdout(),
                self.audit_lines().join("\n")
            );
            for address in FULL_ADDRESSES {
                assert!(
                    !logs.contains(address),
                    "a log or audit line holds the full address {address}:\n{logs}"
                );
            }
        }
    }
}

/// The gateway binary built by cargo for the integration tests.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_privacy-gateway"))
}

impl Gateway {
    /// Writes `config`, starts the gateway, and waits until both listeners accept.
    pub fn start(config: &TestConfig) -> Gateway {
        Self::start_logging(config, "info")
    }

    /// [`Self::start`] with `RUST_LOG=rust_log` (e.g. `trace`, to show that
    /// even the most verbose logs hold no secret).
    pub fn start_logging(config: &TestConfig, rust_log: &str) -> Gateway {
        Self::start_with_log_filter(config, Some(rust_log))
    }

    /// [`Self::start`] without `RUST_LOG`: the process's default log settings.
    pub fn start_at_default_log_settings(config: &TestConfig) -> Gateway {
        Self::start_with_log_filter(config, None)
    }

    fn start_with_log_filter(config: &TestConfig, rust_log: Option<&str>) -> Gateway {
        // Ports found free may be taken by another test before the gateway
        // binds them: the gateway then says so and exits, and it is started
        // afresh on other ports (a few times, never forever).
        let mut attempts = 3;
        loop {
            attempts -= 1;
            match Self::try_start(config, rust_log) {
                Ok(gateway) => return gateway,
                Err(logs) if attempts > 0 && logs.contains("address in use") => {}
                Err(logs) => panic!("gateway exited:\n{logs}"),
            }
        }
    }

    /// One start on freshly chosen ports: the logs if the process exited.
    fn try_start(config: &TestConfig, rust_log: Option<&str>) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let host: IpAddr = config.listen_host.parse().expect("listen host");
        let [api, chat, admin] = free_ports();
        let api = SocketAddr::new(host, api);
        let chat = SocketAddr::new(host, chat);
        let admin = SocketAddr::new("127.0.0.1".parse().expect("loopback"), admin);
        let accounts = if config.compiled_accounts {
            "accounts = \"accounts.pgcs\"\naccount_changes = \"changes\""
        } else {
            "accounts = \"accounts.jsonl\""
        };
        let gateway = format!(
            "threads = 1\n\n[[listener]]\naddress = \"{api}\"\nproduct = \"api\"\n{}\n\n[[listener]]\naddress = \"{chat}\"\nproduct = \"chat\"\n{}\n\n\
             [files]\nrules = \"rules.toml\"\npools = \"pools.toml\"\n{accounts}\n{}\n\n[trust]\n{}\n\n\
             [upstream]\nconnect_timeout_ms = 500\nread_timeout_ms = 10000\nejection_ms = {}\n{}\n\n\
             [process]\nupgrade_sock = \"{}\"\npid_file = \"{}\"\ngrace_period_seconds = 1\ngraceful_shutdown_timeout_seconds = 5\n\n\
             [admin]\naddress = \"{admin}\"\n{}\n\n[audit]\n{}\n\n{}\n",
            config.api_listener,
            config.chat_listener,
            config.extra_files,
            config.trust,
            config.ejection_ms,
            config.upstream,
            dir.path().join("run").join("upgrade.sock").display(),
            dir.path().join("gateway.pid").display(),
            config.admin,
            config.audit,
            config.extra_tables
        );
        let write = |name: &str, bytes: &[u8]| {
            std::fs::write(dir.path().join(name), bytes).expect("write config")
        };
        write("gateway.toml", gateway.as_bytes());
        let files: Vec<(&str, &[u8])> = vec![
            ("rules.toml", config.rules.as_bytes()),
            ("pools.toml", config.pools.as_bytes()),
            ("accounts.jsonl", config.accounts.as_bytes()),
        ];
        if config.configmap_layout {
            configmap_publish(dir.path(), "..v1", &files);
            for (name, _) in &files {
                std::os::unix::fs::symlink(format!("..data/{name}"), dir.path().join(name))
                    .expect("symlink");
            }
        } else {
            for (name, bytes) in &files {
                write(name, bytes);
            }
        }
        for (name, bytes) in &config.attachments {
            write(name, bytes);
        }
        if config.compiled_accounts {
            std::fs::create_dir(dir.path().join("changes")).expect("changes folder");
            compile_accounts(dir.path(), "accounts.jsonl", "accounts.pgcs");
        }
        let child = spawn(dir.path(), "gateway.log", false, rust_log);
        let mut gateway = Gateway {
            child,
            dir,
            api,
            chat,
            admin,
        };
        gateway.wait_ready().map(|()| gateway)
    }

    /// Waits until every listener accepts and serves; the logs if the
    /// process exited.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        for addr in [self.api, self.chat, self.admin] {
            self.poll_until(
                deadline,
                &format!("gateway did not listen on {addr}"),
                |_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            )?;
        }
        // The sockets are bound before the services start: accepting is not
        // yet serving. `/readyz` says when every listener's service runs
        // (whether the pools are healthy is each test's business).
        self.poll_until(
            deadline,
            "the gateway's listeners did not start serving",
            |gw| {
                gw.admin_get_blocking("/readyz")
                    .1
                    .contains("\"listening\":true")
            },
        )
    }

    /// Polls `done` every 20 ms until it holds: the logs if the process
    /// exits first, a panic naming `what` at `deadline`.
    fn poll_until(
        &mut self,
        deadline: Instant,
        what: &str,
        mut done: impl FnMut(&Self) -> bool,
    ) -> Result<(), String> {
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exit {status}:\n{}", self.logs()));
            }
            assert!(Instant::now() < deadline, "{what}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `GET path` on the admin listener from a thread of its own, for code
    /// that cannot await (status 0 when the request fails).
    pub fn admin_get_blocking(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.admin);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                match reqwest::get(url).await {
                    Ok(resp) => (
                        resp.status().as_u16(),
                        resp.text().await.unwrap_or_default(),
                    ),
                    Err(_) => (0, String::new()),
                }
            })
        })
        .join()
        .expect("admin thread")
    }

    /// Starts a second process with `run --upgrade` on the same configuration
    /// (logging to `upgrade.log`): it takes the listeners over once the
    /// running one is sent `SIGQUIT`.
    pub fn start_upgrade(&self) -> Child {
        spawn(self.dir.path(), "upgrade.log", true, Some("info"))
    }

    /// Where the new process of an upgrade waits for the listening sockets
    /// (in a folder the gateway creates owner-only).
    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("run").join("upgrade.sock")
    }

    /// The gateway process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the gateway process to exit; returns whether it did.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Replaces configuration file `name` the way deploy tools do: a new
    /// file renamed over the old one.
    pub fn replace_file(&self, name: &str, contents: &str) {
        self.replace_file_bytes(name, contents.as_bytes());
    }

    /// [`Self::replace_file`] for binary contents.
    pub fn replace_file_bytes(&self, name: &str, contents: &[u8]) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, self.dir.path().join(name)).expect("rename over");
    }

    /// Writes change file `name` into `changes/` as an account system
    /// should: a hidden temporary file renamed into place.
    pub fn write_change(&self, name: &str, contents: &str) {
        let changes = self.dir.path().join("changes");
        let tmp = changes.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, changes.join(name)).expect("rename into place");
    }

    /// Publishes new file contents in the ConfigMap layout: a new timestamped
    /// folder, then `..data` swapped to it by an atomic symlink rename.
    pub fn configmap_swap(&self, version: &str, files: &[(&str, &[u8])]) {
        configmap_publish(self.dir.path(), version, files);
    }

    /// Every audit line written so far.
    pub fn audit_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `GET path` on the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::get(format!("http://{}{path}", self.admin))
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// Waits (bounded) until the gateway has logged `text`; fails the test otherwise.
    pub async fn expect_log(&self, text: &str) {
        assert!(
            eventually(Duration::from_secs(10), || self.logs().contains(text)).await,
            "`{text}` was not logged:\n{}",
            self.logs()
        );
    }

    /// `check --config` on this gateway's configuration: success, and what it printed on stderr.
    pub fn check(&self) -> (bool, String) {
        let out = Command::new(binary())
            .arg("check")
            .arg("--config")
            .arg(self.dir.path().join("gateway.toml"))
            .output()
            .expect("run check");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Everything the gateway logged so far (standard error).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    /// Everything the gateway wrote to standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log.stdout")).unwrap_or_default()
    }

    /// `http://` URL of `path` on the api listener.
    pub fn api_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// `http://` URL of `path` on the chat listener.
    pub fn chat_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.chat)
    }
}

/// Starts the gateway binary on `dir/gateway.toml`, logging to `dir/log`
/// (standard output, where `[audit] path = "-"` writes, to `dir/log.stdout`).
fn spawn(dir: &Path, log: &str, upgrade: bool, rust_log: Option<&str>) -> Child {
    let stdout = std::fs::File::create(dir.join(format!("{log}.stdout"))).expect("stdout file");
    let log = std::fs::File::create(dir.join(log)).expect("log file");
    let mut command = Command::new(binary());
    command
        .arg("run")
        .arg("--config")
        .arg(dir.join("gateway.toml"));
    if upgrade {
        command.arg("--upgrade");
    }
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    command
        .stdout(stdout)
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn gateway")
}

/// Runs `compile-accounts` in `dir` (its `gateway.toml` names rules and
/// pools) from `export` to `output`; panics with its output if it fails.
pub fn compile_accounts(dir: &Path, export: &str, output: &str) -> std::process::Output {
    let out = Command::new(binary())
        .current_dir(dir)
        .args([
            "compile-accounts",
            "--config",
            "gateway.toml",
            export,
            "--output",
            output,
        ])
        .output()
        .expect("run compile-accounts");
    assert!(
        out.status.success(),
        "compile-accounts failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `files` into `dir/version/` and points `dir/..data` at it atomically.
pub fn configmap_publish(dir: &Path, version: &str, files: &[(&str, &[u8])]) {
    std::fs::create_dir(dir.join(version)).expect("version folder");
    for (name, bytes) in files {
        std::fs::write(dir.join(version).join(name), bytes).expect("write");
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(version, &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

/// Sends `signal` (e.g. `HUP`, `QUIT`) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let number = signal_number(signal);
    let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
    // kill(0, ...) would signal the test's own process group.
    assert!(pid > 0, "no process to signal");
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let sent = unsafe { libc::kill(pid, number) };
    assert_eq!(
        sent,
        0,
        "kill -{signal} {pid}: {}",
        std::io::Error::last_os_error()
    );
}

fn signal_number(signal: &str) -> libc::c_int {
    match signal {
        "HUP" => libc::SIGHUP,
        "QUIT" => libc::SIGQUIT,
        "TERM" => libc::SIGTERM,
        "USR1" => libc::SIGUSR1,
        "KILL" => libc::SIGKILL,
        other => panic!("no such signal in the tests: {other}"),
    }
}

/// Waits (bounded) until process `pid` catches `signal`, read from its
/// `SigCgt` mask: the gateway ignores `SIGHUP` and `SIGUSR1` until the
/// service that acts on them listens, so one sent earlier is lost.
pub async fn handler_installed(pid: u32, signal: &str) -> bool {
    let bit = 1u64 << (signal_number(signal) - 1);
    let status = format!("/proc/{pid}/status");
    eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&status).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .is_some_and(|mask| mask & bit != 0)
        })
    })
    .await
}

/// Waits (bounded) until `f` holds; returns whether it did.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}

/// The headers `x-privacy-signature` covers, as an upstream received them:
/// the stamped contract headers in arrival order, the signature left out.
pub fn signed_headers(r: &Recorded) -> Vec<(String, String)> {
    r.headers
        .iter()
        .filter(|(n, _)| {
            (n.starts_with("x-privacy-") && n != "x-privacy-signature")
                || n == "x-zero-data-retention"
                || n == "x-forwarded-for"
        })
        .cloned()
        .collect()
}

/// The value of one series (e.g. `name{label="v"}`) in Prometheus text; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a metric value"))
}

/// The audit lines written so far, as JSON.
pub fn audit_json(gw: &Gateway) -> Vec<serde_json::Value> {
    gw.audit_lines()
        .iter()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

/// Waits (bounded) until the asynchronous check `f` (a request, say)
/// holds, pausing 50 ms between tries; returns whether it did.
pub async fn eventually_async<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f().await
}

/// The decision id the gateway returned to the client.
pub fn decision_id(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("x-privacy-decision-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Sends `POST url` with body `{}` as the holder of API key `key`; the status.
pub async fn post_as(c: &reqwest::Client, url: &str, key: &str) -> reqwest::StatusCode {
    send_as(c, url, key).await.status()
}

/// Sends `POST url` with body `{}` as the holder of API key `key`; the answer.
pub async fn send_as(c: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    c.post(url)
        .bearer_auth(key)
        .body("{}")
        .send()
        .await
        .expect("request")
}

/// Sends `POST url` with body `{}`, an optional API key and extra headers;
/// expects it forwarded to exactly one upstream and returns that upstream's
/// pool and what it received.
pub async fn forward(
    ups: &Upstreams,
    url: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
) -> (String, Recorded) {
    forward_with(&client(), ups, url, key, headers).await
}

/// [`forward`] with a given client (HTTP/2, TLS).
pub async fn forward_with(
    client: &reqwest::Client,
    ups: &Upstreams,
    url: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
) -> (String, Recorded) {
    let before = ups.all_requests().len();
    let mut req = client.post(url).body("{}");
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let id = decision_id(&resp);
    let body = resp.text().await.unwrap_or_default();
    assert_eq!(
        status, 200,
        "{key:?} {headers:?} is forwarded; body: {body}"
    );
    assert_eq!(
        ups.all_requests().len(),
        before + 1,
        "exactly one upstream request"
    );
    id.and_then(|id| ups.by_decision(&id))
        .expect("upstream request carrying the client's decision id")
}

/// An HTTP client connecting from [`CLIENT_V4`].
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(CLIENT_V4.parse::<IpAddr>().ok())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// The path of the folder holding test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}
