//! Assembles the Pingora server: one proxy service per listener, all
//! reading the same snapshot handle.

use std::sync::Arc;
use std::time::Duration;

use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use pingora::services::background::background_service;

use crate::config::{GatewaySettings, SnapshotHandle};
use crate::health::HealthChecker;
use crate::proxy::PrivacyProxy;
use crate::reload::{ReloadService, Reloader};

/// A Pingora server ready to `run`: a proxy service per listener, the
/// health checker, and, when given, the configuration reloader.
/// `upgrade` takes the listening sockets over from a running old process;
/// `daemon` detaches (no thread started before `run` survives it).
pub fn build(
    settings: &GatewaySettings,
    snapshots: Arc<SnapshotHandle>,
    reloader: Option<Arc<Reloader>>,
    upgrade: bool,
    daemon: bool,
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
        upgrade,
        daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();
    for listener in &settings.listeners {
        let name = format!("privacy-gateway {} {}", listener.product, listener.address);
        let mut service = http_proxy_service_with_name(
            &server.configuration,
            PrivacyProxy::new(snapshots.clone(), listener.product),
            &name,
        );
        service.add_tcp(&listener.address.to_string());
        server.add_service(service);
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
