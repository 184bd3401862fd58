//! The upstream side of the pools: their addresses, and the choice of one
//! among the pools the decision permitted, lowest priority tier first. The
//! choice never leaves the permitted set, whatever fails.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use thiserror::Error;

use crate::credential::UpstreamCredential;
use crate::dns::HostPort;
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
    #[error("address `{0}`: {1}")]
    Resolve(String, String),
}

/// One resolved address of an endpoint, with its own health.
#[derive(Clone, Debug)]
pub struct Address {
    /// Where to connect.
    pub socket: SocketAddr,
    /// Shared with every snapshot that has this address.
    pub health: Arc<EndpointHealth>,
}

/// One configured upstream address of a pool: an IP, or a host name that
/// may resolve to several addresses, re-resolved while the gateway runs.
#[derive(Debug)]
pub struct Endpoint {
    /// The host as configured (a name or an IP literal).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Whether to speak TLS.
    pub tls: bool,
    /// SNI and certificate name.
    pub server_name: String,
    /// `host[:port]` as written in the address (port only when not the
    /// scheme's default): the `Host` sent when the pool sets none, made
    /// once so that sending it copies nothing.
    pub authority: HeaderValue,
    /// Share of the pool's traffic relative to its other addresses.
    pub weight: u32,
    /// Where the host resolves now (never empty).
    addresses: ArcSwap<Vec<Address>>,
    next_address: AtomicUsize,
    /// Its request and error counters, once the snapshot is installed.
    pub counters: Option<EndpointCounters>,
}

/// `http://host:port` or `https://host:port` (default ports 80/443), split.
pub fn parse_url(address: &str) -> Result<(bool, String, u16), EndpointError> {
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
    Ok((tls, host.to_string(), port))
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port` (default ports 80/443).
    /// An IP host is its own address; a name takes its addresses from
    /// `resolved` (the load's answers) and must have some.
    pub fn parse(
        address: &str,
        server_name: Option<&str>,
        weight: u32,
        registry: &HealthRegistry,
        resolved: &HashMap<HostPort, Result<Vec<SocketAddr>, String>>,
    ) -> Result<Self, EndpointError> {
        let (tls, host, port) = parse_url(address)?;
        let sockets = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match resolved.get(&(host.clone(), port)) {
                Some(Ok(sockets)) if !sockets.is_empty() => sockets.clone(),
                Some(Err(e)) => return Err(EndpointError::Resolve(address.to_string(), e.clone())),
                _ => {
                    return Err(EndpointError::Resolve(
                        address.to_string(),
                        "no address".into(),
                    ))
                }
            },
        };
        let server_name = server_name.unwrap_or(&host).to_string();
        let host_text = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let default_port = if tls { 443 } else { 80 };
        let authority = if port == default_port {
            host_text
        } else {
            format!("{host_text}:{port}")
        };
        let authority = HeaderValue::try_from(authority)
            .map_err(|_| EndpointError::Syntax(address.to_string()))?;
        let endpoint = Endpoint {
            host,
            port,
            tls,
            server_name,
            authority,
            weight: weight.max(1),
            addresses: ArcSwap::from_pointee(Vec::new()),
            next_address: AtomicUsize::new(0),
            counters: None,
        };
        endpoint.set_addresses(&sockets, registry);
        Ok(endpoint)
    }

    /// Where the host resolves now.
    pub fn addresses(&self) -> Arc<Vec<Address>> {
        self.addresses.load_full()
    }

    /// Points the endpoint at `sockets` (each with its health record from
    /// `registry`); returns whether anything changed. An empty answer
    /// changes nothing: the last addresses are kept.
    pub fn set_addresses(&self, sockets: &[SocketAddr], registry: &HealthRegistry) -> bool {
        let current = self.addresses.load();
        if sockets.is_empty() || current.iter().map(|a| a.socket).eq(sockets.iter().copied()) {
            return false;
        }
        let addresses = sockets
            .iter()
            .map(|&socket| Address {
                socket,
                health: registry.endpoint(EndpointKey {
                    socket,
                    tls: self.tls,
                    server_name: self.server_name.clone(),
                }),
            })
            .collect();
        self.addresses.store(Arc::new(addresses));
        true
    }

    /// `host:port` as configured (`[v6]:port` for an IPv6 literal): the
    /// `address` label of its counters.
    pub fn label(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{}:{}", self.host, self.port),
        }
    }

    /// Whether the host is a name (re-resolved) rather than an IP.
    pub fn is_named(&self) -> bool {
        crate::dns::is_name(&self.host)
    }
}

/// Whether an address of endpoint `endpoint` of pool `pool` may take this
/// attempt: healthy and not yet tried.
fn usable(address: &Address, pool: usize, endpoint: usize, tried: &[Target]) -> bool {
    address.health.is_usable()
        && !tried.contains(&Target {
            pool,
            endpoint,
            socket: address.socket,
        })
}

/// Whether any address of an endpoint may take this attempt.
fn endpoint_open(e: &Endpoint, pool: usize, endpoint: usize, tried: &[Target]) -> bool {
    e.addresses
        .load()
        .iter()
        .any(|a| usable(a, pool, endpoint, tried))
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
    /// The `Host` every request to this pool carries (`host` in pools.toml);
    /// `None`: each address's own `host[:port]`. Never the client's.
    pub host: Option<HeaderValue>,
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
            host: None,
            next_endpoint: AtomicUsize::new(0),
        }
    }

    /// The same pool, sending `credential` on every request.
    pub fn with_credential(mut self, credential: Option<UpstreamCredential>) -> Self {
        self.credential = credential;
        self
    }

    /// Sends `host` as every request's `Host` instead of each address's own.
    pub fn with_host(mut self, host: Option<HeaderValue>) -> Self {
        self.host = host;
        self
    }

    /// Whether any address of the pool can take requests now.
    pub fn is_available(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| e.addresses.load().iter().any(|a| a.health.is_usable()))
    }
}

/// An attempt's target: pool index, endpoint index and the address chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Index of the pool.
    pub pool: usize,
    /// Index of the endpoint within the pool.
    pub endpoint: usize,
    /// The resolved address of the endpoint.
    pub socket: SocketAddr,
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
                .any(|(endpoint, e)| endpoint_open(e, pool, endpoint, tried));
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
            let w = if endpoint_open(e, pool_index, i, tried) {
                e.weight as usize
            } else {
                0
            };
            (i, w)
        });
        let pool_total: usize = weights.clone().map(|(_, w)| w).sum();
        let ticket = pool.next_endpoint.fetch_add(1, Ordering::Relaxed) % pool_total.max(1);
        let endpoint_index = pick_weighted(weights, ticket)?;
        // Round robin among the endpoint's open addresses.
        let endpoint = &pool.endpoints[endpoint_index];
        let addresses = endpoint.addresses.load();
        let open: Vec<SocketAddr> = addresses
            .iter()
            .filter(|a| usable(a, pool_index, endpoint_index, tried))
            .map(|a| a.socket)
            .collect();
        let turn = endpoint.next_address.fetch_add(1, Ordering::Relaxed);
        open.get(turn % open.len().max(1)).map(|&socket| Target {
            pool: pool_index,
            endpoint: endpoint_index,
            socket,
        })
    }

    /// Takes a target's address out of rotation after a failed connect
    /// (unless a re-resolution already dropped the address).
    pub fn eject(&self, target: Target) {
        let endpoint = self
            .pools
            .get(target.pool)
            .and_then(|p| p.endpoints.get(target.endpoint));
        if let Some(e) = endpoint {
            for address in e
                .addresses
                .load()
                .iter()
                .filter(|a| a.socket == target.socket)
            {
                address.health.eject(self.timeouts.ejection);
            }
        }
    }

    /// Endpoints whose host is a name, to re-resolve.
    pub fn named_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.pools
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.is_named())
    }

    /// The `Host` a request to `target` carries: the pool's `host`, else the
    /// address's own `host[:port]`.
    pub fn host(&self, target: Target) -> Option<&HeaderValue> {
        let pool = self.pools.get(target.pool)?;
        let endpoint = pool.endpoints.get(target.endpoint)?;
        Some(pool.host.as_ref().unwrap_or(&endpoint.authority))
    }

    /// The Pingora peer for a target.
    pub fn peer(&self, target: Target) -> Option<HttpPeer> {
        let pool = self.pools.get(target.pool)?;
        let endpoint = pool.endpoints.get(target.endpoint)?;
        let mut peer = HttpPeer::new(target.socket, endpoint.tls, endpoint.server_name.clone());
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

    const NONE: &[(HostPort, Result<Vec<SocketAddr>, String>)] = &[];

    fn parse(url: &str, name: Option<&str>, r: &HealthRegistry) -> Result<Endpoint, EndpointError> {
        Endpoint::parse(url, name, 1, r, &NONE.iter().cloned().collect())
    }

    fn pool_of(name: &str, weight: u32, endpoints: Vec<Endpoint>) -> PoolUpstream {
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

    fn pool(name: &str, weight: u32, ports: &[u16]) -> PoolUpstream {
        let registry = HealthRegistry::default();
        let endpoints = ports
            .iter()
            .map(|p| parse(&format!("http://127.0.0.1:{p}"), None, &registry).unwrap())
            .collect();
        pool_of(name, weight, endpoints)
    }

    fn target(pool: usize, endpoint: usize, port: u16) -> Target {
        Target {
            pool,
            endpoint,
            socket: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    #[test]
    fn endpoints_parse_schemes_ports_and_names() {
        let r = HealthRegistry::default();
        let e = parse("https://127.0.0.1:8443", Some("inference.test"), &r).unwrap();
        assert!(e.tls);
        assert_eq!(e.addresses()[0].socket.port(), 8443);
        assert_eq!(e.server_name, "inference.test");
        assert_eq!(e.authority, "127.0.0.1:8443");
        let e = parse("http://[::1]", None, &r).unwrap();
        assert_eq!(e.addresses()[0].socket.port(), 80);
        assert_eq!(e.authority, "[::1]");
        assert!(!e.is_named());
        let e = parse("https://127.0.0.1:443/", None, &r).unwrap();
        assert_eq!(e.authority, "127.0.0.1");
        assert!(parse("ftp://x", None, &r).is_err());
        assert!(parse("http://127.0.0.1:1/path", None, &r).is_err());
        // A name needs an answer from the load.
        assert!(matches!(
            parse("http://inference.test:80", None, &r),
            Err(EndpointError::Resolve(..))
        ));
    }

    #[test]
    fn a_name_has_one_health_record_per_address_and_follows_new_answers() {
        let r = HealthRegistry::default();
        let a: SocketAddr = "127.0.0.2:9000".parse().unwrap();
        let b: SocketAddr = "127.0.0.3:9000".parse().unwrap();
        let c: SocketAddr = "127.0.0.4:9000".parse().unwrap();
        let answers = [(("inference.test".to_string(), 9000), Ok(vec![a, b]))];
        let e = Endpoint::parse(
            "http://inference.test:9000",
            None,
            1,
            &r,
            &answers.into_iter().collect(),
        )
        .unwrap();
        assert!(e.is_named());
        assert_eq!(e.server_name, "inference.test");
        let ups = Upstreams::new(vec![pool_of("a", 1, vec![e])], UpstreamTimeouts::default());
        let mut candidates = PoolSet::EMPTY;
        candidates.insert(0);
        let picked: std::collections::BTreeSet<SocketAddr> = (0..4)
            .map(|_| ups.choose([candidates], &[]).unwrap().socket)
            .collect();
        assert_eq!(picked, [a, b].into_iter().collect());
        // One address fails: only the other takes requests.
        ups.eject(Target {
            pool: 0,
            endpoint: 0,
            socket: a,
        });
        for _ in 0..4 {
            assert_eq!(ups.choose([candidates], &[]).unwrap().socket, b);
        }
        // A new answer: the ejected address keeps its record, the new one starts healthy.
        let endpoint = ups.named_endpoints().next().unwrap();
        assert!(endpoint.set_addresses(&[a, c], &r));
        assert!(
            !endpoint.set_addresses(&[a, c], &r),
            "the same answer changes nothing"
        );
        assert!(
            !endpoint.set_addresses(&[], &r),
            "an empty answer keeps the last one"
        );
        for _ in 0..4 {
            assert_eq!(ups.choose([candidates], &[]).unwrap().socket, c);
        }
        let tried = [Target {
            pool: 0,
            endpoint: 0,
            socket: c,
        }];
        assert_eq!(ups.choose([candidates], &tried), None);
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
        ups.eject(target(0, 0, 1));
        for _ in 0..20 {
            let t = ups.choose([candidates], &[]).unwrap();
            assert_ne!(t, target(0, 0, 1));
        }
        ups.eject(target(0, 1, 2));
        ups.eject(target(1, 0, 3));
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
        ups.eject(target(1, 0, 2));
        assert_eq!(ups.choose(tiers, &[]), None);
        assert!(!ups.has_choice(set(0).union(set(1)), &[]));
        assert!(ups.has_choice(set(2), &[]));
    }
}
