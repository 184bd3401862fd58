//! Who the client is on the network: the trusted-proxy-aware client address,
//! and the truncated prefix that is all the rest of the system ever sees.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use thiserror::Error;

/// Peers whose `X-Forwarded-For` is believed (a trusted front proxy or load balancer).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trust these networks.
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    /// Whether `ip` is inside a trusted network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Why no client address could be established.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ClientIpError {
    /// A trusted proxy sent an `X-Forwarded-For` entry that is not an address.
    #[error("X-Forwarded-For from a trusted proxy holds an entry that is not an IP address")]
    MalformedForwardedFor,
}

/// The client's address: the TCP peer, or, only when the peer is a trusted
/// proxy, the right-most address of `X-Forwarded-For` that is not itself a
/// trusted proxy (Envoy's `xff_num_trusted_hops` semantics, by network).
///
/// `forwarded_for` holds every `X-Forwarded-For` field value in arrival order.
/// IPv4-mapped IPv6 addresses are returned as IPv4.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &TrustedProxies,
) -> Result<IpAddr, ClientIpError> {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return Ok(peer);
    }
    let mut client = peer;
    for value in forwarded_for.rev() {
        let text = std::str::from_utf8(value).map_err(|_| ClientIpError::MalformedForwardedFor)?;
        for entry in text.rsplit(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let hop = parse_hop(entry).ok_or(ClientIpError::MalformedForwardedFor)?;
            client = hop;
            if !trusted.contains(hop) {
                return Ok(hop);
            }
        }
    }
    // Every hop was trusted: the left-most is the best we know.
    Ok(client)
}

/// One `X-Forwarded-For` entry: an address, optionally bracketed and with a port.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sock) = entry.parse::<std::net::SocketAddr>() {
        return Some(sock.ip().to_canonical());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
}

/// Prefix lengths to which client addresses are truncated (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixLengths {
    /// For IPv4 (default 24).
    pub ipv4: u8,
    /// For IPv6 (default 48).
    pub ipv6: u8,
}

impl Default for PrefixLengths {
    fn default() -> Self {
        PrefixLengths { ipv4: 24, ipv6: 48 }
    }
}

/// The client's address truncated to a permitted prefix: the only form of
/// the address that ever leaves the gateway or reaches a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientPrefix(IpNet);

impl ClientPrefix {
    /// Truncates `ip` (IPv4-mapped addresses count as IPv4).
    pub fn new(ip: IpAddr, lengths: PrefixLengths) -> Self {
        let ip = ip.to_canonical();
        let len = match ip {
            IpAddr::V4(_) => lengths.ipv4.min(32),
            IpAddr::V6(_) => lengths.ipv6.min(128),
        };
        // The length is clamped to the family's maximum, so `new` cannot fail.
        let net = IpNet::new(ip, len).map_or(IpNet::from(ip), |n| n.trunc());
        ClientPrefix(net)
    }

    /// The network address, e.g. `203.0.113.0`: the value of `x-forwarded-for`.
    pub fn address(&self) -> IpAddr {
        self.0.network()
    }
}

impl fmt::Display for ClientPrefix {
    /// e.g. `203.0.113.0/24`: the value of `x-privacy-client-prefix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> TrustedProxies {
        TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()])
    }

    #[test]
    fn untrusted_peer_ignores_forwarded_for() {
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        let xff: [&[u8]; 1] = [b"1.2.3.4"];
        assert_eq!(client_address(peer, xff.into_iter(), &trusted()), Ok(peer));
    }

    #[test]
    fn trusted_peer_uses_rightmost_untrusted_hop() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let xff: [&[u8]; 2] = [b"1.2.3.4, 198.51.100.7", b"10.1.1.1"];
        assert_eq!(
            client_address(peer, xff.into_iter(), &trusted()),
            Ok("198.51.100.7".parse().unwrap())
        );
    }

    #[test]
    fn trusted_peer_with_garbage_forwarded_for_is_an_error() {
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let xff: [&[u8]; 1] = [b"not-an-ip"];
        assert_eq!(
            client_address(peer, xff.into_iter(), &trusted()),
            Err(ClientIpError::MalformedForwardedFor)
        );
    }

    #[test]
    fn forwarded_for_entries_with_ports_and_brackets_parse() {
        assert_eq!(parse_hop("[2001:db8::1]"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("[2001:db8::1]:443"), "2001:db8::1".parse().ok());
        assert_eq!(parse_hop("192.0.2.1:8080"), "192.0.2.1".parse().ok());
    }

    #[test]
    fn prefixes_truncate_both_families_and_mapped_addresses() {
        let l = PrefixLengths::default();
        let v4 = ClientPrefix::new("203.0.113.77".parse().unwrap(), l);
        assert_eq!(v4.to_string(), "203.0.113.0/24");
        assert_eq!(v4.address().to_string(), "203.0.113.0");
        let v6 = ClientPrefix::new("2001:db8:1234:5678::9".parse().unwrap(), l);
        assert_eq!(v6.to_string(), "2001:db8:1234::/48");
        let mapped = ClientPrefix::new("::ffff:203.0.113.77".parse().unwrap(), l);
        assert_eq!(mapped, v4);
    }
}
