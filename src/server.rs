//! Assembles the Pingora server: one proxy service per listener, all
//! reading the same snapshot handle.

use std::sync::Arc;

use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use pingora::services::background::background_service;

use crate::config::{GatewaySettings, SnapshotHandle};
use crate::health::HealthChecker;
use crate::proxy::PrivacyProxy;

/// Why the server could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Pingora refused its configuration.
    #[error("cannot create the server: {0}")]
    Pingora(String),
}

/// A Pingora server ready to `run`, with a service per listener.
pub fn build(
    settings: &GatewaySettings,
    snapshots: Arc<SnapshotHandle>,
    opt: Option<Opt>,
) -> Result<Server, ServerError> {
    let conf = ServerConf {
        threads: settings.threads,
        // Pingora retries a failed connect on another permitted endpoint at
        // most this often; the candidate set bounds it further.
        max_retries: 8,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
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
    Ok(server)
}
