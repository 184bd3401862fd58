//! The staging load test (`examples/load_test.rs`), run briefly against the
//! real gateway in front of echo upstreams: it must pass where the gateway
//! keeps the policy, and fail where the gateway stamps what `explain` does
//! not (a gateway signing with another key than the files it was given).

#[path = "../examples/load_test.rs"]
#[allow(dead_code)]
mod load_test;
mod support;

use std::path::Path;

use clap::Parser;

/// Load-test arguments: `seconds` of load at a bounded rate, the gateway's
/// files in `config`.
fn args(gw: &support::Gateway, config: &Path, seconds: u32) -> load_test::Args {
    let config = config.display().to_string();
    let (api, chat) = (gw.api_url(""), gw.chat_url(""));
    let run_time = format!("{seconds}s");
    load_test::Args::try_parse_from([
        "load_test",
        "--gateway-config",
        &config,
        "--api-url",
        &api,
        "--chat-url",
        &chat,
        "--run-time",
        &run_time,
        "--users",
        "6",
        "--increase-rate",
        "6",
        "--throttle-requests",
        "200",
        "--unknown-percent",
        "5",
        "--stream-percent",
        "20",
        "--quiet",
    ])
    .expect("load test arguments")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_test_passes_a_faithful_gateway_and_catches_stamps_explain_would_not_make() {
    let key = b"load-test-signing-key-0123456789";
    let (_ups, gw) = support::start_with(|c| c.sign_with(key)).await;

    let tally = load_test::run(args(&gw, &gw.dir.path().join("gateway.toml"), 4))
        .await
        .expect("load test runs");
    assert_eq!(tally.violation_count(), 0, "{tally:?}");
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert!(count(&tally.forwarded) > 50, "{tally:?}");
    assert!(count(&tally.streamed) > 0, "{tally:?}");
    assert!(count(&tally.refused) > 0, "{tally:?}");

    // The same gateway, checked against files that sign with another key:
    // every forwarded answer's signature differs from explain's.
    let other = tempfile::tempdir().expect("tempdir");
    for name in ["gateway.toml", "rules.toml", "pools.toml", "accounts.jsonl"] {
        std::fs::copy(gw.dir.path().join(name), other.path().join(name)).expect("copy");
    }
    std::fs::write(
        other.path().join("signing.key"),
        b"another-signing-key-0123456789ab",
    )
    .expect("key");
    let tally = load_test::run(args(&gw, &other.path().join("gateway.toml"), 2))
        .await
        .expect("load test runs");
    assert!(tally.violations_of("stamps") > 10, "{tally:?}");
    assert_eq!(count(&tally.forwarded), 0, "{tally:?}");
}
