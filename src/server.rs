//! Assembles the Pingora server: one proxy service per listener, all
//! reading the same snapshot handle.

use std::sync::Arc;
use std::time::Duration;

use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use pingora::services::background::background_service;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::config::{GatewaySettings, SnapshotHandle};
use crate::health::HealthChecker;
use crate::observe::Observers;
use crate::proxy::PrivacyProxy;
use crate::reload::{ReloadService, Reloader};

/// How the process starts: fresh or taking sockets over, attached or detached.
#[derive(Clone, Copy, Debug, Default)]
pub struct Launch {
    /// Take the listening sockets over from a running old process.
    pub upgrade: bool,
    /// Detach (no thread started before `run` survives it).
    pub daemon: bool,
}

/// A Pingora server ready to `run`: a proxy service per listener, the
/// health checker, the admin listener when configured, and, when given,
/// the configuration reloader.
pub fn build(
    settings: &GatewaySettings,
    snapshots: Arc<SnapshotHandle>,
    observers: Arc<Observers>,
    reloader: Option<Arc<Reloader>>,
    launch: Launch,
) -> Server {
    let conf = ServerConf {
        threads: settings.threads,
        // Pingora retries a failed connect on another permitted endpoint at
        // most this often; the candidate set bounds it further.
        max_retries: 8,
        upgrade_sock: settings.upgrade_sock.clone(),
        pid_file: settings.pid_file.clone(),
        grace_period_seconds: Some(settings.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(settings.graceful_shutdown_timeout_seconds),
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
        let mut service = http_proxy_service_with_name(
            &server.configuration,
            PrivacyProxy::new(snapshots.clone(), listener.product, observers.clone()),
            &name,
        );
        service.add_tcp(&listener.address.to_string());
        server.add_service(service);
    }
    if let Some(address) = settings.admin {
        let app = AdminApp::new(snapshots.clone(), observers.metrics.clone());
        let mut admin = Service::new("privacy-gateway admin".to_string(), app);
        admin.add_tcp(&address.to_string());
        server.add_service(admin);
    }
    server.add_service(background_service(
        "health checks",
        HealthChecker::new(snapshots),
    ));
    if let Some(reloader) = reloader {
        let service = ReloadService::new(reloader, Duration::from_millis(200));
        server.add_service(background_service("configuration reload", service));
    }
    server
}
