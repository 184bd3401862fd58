//! Cost of the decision, of a whole request evaluation against a compiled
//! consent snapshot of 1,000,000 accounts (and the shipped 16, for the
//! ratio), and of (re)loading that snapshot.
//!
//! ```text
//! cargo bench --bench decide              # full
//! cargo bench --bench decide -- --quick   # shorter, noisier
//! cargo bench --bench decide -- evaluate  # one group (regex filter)
//! ```
//!
//! Groups:
//! - `decide`: the pure [`policy::decide`] for three representative facts.
//! - `evaluate_1m_accounts`: [`evaluate`] of a request head carrying a known
//!   API key and an unknown one (the 401 path), against the 1M snapshot
//!   (`big`) and the shipped 16-account one (`shipped`). The big
//!   benchmark cycles through 2^20 random-ish accounts, so lookups land all
//!   over the table; `big_hot64` cycles through 64 of them, which shows what
//!   of the difference is cache misses rather than the table's size.
//! - `load_1m_accounts`: [`config::load`] of the compiled 1M snapshot (a
//!   reload: the mapped file's header, the rules and pools) and of the
//!   shipped configuration (16 accounts of JSON Lines compiled in memory).
//!
//! The 1M snapshot is generated (with `support/accounts.rs`, as
//! `examples/gen_accounts.rs` does) into a temporary folder beside copies of
//! the shipped gateway/rules/pools files, compiled there with
//! [`config::compile_export`] (as `compile-accounts` does; the export is
//! then deleted) and loaded once before the `evaluate_1m_accounts` group,
//! whatever the filter (about 5 s at 1M); the process's VmRSS/VmHWM before
//! and after that load are printed to stderr.
//! Compare ratios between benchmarks, not absolute times: the machines this
//! runs on are shared. `BENCH_ACCOUNTS=N` changes the size of the big
//! snapshot; without `--bench` (`cargo test --benches`) it is 10,000, so
//! that test mode stays quick.

#[path = "support/accounts.rs"]
mod accounts;

use std::fs::File;
use std::hint::black_box;
use std::io::BufWriter;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::Criterion;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method};
use privacy_gateway::config::{self, LoadOptions, Snapshot};
use privacy_gateway::evaluate::{evaluate, Refusal, RequestHead};
use privacy_gateway::identity::IdentityError;
use privacy_gateway::policy::{
    self, Capability, CapabilitySet, Consents, PlanClass, PoolCatalog, PoolProfile, Product,
    ProductSet, RegionId, RequestFacts, RouteConstraint, SubprocessorSet,
};

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_decide(&mut c);
    // Built before any timing (a few seconds), even when a filter leaves out
    // its benchmarks: built inside one, it would count towards the time
    // `--quick` allows that benchmark.
    let big = build_big();
    bench_evaluate(&mut c, &big);
    bench_load(&mut c, &big);
    c.final_summary();
}

// ---------------------------------------------------------------- decide

/// Region indices in the order the shipped `pools.toml` first names them.
const EU: RegionId = RegionId(0);
const US: RegionId = RegionId(1);
/// Subprocessor indices, likewise.
const AZURE: usize = 0;
const GCP: usize = 1;
const CEREBRAS: usize = 2;
const BLACK_FOREST_LABS: usize = 3;
const BRAVE: usize = 4;
const E2B: usize = 5;

/// The catalogue `config::load` compiles from the shipped `pools.toml`.
fn shipped_catalog() -> PoolCatalog {
    let pool = |subprocessor, region, capabilities: &[Capability]| {
        let mut set = CapabilitySet::default();
        for c in capabilities {
            set.insert(*c);
        }
        PoolProfile::new(subprocessor, region, set)
    };
    use Capability::*;
    PoolCatalog::new(vec![
        pool(
            AZURE,
            EU,
            &[Chat, Embeddings, FineTuning, Feedback, Connector],
        ), // azure-sweden
        pool(GCP, EU, &[Chat, Embeddings, Feedback, Connector]), // gcp-ireland
        PoolProfile {
            priority: 1,
            ..pool(GCP, US, &[Chat, Embeddings])
        }, // gcp-us
        PoolProfile {
            priority: 1,
            ..pool(CEREBRAS, US, &[Chat])
        }, // cerebras
        PoolProfile {
            retains_input: Some(std::time::Duration::from_secs(15 * 86_400)),
            ..pool(BLACK_FOREST_LABS, US, &[ImageGeneration])
        }, // black-forest-labs
        pool(BRAVE, US, &[WebSearch]),                           // brave
        PoolProfile {
            products: ProductSet::only(Product::Chat),
            ..pool(E2B, US, &[CodeInterpreter])
        }, // e2b
    ])
}

fn bench_decide(c: &mut Criterion) {
    let pools = shipped_catalog();
    let none = Consents::default();
    let mut opt_out_gcp = SubprocessorSet::EMPTY;
    opt_out_gcp.insert(GCP);
    let eu_only_no_gcp = Consents {
        residency: Some(EU),
        subprocessor_opt_outs: opt_out_gcp,
        ..Consents::default()
    };
    let cases = [
        (
            "api_paid_chat",
            RequestFacts {
                product: Product::Api,
                plan: Some(PlanClass::ApiPaid),
                consents: &none,
                capability: Capability::Chat,
                global_privacy_control: false,
            },
        ),
        (
            "chat_anonymous_gpc",
            RequestFacts {
                product: Product::Chat,
                plan: Some(PlanClass::ChatAnonymous),
                consents: &none,
                capability: Capability::Chat,
                global_privacy_control: true,
            },
        ),
        (
            "api_eu_only_opt_out",
            RequestFacts {
                product: Product::Api,
                plan: Some(PlanClass::ApiPaid),
                consents: &eu_only_no_gcp,
                capability: Capability::Chat,
                global_privacy_control: false,
            },
        ),
    ];
    // The eu-only case must exercise both removal branches.
    let d = policy::decide(&pools, &cases[2].1);
    assert_eq!(d.route.candidates.iter().collect::<Vec<_>>(), [0]);
    assert!(
        !d.route
            .removed
            .by(RouteConstraint::SubprocessorOptOut)
            .is_empty()
            && !d.route.removed.by(RouteConstraint::Residency).is_empty()
    );

    let mut group = c.benchmark_group("decide");
    for (name, facts) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| policy::decide(black_box(&pools), black_box(facts)))
        });
    }
    group.finish();
}

// ---------------------------------------------------------------- evaluate

/// The generated snapshot and the folder its files are in.
struct Big {
    _dir: tempfile::TempDir,
    gateway: PathBuf,
    accounts: u64,
    snapshot: Snapshot,
}

fn big_account_count() -> u64 {
    if let Some(n) = std::env::var("BENCH_ACCOUNTS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .filter(|&n: &u64| n > 0)
    {
        return n;
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` does not.
    if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        10_000
    }
}

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Writes the shipped gateway/rules/pools files and `n` generated accounts
/// into a temporary folder, compiles the accounts, loads them, and prints
/// what it cost.
fn build_big() -> Big {
    let n = big_account_count();
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["rules.toml", "pools.toml"] {
        std::fs::copy(shipped_dir().join(name), dir.path().join(name)).expect("copy config");
    }
    let gateway = dir.path().join("gateway.toml");
    let shipped_gateway =
        std::fs::read_to_string(shipped_dir().join("gateway.toml")).expect("read gateway.toml");
    let compiled_gateway: Vec<&str> = shipped_gateway
        .lines()
        .map(|l| {
            if l.starts_with("accounts =") {
                "accounts = \"accounts.pgcs\""
            } else {
                l
            }
        })
        .collect();
    std::fs::write(&gateway, compiled_gateway.join("\n")).expect("write gateway.toml");
    let export = dir.path().join("accounts.jsonl");
    let started = Instant::now();
    let file = File::create(&export).expect("create accounts.jsonl");
    accounts::write_accounts(&mut BufWriter::new(file), n).expect("write accounts.jsonl");
    let generated = started.elapsed();
    let bytes = std::fs::metadata(&export).map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let compiled = dir.path().join("accounts.pgcs");
    config::compile_export(&gateway, &export, &compiled, None)
        .unwrap_or_else(|e| panic!("generated accounts do not compile:\n{e}"));
    let compile_time = started.elapsed();
    std::fs::remove_file(&export).expect("remove the export");

    let before = memory();
    let started = Instant::now();
    let (_, snapshot) = config::load(&gateway, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("generated snapshot does not load:\n{e}"));
    let loaded = started.elapsed();
    let after = memory();
    assert_eq!(snapshot.accounts.len() as u64, n);
    eprintln!(
        "\nconsent snapshot of {n} accounts: accounts.jsonl {:.1} MiB, generated in {generated:.2?}, \
         compiled in {compile_time:.2?} to {:.1} MiB; first load {loaded:.2?}\n  \
         memory before load: {before}\n  memory after load:  {after}\n  \
         RSS grown by the load: {:.1} MiB\n",
        mib(bytes),
        mib(std::fs::metadata(&compiled).map(|m| m.len()).unwrap_or(0)),
        mib(after.rss_kib.saturating_sub(before.rss_kib) * 1024),
    );
    Big {
        _dir: dir,
        gateway,
        accounts: n,
        snapshot,
    }
}

fn shipped_snapshot() -> Snapshot {
    config::load(&shipped_dir().join("gateway.toml"), &LoadOptions::default())
        .expect("shipped config loads")
        .1
}

/// `Authorization: Bearer <key>` for each key. The texts are leaked so that
/// the values are static: putting one in a header map copies nothing.
fn bearer_values(keys: impl Iterator<Item = String>) -> Vec<HeaderValue> {
    keys.map(|key| {
        let text: &'static str = Box::leak(format!("Bearer {key}").into_boxed_str());
        HeaderValue::from_static(text)
    })
    .collect()
}

/// `count` values cycling through `distinct`.
fn cycle(distinct: &[HeaderValue], count: usize) -> Vec<HeaderValue> {
    (0..count)
        .map(|k| distinct[k % distinct.len()].clone())
        .collect()
}

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
const PATH: &str = "/v1/chat/completions";

/// The path as Pingora holds it parsed, which the proxy passes along.
static RECEIVED: std::sync::LazyLock<PathAndQuery> =
    std::sync::LazyLock::new(|| PathAndQuery::from_static(PATH));

fn head(headers: &HeaderMap) -> RequestHead<'_> {
    RequestHead {
        method: &Method::POST,
        target: PATH.as_bytes(),
        received: Some(&RECEIVED),
        headers,
        peer: PEER,
        listener_product: Product::Api,
    }
}

/// A request's headers carrying `authorization`.
fn headers_with(authorization: &HeaderValue) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(http::header::AUTHORIZATION, authorization.clone());
    headers
}

/// Benchmarks `evaluate` of a `POST /v1/chat/completions` on the api
/// listener, with the next of `keys` as its `Authorization` each iteration
/// (the swap costs the same in every benchmark of the group). The position
/// in `keys` carries over from one sample to the next: restarting at the
/// first key would time keys the previous sample just brought into cache.
fn bench_keys(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    snapshot: &Snapshot,
    keys: &[HeaderValue],
) {
    let mut headers = headers_with(&keys[0]);
    let mut k = 0usize;
    group.bench_function(name, |b| {
        b.iter(|| {
            k = if k + 1 == keys.len() { 0 } else { k + 1 };
            headers.insert(http::header::AUTHORIZATION, keys[k].clone());
            evaluate(snapshot, &head(black_box(&headers)))
        })
    });
}

fn bench_evaluate(c: &mut Criterion, big: &Big) {
    let n = big.accounts;
    // As many keys as the big snapshot has accounts (at most 2^20), in every
    // benchmark, so that only the snapshot and the accounts named differ.
    let count = (n as usize).clamp(64, 1 << 20);

    // The shipped demo accounts: key = id with `acct-` replaced by `demo-`.
    let shipped = shipped_snapshot();
    let demo_keys = bearer_values(
        [
            "api-free",
            "api-free-objected",
            "api-paid",
            "api-zdr",
            "api-no-cerebras",
            "api-eu-only",
            "chat-free",
            "chat-free-optout",
            "chat-pro",
            "chat-student",
            "chat-team",
            "chat-team-optin",
            "chat-no-geo",
            "chat-restricted",
            "api-free-zdr",
            "chat-team-objected",
        ]
        .into_iter()
        .map(|name| format!("demo-{name}")),
    );
    assert_eq!(shipped.accounts.len(), demo_keys.len());
    for key in &demo_keys {
        assert!(admitted_account(&shipped, key).starts_with("acct-"));
    }
    let shipped_known = cycle(&demo_keys, count);
    let unknown = bearer_values((0..count).map(|k| format!("bench-unknown-{k}")));
    assert_unknown(&shipped, &unknown[0]);

    // Random-ish accounts of the big snapshot: all over the table, and 64
    // of them over and over (the table's cost without cache misses).
    let big_known =
        bearer_values((0..count as u64).map(|k| accounts::api_key(accounts::mix(k ^ 0x5eed) % n)));
    let big_hot = cycle(&big_known[..64], count);
    for key in big_known.iter().step_by(count / 64) {
        let id = admitted_account(&big.snapshot, key);
        assert!(id.starts_with("acct-bench-"), "{id}");
    }
    assert_unknown(&big.snapshot, &unknown[0]);

    let mut group = c.benchmark_group("evaluate_1m_accounts");
    bench_keys(&mut group, "known_key/big", &big.snapshot, &big_known);
    bench_keys(&mut group, "known_key/big_hot64", &big.snapshot, &big_hot);
    bench_keys(&mut group, "known_key/shipped", &shipped, &shipped_known);
    bench_keys(&mut group, "unknown_key/big", &big.snapshot, &unknown);
    bench_keys(&mut group, "unknown_key/shipped", &shipped, &unknown);
    group.finish();
}

/// The account a known key resolves to (admitted, or refused with 451).
fn admitted_account(snapshot: &Snapshot, authorization: &HeaderValue) -> String {
    match evaluate(snapshot, &head(&headers_with(authorization))) {
        Ok(a) => a.account.into(),
        Err(Refusal::NoPermittedRoute(a)) => a.account.into(),
        Err(other) => panic!("known key refused: {other:?}"),
    }
}

fn assert_unknown(snapshot: &Snapshot, authorization: &HeaderValue) {
    match evaluate(snapshot, &head(&headers_with(authorization))) {
        Err(Refusal::Identity(IdentityError::UnknownApiKey)) => {}
        other => panic!("unknown key not refused with 401: {other:?}"),
    }
}

// ---------------------------------------------------------------- load

fn bench_load(c: &mut Criterion, big: &Big) {
    let mut group = c.benchmark_group("load_1m_accounts");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    group.bench_function("config_load/big", |b| {
        let n = big.accounts;
        b.iter_with_large_drop(|| {
            let (_, s) = config::load(&big.gateway, &LoadOptions::default()).expect("load");
            assert_eq!(s.accounts.len() as u64, n);
            s
        })
    });
    let shipped = shipped_dir().join("gateway.toml");
    group.bench_function("config_load/shipped", |b| {
        b.iter_with_large_drop(|| config::load(&shipped, &LoadOptions::default()).expect("load"))
    });
    group.finish();
}

// ---------------------------------------------------------------- memory

/// This process's resident memory, from `/proc/self/status` (Linux).
#[derive(Clone, Copy)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory() -> Memory {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VmRSS {:.1} MiB, VmHWM (peak) {:.1} MiB",
            mib(self.rss_kib * 1024),
            mib(self.hwm_kib * 1024)
        )
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
