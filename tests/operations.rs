//! Operating the real binary: keep-alive clients across a graceful upgrade
//! and a graceful stop, a busy port, the upgrade socket's folder, log
//! reopening, log levels and what goes to standard output.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use privacy_gateway::echo::{EchoUpstream, StreamPace};
use support::{eventually, signal, Gateway, TestConfig, Upstreams};

/// A response as a raw HTTP/1.1 client read it.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// The server said `Connection: close`.
    close: bool,
    body: Vec<u8>,
}

/// What one request of a keep-alive client came to.
#[derive(Debug)]
enum Outcome {
    /// A complete response.
    Answered(RawResponse),
    /// No connection could be opened: nobody listens any more.
    Refused,
    /// The request was written and no complete response came back: lost.
    Lost(String),
}

/// An HTTP/1.1 client that keeps its connection for the next request, as a
/// load balancer does, and counts the connections it opens. Like every
/// well-behaved client it notices a connection the server closed while it
/// was idle before writing on it, and then opens a new one.
struct KeepAliveClient {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    opened: usize,
}

impl KeepAliveClient {
    fn new(addr: SocketAddr) -> Self {
        KeepAliveClient {
            addr,
            conn: None,
            opened: 0,
        }
    }

    fn send(&mut self, request: &[u8]) -> Outcome {
        if self
            .conn
            .as_ref()
            .is_some_and(|c| closed_by_peer(c.get_ref()))
        {
            self.conn = None;
        }
        if self.conn.is_none() {
            match TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)) {
                Ok(stream) => {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("read timeout");
                    self.opened += 1;
                    self.conn = Some(BufReader::new(stream));
                }
                Err(_) => return Outcome::Refused,
            }
        }
        let conn = self.conn.as_mut().expect("a connection");
        let result = conn
            .get_mut()
            .write_all(request)
            .and_then(|()| read_response(conn));
        match result {
            Ok(response) => {
                if response.close {
                    self.conn = None;
                }
                Outcome::Answered(response)
            }
            Err(e) => {
                self.conn = None;
                Outcome::Lost(e.to_string())
            }
        }
    }
}

/// Whether the server has closed an idle connection (end of stream or reset).
fn closed_by_peer(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let closed = match stream.peek(&mut byte) {
        Ok(_) => true, // end of stream, or bytes nobody asked for
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    closed || stream.set_nonblocking(false).is_err()
}

fn read_response(conn: &mut BufReader<TcpStream>) -> std::io::Result<RawResponse> {
    let broken = |what: &str| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what);
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(broken("closed before a response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| broken("no status line"))?;
    let (mut length, mut chunked, mut close) = (None, false, false);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(broken("closed inside the head"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim().to_ascii_lowercase();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(broken("closed inside a chunked body"));
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| broken("bad chunk size"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if conn.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            conn.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        conn.read_exact(&mut body)?;
    } else {
        conn.read_to_end(&mut body)?;
        close = true;
    }
    Ok(RawResponse {
        status,
        close,
        body,
    })
}

/// `POST path` with a JSON body as the holder of `key`.
fn post(path: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one keep-alive client of a [`ClientLoop`] saw.
#[derive(Debug, Default)]
struct Tally {
    answered: usize,
    not_ok: Vec<u16>,
    closes: usize,
    refused: usize,
    lost: Vec<String>,
    opened: usize,
}

/// Keep-alive clients each sending requests back to back on their own
/// connection, bounded in count and time, until stopped (or, with
/// `stop_when_refused`, until nobody listens).
struct ClientLoop {
    done: Arc<AtomicUsize>,
    /// Connections opened so far, by all clients.
    opened: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

impl ClientLoop {
    fn start(addr: SocketAddr, clients: usize, stop_when_refused: bool) -> Self {
        let done = Arc::new(AtomicUsize::new(0));
        let opened = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|_| {
                let (done, opened, stop) = (done.clone(), opened.clone(), stop.clone());
                std::thread::spawn(move || {
                    let request = post("/v1/chat/completions", "demo-api-paid", "{}");
                    let mut client = KeepAliveClient::new(addr);
                    let mut tally = Tally::default();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    for _ in 0..20_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            break;
                        }
                        let before = client.opened;
                        let outcome = client.send(&request);
                        opened.fetch_add(client.opened - before, Ordering::Relaxed);
                        match outcome {
                            Outcome::Answered(r) => {
                                tally.answered += 1;
                                tally.closes += usize::from(r.close);
                                if r.status != 200 {
                                    tally.not_ok.push(r.status);
                                }
                            }
                            Outcome::Refused => {
                                tally.refused += 1;
                                if stop_when_refused {
                                    break;
                                }
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Outcome::Lost(e) => tally.lost.push(e),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.opened = client.opened;
                    tally
                })
            })
            .collect();
        ClientLoop {
            done,
            opened,
            stop,
            threads,
        }
    }

    /// Waits (bounded) until `n` more requests have completed.
    fn advance(&self, n: usize) {
        let target = self.done.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.done.load(Ordering::Relaxed) < target {
            assert!(Instant::now() < deadline, "the client loop stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Connections opened so far.
    fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    fn finish(self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    }
}

/// Kills a second gateway process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What an upgrade under keep-alive load came to: each client's tally, the
/// old process's log and the new one's.
struct Upgraded {
    tallies: Vec<Tally>,
    old_log: String,
    new_log: String,
}

/// Four keep-alive clients loop while the gateway is upgraded: the new
/// process started first and then the old one signalled (the README's
/// order), or the other way round (the systemd unit's order).
async fn upgrade_under_keep_alive_load(signal_first: bool) -> Upgraded {
    let ups = Upstreams::start().await;
    let mut gw = Gateway::start(&TestConfig::shipped_with(&ups));
    let run = ClientLoop::start(gw.api, 4, false);
    run.advance(200);
    // The clients really keep their connections: one each so far.
    assert_eq!(run.opened(), 4);
    let upgrade_sock = gw.upgrade_sock();
    let start_new = |gw: &Gateway| KillOnDrop(gw.start_upgrade());
    let new = if signal_first {
        signal(gw.pid(), "QUIT");
        // The new process starts only once the old one has looked for its
        // socket and is waiting (it tries again each second, five times).
        assert!(
            eventually(Duration::from_secs(10), || gw
                .logs()
                .contains("server not ready"))
            .await,
            "the old process did not wait for the new one"
        );
        start_new(&gw)
    } else {
        let new = start_new(&gw);
        assert!(
            eventually(Duration::from_secs(10), || upgrade_sock.exists()).await,
            "the new process did not open the upgrade socket"
        );
        // Only its owner can reach it: the gateway made its folder owner-only.
        let folder = std::fs::metadata(upgrade_sock.parent().expect("folder")).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&folder.permissions()) & 0o777,
            0o700
        );
        // The old process is signalled only once the new one has waited
        // for the sockets (it looks again each second).
        let new_log = gw.dir.path().join("upgrade.log");
        assert!(
            eventually(Duration::from_secs(10), || {
                std::fs::read_to_string(&new_log)
                    .is_ok_and(|log| log.contains("No incoming socket transfer"))
            })
            .await,
            "the new process did not wait for the sockets"
        );
        signal(gw.pid(), "QUIT");
        new
    };
    assert!(
        gw.wait_exit(Duration::from_secs(30)),
        "the old process did not exit"
    );
    // The new process serves every client alone now, each on one connection.
    let opened = run.opened();
    run.advance(200);
    assert!(run.opened() <= opened + 4, "connections were not reused");
    let tallies = run.finish();
    drop(new);
    let lost: Vec<&String> = tallies.iter().flat_map(|t| &t.lost).collect();
    assert!(lost.is_empty(), "{} requests lost: {lost:?}", lost.len());
    assert!(
        tallies
            .iter()
            .all(|t| t.not_ok.is_empty() && t.refused == 0),
        "{tallies:?}"
    );
    // Each moved to a new connection when the old process told it to close.
    for t in &tallies {
        assert!(t.opened >= 2 && t.closes >= 1, "{tallies:?}");
    }
    let new_log = std::fs::read_to_string(gw.dir.path().join("upgrade.log")).expect("upgrade log");
    let old_log = gw.logs();
    // Nothing either process did was an error, and the new one says it
    // serves on the sockets it was handed.
    assert_no_errors(&old_log);
    assert_no_errors(&new_log);
    assert!(
        new_log.contains("taken over from the running process"),
        "{new_log}"
    );
    Upgraded {
        tallies,
        old_log,
        new_log,
    }
}

/// Asserts that no line of `log` is at ERROR level.
fn assert_no_errors(log: &str) {
    assert!(
        log.lines().all(|l| !l.contains("ERROR")),
        "an error was logged:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_clients_lose_no_request_across_a_graceful_upgrade() {
    let Upgraded {
        tallies,
        old_log,
        new_log,
    } = upgrade_under_keep_alive_load(false).await;
    assert_eq!(tallies.len(), 4);
    // The old process said what it did.
    for step in [
        "graceful upgrade",
        "closing the listeners",
        "every request answered; exiting",
    ] {
        assert!(old_log.contains(step), "{step}: {old_log}");
    }
    // The new process waited for the sockets: a normal step, at INFO.
    assert_normal_step_at_info(&new_log, "No incoming socket transfer");
}

/// `log` says `step`, and every line that does says it at INFO (Pingora
/// logs these waits of an upgrade as failures; the gateway re-levels them).
fn assert_normal_step_at_info(log: &str, step: &str) {
    assert!(log.contains(step), "{step}: {log}");
    for line in log.lines().filter(|l| l.contains(step)) {
        assert!(line.contains(" INFO "), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_systemd_units_reload_order_signal_first_loses_no_request_either() {
    let Upgraded { old_log, .. } = upgrade_under_keep_alive_load(true).await;
    // The old process waited for the new one's socket: a normal step too.
    assert_normal_step_at_info(&old_log, "server not ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_answers_every_request_it_accepted() {
    // Streams slow enough to be in flight when the listeners close (the
    // test configuration serves 1 s after SIGTERM).
    let mut echoes = std::collections::HashMap::new();
    for name in support::shipped_pool_names() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pace = StreamPace::Every(Duration::from_millis(800));
        let echo = EchoUpstream::start_with(&name, listener, pace).expect("echo");
        echoes.insert(name, echo);
    }
    let ups = Upstreams { echoes };
    let mut gw = Gateway::start(&TestConfig::shipped_with(&ups));
    const CLIENTS: usize = 4;
    let run = ClientLoop::start(gw.api, CLIENTS, true);
    run.advance(200);
    // A stream in flight when the signal comes: it must finish whole.
    let api = gw.api;
    let stream = std::thread::spawn(move || {
        let started = Instant::now();
        let mut client = KeepAliveClient::new(api);
        let outcome = client.send(&post(
            "/v1/chat/completions",
            "demo-api-paid",
            r#"{"stream":true}"#,
        ));
        (outcome, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    signal(gw.pid(), "TERM");
    assert!(
        gw.wait_exit(Duration::from_secs(30)),
        "the process did not exit"
    );
    let tallies = run.finish();
    let lost: Vec<&String> = tallies.iter().flat_map(|t| &t.lost).collect();
    assert!(lost.is_empty(), "{} requests lost: {lost:?}", lost.len());
    assert!(tallies.iter().all(|t| t.not_ok.is_empty()), "{tallies:?}");
    // Each client kept one connection until the listeners closed, was then
    // told `Connection: close` (or, idle, saw it closed), and was refused a
    // new one.
    for t in &tallies {
        assert!(
            t.opened == 1 && t.answered > 20 && t.closes <= 1 && t.refused == 1,
            "{tallies:?}"
        );
    }
    assert!(tallies.iter().any(|t| t.closes == 1), "{tallies:?}");
    match stream.join().expect("stream thread") {
        (Outcome::Answered(r), took) => {
            assert_eq!(r.status, 200);
            let body = String::from_utf8_lossy(&r.body);
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            assert!(
                took > Duration::from_millis(1200),
                "the stream ended before the listeners closed ({took:?})"
            );
        }
        other => panic!("the stream in flight was cut: {other:?}"),
    }
}

/// The shipped configuration in `dir`, its process files inside `dir`,
/// listening on the given ports of `host`: a loopback address no other test
/// listens on, so that a probe there reaches this test's gateway even when
/// another test's gateway has the same port number on 127.0.0.1.
fn shipped_config_in(dir: &std::path::Path, host: &str, api: u16, chat: u16, admin: u16) {
    let gateway = support::shipped("gateway.toml")
        .replace("127.0.0.1:8080", &format!("{host}:{api}"))
        .replace("127.0.0.1:8081", &format!("{host}:{chat}"))
        .replace("127.0.0.1:9090", &format!("{host}:{admin}"))
        .replace("/tmp/privacy-gateway/", &format!("{}/run/", dir.display()));
    std::fs::write(dir.join("gateway.toml"), gateway).expect("write");
    for name in ["rules.toml", "pools.toml", "accounts.jsonl"] {
        std::fs::write(dir.join(name), support::shipped(name)).expect("write");
    }
}

#[test]
fn a_busy_port_fails_the_start_after_a_bounded_retry_and_is_never_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = "127.0.85.1";
    let taken = std::net::TcpListener::bind((host, 0)).expect("bind");
    let chat = taken.local_addr().expect("addr").port();
    let [api, admin] = support::free_ports();
    shipped_config_in(dir.path(), host, api, chat, admin);
    let started = Instant::now();
    let mut child = std::process::Command::new(support::binary())
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Until it gives up, nobody may be told it is ready.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running with its port taken"
        );
        if let Ok(mut admin) = TcpStream::connect((host, admin)) {
            let _ =
                admin.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut answer = String::new();
            let _ = admin.read_to_string(&mut answer);
            assert!(
                !answer.starts_with("HTTP/1.1 200"),
                "ready with a port taken: {answer}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("address in use; trying again"), "{stderr}");
    assert!(
        stderr.contains("cannot listen: ") && stderr.contains(&chat.to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_log_is_reopened_on_sigusr1_after_a_rotation() {
    let (_ups, gw) = support::start_with(|_| {}).await;
    let c = support::client();
    let url = gw.api_url("/v1/chat/completions");
    assert_eq!(support::post_as(&c, &url, "demo-api-paid").await, 200);
    assert!(eventually(Duration::from_secs(5), || gw.audit_lines().len() == 1).await);
    // What logrotate does without copytruncate: move the file, then signal.
    let audit = gw.dir.path().join("audit.jsonl");
    let rotated = gw.dir.path().join("audit.jsonl.1");
    std::fs::rename(&audit, &rotated).expect("rotate");
    signal(gw.pid(), "USR1");
    assert!(
        eventually(Duration::from_secs(5), || gw
            .logs()
            .contains("audit log reopened"))
        .await,
        "{}",
        gw.logs()
    );
    for _ in 0..2 {
        assert_eq!(support::post_as(&c, &url, "demo-api-paid").await, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || gw.audit_lines().len() == 2).await,
        "the new file has {:?}",
        gw.audit_lines()
    );
    let old = std::fs::read_to_string(&rotated).expect("rotated file");
    assert_eq!(old.lines().count(), 1, "{old}");
    assert_no_errors(&gw.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_audit_log_on_standard_output_nothing_else_is_written_there() {
    let (_ups, gw) = support::start_with(|c| c.audit = "path = \"-\"\n".into()).await;
    let c = support::client();
    for key in ["demo-api-paid", "no-such-key"] {
        support::post_as(&c, &gw.api_url("/v1/chat/completions"), key).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || gw.stdout().lines().count() == 2).await,
        "{}",
        gw.stdout()
    );
    for line in gw.stdout().lines() {
        let record: serde_json::Value = serde_json::from_str(line).expect("an audit line");
        assert!(record["decision_id"].is_string(), "{line}");
    }
    // Start-up lines went to the diagnostic log instead.
    assert!(gw.logs().contains("listening on"), "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn expected_outcomes_are_not_logged_as_errors() {
    let (mut ups, gw) = support::start_with(|_| {}).await;
    // Every image pool is gone: a 503 the policy chose, not a gateway error.
    ups.stop("black-forest-labs").await;
    let c = support::client();
    let status = support::post_as(&c, &gw.api_url("/v1/images/generations"), "demo-api-paid").await;
    assert_eq!(status, 503);
    assert!(eventually(Duration::from_secs(5), || gw.audit_lines().len() == 1).await);
    let logs = gw.logs();
    assert_no_errors(&logs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bare_trusted_proxy_address_trusts_that_one_host() {
    let ups = Upstreams::start().await;
    let xff = [("x-forwarded-for", "198.51.100.23")];
    for (trusted, client_prefix) in [
        (support::CLIENT_V4, "198.51.100.0/24"),
        // Its neighbour: a /32, not a /24.
        ("127.45.67.88", "127.45.67.0/24"),
    ] {
        let mut config = TestConfig::shipped_with(&ups);
        config.trust = format!("trusted_proxies = [\"{trusted}\"]\n");
        let gw = Gateway::start(&config);
        let url = gw.api_url("/v1/chat/completions");
        let (_, r) = support::forward(&ups, &url, Some("demo-api-paid"), &xff).await;
        assert_eq!(
            r.header("x-privacy-client-prefix"),
            Some(client_prefix),
            "trusting {trusted}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signature_verifies_with_the_key_file_trimmed_as_the_readme_says() {
    use hmac::{Hmac, Mac};
    // As `echo "$KEY" > signing.key` writes it: with a trailing newline.
    let file = b"readme-verifier-signing-key-0123456789\n";
    let (ups, gw) = support::start_with(|c| c.sign_with(file)).await;
    let url = gw.api_url("/v1/chat/completions");
    let (_, r) = support::forward(&ups, &url, Some("demo-api-paid"), &[]).await;
    let signature = r.header("x-privacy-signature").expect("signed");
    // The README's verifier: `name:value\n` for every stamped header in the
    // order received, the signature left out, keyed with the file's
    // contents without leading or trailing whitespace.
    let message: String = support::signed_headers(&r)
        .iter()
        .map(|(n, v)| format!("{n}:{v}\n"))
        .collect();
    let hmac_hex = |key: &[u8]| {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
        mac.update(message.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    };
    assert_eq!(hmac_hex(file.trim_ascii()), signature);
    assert_ne!(
        hmac_hex(file),
        signature,
        "the newline is not part of the key"
    );
}

/// Sends `SIGKILL` to a detached gateway when the test ends, however it ends.
struct KillPidOnDrop(u32);

impl Drop for KillPidOnDrop {
    fn drop(&mut self) {
        // Never 0: kill(0, ...) would signal the test's own process group.
        if let Ok(pid @ 1..) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) takes plain integers; a process already gone
            // is an error nobody needs to hear of here.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_writes_its_audit_lines_and_stops_gracefully() {
    let ups = Upstreams::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let host = "127.0.85.2";
    let [api, chat, admin] = support::free_ports();
    shipped_config_in(dir.path(), host, api, chat, admin);
    let gateway = dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&gateway).expect("read");
    let text = text
        .replace("path = \"-\"", "path = \"audit.jsonl\"")
        .replace("grace_period_seconds = 5 ", "grace_period_seconds = 1 ");
    std::fs::write(&gateway, text).expect("write");
    std::fs::write(
        dir.path().join("pools.toml"),
        support::pools_with_addresses(&ups.addresses()),
    )
    .expect("write");
    let log = std::fs::File::create(dir.path().join("daemon.log")).expect("log");
    // The command returns once detached; a relative --config still names the
    // same files after the daemon moved to `/`.
    let status = std::process::Command::new(support::binary())
        .current_dir(dir.path())
        .args(["run", "--daemon", "--config", "gateway.toml"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .status()
        .expect("run --daemon");
    assert!(status.success());
    let pid_file = dir.path().join("run").join("privacy-gateway.pid");
    assert!(eventually(Duration::from_secs(10), || pid_file.exists()).await);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("a pid");
    let _kill = KillPidOnDrop(pid);
    let url = format!("http://{host}:{api}/v1/chat/completions");
    let c = support::client();
    assert!(
        eventually(Duration::from_secs(10), || {
            std::net::TcpStream::connect((host, api)).is_ok()
        })
        .await
    );
    assert_eq!(support::post_as(&c, &url, "demo-api-paid").await, 200);
    // The writer thread runs in the daemon, not in the process that forked it.
    let audit = dir.path().join("audit.jsonl");
    assert!(
        eventually(Duration::from_secs(5), || {
            std::fs::read_to_string(&audit).is_ok_and(|a| a.lines().count() == 1)
        })
        .await,
        "no audit line from the daemon"
    );
    signal(pid, "TERM");
    let gone = eventually(Duration::from_secs(20), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .await;
    let logs = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
    assert!(gone, "the daemon did not stop: {logs}");
    assert!(logs.contains("every request answered; exiting"), "{logs}");
}
