//! Pool host names: resolved when the configuration is loaded (a name that
//! does not resolve is a configuration error), then re-resolved in the
//! background as their answers expire (the record's TTL, at most
//! `dns_refresh_ms` apart). A new answer changes where the next requests go;
//! requests in flight keep their connections, and each address keeps its
//! own health. A failed or empty re-resolution keeps the last answer.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::time::Instant;

use crate::config::SnapshotHandle;

/// How pool host names are resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers to ask; empty: the system's (`/etc/resolv.conf`, `/etc/hosts`).
    pub servers: Vec<SocketAddr>,
    /// Longest time between two resolutions of a name (sooner when its TTL ends).
    pub refresh: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: Vec::new(),
            refresh: Duration::from_secs(30),
        }
    }
}

/// Shortest time between two resolutions of a name, whatever its TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// A host name and port to resolve.
pub type HostPort = (String, u16);

/// The answer for one name: its addresses (sorted, never empty) and when to ask again.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Where the name points now.
    pub addresses: Vec<SocketAddr>,
    /// When the answer expires.
    pub refresh_at: Instant,
}

fn resolver(settings: &DnsSettings) -> Result<TokioResolver, String> {
    let provider = TokioRuntimeProvider::default();
    let builder = if settings.servers.is_empty() {
        TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read the system's resolver configuration: {e}"))?
    } else {
        let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
        for server in &settings.servers {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            config.add_name_server(NameServerConfig::new(server.ip(), true, vec![udp, tcp]));
        }
        TokioResolver::builder_with_config(config, provider)
    };
    builder
        .build()
        .map_err(|e| format!("cannot build a DNS resolver: {e}"))
}

async fn lookup(
    resolver: &TokioResolver,
    (host, port): &HostPort,
    refresh: Duration,
) -> Result<Answer, String> {
    let found = resolver
        .lookup_ip(host.as_str())
        .await
        .map_err(|e| format!("`{host}` does not resolve: {e}"))?;
    let addresses: BTreeSet<SocketAddr> =
        found.iter().map(|ip| SocketAddr::new(ip, *port)).collect();
    if addresses.is_empty() {
        return Err(format!("`{host}` resolves to no address"));
    }
    let ttl = found
        .valid_until()
        .saturating_duration_since(std::time::Instant::now());
    Ok(Answer {
        addresses: addresses.into_iter().collect(),
        refresh_at: Instant::now() + ttl.clamp(MIN_REFRESH, refresh.max(MIN_REFRESH)),
    })
}

/// Resolves every name in `names` now, from any thread (a private runtime
/// on a thread of its own, so that it works inside and outside Tokio).
pub fn resolve_all(
    settings: &DnsSettings,
    names: &BTreeSet<HostPort>,
) -> HashMap<HostPort, Result<Vec<SocketAddr>, String>> {
    if names.is_empty() {
        return HashMap::new();
    }
    let settings = settings.clone();
    std::thread::scope(|scope| {
        let work = scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a DNS runtime: {e}"))?;
            runtime.block_on(async {
                let resolver = resolver(&settings)?;
                let mut out = HashMap::new();
                for name in names {
                    let answer = lookup(&resolver, name, settings.refresh).await;
                    out.insert(name.clone(), answer.map(|a| a.addresses));
                }
                Ok::<_, String>(out)
            })
        });
        let outcome = work
            .join()
            .unwrap_or_else(|_| Err("the DNS thread failed".to_string()));
        outcome.unwrap_or_else(|e| {
            names
                .iter()
                .map(|name| (name.clone(), Err(e.clone())))
                .collect()
        })
    })
}

/// Whether `host` needs resolving (it is not an IP literal).
pub fn is_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_err()
}

/// The background service that re-resolves the current snapshot's pool
/// host names as their answers expire.
pub struct DnsRefresher {
    snapshots: Arc<SnapshotHandle>,
}

impl DnsRefresher {
    /// Refreshes the names of whatever snapshot is current; new addresses
    /// get their health records from its registry.
    pub fn new(snapshots: Arc<SnapshotHandle>) -> Self {
        DnsRefresher { snapshots }
    }
}

#[async_trait]
impl BackgroundService for DnsRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut settings = self.snapshots.current().dns.clone();
        let mut resolver = match resolver(&settings) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("pool host names will not be re-resolved: {e}");
                return;
            }
        };
        // When each name is due; a name seen for the first time was just
        // resolved by the load, so it is due after one refresh period.
        let mut due: HashMap<HostPort, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let snapshot = self.snapshots.current();
            if snapshot.dns != settings {
                settings = snapshot.dns.clone();
                match self::resolver(&settings) {
                    Ok(r) => resolver = r,
                    Err(e) => tracing::error!("keeping the previous DNS resolver: {e}"),
                }
            }
            let now = Instant::now();
            let names: BTreeSet<HostPort> = snapshot
                .upstreams
                .named_endpoints()
                .map(|e| (e.host.clone(), e.port))
                .collect();
            for name in names {
                let at = *due
                    .entry(name.clone())
                    .or_insert_with(|| now + settings.refresh.min(MIN_REFRESH * 5));
                if at > now {
                    continue;
                }
                match lookup(&resolver, &name, settings.refresh).await {
                    Ok(answer) => {
                        due.insert(name.clone(), answer.refresh_at);
                        // Every endpoint with this name (several pools may share one).
                        let mut changed = false;
                        for endpoint in snapshot.upstreams.named_endpoints() {
                            if endpoint.host == name.0 && endpoint.port == name.1 {
                                changed |=
                                    endpoint.set_addresses(&answer.addresses, &snapshot.health);
                            }
                        }
                        if changed {
                            tracing::info!(
                                host = %name.0,
                                addresses = answer.addresses.len(),
                                "pool host name resolves to new addresses"
                            );
                        }
                    }
                    Err(e) => {
                        due.insert(name, now + MIN_REFRESH * 5);
                        tracing::warn!("keeping the last addresses of a pool host: {e}");
                    }
                }
            }
        }
    }
}
