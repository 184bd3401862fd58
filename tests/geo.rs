//! Through the real proxy: the client's country (spec §3). Every `.mmdb` file
//! is generated here with `mmdb-writer`, in both record layouts the spec
//! names, and the client address is set by a trusted proxy's
//! `X-Forwarded-For` (the test client connects from 127.45.67.89).

mod support;

use std::net::IpAddr;
use std::path::Path;

use mmdb_writer::ipnet::IpNet;
use mmdb_writer::{Ipv4Aliasing, Writer};
use privacy_gateway::echo::Recorded;
use privacy_gateway::policy::Product;
use serde_json::{json, Value};
use support::{Gateway, TestConfig, Upstreams, CLIENT_V4};

const CHAT: &str = "/v1/chat/completions";
const GEO_FILE: &str = "geo.mmdb";
/// A documentation address the databases below place in France.
const FR_CLIENT: &str = "198.51.100.23";

// ---- databases ----

/// A GeoIP2/GeoLite2-Country record: the country nested under `country`,
/// with the other fields real files carry (a different `registered_country`
/// makes sure the right one is read).
fn geoip2(iso: &str) -> Value {
    json!({
        "continent": {"code": "EU", "geoname_id": 6_255_148u32, "names": {"en": "Europe"}},
        "country": {
            "geoname_id": 3_017_382u32,
            "is_in_european_union": true,
            "iso_code": iso,
            "names": {"en": format!("Country {iso}")}
        },
        "registered_country": {"geoname_id": 6_252_001u32, "iso_code": "US", "names": {"en": "United States"}}
    })
}

/// The flat layout of many free databases (DB-IP lite, IPinfo, ...).
fn flat(iso: &str) -> Value {
    json!({
        "continent_code": "EU",
        "country_code": iso,
        "country_name": format!("Country {iso}")
    })
}

/// An IPv6 database (IPv4 under `::/96`) holding `entries`, with or without
/// the IPv4-mapped/6to4/Teredo aliases real MaxMind files carry.
fn mmdb_with(aliasing: Ipv4Aliasing, entries: &[(&str, Value)]) -> Vec<u8> {
    let mut writer = Writer::builder("GeoLite2-Country")
        .ipv4_aliasing(aliasing)
        .build();
    for (net, record) in entries {
        let net: IpNet = net.parse().expect("test network");
        writer
            .insert(net, record)
            .unwrap_or_else(|e| panic!("insert {net}: {e}"));
    }
    let bytes = writer.to_bytes().expect("write mmdb");
    // The file itself is right, so a missing country below is the gateway's doing.
    let reader = maxminddb::Reader::from_source(bytes.clone()).expect("the generated file opens");
    for (net, record) in entries {
        let net: IpNet = net.parse().expect("test network");
        let found: Option<Value> = reader
            .lookup(net.network())
            .and_then(|r| r.decode())
            .unwrap_or_else(|e| panic!("look up {net} in the generated file: {e}"));
        assert_eq!(found.as_ref(), Some(record), "generated file holds {net}");
    }
    bytes
}

fn mmdb(entries: &[(&str, Value)]) -> Vec<u8> {
    mmdb_with(Ipv4Aliasing::Enabled, entries)
}

// ---- the gateway ----

struct Setup {
    gw: Gateway,
    ups: Upstreams,
}

/// A gateway trusting the test client as a proxy, with `geo` (if any) as its
/// country database.
async fn setup(geo: Option<Vec<u8>>) -> Setup {
    let ups = Upstreams::start().await;
    let mut config = TestConfig::shipped_with(&ups);
    config
        .trust
        .push_str("trusted_proxies = [\"127.45.0.0/16\"]\n");
    if let Some(bytes) = geo {
        config.extra_files = format!("geo = \"{GEO_FILE}\"");
        config.attachments.push((GEO_FILE.into(), bytes));
    }
    let gw = Gateway::start(&config);
    Setup { gw, ups }
}

impl Setup {
    /// Sends `POST /v1/chat/completions` to the chat listener as client
    /// `client_ip` (via `X-Forwarded-For`), with an optional key and extra
    /// headers; expects it forwarded, and returns what the upstream received.
    async fn forwarded(
        &self,
        key: Option<&str>,
        client_ip: &str,
        extra: &[(&str, &str)],
    ) -> Recorded {
        let mut headers = vec![("x-forwarded-for", client_ip)];
        headers.extend_from_slice(extra);
        support::forward(&self.ups, &self.gw.chat_url(CHAT), key, &headers)
            .await
            .1
    }

    /// Every byte the upstreams received, as text.
    fn upstream_text(&self) -> String {
        String::from_utf8_lossy(&self.ups.all_bytes()).into_owned()
    }

    /// The decision's geo part for the same request, decided by the library
    /// under the gateway's own configuration folder (the basis is not a
    /// stamped header, so this is where it can be read).
    fn geo_decision(
        &self,
        key: Option<&str>,
        client_ip: &str,
        extra: &[(&str, &str)],
    ) -> (bool, String, Option<String>) {
        let (_, snapshot) = privacy_gateway::config::load(
            &self.gw.dir.path().join("gateway.toml"),
            &privacy_gateway::config::LoadOptions::default(),
        )
        .expect("the gateway's configuration loads");
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", client_ip.parse().expect("header value"));
        if let Some(key) = key {
            headers.insert(
                http::header::AUTHORIZATION,
                format!("Bearer {key}").parse().expect("header value"),
            );
        }
        for (name, value) in extra {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                value.parse().expect("header value"),
            );
        }
        let head = privacy_gateway::evaluate::RequestHead {
            method: &http::Method::POST,
            target: CHAT.as_bytes(),
            received: None,
            headers: &headers,
            peer: CLIENT_V4.parse::<IpAddr>().expect("client address"),
            listener_product: Product::Chat,
        };
        let admission = privacy_gateway::evaluate::evaluate(&snapshot, &head)
            .unwrap_or_else(|r| panic!("request is admitted, got {}", r.code()));
        (
            admission.decision.geo.lookup,
            admission.decision.geo.basis.to_string(),
            admission.country.map(|c| c.to_string()),
        )
    }
}

// ---- spec §3: the country ----

#[tokio::test(flavor = "multi_thread")]
async fn geoip2_layout_stamps_the_country_for_accounts_and_anonymous_chat_without_leaking_the_address(
) {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", geoip2("FR"))]))).await;

    for key in [Some("demo-chat-pro"), None] {
        let r = s.forwarded(key, FR_CLIENT, &[]).await;
        assert_eq!(
            r.header_values("x-privacy-country"),
            vec!["FR"],
            "{key:?}: country of {FR_CLIENT} from country.iso_code: {r:?}"
        );
        assert_eq!(
            r.header("x-privacy-client-prefix"),
            Some("198.51.100.0/24"),
            "{key:?}: the prefix is still the truncated address: {r:?}"
        );
        assert_eq!(
            s.geo_decision(key, FR_CLIENT, &[]),
            (true, "3.1/ip-country".to_string(), Some("FR".to_string())),
            "{key:?}: lookup allowed on basis 3.1/ip-country"
        );
    }

    let bytes = s.upstream_text();
    assert!(
        bytes.contains("198.51.100.0"),
        "the prefix reached upstream (the check below can fail)"
    );
    assert!(
        !bytes.contains(FR_CLIENT),
        "the full address reached upstream:\n{bytes}"
    );
    let logs = s.gw.logs();
    assert!(
        !logs.contains(FR_CLIENT),
        "a log line holds the full address:\n{logs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flat_country_code_layout_stamps_the_country() {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", flat("DE"))]))).await;
    for key in [Some("demo-chat-pro"), None] {
        let r = s.forwarded(key, FR_CLIENT, &[]).await;
        assert_eq!(
            r.header_values("x-privacy-country"),
            vec!["DE"],
            "{key:?}: country of {FR_CLIENT} from the flat country_code: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_country_of_a_6to4_nat64_or_teredo_client_is_that_of_its_ipv4_address() {
    // Without the aliases a MaxMind file may carry, these resolve only if the
    // gateway looks them up as the IPv4 client they embed (spec §3).
    let db = mmdb_with(
        Ipv4Aliasing::Disabled,
        &[
            ("198.51.100.0/24", geoip2("FR")),
            ("2002::/16", geoip2("US")),
            ("2001::/32", geoip2("US")),
            ("64:ff9b::/96", geoip2("US")),
        ],
    );
    let s = setup(Some(db)).await;
    // 198.51.100.23 is c633:6417; inverted (Teredo) 39cc:9be8.
    for carrier in [
        "2002:c633:6417::1",
        "64:ff9b::c633:6417",
        "2001:0:4136:e378:8000:63bf:39cc:9be8",
    ] {
        let r = s.forwarded(Some("demo-chat-pro"), carrier, &[]).await;
        assert_eq!(
            r.header_values("x-privacy-country"),
            vec!["FR"],
            "country of {carrier}: {r:?}"
        );
        assert_eq!(r.header("x-privacy-client-prefix"), Some("198.51.100.0/24"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_and_ipv4_mapped_client_addresses_are_looked_up() {
    // Without the IPv4 aliases in the file, a mapped address resolves only if
    // the gateway looks it up as the IPv4 address it is.
    let db = mmdb_with(
        Ipv4Aliasing::Disabled,
        &[
            ("198.51.100.0/24", geoip2("FR")),
            ("2001:db8::/32", geoip2("NL")),
        ],
    );
    let s = setup(Some(db)).await;

    let v6 = "2001:db8:1234:5678::abcd";
    let r = s.forwarded(Some("demo-chat-pro"), v6, &[]).await;
    assert_eq!(
        r.header_values("x-privacy-country"),
        vec!["NL"],
        "country of IPv6 client {v6}: {r:?}"
    );
    assert_eq!(
        r.header("x-privacy-client-prefix"),
        Some("2001:db8:1234::/48")
    );

    let mapped = "::ffff:198.51.100.23";
    let r = s.forwarded(Some("demo-chat-pro"), mapped, &[]).await;
    assert_eq!(
        r.header_values("x-privacy-country"),
        vec!["FR"],
        "country of IPv4-mapped client {mapped}: {r:?}"
    );

    let r = s.forwarded(None, mapped, &[]).await;
    assert_eq!(
        r.header_values("x-privacy-country"),
        vec!["FR"],
        "country of anonymous IPv4-mapped client {mapped}: {r:?}"
    );

    let bytes = s.upstream_text();
    assert!(
        !support::V6_CLIENT_PARTS
            .iter()
            .any(|part| bytes.contains(part))
            && !bytes.contains(FR_CLIENT),
        "a full address reached upstream:\n{bytes}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_country_comes_from_the_full_address_not_the_forwarded_prefix() {
    // The /24 prefix 198.51.100.0 lies in FR; the client itself in BE.
    let s = setup(Some(mmdb(&[
        ("198.51.100.0/25", geoip2("FR")),
        ("198.51.100.128/25", geoip2("BE")),
    ])))
    .await;
    let r = s
        .forwarded(Some("demo-chat-pro"), "198.51.100.200", &[])
        .await;
    assert_eq!(
        r.header("x-privacy-client-prefix"),
        Some("198.51.100.0/24"),
        "{r:?}"
    );
    assert_eq!(
        r.header_values("x-privacy-country"),
        vec!["BE"],
        "looked up before truncation: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_country_without_consent_ip_opt_out_gpc_or_restriction() {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", geoip2("FR"))]))).await;

    // Control: the same gateway and address do give a country.
    let r = s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await;
    assert_eq!(r.header("x-privacy-country"), Some("FR"), "control: {r:?}");

    // ip_personalization_opt_out: no country and no part of the address.
    let r = s.forwarded(Some("demo-chat-no-geo"), FR_CLIENT, &[]).await;
    assert_eq!(r.header("x-privacy-account"), Some("acct-chat-no-geo"));
    assert!(
        r.header("x-privacy-country").is_none(),
        "ip_personalization_opt_out: no country: {r:?}"
    );
    assert!(
        r.header("x-forwarded-for").is_none(),
        "ip_personalization_opt_out: no x-forwarded-for: {r:?}"
    );
    assert!(
        r.header("x-privacy-client-prefix").is_none(),
        "ip_personalization_opt_out: no client prefix: {r:?}"
    );
    assert_eq!(
        s.geo_decision(Some("demo-chat-no-geo"), FR_CLIENT, &[]),
        (false, "3.1/ip-opt-out".to_string(), None),
        "ip_personalization_opt_out: lookup skipped on basis 3.1/ip-opt-out"
    );

    // Anonymous with Sec-GPC: no country, but the prefix is still forwarded.
    let gpc = [("Sec-GPC", "1")];
    let r = s.forwarded(None, FR_CLIENT, &gpc).await;
    assert_eq!(r.header("x-privacy-account"), Some("anonymous"));
    assert!(
        r.header("x-privacy-country").is_none(),
        "anonymous with Sec-GPC: no country: {r:?}"
    );
    assert_eq!(
        r.header("x-privacy-client-prefix"),
        Some("198.51.100.0/24"),
        "anonymous with Sec-GPC: the prefix is still forwarded: {r:?}"
    );
    assert_eq!(
        s.geo_decision(None, FR_CLIENT, &gpc),
        (false, "3.1/ip-opt-out".to_string(), None),
        "anonymous with Sec-GPC: lookup skipped on basis 3.1/ip-opt-out"
    );

    // restricted (right to limitation): no lookup.
    let r = s
        .forwarded(Some("demo-chat-restricted"), FR_CLIENT, &[])
        .await;
    assert_eq!(r.header("x-privacy-account"), Some("acct-chat-restricted"));
    assert!(
        r.header("x-privacy-country").is_none(),
        "restricted: no country: {r:?}"
    );
    let (lookup, _, country) = s.geo_decision(Some("demo-chat-restricted"), FR_CLIENT, &[]);
    assert!(!lookup && country.is_none(), "restricted: no lookup");
    // Spec §3 (e2): the skipped lookup names the more specific reason.
    let mut restricted = None;
    assert!(
        support::eventually(std::time::Duration::from_secs(5), || {
            restricted = support::audit_json(&s.gw)
                .into_iter()
                .find(|l| l["account"] == "acct-chat-restricted");
            restricted.is_some()
        })
        .await
    );
    assert_eq!(restricted.expect("audit line")["geo_basis"], "8/limitation");

    let bytes = s.upstream_text();
    assert!(
        !bytes.contains(FR_CLIENT),
        "the full address reached upstream:\n{bytes}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_not_in_the_database_gets_no_country_and_is_still_forwarded() {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", geoip2("FR"))]))).await;
    let r = s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await;
    assert_eq!(r.header("x-privacy-country"), Some("FR"), "control: {r:?}");

    for key in [Some("demo-chat-pro"), None] {
        let r = s.forwarded(key, "203.0.113.77", &[]).await;
        assert!(
            r.header("x-privacy-country").is_none(),
            "{key:?}: unknown address, no country: {r:?}"
        );
        assert_eq!(
            r.header("x-privacy-client-prefix"),
            Some("203.0.113.0/24"),
            "{key:?}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_geo_file_the_gateway_serves_and_stamps_no_country() {
    let s = setup(None).await;
    for key in [Some("demo-chat-pro"), None] {
        let r = s.forwarded(key, FR_CLIENT, &[]).await;
        assert!(
            r.header("x-privacy-country").is_none(),
            "{key:?}: no database, no country: {r:?}"
        );
        assert_eq!(
            r.header("x-privacy-client-prefix"),
            Some("198.51.100.0/24"),
            "{key:?}: {r:?}"
        );
    }
}

// ---- spec §8: the geo revision ----

#[tokio::test(flavor = "multi_thread")]
async fn the_geo_revision_is_the_databases_build_epoch_in_audit_and_explain() {
    let built = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_201_600);
    let mut writer = Writer::builder("GeoLite2-Country")
        .build_epoch(built)
        .build();
    writer
        .insert(
            "198.51.100.0/24".parse::<IpNet>().expect("net"),
            &geoip2("FR"),
        )
        .expect("insert");
    let s = setup(Some(writer.to_bytes().expect("mmdb"))).await;
    s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await;
    let mut lines = Vec::new();
    assert!(
        support::eventually(std::time::Duration::from_secs(5), || {
            lines = support::audit_json(&s.gw);
            !lines.is_empty()
        })
        .await
    );
    assert_eq!(lines[0]["geo_revision"], 1_764_201_600u64);
    assert_eq!(lines[0]["country"], "FR");
    let out = std::process::Command::new(support::binary())
        .args([
            "explain",
            "--path",
            CHAT,
            "--listener",
            "chat",
            "--client-ip",
            FR_CLIENT,
        ])
        .arg("--config")
        .arg(s.gw.dir.path().join("gateway.toml"))
        .output()
        .expect("explain");
    let explained: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(explained["geo_revision"], 1_764_201_600u64);
    assert_eq!(explained["consent_revision"], lines[0]["consent_revision"]);
}

// ---- spec §8: a bad geo file ----

/// Writes a configuration folder using `geo` as its country database and
/// runs `privacy-gateway check` on it.
fn check_with_geo(dir: &Path, geo: &[u8]) -> std::process::Output {
    for (name, text) in [
        ("rules.toml", support::shipped("rules.toml")),
        ("pools.toml", support::shipped("pools.toml")),
        ("accounts.jsonl", support::shipped("accounts.jsonl")),
    ] {
        std::fs::write(dir.join(name), text).expect("write");
    }
    std::fs::write(dir.join(GEO_FILE), geo).expect("write geo");
    std::fs::write(
        dir.join("gateway.toml"),
        format!(
            "[[listener]]\naddress = \"127.0.0.1:1\"\nproduct = \"chat\"\n[files]\nrules = \"rules.toml\"\npools = \"pools.toml\"\naccounts = \"accounts.jsonl\"\ngeo = \"{GEO_FILE}\"\n"
        ),
    )
    .expect("write");
    std::process::Command::new(support::binary())
        .args(["check", "--config"])
        .arg(dir.join("gateway.toml"))
        .output()
        .expect("run check")
}

/// Bytes that are no MaxMind database (a fixed pseudo-random sequence).
fn noise(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}

#[test]
fn a_geo_file_that_is_not_a_maxmind_database_fails_check_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Control: the same folder with a real database passes.
    let out = check_with_geo(dir.path(), &mmdb(&[("198.51.100.0/24", geoip2("FR"))]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("geo on"),
        "control: a valid database passes check: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = check_with_geo(dir.path(), &noise(4096));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check accepted random bytes as a geo database: {}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(GEO_FILE),
        "the error names the geo file: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_geo_database_applies_without_a_restart_and_a_broken_one_is_refused() {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", geoip2("FR"))]))).await;
    let country =
        |r: &privacy_gateway::echo::Recorded| r.header("x-privacy-country").map(str::to_string);
    assert_eq!(
        country(&s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await).as_deref(),
        Some("FR")
    );

    // A broken database changes nothing.
    let path = s.gw.dir.path().join(GEO_FILE);
    let tmp = s.gw.dir.path().join("geo.tmp");
    std::fs::write(&tmp, noise(4096)).expect("write");
    std::fs::rename(&tmp, &path).expect("rename over");
    let reported = support::eventually(std::time::Duration::from_secs(10), || {
        s.gw.logs().contains("reload rejected")
    })
    .await;
    assert!(
        reported,
        "the broken database was not reported:\n{}",
        s.gw.logs()
    );
    assert_eq!(
        country(&s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await).as_deref(),
        Some("FR")
    );

    // A good one replaces it on the next request after the reload.
    std::fs::write(&tmp, mmdb(&[("198.51.100.0/24", geoip2("BE"))])).expect("write");
    std::fs::rename(&tmp, &path).expect("rename over");
    assert_eq!(
        country_becomes(&s, "BE").await.as_deref(),
        Some("BE"),
        "the new database was not applied:\n{}",
        s.gw.logs()
    );
}

/// The country stamped for [`FR_CLIENT`] once it is `want` (bounded wait), or the last one seen.
async fn country_becomes(s: &Setup, want: &str) -> Option<String> {
    let mut last = None;
    for _ in 0..200 {
        let r = s.forwarded(Some("demo-chat-pro"), FR_CLIENT, &[]).await;
        last = r.header("x-privacy-country").map(str::to_string);
        if last.as_deref() == Some(want) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_geo_database_named_by_a_reload_is_watched_too() {
    let s = setup(Some(mmdb(&[("198.51.100.0/24", geoip2("FR"))]))).await;
    let dir = s.gw.dir.path();
    // gateway.toml now names another database in the same folder.
    std::fs::write(
        dir.join("other.mmdb"),
        mmdb(&[("198.51.100.0/24", geoip2("NL"))]),
    )
    .expect("write");
    let gateway = std::fs::read_to_string(dir.join("gateway.toml")).expect("read");
    s.gw.replace_file(
        "gateway.toml",
        &gateway.replace("geo = \"geo.mmdb\"", "geo = \"other.mmdb\""),
    );
    assert_eq!(
        country_becomes(&s, "NL").await.as_deref(),
        Some("NL"),
        "{}",
        s.gw.logs()
    );
    // And a change to that new file is picked up as well.
    s.gw.replace_file_bytes("other.mmdb", &mmdb(&[("198.51.100.0/24", geoip2("LU"))]));
    assert_eq!(
        country_becomes(&s, "LU").await.as_deref(),
        Some("LU"),
        "{}",
        s.gw.logs()
    );
}
