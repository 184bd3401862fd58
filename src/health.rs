//! Endpoint health: active checks (Pingora's TCP and HTTP health checks, on a
//! schedule per pool) and passive ejection after a failed connect. Health is
//! kept per address in a registry that outlives configuration snapshots, so
//! a reload neither forgets a dead endpoint nor revives it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck, TcpHealthCheck};
use pingora::lb::Backend;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::SnapshotHandle;

/// The health of one upstream address. Read on every request (atomics only).
#[derive(Debug)]
pub struct EndpointHealth {
    /// Result of the active checks (true until a check says otherwise).
    active_up: AtomicBool,
    /// Passive ejection: unusable until this many ms after the registry's epoch.
    ejected_until_ms: AtomicU64,
    successes: AtomicU32,
    failures: AtomicU32,
    epoch: Instant,
}

impl EndpointHealth {
    fn new(epoch: Instant) -> Self {
        EndpointHealth {
            active_up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether requests may be sent to the address now.
    pub fn is_usable(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
            && self.now_ms() >= self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// Takes the address out of rotation for `duration` after a failed connect.
    pub fn eject(&self, duration: Duration) {
        let until = self.now_ms() + duration.as_millis() as u64;
        self.ejected_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    /// Records one active check; flips the state after enough in a row.
    /// Returns the new state when it flipped.
    pub fn observe(&self, success: bool, thresholds: Thresholds) -> Option<bool> {
        if success {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= thresholds.healthy {
                // Enough passing checks also end a passive ejection.
                self.ejected_until_ms.store(0, Ordering::Relaxed);
                if !self.active_up.swap(true, Ordering::Relaxed) {
                    return Some(true);
                }
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= thresholds.unhealthy && self.active_up.swap(false, Ordering::Relaxed) {
                return Some(false);
            }
        }
        None
    }
}

/// Consecutive check results needed to flip an endpoint's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Successes to become healthy.
    pub healthy: u32,
    /// Failures to become unhealthy.
    pub unhealthy: u32,
}

/// Identifies an address across snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// Where.
    pub socket: SocketAddr,
    /// With TLS.
    pub tls: bool,
    /// Under which name.
    pub server_name: String,
}

/// Health of every address ever configured in this process.
#[derive(Debug)]
pub struct HealthRegistry {
    epoch: Instant,
    endpoints: Mutex<HashMap<EndpointKey, Arc<EndpointHealth>>>,
}

impl Default for HealthRegistry {
    fn default() -> Self {
        HealthRegistry {
            epoch: Instant::now(),
            endpoints: Mutex::new(HashMap::new()),
        }
    }
}

impl HealthRegistry {
    /// The health record of `key`, created healthy on first use.
    pub fn endpoint(&self, key: EndpointKey) -> Arc<EndpointHealth> {
        let mut map = match self.endpoints.lock() {
            Ok(map) => map,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(key)
            .or_insert_with(|| Arc::new(EndpointHealth::new(self.epoch)))
            .clone()
    }
}

/// How a pool's endpoints are actively checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect.
    Tcp,
    /// `GET path` expecting `200`, over TLS for https endpoints.
    Http {
        /// The path to request.
        path: String,
    },
}

/// A pool's active health-check settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    /// What to do.
    pub probe: Probe,
    /// How often.
    pub interval: Duration,
    /// Longest wait for one check.
    pub timeout: Duration,
    /// When to flip.
    pub thresholds: Thresholds,
}

/// The background service that runs every pool's active checks against the
/// current snapshot's endpoints.
pub struct HealthChecker {
    snapshots: Arc<SnapshotHandle>,
}

impl HealthChecker {
    /// Checks the endpoints of whatever snapshot is current.
    pub fn new(snapshots: Arc<SnapshotHandle>) -> Self {
        HealthChecker { snapshots }
    }

    /// Runs one round: every pool whose check is due, every endpoint at once.
    async fn round(&self, due: &mut HashMap<String, Instant>) {
        let snapshot = self.snapshots.current();
        let now = Instant::now();
        let mut checks = tokio::task::JoinSet::new();
        for pool in snapshot.upstreams.pools() {
            let Some(spec) = &pool.health_check else {
                continue;
            };
            if due.get(&pool.name).is_some_and(|t| *t > now) {
                continue;
            }
            due.insert(pool.name.clone(), now + spec.interval);
            let addresses = pool.endpoints.iter().flat_map(|e| {
                e.addresses()
                    .iter()
                    .map(move |a| (e, a.clone()))
                    .collect::<Vec<_>>()
            });
            for (endpoint, address) in addresses {
                let checker = probe_for(spec, endpoint, pool.ca.clone());
                let Ok(backend) = Backend::new(&address.socket.to_string()) else {
                    continue;
                };
                let health = address.health;
                let (spec, pool_name, addr) = (spec.clone(), pool.name.clone(), address.socket);
                checks.spawn(async move {
                    let ok = matches!(
                        tokio::time::timeout(spec.timeout, checker.check(&backend)).await,
                        Ok(Ok(()))
                    );
                    if let Some(up) = health.observe(ok, spec.thresholds) {
                        tracing::warn!(pool = %pool_name, endpoint = %addr, healthy = up, "endpoint health changed");
                    }
                });
            }
        }
        while checks.join_next().await.is_some() {}
    }
}

fn probe_for(
    spec: &CheckSpec,
    endpoint: &crate::routing::Endpoint,
    ca: Option<Arc<Box<[pingora::tls::x509::X509]>>>,
) -> Box<dyn HealthCheck + Send + Sync> {
    match &spec.probe {
        Probe::Tcp => {
            let mut check = TcpHealthCheck::new();
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check
        }
        Probe::Http { path } => {
            let mut check = HttpHealthCheck::new(&endpoint.server_name, endpoint.tls);
            check.peer_template.options.connection_timeout = Some(spec.timeout);
            check.peer_template.options.read_timeout = Some(spec.timeout);
            check.peer_template.options.ca = ca;
            check.req.set_uri(
                http::Uri::try_from(path.as_str()).unwrap_or_else(|_| http::Uri::from_static("/")),
            );
            Box::new(check)
        }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut due = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.round(&mut due).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        healthy: 2,
        unhealthy: 3,
    };

    #[test]
    fn state_flips_only_after_enough_checks_in_a_row() {
        let h = EndpointHealth::new(Instant::now());
        assert!(h.is_usable());
        assert_eq!(h.observe(false, T), None);
        assert_eq!(h.observe(false, T), None);
        assert_eq!(h.observe(true, T), None);
        assert_eq!(h.observe(false, T), None);
        assert_eq!(h.observe(false, T), None);
        assert_eq!(h.observe(false, T), Some(false));
        assert!(!h.is_usable());
        assert_eq!(h.observe(true, T), None);
        assert_eq!(h.observe(true, T), Some(true));
        assert!(h.is_usable());
    }

    #[test]
    fn ejection_lasts_its_duration() {
        let h = EndpointHealth::new(Instant::now());
        h.eject(Duration::from_secs(60));
        assert!(!h.is_usable());
        let h = EndpointHealth::new(Instant::now());
        h.eject(Duration::ZERO);
        assert!(h.is_usable());
    }

    #[test]
    fn the_registry_keeps_one_record_per_address() {
        let r = HealthRegistry::default();
        let key = EndpointKey {
            socket: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            server_name: "a".into(),
        };
        let a = r.endpoint(key.clone());
        a.eject(Duration::from_secs(60));
        assert!(!r.endpoint(key).is_usable());
    }
}
