//! The upstream side of the pools: their addresses, and the choice of one
//! among the pools the decision permitted. The choice never leaves the
//! permitted set, whatever fails.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use thiserror::Error;

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
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port` (default ports 80/443).
    pub fn parse(address: &str, server_name: Option<&str>) -> Result<Self, EndpointError> {
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
        Ok(Endpoint {
            socket,
            tls,
            server_name: server_name.unwrap_or(host).to_string(),
        })
    }
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
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: Duration::from_secs(2),
            read: Duration::from_secs(120),
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
    ) -> Self {
        PoolUpstream {
            name,
            subprocessor,
            region,
            weight,
            endpoints,
            ca,
            next_endpoint: AtomicUsize::new(0),
        }
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

    /// Chooses a target among `candidates`, weighted across pools and round
    /// robin across a pool's endpoints, skipping the targets in `tried`.
    /// `None` when every permitted endpoint has been tried.
    pub fn choose(&self, candidates: PoolSet, tried: &[Target]) -> Option<Target> {
        let untried = |pool: usize, endpoint: usize| !tried.contains(&Target { pool, endpoint });
        let open = |pool: usize| {
            self.pools
                .get(pool)
                .is_some_and(|p| (0..p.endpoints.len()).any(|e| untried(pool, e)))
        };
        let total: usize = candidates
            .iter()
            .filter(|&i| open(i))
            .map(|i| self.pools[i].weight as usize)
            .sum();
        if total == 0 {
            return None;
        }
        let mut ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed) % total;
        let pool_index = candidates.iter().filter(|&i| open(i)).find(|&i| {
            let w = self.pools[i].weight as usize;
            if ticket < w {
                true
            } else {
                ticket -= w;
                false
            }
        })?;
        let pool = &self.pools[pool_index];
        let n = pool.endpoints.len();
        let start = pool.next_endpoint.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&e| untried(pool_index, e))
            .map(|endpoint| Target {
                pool: pool_index,
                endpoint,
            })
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
        let endpoints = ports
            .iter()
            .map(|p| Endpoint::parse(&format!("http://127.0.0.1:{p}"), None).unwrap())
            .collect();
        PoolUpstream::new(
            name.into(),
            "s".into(),
            "eu".into(),
            weight,
            endpoints,
            None,
        )
    }

    #[test]
    fn endpoints_parse_schemes_ports_and_names() {
        let e = Endpoint::parse("https://127.0.0.1:8443", Some("inference.test")).unwrap();
        assert!(e.tls);
        assert_eq!(e.socket.port(), 8443);
        assert_eq!(e.server_name, "inference.test");
        let e = Endpoint::parse("http://[::1]", None).unwrap();
        assert_eq!(e.socket.port(), 80);
        assert!(Endpoint::parse("ftp://x", None).is_err());
        assert!(Endpoint::parse("http://127.0.0.1:1/path", None).is_err());
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
            counts[ups.choose(candidates, &[]).unwrap().pool] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn tried_targets_are_skipped_until_none_is_left() {
        let ups = Upstreams::new(vec![pool("a", 1, &[1, 2])], UpstreamTimeouts::default());
        let mut candidates = PoolSet::EMPTY;
        candidates.insert(0);
        let first = ups.choose(candidates, &[]).unwrap();
        let second = ups.choose(candidates, &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(ups.choose(candidates, &[first, second]), None);
    }
}
