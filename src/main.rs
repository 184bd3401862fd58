//! Command line: `run`, `demo`, `check`, `hash-key`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use privacy_gateway::audit::AuditLog;
use privacy_gateway::config::{self, LoadOptions, SnapshotHandle};
use privacy_gateway::echo::EchoUpstream;
use privacy_gateway::explain;
use privacy_gateway::metrics::Metrics;
use privacy_gateway::observe::Observers;
use privacy_gateway::policy::Product;
use privacy_gateway::reload::Reloader;
use privacy_gateway::server;
use privacy_gateway::server::Launch;

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
    /// Load and validate the configuration without serving.
    Check {
        /// Path to gateway.toml.
        #[arg(long, short)]
        config: PathBuf,
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
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,privacy_gateway=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

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
            None,
            Launch { upgrade, daemon },
        ),
        Command::Demo { config } => demo(&config),
        Command::Check { config } => check(&config),
        Command::HashKey => hash_key(),
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

fn run(
    config_path: &Path,
    options: LoadOptions,
    banner: Option<String>,
    launch: Launch,
) -> ExitCode {
    let (settings, snapshot) = match config::load(config_path, &options) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_json);
    let metrics = Arc::new(Metrics::new());
    metrics.set_policy_version(&snapshot.policy_version);
    let audit = match &settings.audit {
        None => None,
        Some(target) => {
            match AuditLog::open(target, settings.audit_buffer, metrics.audit_dropped.clone()) {
                Ok(log) => Some(log),
                Err(e) => {
                    eprintln!("cannot open the audit log {target:?}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    tracing::info!(policy_version = %snapshot.policy_version, accounts = snapshot.accounts.len(), "configuration loaded");
    let handle = Arc::new(SnapshotHandle::new(snapshot));
    let reloader = Arc::new(Reloader::new(
        config_path.to_path_buf(),
        options,
        settings.clone(),
        handle.clone(),
        metrics.clone(),
    ));
    let observers = Arc::new(Observers { metrics, audit });
    let server = server::build(&settings, handle, observers, Some(reloader), launch);
    for listener in &settings.listeners {
        println!(
            "listening on {} ({} product)",
            listener.address, listener.product
        );
    }
    if let Some(banner) = banner {
        println!("{banner}");
    }
    server.run(pingora::server::RunArgs::default());
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
    let mut banner = String::from("demo echo upstreams:");
    let mut names: Vec<_> = pool_addresses.iter().collect();
    names.sort();
    for (pool, urls) in names {
        banner.push_str(&format!("\n  {pool:<18} {}", urls.join(", ")));
    }
    run(
        config_path,
        LoadOptions {
            pool_addresses,
            ..LoadOptions::default()
        },
        Some(banner),
        Launch::default(),
    )
}

fn check(config_path: &Path) -> ExitCode {
    match config::load(config_path, &LoadOptions::default()) {
        Ok((settings, snapshot)) => {
            println!(
                "ok: policy {}, {} listeners, {} routes, {} plans, {} pools, {} accounts, geo {}",
                snapshot.policy_version,
                settings.listeners.len(),
                snapshot.routes.len(),
                snapshot.plan_count,
                snapshot.upstreams.pools().len(),
                snapshot.accounts.len(),
                if snapshot.geo.is_some() { "on" } else { "off" },
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
