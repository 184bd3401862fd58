//! Heap allocations of the work the gateway adds to one request, counted
//! by a counting global allocator (`allocation-counter`, this thread only):
//!
//! ```text
//! cargo bench --bench alloc
//! ```
//!
//! Each step is the function the proxy calls, on the shipped configuration
//! with a signing key, for a `POST /v1/chat/completions` as `demo-api-paid`
//! (the common case), then for an unknown key (a 401):
//!
//! - `decision id`: the request's id, as `new_ctx` makes it;
//! - `evaluate`: key hash, account lookup, facts, decision;
//! - `stamps`: the contract's values and signature for this request
//!   (`Admission::stamps`), the gateway's own work;
//! - `rewrite`: all of the upstream rewrite as the proxy does it: strip
//!   what a client may not send, set the decided target and the pool's
//!   `Host`, then the stamps inserted into the request's header map (taken
//!   out of Pingora's `RequestHeader` and put back, with room for them
//!   reserved once);
//! - `observe`: metrics, access line (no subscriber is installed here, so
//!   it is not formatted) and the audit line queued to its writer.
//!
//! Prints allocations and bytes per request for each step, averaged over
//! many requests after a warm-up (first-use series and buffers excluded).
//! No timing: a count does not depend on the machine. Without `--bench`
//! (`cargo test --benches`) it runs a few requests only.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use allocation_counter::{measure, AllocationInfo};
use http::Method;
use pingora::http::RequestHeader;
use privacy_gateway::audit::{AuditLog, AuditTarget};
use privacy_gateway::config::{self, LoadOptions, Snapshot};
use privacy_gateway::evaluate::{evaluate, Admission, RequestHead};
use privacy_gateway::metrics::Metrics;
use privacy_gateway::observe::{Completed, Observers};
use privacy_gateway::policy::Product;
use privacy_gateway::proxy::rewrite_upstream_request;
use privacy_gateway::routing::Target;
use privacy_gateway::stamp::{self, DecisionId};

const PATH: &str = "/v1/chat/completions";
const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77));

/// The shipped configuration with a signing key, in a temporary folder.
fn snapshot(dir: &Path) -> Snapshot {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["rules.toml", "pools.toml", "accounts.jsonl"] {
        std::fs::copy(shipped.join(name), dir.join(name)).expect("copy config");
    }
    std::fs::write(
        dir.join("signing.key"),
        "bench-signing-key-0123456789abcdef",
    )
    .expect("key");
    let gateway = std::fs::read_to_string(shipped.join("gateway.toml"))
        .expect("gateway.toml")
        .replace("[signing]", "[signing]\nkey_file = \"signing.key\"");
    std::fs::write(dir.join("gateway.toml"), gateway).expect("write gateway.toml");
    config::load(&dir.join("gateway.toml"), &LoadOptions::default())
        .expect("config loads")
        .1
}

/// The request head a client commonly sends, as Pingora parsed it.
fn client_request(key: &str) -> RequestHeader {
    let mut req = RequestHeader::build("POST", PATH.as_bytes(), Some(8)).expect("request");
    for (name, value) in [
        ("Host", "gateway.example"),
        ("Content-Type", "application/json"),
        ("Content-Length", "57"),
        ("Accept", "*/*"),
        ("User-Agent", "bench/1"),
        ("Authorization", &format!("Bearer {key}")),
    ] {
        req.append_header(name.to_string(), value).expect("header");
    }
    req
}

/// Allocations of each step, summed over the requests measured.
#[derive(Default)]
struct Steps {
    decision_id: AllocationInfo,
    evaluate: AllocationInfo,
    stamps: AllocationInfo,
    rewrite: AllocationInfo,
    observe: AllocationInfo,
}

fn add(sum: &mut AllocationInfo, one: AllocationInfo) {
    sum.count_total += one.count_total;
    sum.bytes_total += one.bytes_total;
}

/// One request through every step, each counted.
fn one_request(
    snapshot: &Snapshot,
    observers: &Observers,
    client: &RequestHeader,
    steps: &mut Steps,
) -> u16 {
    let mut decision_id = None;
    add(
        &mut steps.decision_id,
        measure(|| decision_id = Some(DecisionId::new())),
    );
    let decision_id = decision_id.expect("made");
    let decision_id = decision_id.as_str();
    let head = RequestHead {
        method: &Method::POST,
        target: client.raw_path(),
        received: client.uri.path_and_query(),
        headers: &client.headers,
        peer: PEER,
        listener_product: Product::Api,
    };
    let mut outcome = None;
    add(
        &mut steps.evaluate,
        measure(|| outcome = Some(evaluate(snapshot, black_box(&head)))),
    );
    let outcome = outcome.expect("evaluated");
    let (admission, status): (Option<&Admission>, u16) = match &outcome {
        Ok(a) => (Some(a), 200),
        Err(privacy_gateway::evaluate::Refusal::NoPermittedRoute(a)) => (Some(a), 451),
        Err(r) => (None, r.status()),
    };
    let pool = snapshot.upstreams.pool(0).expect("a pool");
    let target = Target {
        pool: 0,
        endpoint: 0,
        socket: pool.endpoints[0].addresses()[0].socket,
    };
    if let (Ok(admission), 200) = (&outcome, status) {
        add(
            &mut steps.stamps,
            measure(|| {
                black_box(
                    admission
                        .stamps(snapshot, decision_id, pool)
                        .expect("stamps"),
                );
            }),
        );
        let mut upstream = client.clone();
        add(
            &mut steps.rewrite,
            measure(|| {
                rewrite_upstream_request(&mut upstream, snapshot, admission, decision_id, target)
                    .expect("rewrite")
            }),
        );
        assert!(upstream.headers.get(stamp::SIGNATURE).is_some());
        assert_eq!(upstream.raw_path(), PATH.as_bytes());
        assert_ne!(
            upstream.headers.get(http::header::HOST),
            client.headers.get("host")
        );
        black_box(&upstream);
    }
    let done = Completed {
        decision_id,
        method: "POST",
        path: PATH,
        snapshot,
        listener_product: Product::Api,
        admission,
        quarantine: None,
        status,
        error_code: None,
        pool: (status == 200).then_some(0),
        total: Duration::from_micros(900),
        upstream: (status == 200).then_some(Duration::from_micros(700)),
    };
    add(
        &mut steps.observe,
        measure(|| observers.request_done(black_box(&done))),
    );
    status
}

fn report(name: &str, steps: &Steps, requests: u64) {
    println!("\n{name} ({requests} requests): allocations (bytes) per request");
    let mut total = AllocationInfo::default();
    for (step, info) in [
        ("decision id", steps.decision_id),
        ("evaluate", steps.evaluate),
        ("stamps (values, signature)", steps.stamps),
        ("rewrite (strip, insert stamps)", steps.rewrite),
        ("observe (metrics, audit line)", steps.observe),
    ] {
        // The rewrite includes the stamps: count them once.
        if step != "stamps (values, signature)" {
            add(&mut total, info);
        }
        println!(
            "  {step:<32} {:>7.2} ({:>6.0} B)",
            info.count_total as f64 / requests as f64,
            info.bytes_total as f64 / requests as f64
        );
    }
    println!(
        "  {:<32} {:>7.2} ({:>6.0} B)",
        "total",
        total.count_total as f64 / requests as f64,
        total.bytes_total as f64 / requests as f64
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let requests: u64 = if bench { 10_000 } else { 20 };
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = snapshot(dir.path());
    let metrics = Arc::new(Metrics::new());
    let audit = AuditLog::open(
        &AuditTarget::File(dir.path().join("audit.jsonl")),
        65_536,
        metrics.audit_dropped.clone(),
    )
    .expect("audit log");
    audit.start().expect("audit writer");
    let observers = Observers {
        metrics,
        audit: Some(audit),
    };
    for (name, key, expected) in [
        ("api-paid, forwarded", "demo-api-paid", 200),
        ("unknown key, 401", "bench-unknown-key", 401),
    ] {
        let client = client_request(key);
        // Warm up: first-use metric series, buffers, lazy statics.
        for _ in 0..100 {
            one_request(&snapshot, &observers, &client, &mut Steps::default());
        }
        let mut steps = Steps::default();
        for _ in 0..requests {
            assert_eq!(
                one_request(&snapshot, &observers, &client, &mut steps),
                expected
            );
        }
        report(name, &steps, requests);
    }
    assert!(observers
        .audit
        .as_ref()
        .is_some_and(|a| a.flush(Duration::from_secs(5))));
}
