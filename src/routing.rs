//! The upstream side of the pools: their addresses, and the choice of one
//! among the pools the decision permitted, lowest priority tier first. The
//! choice never leaves the permitted set, whatever fails.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use thiserror::Error;

use crate::credential::UpstreamCredential;
use crate::health::{CheckSpec, EndpointHealth, EndpointKey, HealthRegistry};
use crate::metrics::EndpointCounters;
use crate::policy::PoolSet;

/// Why a pool address could not be used.
#[derive(Debug, Error)]
pub enum EndpointError {
    /// Not `http://host:port` or `https://host:port`.
    #[error("address `{0}` must look like http://host:port or https://host:port")]
    Syntax(String),
    /// The host did not resolve.
    #[error("address `{0}` does not resolve: {1}")]
    Resolve(String, std::io::Error),
}

/// One upstream address of a pool.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Where to connect (resolved when the configuration is loaded).
    pub socket: SocketAddr,
    /// Whether to speak TLS.
    pub tls: bool,
    /// SNI and certificate name.
    pub server_name: String,
    /// Share of the pool's traffic relative to its other addresses.
    pub weight: u32,
    /// Shared with every snapshot that has this address.
    pub health: Arc<EndpointHealth>,
    /// Its request and error counters, once the snapshot is installed.
    pub counters: Option<EndpointCounters>,
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port` (default ports 80/443)
    /// and attaches the address's health record from `registry`.
    pub fn parse(
        address: &str,
        server_name: Option<&str>,
        weight: u32,
        registry: &HealthRegistry,
    ) -> Result<Self, EndpointError> {
        let syntax = || EndpointError::Syntax(address.to_string());
        let (tls, rest) = if let Some(rest) = address.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = address.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(syntax());
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains('/') {
            return Err(syntax());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = split_host_port(authority, default_port).ok_or_else(syntax)?;
        let socket = (host, port)
            .to_socket_addrs()
            .map_err(|e| EndpointError::Resolve(address.to_string(), e))?
            .next()
            .ok_or_else(syntax)?;
        let server_name = server_name.unwrap_or(host).to_string();
        let health = registry.endpoint(EndpointKey {
            socket,
            tls,
            server_name: server_name.clone(),
        });
        Ok(Endpoint {
            socket,
            tls,
            server_name,
            weight: weight.max(1),
            health,
            counters: None,
        })
    }
}

/// Whether an address may take this attempt: healthy and not yet tried.
fn usable(endpoint: &Endpoint, target: Target, tried: &[Target]) -> bool {
    endpoint.health.is_usable() && !tried.contains(&target)
}

/// The item whose cumulative weight range holds `ticket` (< total weight).
fn pick_weighted(items: impl Iterator<Item = (usize, usize)>, mut ticket: usize) -> Option<usize> {
    for (item, weight) in items {
        if ticket < weight {
            return Some(item);
        }
        ticket -= weight;
    }
    None
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, port.parse().ok()?)),
        Some(_) => None,
        None => Some((authority, default_port)),
    }
}

/// Timeouts applied to every upstream connection.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamTimeouts {
    /// TCP and TLS connect.
    pub connect: Duration,
    /// Longest silence while reading.
    pub read: Duration,
    /// How long an address that refused a connection is left out (passive health).
    pub ejection: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(120),
            ejection: Duration::from_secs(5),
        }
    }
}

/// One pool's upstream side.
pub struct PoolUpstream {
    /// The pool's name.
    pub name: String,
    /// Its subprocessor's name.
    pub subprocessor: String,
    /// Its region's name.
    pub region: String,
    /// Relative share of traffic.
    pub weight: u32,
    /// Its addresses.
    pub endpoints: Vec<Endpoint>,
    /// CA certificates for its TLS endpoints, when not the system's.
    pub ca: Option<Arc<Box<[X509]>>>,
    /// Active health checks, when configured.
    pub health_check: Option<CheckSpec>,
    /// The operator's credential, sent on every request to the pool.
    pub credential: Option<UpstreamCredential>,
    next_endpoint: AtomicUsize,
}

impl std::fmt::Debug for PoolUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolUpstream")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl PoolUpstream {
    /// A pool with its addresses.
    pub fn new(
        name: String,
        subprocessor: String,
        region: String,
        weight: u32,
        endpoints: Vec<Endpoint>,
        ca: Option<Arc<Box<[X509]>>>,
        health_check: Option<CheckSpec>,
    ) -> Self {
        PoolUpstream {
            name,
            subprocessor,
            region,
            weight,
            endpoints,
            ca,
            health_check,
            credential: None,
            next_endpoint: AtomicUsize::new(0),
        }
    }

    /// The same pool, sending `credential` on every request.
    pub fn with_credential(mut self, credential: Option<UpstreamCredential>) -> Self {
        self.credential = credential;
        self
    }

    /// Whether any address of the pool can take requests now.
    pub fn is_available(&self) -> bool {
        self.endpoints.iter().any(|e| e.health.is_usable())
    }
}

/// An attempt's target: pool index and endpoint index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index of the pool.
    pub pool: usize,
    /// Index of the endpoint within the pool.
    pub endpoint: usize,
}

/// Every pool's upstream side, in configuration order (the indices of `PoolSet`).
#[derive(Debug, Default)]
pub struct Upstreams {
    pools: Vec<PoolUpstream>,
    timeouts: UpstreamTimeouts,
    next_ticket: AtomicUsize,
}

impl Upstreams {
    /// The pools, in configuration order.
    pub fn new(pools: Vec<PoolUpstream>, timeouts: UpstreamTimeouts) -> Self {
        Upstreams {
            pools,
            timeouts,
            next_ticket: AtomicUsize::new(0),
        }
    }

    /// One pool.
    pub fn pool(&self, index: usize) -> Option<&PoolUpstream> {
        self.pools.get(index)
    }

    /// Every pool.
    pub fn pools(&self) -> &[PoolUpstream] {
        &self.pools
    }

    /// Every pool, to attach what the snapshot is installed with.
    pub fn pools_mut(&mut self) -> &mut [PoolUpstream] {
        &mut self.pools
    }

    /// The counters of a target's address, when attached.
    pub fn counters(&self, target: Target) -> Option<&EndpointCounters> {
        self.pools
            .get(target.pool)?
            .endpoints
            .get(target.endpoint)?
            .counters
            .as_ref()
    }

    /// Every header a pool's credential is sent in: a client may neither
    /// send one (to any pool) nor receive one.
    pub fn credential_headers(&self) -> impl Iterator<Item = &http::HeaderName> {
        self.pools
            .iter()
            .filter_map(|p| p.credential.as_ref().map(UpstreamCredential::header))
    }

    /// The weight of pool `pool` among the candidates now: its configured
    /// weight while it has a healthy address not in `tried`, else 0.
    fn open_weight(&self, pool: usize, tried: &[Target]) -> usize {
        self.pools.get(pool).map_or(0, |p| {
            let open = p
                .endpoints
                .iter()
                .enumerate()
                .any(|(endpoint, e)| usable(e, Target { pool, endpoint }, tried));
            if open {
                p.weight as usize
            } else {
                0
            }
        })
    }

    /// Whether [`Self::choose`] would find a target (without taking a turn).
    pub fn has_choice(&self, candidates: PoolSet, tried: &[Target]) -> bool {
        candidates.iter().any(|i| self.open_weight(i, tried) > 0)
    }

    /// Chooses a target from the first of `tiers` (the candidates by
    /// priority, lowest first: [`crate::policy::RouteDecision::tiers`]) that
    /// still has a usable address: a higher tier only when every address of
    /// the lower ones is unhealthy or already in `tried` (spec §4, EU first).
    /// `None` when no permitted address is left in any tier: the caller
    /// answers 503 and never looks further.
    pub fn choose(
        &self,
        tiers: impl IntoIterator<Item = PoolSet>,
        tried: &[Target],
    ) -> Option<Target> {
        tiers
            .into_iter()
            .find_map(|pools| self.choose_in(pools, tried))
    }

    /// Chooses a target among `candidates`: weighted across pools, then
    /// weighted round robin across a pool's addresses, skipping addresses
    /// that are unhealthy or already in `tried`.
    fn choose_in(&self, candidates: PoolSet, tried: &[Target]) -> Option<Target> {
        let open_weight = |pool: usize| self.open_weight(pool, tried);
        let total: usize = candidates.iter().map(open_weight).sum();
        if total == 0 {
            return None;
        }
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed) % total;
        let pool_index = pick_weighted(candidates.iter().map(|i| (i, open_weight(i))), ticket)?;
        let pool = &self.pools[pool_index];
        let weights = pool.endpoints.iter().enumerate().map(|(i, e)| {
            let target = Target {
                pool: pool_index,
                endpoint: i,
            };
            let w = if usable(e, target, tried) {
                e.weight as usize
            } else {
                0
            };
            (i, w)
        });
        let pool_total: usize = weights.clone().map(|(_, w)| w).sum();
        let ticket = pool.next_endpoint.fetch_add(1, Ordering::Relaxed) % pool_total.max(1);
        pick_weighted(weights, ticket).map(|endpoint| Target {
            pool: pool_index,
            endpoint,
        })
    }

    /// Takes a target's address out of rotation after a failed connect.
    pub fn eject(&self, target: Target) {
        if let Some(e) = self
            .pools
            .get(target.pool)
            .and_then(|p| p.endpoints.get(target.endpoint))
        {
            e.health.eject(self.timeouts.ejection);
        }
    }

    /// The Pingora peer for a target.
    pub fn peer(&self, target: Target) -> Option<HttpPeer> {
        let pool = self.pools.get(target.pool)?;
        let endpoint = pool.endpoints.get(target.endpoint)?;
        let mut peer = HttpPeer::new(endpoint.socket, endpoint.tls, endpoint.server_name.clone());
        peer.options.connection_timeout = Some(self.timeouts.connect);
        peer.options.total_connection_timeout = Some(self.timeouts.connect);
        peer.options.read_timeout = Some(self.timeouts.read);
        if let Some(ca) = &pool.ca {
            peer.options.ca = Some(ca.clone());
        }
        Some(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, weight: u32, ports: &[u16]) -> PoolUpstream {
        let registry = HealthRegistry::default();
        let endpoints = ports
            .iter()
            .map(|p| Endpoint::parse(&format!("http://127.0.0.1:{p}"), None, 1, &registry).unwrap())
            .collect();
        PoolUpstream::new(
            name.into(),
            "s".into(),
            "eu".into(),
            weight,
            endpoints,
            None,
            None,
        )
    }

    #[test]
    fn endpoints_parse_schemes_ports_and_names() {
        let r = HealthRegistry::default();
        let e = Endpoint::parse("https://127.0.0.1:8443", Some("inference.test"), 1, &r).unwrap();
        assert!(e.tls);
        assert_eq!(e.socket.port(), 8443);
        assert_eq!(e.server_name, "inference.test");
        let e = Endpoint::parse("http://[::1]", None, 1, &r).unwrap();
        assert_eq!(e.socket.port(), 80);
        assert!(Endpoint::parse("ftp://x", None, 1, &r).is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1/path", None, 1, &r).is_err());
    }

    #[test]
    fn choice_is_weighted_and_stays_inside_the_candidates() {
        let ups = Upstreams::new(
            vec![pool("a", 3, &[1]), pool("b", 1, &[2]), pool("c", 5, &[3])],
            UpstreamTimeouts::default(),
        );
        let mut candidates = PoolSet::EMPTY;
        candidates.insert(0);
        candidates.insert(1);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[ups.choose([candidates], &[]).unwrap().pool] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn tried_targets_are_skipped_until_none_is_left() {
        let ups = Upstreams::new(vec![pool("a", 1, &[1, 2])], UpstreamTimeouts::default());
        let mut candidates = PoolSet::EMPTY;
        candidates.insert(0);
        let first = ups.choose([candidates], &[]).unwrap();
        let second = ups.choose([candidates], &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(ups.choose([candidates], &[first, second]), None);
    }

    #[test]
    fn ejected_addresses_are_skipped_and_a_pool_without_any_is_closed() {
        let ups = Upstreams::new(
            vec![pool("a", 1, &[1, 2]), pool("b", 1, &[3])],
            UpstreamTimeouts::default(),
        );
        let mut candidates = PoolSet::EMPTY;
        candidates.insert(0);
        candidates.insert(1);
        ups.eject(Target {
            pool: 0,
            endpoint: 0,
        });
        for _ in 0..20 {
            let t = ups.choose([candidates], &[]).unwrap();
            assert_ne!(
                t,
                Target {
                    pool: 0,
                    endpoint: 0
                }
            );
        }
        ups.eject(Target {
            pool: 0,
            endpoint: 1,
        });
        ups.eject(Target {
            pool: 1,
            endpoint: 0,
        });
        assert!(!ups.pool(0).unwrap().is_available());
        assert_eq!(ups.choose([candidates], &[]), None);
    }

    #[test]
    fn the_lowest_tier_with_a_usable_address_is_used_and_tried_addresses_fall_through() {
        let ups = Upstreams::new(
            vec![
                pool("eu", 1, &[1]),
                pool("us", 1, &[2]),
                pool("other", 1, &[3]),
            ],
            UpstreamTimeouts::default(),
        );
        let set = |i: usize| {
            let mut s = PoolSet::EMPTY;
            s.insert(i);
            s
        };
        let tiers = [set(0), set(1)];
        for _ in 0..10 {
            assert_eq!(ups.choose(tiers, &[]).map(|t| t.pool), Some(0));
        }
        // A refused attempt in the first tier moves the retry to the next.
        let first = ups.choose(tiers, &[]).unwrap();
        assert_eq!(ups.choose(tiers, &[first]).map(|t| t.pool), Some(1));
        // An ejected first tier sends everything to the next, never outside.
        ups.eject(first);
        for _ in 0..10 {
            assert_eq!(ups.choose(tiers, &[]).map(|t| t.pool), Some(1));
        }
        ups.eject(Target {
            pool: 1,
            endpoint: 0,
        });
        assert_eq!(ups.choose(tiers, &[]), None);
        assert!(!ups.has_choice(set(0).union(set(1)), &[]));
        assert!(ups.has_choice(set(2), &[]));
    }
}
