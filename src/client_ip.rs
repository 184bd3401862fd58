//! Who the client is on the network: the trusted-proxy-aware client address,
//! and the truncated prefix that is all the rest of the system ever sees.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
/// An IPv6 address that carries an IPv4 client (IPv4-mapped, 6to4, NAT64,
/// Teredo) is returned as that IPv4 address (spec §3), for truncation and
/// country alike. Trust is decided on the addresses as they arrive: an
/// embedded address never makes a hop trusted.
pub fn client_address<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &TrustedProxies,
) -> Result<IpAddr, ClientIpError> {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return Ok(embedded_client(peer));
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
                return Ok(embedded_client(hop));
            }
        }
    }
    // Every hop was trusted: the left-most is the best we know.
    Ok(embedded_client(client))
}

/// The IPv4 client an IPv6 address carries (spec §3): IPv4-mapped
/// (`::ffff:0:0/96`), 6to4 (`2002::/16`, bits 16-47), the NAT64 well-known
/// prefix (`64:ff9b::/96`, the last 32 bits) and Teredo (`2001::/32`, the
/// last 32 bits inverted). Truncated as IPv6, the `/48` of a 6to4 address
/// would be the whole IPv4 address.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let last = || Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(last()),
        [0x2002, ..] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(last()),
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!u32::from(last()))),
        _ => None,
    }
}

/// `ip`, or the IPv4 client it carries.
fn embedded_client(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
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
        // No fallback: the full address (`IpNet::from(ip)`) must never stand
        // in for a prefix, so a failure here is a bug that stops the request.
        let net = IpNet::new(ip, len)
            .expect("the prefix length is clamped to the address family's maximum")
            .trunc();
        ClientPrefix(net)
    }

    /// The network address, e.g. `203.0.113.0`: the value of `x-forwarded-for`.
    pub fn address(&self) -> IpAddr {
        self.0.network()
    }

    /// How many leading bits are kept, e.g. 24.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
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

    #[test]
    fn ipv6_addresses_that_carry_an_ipv4_client_are_that_client() {
        let client: Ipv4Addr = "203.0.113.77".parse().unwrap();
        for carrier in [
            "::ffff:203.0.113.77",
            "2002:cb00:714d::1",                    // 6to4
            "2002:cb00:714d:1234:5678::abcd",       // 6to4, any subnet and host
            "64:ff9b::cb00:714d",                   // NAT64 well-known prefix
            "2001:0:4136:e378:8000:63bf:34ff:8eb2", // Teredo: last 32 bits inverted
        ] {
            let ip: Ipv6Addr = carrier.parse().unwrap();
            assert_eq!(embedded_ipv4(ip), Some(client), "{carrier}");
        }
        for plain in [
            "2001:db8::1",
            "2001:db8:1234:5678::abcd",
            "64:ff9b:1::1",
            "::1",
        ] {
            let ip: Ipv6Addr = plain.parse().unwrap();
            assert_eq!(embedded_ipv4(ip), None, "{plain}");
        }
    }

    #[test]
    fn an_embedded_client_is_truncated_as_ipv4_but_never_trusted_as_one() {
        let l = PrefixLengths::default();
        // Untrusted peer over 6to4: the /24 of its IPv4, not the /48 that holds all of it.
        let peer: IpAddr = "2002:cb00:714d::1".parse().unwrap();
        let none: [&[u8]; 0] = [];
        let client = client_address(peer, none.into_iter(), &trusted()).unwrap();
        assert_eq!(client, "203.0.113.77".parse::<IpAddr>().unwrap());
        assert_eq!(ClientPrefix::new(client, l).to_string(), "203.0.113.0/24");
        // A 6to4 hop embedding a trusted IPv4 (10.0.0.1) is still the client,
        // not a trusted hop to skip over.
        let xff: [&[u8]; 1] = [b"198.51.100.7, 2002:a00:1::1"];
        let client = client_address("10.9.9.9".parse().unwrap(), xff.into_iter(), &trusted());
        assert_eq!(client, Ok("10.0.0.1".parse().unwrap()));
    }
}
