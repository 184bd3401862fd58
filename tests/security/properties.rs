//! Property tests. Through the real gateway: random client addresses
//! (IPv4, IPv6, IPv4-mapped) in every address header, repeated, in mixed
//! case and with underscores, from untrusted and trusted peers, never reach
//! an upstream byte, a log line or an audit line; random spoofed privacy
//! headers never change a decision. On the library: prefixes hold no host
//! bits, signatures are never empty, normalised targets are stable.
//!
//! `PROPTEST_CASES` sets the number of cases of each property (default 48
//! through the gateway, 256 on the library); SECURITY.md records a long run.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use privacy_gateway::client_ip::{ClientPrefix, PrefixLengths};
use privacy_gateway::request_target::RequestTarget;
use privacy_gateway::stamp::{self, SigningKey, ADDRESS_HEADERS};

use tokio::io::AsyncWriteExt;

use crate::raw::{connect, exchange, read_reply, trusting_the_client, Reply};
use crate::support::{Gateway, TestConfig, Upstreams};

const CHAT: &str = "/v1/chat/completions";

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(default_cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default_cases),
        failure_persistence: None,
        ..Config::default()
    })
}

/// One gateway with its upstreams, on a runtime of its own (proptest's
/// runner is synchronous), and the kept-alive connection cases go over:
/// thousands of connections from one client address would run out of
/// ports while the closed ones wait out TIME_WAIT.
struct Bench {
    rt: tokio::runtime::Runtime,
    ups: Upstreams,
    gw: Gateway,
    connection: std::cell::RefCell<Option<tokio::net::TcpStream>>,
}

impl Bench {
    fn start(edit: impl FnOnce(&mut TestConfig)) -> Bench {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let ups = rt.block_on(Upstreams::start());
        let mut config = TestConfig::shipped_with(&ups);
        edit(&mut config);
        let gw = Gateway::start(&config);
        Bench {
            rt,
            ups,
            gw,
            connection: Default::default(),
        }
    }

    /// Sends `request` on the kept-alive connection (a new one when the
    /// gateway closed the last) and reads the answer.
    fn send(&self, request: &[u8]) -> Reply {
        let kept = self.connection.take();
        let (reply, open) = self.rt.block_on(async {
            let mut stream = match kept {
                Some(stream) => stream,
                None => connect(self.gw.chat).await,
            };
            let reply = match stream.write_all(request).await {
                Ok(()) => read_reply(&mut stream).await,
                Err(_) => None,
            };
            match reply {
                Some(reply) => (reply, Some(stream)),
                // Closed between two requests: once more, on a new connection.
                None => (exchange(self.gw.chat, request).await, None),
            }
        });
        if reply.header("connection") != Some("close") {
            self.connection.replace(open);
        }
        reply
    }

    /// What every upstream received since the last call.
    fn upstream_bytes(&self) -> Vec<u8> {
        self.ups
            .echoes
            .values()
            .flat_map(|e| e.take_received_bytes())
            .collect()
    }

    /// Everything the gateway logged and audited, once at least `requests`
    /// audit lines are written (the writer batches them, so the last
    /// requests' lines may still be on their way; waits at most 10 s).
    fn logs_and_audit(&self, requests: usize) -> (String, usize) {
        let audit = |gw: &Gateway| gw.audit_lines().len() >= requests;
        self.rt.block_on(crate::support::eventually(
            std::time::Duration::from_secs(10),
            || audit(&self.gw),
        ));
        let lines = self.gw.audit_lines();
        let text = format!("{}\n{}", self.gw.logs(), lines.join("\n"));
        (text, lines.len())
    }
}

/// A client address with bits beyond its /24 (IPv4) or /48 (IPv6): its full
/// text never equals the prefix the gateway may forward.
fn client_address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
    ]
    .prop_filter("host bits beyond the prefix", |ip| {
        match ip.to_canonical() {
            IpAddr::V4(v4) => v4.octets()[3] != 0,
            IpAddr::V6(v6) => v6.segments()[3..].iter().any(|&s| s != 0),
        }
    })
}

/// How an address is written in a header value.
fn written(ip: IpAddr, form: u8) -> String {
    match (ip, form % 4) {
        (IpAddr::V6(v6), 1) => format!("[{v6}]:443"),
        (IpAddr::V6(v6), 2) => format!("for=\"[{v6}]\"").to_uppercase(),
        (IpAddr::V6(v6), 3) => v6.to_string().to_uppercase(),
        (IpAddr::V4(v4), 1) => format!("{v4}:8080"),
        (IpAddr::V4(v4), 2) => format!("for={v4}"),
        _ => ip.to_string(),
    }
}

/// A header name in random case, sometimes with underscores.
fn spelled(name: &str, case_bits: u64, underscore: bool) -> String {
    let name: String = name
        .chars()
        .enumerate()
        .map(|(i, c)| match case_bits >> (i % 64) & 1 {
            1 => c.to_ascii_uppercase(),
            _ => c,
        })
        .collect();
    if underscore {
        name.replace('-', "_")
    } else {
        name
    }
}

/// One address-header line: which header, how spelled, which address, how written.
fn address_line() -> impl Strategy<Value = (usize, u64, bool, IpAddr, u8)> {
    (
        0..ADDRESS_HEADERS.len(),
        any::<u64>(),
        prop::bool::weighted(0.2),
        client_address(),
        any::<u8>(),
    )
}

/// The forms of `ip` whose presence means the full address leaked (lower case).
fn leak_forms(ip: IpAddr) -> Vec<String> {
    let mut forms = vec![ip.to_string().to_ascii_lowercase()];
    forms.push(ip.to_canonical().to_string().to_ascii_lowercase());
    forms
}

/// Every IP address written in `text`, canonical.
fn addresses_in(text: &str) -> HashSet<IpAddr> {
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
        .flat_map(|token| {
            let token = token.trim_matches(|c| c == ':' || c == '.');
            let without_port = token.rsplit_once(':').map(|(a, _)| a);
            [Some(token), without_port]
        })
        .flatten()
        .filter_map(|t| t.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect()
}

fn run_address_property(trusted: bool) {
    let bench = Bench::start(|c| {
        if trusted {
            trusting_the_client(c);
        }
    });
    let keys = [None, Some("demo-chat-pro"), Some("demo-chat-no-geo")];
    let sent: std::cell::RefCell<HashSet<IpAddr>> = Default::default();
    let strategy = (
        prop::collection::vec(address_line(), 1..8),
        0..keys.len(),
        1..3usize,
    );
    let result = runner(48).run(&strategy, |(lines, key, repeat)| {
        let mut headers = Vec::new();
        for _ in 0..repeat {
            for (header, case_bits, underscore, ip, form) in &lines {
                let name = spelled(ADDRESS_HEADERS[*header], *case_bits, *underscore);
                headers.push(format!("{name}: {}", written(*ip, *form)));
            }
        }
        if let Some(key) = keys[key] {
            headers.push(format!("Authorization: Bearer {key}"));
        }
        let header_refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        let reply = bench.send(&crate::raw::post(CHAT, &header_refs));
        // A trusted proxy's unparsable X-Forwarded-For is refused, never guessed.
        prop_assert!(
            reply.status == 200 || (trusted && reply.status == 400),
            "{reply:?}"
        );
        let upstream = String::from_utf8_lossy(&bench.upstream_bytes()).to_ascii_lowercase();
        let answer = String::from_utf8_lossy(&reply.body).to_ascii_lowercase();
        for (.., ip, _) in &lines {
            sent.borrow_mut().insert(ip.to_canonical());
            for form in leak_forms(*ip) {
                prop_assert!(
                    !upstream.contains(&form),
                    "{form} reached upstream:\n{upstream}"
                );
                prop_assert!(!answer.contains(&form), "{form} in the answer:\n{answer}");
            }
        }
        prop_assert!(!upstream.contains("127.45.67.89"));
        for line in upstream.lines() {
            let name = line.split(':').next().unwrap_or_default();
            prop_assert!(!name.contains('_'), "{line}");
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (logged, audited) = bench.logs_and_audit(cases(48) as usize);
    let leaked: Vec<_> = addresses_in(&logged)
        .intersection(&sent.borrow())
        .copied()
        .collect();
    assert!(
        leaked.is_empty(),
        "full addresses in logs or audit lines: {leaked:?}"
    );
    for key in keys.iter().flatten() {
        assert!(!logged.contains(key), "an API key in logs or audit lines");
    }
    assert!(audited >= cases(48) as usize, "every request audited");
}

#[test]
fn no_full_address_from_an_untrusted_peer_reaches_an_upstream_a_log_or_an_audit_line() {
    run_address_property(false);
}

#[test]
fn no_full_address_from_a_trusted_peer_reaches_an_upstream_a_log_or_an_audit_line() {
    run_address_property(true);
}

/// What the stamped headers say about the decision (the pool aside, which
/// routing varies): a spoofed header must change none of them.
const DECISION_HEADERS: [&str; 10] = [
    stamp::TRAINING,
    stamp::TRAINING_BASIS,
    stamp::RETENTION,
    stamp::ZERO_DATA_RETENTION,
    stamp::ACCOUNT,
    stamp::PLAN,
    stamp::PRODUCT,
    stamp::COUNTRY,
    stamp::CLIENT_PREFIX,
    stamp::FORWARDED_FOR,
];

/// Names a client may not set: the decision's, the rest of the contract,
/// and the identity header (from an untrusted peer).
fn spoofable() -> Vec<&'static str> {
    DECISION_HEADERS
        .iter()
        .copied()
        .filter(|&name| name != stamp::FORWARDED_FOR)
        .chain([
            stamp::POOL,
            stamp::SUBPROCESSOR,
            stamp::DECISION_ID,
            stamp::SIGNATURE,
            "x-authenticated-account",
        ])
        .collect()
}

/// Plausible values to spoof them with.
const VALUES: [&str; 10] = [
    "allowed",
    "denied",
    "3.4.3/default",
    "account-lifetime",
    "0",
    "1",
    "acct-chat-team-optin",
    "cerebras",
    "FR",
    "203.0.113.0/24",
];

/// The decision an upstream was told, pool aside.
fn decision(reply: &Reply) -> Vec<Option<String>> {
    DECISION_HEADERS
        .iter()
        .map(|name| reply.echoed(name))
        .collect()
}

#[test]
fn spoofed_privacy_headers_never_change_a_decision() {
    let bench = Bench::start(|_| {});
    let keys = [
        None,
        Some("demo-chat-free"),
        Some("demo-chat-free-optout"),
        Some("demo-chat-team"),
        Some("demo-chat-no-geo"),
        Some("demo-chat-restricted"),
    ];
    let with_key = |key: Option<&str>, extra: &[String]| {
        let mut headers: Vec<String> = extra.to_vec();
        if let Some(key) = key {
            headers.push(format!("Authorization: Bearer {key}"));
        }
        let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
        bench.send(&crate::raw::post(CHAT, &refs))
    };
    let baseline: Vec<_> = keys
        .iter()
        .map(|key| {
            let reply = with_key(*key, &[]);
            assert_eq!(reply.status, 200, "{reply:?}");
            decision(&reply)
        })
        .collect();
    let spoofable = spoofable();
    let spoof = (
        0..spoofable.len(),
        any::<u64>(),
        any::<bool>(),
        0..VALUES.len(),
        "[a-z0-9/.,-]{0,12}",
    );
    let strategy = (prop::collection::vec(spoof, 1..10), 0..keys.len());
    let result = runner(48).run(&strategy, |(spoofs, key)| {
        let lines: Vec<String> = spoofs
            .iter()
            .map(|(name, case_bits, underscore, value, noise)| {
                let name = spelled(spoofable[*name], *case_bits, *underscore);
                format!("{name}: {}{noise}", VALUES[*value])
            })
            .collect();
        let reply = with_key(keys[key], &lines);
        prop_assert_eq!(reply.status, 200, "{:?}", reply);
        prop_assert_eq!(&decision(&reply), &baseline[key], "{:?}", lines);
        let _ = bench.upstream_bytes();
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(Config { cases: cases(256), failure_persistence: None, ..Config::default() })]

    /// Finding 9: the prefix never carries a bit of the host part, whatever the lengths.
    #[test]
    fn client_prefixes_hold_no_host_bits(ip in client_address(), v4 in 0u8..=255, v6 in 0u8..=255) {
        let lengths = PrefixLengths { ipv4: v4, ipv6: v6 };
        let prefix = ClientPrefix::new(ip, lengths);
        let text = prefix.to_string();
        let (address, len) = text.split_once('/').expect("CIDR");
        let len: u32 = len.parse().expect("length");
        let network: IpAddr = address.parse().expect("address");
        prop_assert_eq!(network, prefix.address());
        match (ip.to_canonical(), network) {
            (IpAddr::V4(full), IpAddr::V4(net)) => {
                prop_assert_eq!(len, u32::from(v4.min(32)));
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                prop_assert_eq!(u32::from(net), u32::from(full) & mask);
            }
            (IpAddr::V6(full), IpAddr::V6(net)) => {
                prop_assert_eq!(len, u32::from(v6.min(128)));
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                prop_assert_eq!(u128::from(net), u128::from(full) & mask);
            }
            other => return Err(TestCaseError::fail(format!("family changed: {other:?}"))),
        }
    }

    /// Finding 9: signing has no made-up fallback (empty, or all zeros), whatever the key.
    #[test]
    fn signatures_are_never_made_up(key in prop::collection::vec(any::<u8>(), 0..200), value in ".{0,40}") {
        let signature = stamp::signature(&SigningKey::new(key), [(stamp::TRAINING, value.as_bytes())]);
        prop_assert!(signature.iter().all(u8::is_ascii_hexdigit));
        prop_assert_ne!(signature, [b'0'; 64]);
    }

    /// Finding 3: a normalised target normalises to itself and holds no trick.
    #[test]
    fn normalised_targets_are_stable_and_hold_no_trick(raw in "(/([a-zA-Z0-9._~;:@!$&'()*+,=-]|%[0-9a-fA-F]{2}){0,12}){1,6}(\\?[ -~]{0,12})?") {
        if let Ok(target) = RequestTarget::parse(raw.as_bytes()) {
            let text = target.to_string();
            let again = RequestTarget::parse(text.as_bytes());
            prop_assert_eq!(again.as_ref(), Ok(&target));
            let path = target.path().to_ascii_uppercase();
            for trick in ["%2F", "%5C", "%25", "%00", "\\"] {
                prop_assert!(!path.contains(trick), "{}", text);
            }
            for segment in target.path().split('/') {
                let name = segment.split(';').next().unwrap_or_default();
                prop_assert!(name != "." && name != "..", "{}", text);
            }
        }
    }
}
