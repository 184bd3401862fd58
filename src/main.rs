//! Command line: `run`, `demo`, `check`, `explain`, `hash-key`, `healthcheck`,
//! `compile-accounts`, `compact-accounts`.

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use privacy_gateway::audit::AuditLog;
use privacy_gateway::config::{self, LoadOptions, SnapshotHandle};
use privacy_gateway::echo::EchoUpstream;
use privacy_gateway::explain;
use privacy_gateway::lifecycle::{self, Lifecycle};
use privacy_gateway::metrics::Metrics;
use privacy_gateway::observe::Observers;
use privacy_gateway::policy::Product;
use privacy_gateway::reload::{self, Reloader};
use privacy_gateway::server::Launch;
use privacy_gateway::{logging, preflight, server};

/// An inline reverse proxy that enforces a privacy policy on every inference request.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given configuration.
    Run {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the running process (graceful
        /// upgrade: start this, then send the old process SIGQUIT).
        #[arg(long, short)]
        upgrade: bool,
        /// Detach and run in the background (writes [process] pid_file).
        #[arg(long, short)]
        daemon: bool,
    },
    /// Serve the example configuration with local echo upstreams for every pool.
    Demo {
        /// Path to gateway.toml.
        #[arg(long, short, default_value = "config/gateway.toml")]
        config: PathBuf,
    },
    /// Load and validate the configuration without serving, list quarantined
    /// account lines, and check that this host has what `run` needs
    /// (writable audit and pid paths, a private upgrade socket folder).
    Check {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// Check the files only, not this host (e.g. on a build machine).
        #[arg(long)]
        files_only: bool,
        /// Also fail (exit 1) when an account line is quarantined.
        #[arg(long)]
        strict: bool,
    },
    /// Print the full decision for a described request as JSON, sending nothing.
    Explain {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// HTTP method.
        #[arg(long, default_value = "POST")]
        method: String,
        /// Request path.
        #[arg(long)]
        path: String,
        /// A request header, `Name: value`; repeatable.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// The client's address. Alone, it is the TCP peer; with --peer-ip it
        /// arrives as X-Forwarded-For, believed only from a trusted proxy.
        #[arg(long)]
        client_ip: Option<IpAddr>,
        /// The TCP peer's address (default: the client's, else 127.0.0.1).
        #[arg(long)]
        peer_ip: Option<IpAddr>,
        /// Product of the listener the request arrives on (default: the first listener's).
        #[arg(long)]
        listener: Option<String>,
        /// Stamp as if this permitted pool were chosen.
        #[arg(long)]
        pool: Option<String>,
        /// Decision id to stamp, e.g. to reproduce a logged signature.
        #[arg(long)]
        decision_id: Option<String>,
    },
    /// Print the SHA-256 of an API key read from standard input, as the accounts file stores it.
    HashKey,
    /// Exit 0 when the admin listener named in gateway.toml answers `200` (a
    /// container HEALTHCHECK without curl); reads nothing but gateway.toml.
    Healthcheck {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
        /// The admin path to ask.
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Compile a JSON Lines export into a compiled consent snapshot (for
    /// `[files] accounts`), judging every line against the rules and pools of
    /// --config as a load would; quarantined lines are listed as by `check`.
    CompileAccounts {
        /// Path to gateway.toml (its rules and pools judge the export).
        #[arg(long, short)]
        config: PathBuf,
        /// The JSON Lines export.
        export: PathBuf,
        /// Where to write the compiled snapshot (replaced atomically).
        #[arg(long, short)]
        output: PathBuf,
        /// The export already includes the change files up to this sequence.
        #[arg(long)]
        changes_through: Option<u64>,
        /// Fail (exit 1) when an account line is quarantined.
        #[arg(long)]
        strict: bool,
    },
    /// Fold the change files into a new compiled base (replacing `[files]
    /// accounts` atomically), then remove the change files it includes.
    CompactAccounts {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// mimalloc rather than glibc's allocator: the request path (Pingora's
/// header maps above all) allocates and frees many small blocks, and
/// mimalloc's per-thread free lists make that cheaper (README, "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            upgrade,
            daemon,
        } => run(
            &config,
            LoadOptions::default(),
            Vec::new(),
            Launch { upgrade, daemon },
        ),
        Command::Demo { config } => demo(&config),
        Command::Check {
            config,
            files_only,
            strict,
        } => check(&config, files_only, strict),
        Command::HashKey => hash_key(),
        Command::Healthcheck { config, path } => healthcheck(&config, &path),
        Command::CompileAccounts {
            config,
            export,
            output,
            changes_through,
            strict,
        } => compile_accounts(&config, &export, &output, changes_through, strict),
        Command::CompactAccounts { config } => compact_accounts(&config),
        Command::Explain {
            config,
            method,
            path,
            headers,
            client_ip,
            peer_ip,
            listener,
            pool,
            decision_id,
        } => {
            let mut header_map = http::HeaderMap::new();
            for h in &headers {
                if let Err(e) = explain::add_header(&mut header_map, h) {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            }
            let Ok(method) = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            else {
                eprintln!("`{method}` is not an HTTP method");
                return ExitCode::from(2);
            };
            explain_command(
                &config,
                listener.as_deref(),
                explain::DescribedRequest {
                    method,
                    path,
                    headers: header_map,
                    peer: peer_ip
                        .or(client_ip)
                        .unwrap_or(IpAddr::from([127, 0, 0, 1])),
                    client: client_ip,
                    listener_product: Product::Api,
                    pool,
                    decision_id,
                },
            )
        }
    }
}

fn run(config_path: &Path, options: LoadOptions, banner: Vec<String>, launch: Launch) -> ExitCode {
    // A daemon works from `/`: keep naming the same files after it detaches.
    let config_path = &std::path::absolute(config_path).unwrap_or_else(|_| config_path.into());
    let (settings, mut snapshot) = match config::load(config_path, &options) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    logging::init(settings.log_json, settings.log_access);
    if let Err(e) = preflight::create_socket_folder(&settings.upgrade_sock) {
        tracing::error!("cannot create the upgrade socket's folder: {e}");
    }
    let problems = preflight::problems(config_path, &settings);
    if !problems.is_empty() {
        for problem in &problems {
            tracing::error!("{problem}");
        }
        return ExitCode::from(2);
    }
    let metrics = Arc::new(Metrics::new());
    metrics.attach_counters(&mut snapshot.upstreams);
    let audit = match &settings.audit {
        None => None,
        Some(target) => {
            match AuditLog::open(target, settings.audit_buffer, metrics.audit_dropped.clone()) {
                Ok(log) => Some(log),
                Err(e) => {
                    tracing::error!("cannot open the audit log {target:?}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    lifecycle::ignore_signals_until_handled();
    // Bound here, before Pingora (and before daemonizing): a busy port ends
    // this command with an error after a bounded retry. In an upgrade the
    // old process hands its sockets over instead.
    let sockets = if launch.upgrade {
        Default::default()
    } else {
        match server::bind_all(&settings) {
            Ok(sockets) => sockets,
            Err((address, e)) => {
                tracing::error!(%address, "cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    tracing::info!(
        policy_version = %snapshot.policy_version,
        consent_revision = %snapshot.consent_revision,
        accounts = snapshot.accounts.len(),
        "configuration loaded"
    );
    reload::announce(&snapshot, &metrics);
    let handle = Arc::new(SnapshotHandle::new(snapshot));
    let reloader = Arc::new(Reloader::new(
        config_path.to_path_buf(),
        options,
        settings.clone(),
        handle.clone(),
        metrics.clone(),
    ));
    let observers = Arc::new(Observers { metrics, audit });
    let lifecycle = Lifecycle::leak();
    let server = server::build(
        &settings,
        handle,
        observers.clone(),
        Some(reloader),
        launch,
        lifecycle,
        sockets,
    );
    for line in banner {
        tracing::info!("{line}");
    }
    server.run(server::run_args(&settings, lifecycle));
    observers.flush();
    ExitCode::SUCCESS
}

fn demo(config_path: &Path) -> ExitCode {
    let pool_names = match config::load(config_path, &LoadOptions::default()) {
        Ok((_, snapshot)) => snapshot
            .upstreams
            .pools()
            .iter()
            .map(|p| p.name.clone())
            .collect::<Vec<_>>(),
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    // The echo upstreams run on their own runtime, beside Pingora's.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let mut echoes = Vec::new();
            for name in &pool_names {
                match EchoUpstream::start(name).await {
                    Ok(echo) => {
                        echo.stop_recording();
                        echoes.push(echo)
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
            let addresses: HashMap<String, Vec<String>> = pool_names
                .iter()
                .cloned()
                .zip(echoes.iter().map(|e| vec![e.url()]))
                .collect();
            let _ = tx.send(Ok(addresses));
            // Keep the echoes alive for the life of the process.
            std::future::pending::<()>().await;
        });
    });
    let pool_addresses = match rx.recv() {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            eprintln!("cannot start the demo's echo upstreams: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("the demo's echo upstreams did not start");
            return ExitCode::FAILURE;
        }
    };
    let mut names: Vec<_> = pool_addresses.iter().collect();
    names.sort();
    let banner = names
        .into_iter()
        .map(|(pool, urls)| format!("demo echo upstream of pool {pool}: {}", urls.join(", ")))
        .collect();
    run(
        config_path,
        LoadOptions {
            pool_addresses,
            ..LoadOptions::default()
        },
        banner,
        Launch::default(),
    )
}

fn check(config_path: &Path, files_only: bool, strict: bool) -> ExitCode {
    let options = LoadOptions {
        verify_accounts: true,
        ..LoadOptions::default()
    };
    match config::load(config_path, &options) {
        Ok((settings, snapshot)) => {
            let problems = if files_only {
                Vec::new()
            } else {
                preflight::problems(config_path, &settings)
            };
            if !problems.is_empty() {
                eprintln!("{}", config::ConfigErrors(problems));
                return ExitCode::from(1);
            }
            let quarantined = snapshot.full_quarantine_report();
            for q in &quarantined {
                eprintln!("{q}");
            }
            let accounts = &snapshot.accounts;
            // The full scan counts accounts whose names the rules or pools
            // no longer define; the files' own counts do not.
            let valid =
                (accounts.len() + accounts.quarantined_count()).saturating_sub(quarantined.len());
            let base = if accounts.base().is_mapped() {
                "compiled base"
            } else {
                "JSON Lines base"
            };
            let changes = accounts
                .overlay()
                .map(|o| {
                    let files = o.meta().sources.len() - accounts.base().meta().sources.len();
                    format!(", {files} change file(s)")
                })
                .unwrap_or_default();
            println!(
                "ok: policy {}, {} listeners, {} routes, {} plans, {} pools, {} accounts ({} quarantined), consents {} ({base}{changes}), geo {}",
                snapshot.policy_version,
                settings.listeners.len(),
                snapshot.routes.len(),
                snapshot.plan_count,
                snapshot.upstreams.pools().len(),
                valid,
                quarantined.len(),
                snapshot.consent_revision,
                snapshot
                    .geo
                    .as_ref()
                    .map_or_else(|| "off".to_string(), |g| format!("on (built {})", g.build_epoch())),
            );
            if strict && !quarantined.is_empty() {
                eprintln!(
                    "--strict: {} account line(s) quarantined",
                    quarantined.len()
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(1)
        }
    }
}

fn compile_accounts(
    config_path: &Path,
    export: &Path,
    output: &Path,
    changes_through: Option<u64>,
    strict: bool,
) -> ExitCode {
    match config::compile_export(config_path, export, output, changes_through) {
        Ok(compiled) => {
            for q in &compiled.quarantined {
                eprintln!("{q}");
            }
            println!(
                "compiled {} accounts ({} quarantined), consents {}: {} ({:.1} MiB)",
                compiled.accounts,
                compiled.quarantined.len(),
                compiled.revision,
                output.display(),
                compiled.bytes as f64 / (1 << 20) as f64
            );
            if strict && !compiled.quarantined.is_empty() {
                eprintln!(
                    "--strict: {} account line(s) quarantined",
                    compiled.quarantined.len()
                );
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(1)
        }
    }
}

fn compact_accounts(config_path: &Path) -> ExitCode {
    match config::compact(config_path) {
        Ok(done) => {
            for (path, why) in &done.left {
                eprintln!(
                    "{}: not removed ({why}); the new base skips it by its sequence",
                    path.display()
                );
            }
            println!(
                "compacted: {} accounts, consents {}, {} change file(s) folded in and removed",
                done.accounts,
                done.revision,
                done.removed.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(1)
        }
    }
}

fn explain_command(
    config_path: &Path,
    listener: Option<&str>,
    mut request: explain::DescribedRequest,
) -> ExitCode {
    let (settings, snapshot) = match config::load(config_path, &LoadOptions::default()) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(1);
        }
    };
    request.listener_product = match listener.map(str::parse::<Product>) {
        Some(Ok(product)) => product,
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        None => settings
            .listeners
            .first()
            .map_or(Product::Api, |l| l.product),
    };
    match explain::explain(&snapshot, &request) {
        Ok(value) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(
                std::io::stdout(),
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn healthcheck(config_path: &Path, path: &str) -> ExitCode {
    let address = match config::admin_address(config_path) {
        Ok(Some(address)) => address,
        Ok(None) => {
            eprintln!("{}: no [admin] address to probe", config_path.display());
            return ExitCode::from(2);
        }
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    match privacy_gateway::admin::probe(address, path, std::time::Duration::from_secs(3)) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{path} answered {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{path} on {address}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if std::io::stdin().read_line(&mut key).is_err() {
        eprintln!("cannot read the key from standard input");
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        hex::encode(config::hash_api_key(
            key.trim_end_matches(['\r', '\n']).as_bytes()
        ))
    );
    ExitCode::SUCCESS
}
