//! `privacy-gateway check`: the shipped example is valid, and each broken
//! file is refused with a non-zero exit and `file:line: message`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

/// Writes the shipped configuration into a temporary folder, lets `edit`
/// change one file, and runs `check` on it.
fn check_with(edit: impl FnOnce(&Path)) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["gateway.toml", "rules.toml", "pools.toml", "accounts.jsonl"] {
        std::fs::write(dir.path().join(name), support::shipped(name)).expect("write");
    }
    edit(dir.path());
    Command::new(support::binary())
        .args(["check", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .output()
        .expect("run check")
}

fn replace_in(dir: &Path, file: &str, from: &str, to: &str) {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(text.contains(from), "{file} has no `{from}`");
    std::fs::write(&path, text.replacen(from, to, 1)).expect("write");
}

fn line_of(dir: &Path, file: &str, needle: &str) -> usize {
    let text = std::fs::read_to_string(dir.join(file)).expect("read");
    text.lines()
        .position(|l| l.contains(needle))
        .expect("needle present")
        + 1
}

/// Asserts a failed check whose errors include `file:line:` and `message`.
fn assert_refused(out: &Output, file: &str, line: Option<usize>, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "check accepted a broken file; stderr: {stderr}"
    );
    let location = match line {
        Some(l) => format!("{file}:{l}: "),
        None => format!("{file}: "),
    };
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&location) && l.contains(message)),
        "expected `{location}...{message}` in:\n{stderr}"
    );
}

#[test]
fn the_shipped_example_is_valid() {
    let out = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml"))
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: policy 2025-02-06+r"), "{stdout}");
    for part in [
        "2 listeners",
        "8 routes",
        "6 plans",
        "7 pools",
        "14 accounts",
    ] {
        assert!(stdout.contains(part), "{part} missing from: {stdout}");
    }
}

#[test]
fn an_unparsable_pools_file_names_its_line() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(d, "pools.toml", "name = \"cerebras\"", "name = \"cerebras");
        line = line_of(d, "pools.toml", "name = \"cerebras");
    });
    assert_refused(&out, "pools.toml", Some(line), "");
}

#[test]
fn an_unknown_field_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "rules.toml",
            "ipv4_prefix = 24",
            "ipv4_prefix = 24\nipv4_prefx = 16",
        );
        line = line_of(d, "rules.toml", "ipv4_prefx");
    });
    assert_refused(&out, "rules.toml", Some(line), "unknown field `ipv4_prefx`");
}

#[test]
fn a_prefix_length_out_of_range_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(d, "rules.toml", "ipv4_prefix = 24", "ipv4_prefix = 33");
        line = line_of(d, "rules.toml", "ipv4_prefix = 33");
    });
    assert_refused(
        &out,
        "rules.toml",
        Some(line),
        "ipv4_prefix must be 0 to 32",
    );
}

#[test]
fn a_route_to_an_unknown_capability_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "rules.toml",
            "capability = \"embeddings\"",
            "capability = \"telepathy\"",
        );
        line = line_of(d, "rules.toml", "telepathy");
    });
    assert_refused(
        &out,
        "rules.toml",
        Some(line),
        "unknown capability `telepathy`",
    );
}

#[test]
fn a_plan_with_a_class_of_another_product_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "rules.toml",
            "team = \"chat-team\"",
            "team = \"api-paid\"",
        );
        line = line_of(d, "rules.toml", "team = \"api-paid\"");
    });
    assert_refused(
        &out,
        "rules.toml",
        Some(line),
        "cannot have class `api-paid`",
    );
}

#[test]
fn a_capability_with_no_pool_is_refused() {
    let out = check_with(|d| {
        replace_in(
            d,
            "pools.toml",
            "capabilities = [\"code_interpreter\"]",
            "capabilities = [\"web_search\"]",
        );
    });
    assert_refused(
        &out,
        "pools.toml",
        None,
        "capability `code_interpreter` has a route in the rules but no pool serves it",
    );
}

fn account_error(line_text: &str, message: &str) {
    let mut line = 0;
    let out = check_with(|d| {
        let path = d.join("accounts.jsonl");
        let mut text = std::fs::read_to_string(&path).expect("read");
        text.push_str(line_text);
        text.push('\n');
        line = text.lines().count();
        std::fs::write(&path, text).expect("write");
    });
    assert_refused(&out, "accounts.jsonl", Some(line), message);
}

#[test]
fn an_account_key_hash_must_be_64_hex_digits() {
    account_error(
        r#"{"id":"a1","product":"api","plan":"paid","api_key_sha256":["abc"]}"#,
        "64 hex digits",
    );
}

#[test]
fn a_duplicate_account_is_refused() {
    account_error(
        r#"{"id":"acct-api-paid","product":"api","plan":"paid"}"#,
        "already defined",
    );
}

#[test]
fn an_account_on_an_undefined_plan_is_refused() {
    account_error(
        r#"{"id":"a2","product":"chat","plan":"enterprise"}"#,
        "plan `enterprise` is not defined",
    );
}

#[test]
fn an_account_opting_out_of_an_undefined_subprocessor_is_refused() {
    account_error(
        r#"{"id":"a3","product":"api","plan":"paid","subprocessor_opt_outs":["nobody"]}"#,
        "subprocessor `nobody` is not used by any pool",
    );
}

#[test]
fn an_account_with_an_undefined_residency_is_refused() {
    account_error(
        r#"{"id":"a4","product":"api","plan":"paid","residency":"mars"}"#,
        "residency `mars`",
    );
}

#[test]
fn an_unparsable_account_line_is_refused() {
    account_error(r#"{"id":"a5","product":"api","#, "EOF");
}

#[test]
fn an_unknown_account_field_is_refused() {
    account_error(
        r#"{"id":"a6","product":"api","plan":"paid","zdr_please":true}"#,
        "unknown field `zdr_please`",
    );
}
