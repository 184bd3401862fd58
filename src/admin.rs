//! The admin listener: `/metrics` (Prometheus text, behind a bearer token
//! when one is configured), `/healthz` (the process is up) and `/readyz`
//! (every listener accepting, not stopping, and a healthy pool for every
//! capability a pool serves; with the policy version serving, and the
//! capabilities served only by a higher priority tier, each request an
//! exception to EU first). Probes need no token.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::config::SnapshotHandle;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::policy::{Capability, PoolCatalog};

/// The bearer token `/metrics` requires, kept only as its SHA-256 so that
/// comparing a presented token reveals nothing about it.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token from `path` (surrounding whitespace dropped; at least 16 bytes).
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read admin token {}: {e}", path.display()))?;
        let token = bytes.trim_ascii();
        if token.len() < 16 {
            return Err(format!(
                "admin token {} is shorter than 16 bytes",
                path.display()
            ));
        }
        Ok(AdminToken(crate::config::hash_api_key(token)))
    }

    /// Whether an `Authorization` header value presents this token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        authorization
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .is_some_and(|presented| crate::config::hash_api_key(presented.trim_ascii()) == self.0)
    }
}

/// `GET path` on the admin listener at `address` (an unspecified address
/// is probed on loopback); the status answered. For the container's
/// `HEALTHCHECK`, which has no `curl`.
pub fn probe(address: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let mut target = address;
    if target.ip().is_unspecified() {
        target.set_ip(match target.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let mut tcp = TcpStream::connect_timeout(&target, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 32];
    let n = tcp.read(&mut head)?;
    let status = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    status.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// Serves the admin endpoints.
pub struct AdminApp {
    snapshots: Arc<SnapshotHandle>,
    metrics: Arc<Metrics>,
    lifecycle: &'static Lifecycle,
}

impl AdminApp {
    /// Answers for `snapshots`, `metrics` and the process's `lifecycle`.
    pub fn new(
        snapshots: Arc<SnapshotHandle>,
        metrics: Arc<Metrics>,
        lifecycle: &'static Lifecycle,
    ) -> Self {
        AdminApp {
            snapshots,
            metrics,
            lifecycle,
        }
    }

    /// The capabilities in each state `/readyz` names: (no pool can take
    /// them, only a higher tier can).
    fn capabilities_by_state(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let snapshot = self.snapshots.current();
        let available = |i: usize| snapshot.upstreams.pool(i).is_some_and(|p| p.is_available());
        let (mut unavailable, mut exception) = (Vec::new(), Vec::new());
        for c in Capability::ALL {
            match serving_state(&snapshot.pools, c, available) {
                ServingState::Unavailable => unavailable.push(c.as_str()),
                ServingState::ExceptionTier => exception.push(c.as_str()),
                ServingState::NotOffered | ServingState::LowestTier => {}
            }
        }
        (unavailable, exception)
    }
}

/// How a capability can be served now, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServingState {
    /// No pool serves it: nothing to be ready for.
    NotOffered,
    /// A pool of its lowest priority tier can take requests.
    LowestTier,
    /// Only a higher tier can: still served, but every request is an
    /// exception to EU first (spec route 7), which operators want to see.
    ExceptionTier,
    /// No pool can take it: not ready.
    Unavailable,
}

/// Where `capability` stands, given which pools are `available`.
fn serving_state(
    pools: &PoolCatalog,
    capability: Capability,
    available: impl Fn(usize) -> bool,
) -> ServingState {
    let offered = pools.serving(capability);
    let mut tiers = pools
        .tiers()
        .iter()
        .map(|t| t.pools.intersect(offered))
        .filter(|pools| !pools.is_empty());
    let Some(lowest) = tiers.next() else {
        return ServingState::NotOffered;
    };
    if lowest.iter().any(&available) {
        ServingState::LowestTier
    } else if tiers.any(|tier| tier.iter().any(&available)) {
        ServingState::ExceptionTier
    } else {
        ServingState::Unavailable
    }
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                let snapshot = self.snapshots.current();
                let authorization = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                match &snapshot.admin_token {
                    Some(token) if !token.accepts(authorization) => {
                        let mut refused =
                            reply(401, "text/plain", "bearer token required\n".into());
                        refused.headers_mut().insert(
                            http::header::WWW_AUTHENTICATE,
                            http::HeaderValue::from_static("Bearer"),
                        );
                        refused
                    }
                    _ => {
                        self.metrics.refresh_pool_gauges(&snapshot);
                        reply(200, "text/plain; version=0.0.4", self.metrics.render())
                    }
                }
            }
            "/healthz" => reply(200, "text/plain", "ok\n".into()),
            "/readyz" => {
                let (unready, on_exception_tier) = self.capabilities_by_state();
                let version = self.snapshots.current().policy_version.clone();
                let listening = self.lifecycle.is_listening();
                let stopping = self.lifecycle.is_stopping();
                let ready = unready.is_empty() && listening && !stopping;
                let body = serde_json::json!({
                    "ready": ready,
                    "policy_version": version,
                    "listening": listening,
                    "stopping": stopping,
                    "capabilities_without_healthy_pool": unready,
                    "capabilities_on_exception_tier": on_exception_tier,
                });
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.to_string(),
                )
            }
            _ => reply(404, "text/plain", "not found\n".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CapabilitySet, PoolProfile, RegionId};

    /// Pools by (priority, serves chat): chat at 0, 0 and 1, images at 1.
    fn catalog() -> PoolCatalog {
        let pool = |priority, capability| {
            let mut capabilities = CapabilitySet::default();
            capabilities.insert(capability);
            PoolProfile {
                priority,
                ..PoolProfile::new(0, RegionId(0), capabilities)
            }
        };
        PoolCatalog::new(vec![
            pool(0, Capability::Chat),
            pool(0, Capability::Chat),
            pool(1, Capability::Chat),
            pool(1, Capability::ImageGeneration),
        ])
    }

    #[test]
    fn a_capability_is_on_its_exception_tier_only_while_every_lower_pool_is_down() {
        let pools = catalog();
        let state = |up: &[usize]| serving_state(&pools, Capability::Chat, |i| up.contains(&i));
        assert_eq!(state(&[0, 1, 2]), ServingState::LowestTier);
        assert_eq!(state(&[1]), ServingState::LowestTier);
        assert_eq!(state(&[2, 3]), ServingState::ExceptionTier);
        assert_eq!(state(&[3]), ServingState::Unavailable);
    }

    #[test]
    fn a_capability_served_by_one_tier_has_no_exception_and_one_nobody_serves_is_not_offered() {
        let pools = catalog();
        // Image generation's only tier is priority 1: its lowest.
        let images =
            |up: &[usize]| serving_state(&pools, Capability::ImageGeneration, |i| up.contains(&i));
        assert_eq!(images(&[3]), ServingState::LowestTier);
        assert_eq!(images(&[0, 1, 2]), ServingState::Unavailable);
        assert_eq!(
            serving_state(&pools, Capability::Embeddings, |_| true),
            ServingState::NotOffered
        );
    }
}
