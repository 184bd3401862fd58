//! Assembles the Pingora server: one service per listener (its connection
//! limits around a Pingora proxy, behind TLS and the PROXY protocol when
//! configured), all reading the same snapshot handle.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};

use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::{GatewaySettings, Listener, SnapshotHandle};
use crate::dns::DnsRefresher;
use crate::health::HealthChecker;
use crate::lifecycle::{Drain, Lifecycle, Lingering, Listening, Signals};
use crate::listener::GatewayListener;
use crate::observe::Observers;
use crate::proxy::PrivacyProxy;
use crate::proxy_protocol::{self, ProxyHeaders};
use crate::reload::{ReloadService, Reloader};
use crate::tls_listener;

/// After the last request, how long Pingora waits for its runtimes' blocking
/// work (a reload being compiled) before the process ends.
const RUNTIME_STOP_SECONDS: u64 = 5;

/// How the process starts: fresh or taking sockets over, attached or detached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch {
    /// Take the listening sockets over from a running old process.
    pub upgrade: bool,
    /// Detach (no thread started before `run` survives it).
    pub daemon: bool,
}

/// Binds every listener and the admin listener of `settings`, each with
/// a bounded retry; the first address that cannot be bound is the error.
pub fn bind_all(
    settings: &GatewaySettings,
) -> Result<HashMap<SocketAddr, TcpListener>, (SocketAddr, std::io::Error)> {
    let addresses = settings
        .listeners
        .iter()
        .map(|l| l.address)
        .chain(settings.admin);
    let mut sockets = HashMap::new();
    for address in addresses {
        let socket = crate::lifecycle::bind(address).map_err(|e| (address, e))?;
        sockets.insert(address, socket);
    }
    Ok(sockets)
}

/// What `Server::run` waits for: the end signals, read by [`Signals`].
pub fn run_args(settings: &GatewaySettings, lifecycle: &'static Lifecycle) -> RunArgs {
    RunArgs {
        shutdown_signal: Box::new(Signals::new(
            lifecycle,
            Duration::from_secs(settings.grace_period_seconds),
            settings.upgrade_sock.clone(),
        )),
    }
}

/// Where a listener's service runs: its settings, the socket this process
/// bound for it (none in an upgrade), the process's lifecycle.
type ListenerAt<'a> = (&'a Listener, Option<TcpListener>, &'static Lifecycle);

/// The service of one listener: `app` on its address, in the clear or
/// behind TLS, with `headers` read before the TLS handshake when given.
fn listener_service<A: ServerApp + Send + Sync + 'static>(
    name: String,
    app: A,
    (listener, socket, lifecycle): ListenerAt<'_>,
    snapshots: &Arc<SnapshotHandle>,
    headers: Option<ProxyHeaders>,
) -> Listening<Service<A>> {
    let mut service = Service::new(name, app);
    let address = listener.address.to_string();
    match &listener.tls {
        None => service.add_tcp(&address),
        Some(_) => {
            if let Some(headers) = headers {
                service.endpoints().set_pre_tls_callback(Arc::new(headers));
            }
            let tls = tls_listener::settings(snapshots.clone(), listener.address)
                .expect("an OpenSSL acceptor with Mozilla's intermediate settings can be built");
            service.add_tls_with_settings(&address, None, tls);
        }
    }
    let what = format!("{} product", listener.product);
    Listening::new(service, listener.address, what, socket, lifecycle)
}

/// A Pingora server ready to `run`: a proxy service per listener, the
/// health checker, the admin listener when configured, and, when given,
/// the configuration reloader. `sockets` are the listening sockets this
/// process bound (none in an upgrade: the old process hands them over).
pub fn build(
    settings: &GatewaySettings,
    snapshots: Arc<SnapshotHandle>,
    observers: Arc<Observers>,
    reloader: Option<Arc<Reloader>>,
    launch: Launch,
    lifecycle: &'static Lifecycle,
    mut sockets: HashMap<SocketAddr, TcpListener>,
) -> Server {
    let conf = ServerConf {
        threads: settings.threads,
        // Pingora retries a failed connect on another permitted endpoint at
        // most this often; the candidate set bounds it further.
        max_retries: 8,
        upgrade_sock: settings.upgrade_sock.clone(),
        pid_file: settings.pid_file.clone(),
        // Pingora's grace period is how long requests in flight may still
        // take once the listeners are closed; [`Drain`] ends the process
        // as soon as the last one is answered.
        grace_period_seconds: Some(settings.graceful_shutdown_timeout_seconds),
        graceful_shutdown_timeout_seconds: Some(RUNTIME_STOP_SECONDS),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: launch.upgrade,
        daemon: launch.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    for listener in &settings.listeners {
        let name = format!("privacy-gateway {} {}", listener.product, listener.address);
        let mut proxy = http_proxy(
            &server.configuration,
            PrivacyProxy::new(
                snapshots.clone(),
                listener.product,
                observers.clone(),
                lifecycle,
                settings.limits,
            ),
        );
        if listener.h2c {
            let mut options = HttpServerOptions::default();
            options.h2c = true;
            proxy.server_options = Some(options);
        }
        let proxy = GatewayListener::new(
            Lingering::new(proxy),
            &listener.address.to_string(),
            listener.product,
            settings.limits,
            snapshots.clone(),
            observers.clone(),
            lifecycle,
        );
        let headers = listener.proxy_protocol.then(|| {
            ProxyHeaders::new(
                snapshots.clone(),
                observers.metrics.proxy_headers_refused.clone(),
            )
        });
        let socket = sockets.remove(&listener.address);
        match headers {
            // In the clear, the header is read before the proxy sees a byte.
            Some(headers) if listener.tls.is_none() => {
                let app = proxy_protocol::Cleartext::new(proxy, headers);
                let at = (listener, socket, lifecycle);
                server.add_service(listener_service(name, app, at, &snapshots, None));
            }
            headers => {
                let at = (listener, socket, lifecycle);
                server.add_service(listener_service(name, proxy, at, &snapshots, headers));
            }
        }
    }
    if let Some(address) = settings.admin {
        let app = AdminApp::new(snapshots.clone(), observers.metrics.clone(), lifecycle);
        let mut admin = Service::new("privacy-gateway admin".to_string(), app);
        admin.add_tcp(&address.to_string());
        server.add_service(Listening::new(
            admin,
            address,
            "admin".into(),
            sockets.remove(&address),
            lifecycle,
        ));
    }
    server.add_service(background_service(
        "pool host names",
        DnsRefresher::new(snapshots.clone()),
    ));
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(snapshots),
    ));
    if let Some(reloader) = reloader {
        let service = ReloadService::new(reloader, Duration::from_millis(200));
        server.add_service(background_service("configuration reload", service));
    }
    server.add_service(background_service(
        "audit log",
        crate::audit::AuditService::new(observers.clone()),
    ));
    let flush = observers.clone();
    server.add_service(background_service(
        "drain",
        Drain::new(
            lifecycle,
            Duration::from_secs(settings.graceful_shutdown_timeout_seconds),
            Box::new(move || flush.flush()),
        ),
    ));
    server
}
