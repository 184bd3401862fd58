//! The container image cannot be built here (no registry for base images),
//! so its runtime stage is tested as far as it can be without one: the
//! Dockerfile's runtime stage is read, its `COPY` lines laid out under a
//! temporary root, and its `ENTRYPOINT`, `CMD`, `HEALTHCHECK` and the
//! README's `docker run ... demo` command run against that layout with the
//! binary cargo built (only ports and /tmp paths are changed, to free ones).
//! The image's configuration must listen on every interface on the ports
//! it `EXPOSE`s, and run as a non-root user.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::free_ports;

/// Where the image keeps its configuration.
const CONFIG_DIR: &str = "/etc/privacy-gateway";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The runtime (last) stage of the Dockerfile: instruction and arguments,
/// continuation lines joined, comments dropped.
fn runtime_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                instructions.push((op.to_ascii_uppercase(), args.trim().to_string()));
                current.clear();
            }
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .expect("a FROM");
    instructions.split_off(last_from)
}

fn one<'a>(stage: &'a [(String, String)], op: &str) -> &'a str {
    let found: Vec<_> = stage.iter().filter(|(o, _)| o == op).collect();
    assert_eq!(found.len(), 1, "one {op} in the runtime stage: {stage:?}");
    &found[0].1
}

/// A JSON-array (exec form) argument list.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("`{args}` is not exec form: {e}"))
}

/// The image's filesystem, as far as the runtime stage's COPY lines make it.
struct Layout {
    root: tempfile::TempDir,
    /// The path of the binary inside the image.
    binary: String,
}

impl Layout {
    fn build(stage: &[(String, String)]) -> Layout {
        let root = tempfile::tempdir().expect("root");
        let mut binary = None;
        for (_, args) in stage.iter().filter(|(op, _)| op == "COPY") {
            let words: Vec<&str> = args.split_whitespace().collect();
            let (from_build, paths) = match words.first() {
                Some(w) if w.starts_with("--from=") => (true, &words[1..]),
                _ => (false, &words[..]),
            };
            let (dest, sources) = paths.split_last().expect("COPY destination");
            if from_build {
                // The build stage's binary is the one cargo built for these tests.
                assert!(sources == ["/src/target/release/privacy-gateway"], "{args}");
                let target = root.path().join(dest.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().expect("parent")).expect("dir");
                std::fs::copy(support::binary(), &target).expect("copy binary");
                binary = Some(dest.to_string());
                continue;
            }
            assert!(dest.ends_with('/'), "COPY into a folder: {args}");
            let folder = root.path().join(dest.trim_start_matches('/'));
            std::fs::create_dir_all(&folder).expect("dir");
            for source in sources {
                let from = repo().join(source);
                let name = from.file_name().expect("file name");
                std::fs::copy(&from, folder.join(name))
                    .unwrap_or_else(|e| panic!("COPY {source}: {e}"));
            }
        }
        Layout {
            root,
            binary: binary.expect("the binary is copied from the build stage"),
        }
    }

    /// An image path as a path under the layout's root.
    fn path(&self, image_path: &str) -> PathBuf {
        self.root.path().join(image_path.trim_start_matches('/'))
    }

    /// Runs an image command line (`argv[0]` the image binary), image paths mapped.
    fn command(&self, argv: &[String]) -> Command {
        assert_eq!(argv[0], self.binary, "runs the image's binary: {argv:?}");
        let mut command = Command::new(self.path(&argv[0]));
        for arg in &argv[1..] {
            if arg.starts_with(CONFIG_DIR) {
                command.arg(self.path(arg));
            } else {
                command.arg(arg);
            }
        }
        command
    }
}

/// The `docker run` command of the README that starts the demo: its
/// arguments after the image name.
fn readme_demo_args() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with("docker run") && l.contains(" demo"))
        .expect("a `docker run ... demo` line in the README");
    let words: Vec<&str> = line.split_whitespace().collect();
    let image = words
        .iter()
        .position(|w| *w == "privacy-gateway")
        .expect("the image name");
    words[image + 1..].iter().map(|w| w.to_string()).collect()
}

/// The image's gateway.toml with every port moved to a free one and /tmp
/// paths moved into the layout; the ports it had.
fn free_the_ports(layout: &Layout, config: &str) -> (BTreeSet<u16>, Vec<u16>) {
    let path = layout.path(config);
    let mut table: toml::Table =
        toml::from_str(&std::fs::read_to_string(&path).expect("image gateway.toml")).expect("TOML");
    let mut ports = BTreeSet::new();
    let mut moved = Vec::new();
    // Chosen together, so that no two listeners are given the same one.
    let mut free = free_ports::<8>().into_iter();
    let mut rebind = |value: &mut toml::Value| {
        let address: std::net::SocketAddr =
            value.as_str().expect("address").parse().expect("host:port");
        assert!(
            address.ip().is_unspecified(),
            "{address}: a container must listen on every interface"
        );
        ports.insert(address.port());
        let port = free.next().expect("at most 7 listeners and the admin");
        moved.push(port);
        *value = toml::Value::String(format!("{}:{port}", address.ip()));
    };
    for listener in table["listener"].as_array_mut().expect("listeners") {
        rebind(&mut listener["address"]);
    }
    rebind(&mut table["admin"]["address"]);
    let process = table["process"].as_table_mut().expect("[process]");
    for key in ["upgrade_sock", "pid_file"] {
        let image_path = process[key].as_str().expect("path").to_string();
        assert!(
            image_path.starts_with("/tmp/"),
            "{key} must be under /tmp (read-only root)"
        );
        process[key] = layout.path(&image_path).display().to_string().into();
    }
    std::fs::create_dir_all(layout.path("/tmp")).expect("tmp");
    std::fs::write(&path, toml::to_string(&table).expect("TOML")).expect("write");
    (ports, moved)
}

/// Kills a started image command when the test ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(mut command: Command) -> Running {
    Running(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("start"),
    )
}

/// Runs the HEALTHCHECK command until it passes (bounded); whether it did.
fn healthy(layout: &Layout, healthcheck: &[String], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let status = layout
            .command(healthcheck)
            .stderr(Stdio::null())
            .status()
            .expect("healthcheck");
        if status.success() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_stage_serves_the_documented_demo_and_answers_its_healthcheck() {
    let stage = runtime_stage();
    let user = one(&stage, "USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user}: numeric and not root"
    );
    assert!(
        !stage
            .iter()
            .any(|(op, args)| op == "RUN" && args.contains("curl")),
        "no curl in the runtime image"
    );
    let entrypoint = exec_form(one(&stage, "ENTRYPOINT"));
    let cmd = exec_form(one(&stage, "CMD"));
    let healthcheck_line = one(&stage, "HEALTHCHECK");
    let healthcheck =
        exec_form(&healthcheck_line[healthcheck_line.find("CMD ").expect("HEALTHCHECK CMD") + 4..]);
    let exposed: BTreeSet<u16> = one(&stage, "EXPOSE")
        .split_whitespace()
        .map(|p| p.parse().expect("port"))
        .collect();

    let layout = Layout::build(&stage);
    assert_eq!(entrypoint, vec![layout.binary.clone()]);
    assert_eq!(
        healthcheck[0], layout.binary,
        "the HEALTHCHECK uses the binary itself"
    );
    let config = cmd
        .iter()
        .find(|a| a.starts_with(CONFIG_DIR))
        .expect("CMD names a configuration in the image")
        .clone();
    assert_eq!(readme_demo_args(), ["demo", "--config", config.as_str()]);

    // The image's configuration validates as shipped.
    let check = layout
        .command(
            &[
                entrypoint.clone(),
                vec!["check".into(), "--config".into(), config.clone()],
            ]
            .concat(),
        )
        .output()
        .expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let (ports, moved) = free_the_ports(&layout, &config);
    assert_eq!(ports, exposed, "EXPOSE names exactly the configured ports");

    // The README's docker run: demo with echo upstreams.
    let demo_argv = [entrypoint.clone(), readme_demo_args()].concat();
    let demo = start(layout.command(&demo_argv));
    assert!(
        healthy(&layout, &healthcheck, Duration::from_secs(15)),
        "the demo never became healthy"
    );
    let api = moved[0];
    let c = support::client();
    let url = format!("http://127.0.0.1:{api}/v1/chat/completions");
    let resp = support::send_as(&c, &url, "demo-api-paid").await;
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.expect("echo JSON");
    assert_eq!(
        echo["headers"]["x-privacy-account"], "acct-api-paid",
        "{echo}"
    );
    drop(demo);
    assert!(
        !healthy(&layout, &healthcheck, Duration::ZERO),
        "the healthcheck passes with nothing running"
    );

    // The image's default command serves the production layout.
    let _run = start(layout.command(&[entrypoint, cmd].concat()));
    assert!(
        healthy(&layout, &healthcheck, Duration::from_secs(15)),
        "`run` never became healthy"
    );
}
