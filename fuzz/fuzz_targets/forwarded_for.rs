//! The X-Forwarded-For parser: any header values, any peer, trusted or not.
//! The client address is the peer or one of the listed hops, and its
//! prefix holds no host bits.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use privacy_gateway::client_ip::{client_address, ClientPrefix, PrefixLengths, TrustedProxies};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let peer: IpAddr = match selector % 4 {
        0 => [10, 0, 0, 1].into(),
        1 => [198, 51, 100, 7].into(),
        2 => "fd00::1".parse().expect("v6"),
        _ => "::ffff:10.1.2.3".parse().expect("mapped"),
    };
    let trusted = TrustedProxies::new(vec![
        "10.0.0.0/8".parse().expect("net"),
        "fd00::/8".parse().expect("net"),
    ]);
    let values: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    let Ok(client) = client_address(peer, values.iter().copied(), &trusted) else {
        return;
    };
    if !trusted.contains(peer) {
        assert_eq!(client, peer.to_canonical());
    }
    assert_eq!(client, client.to_canonical());
    let prefix = ClientPrefix::new(client, PrefixLengths::default());
    let text = prefix.to_string();
    let (network, len) = text.split_once('/').expect("CIDR text");
    assert_eq!(network.parse::<IpAddr>().ok(), Some(prefix.address()));
    assert_eq!(len, if client.is_ipv4() { "24" } else { "48" });
    match (client, prefix.address()) {
        (IpAddr::V4(c), IpAddr::V4(n)) => assert_eq!(u32::from(c) & !0xff, u32::from(n)),
        (IpAddr::V6(c), IpAddr::V6(n)) => {
            assert_eq!(u128::from(c) >> 80 << 80, u128::from(n))
        }
        other => panic!("family changed: {other:?}"),
    }
});
