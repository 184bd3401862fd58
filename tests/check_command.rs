//! `privacy-gateway check`: the shipped example is valid, and each broken
//! file is refused with a non-zero exit and `file:line: message`.

mod support;

use std::path::Path;
use std::process::{Command, Output};

/// Writes the shipped configuration into a temporary folder (its process
/// files inside it), lets `edit` change files, and runs `command` on it.
fn run_with(command: &[&str], edit: impl FnOnce(&Path)) -> Output {
    let dir = shipped_copy();
    edit(dir.path());
    Command::new(support::binary())
        .args(command)
        .arg("--config")
        .arg(dir.path().join("gateway.toml"))
        .output()
        .expect("run the gateway binary")
}

/// The shipped configuration in a temporary folder, its process files inside it.
fn shipped_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["gateway.toml", "rules.toml", "pools.toml", "accounts.jsonl"] {
        let text = support::shipped(name).replace(
            "/tmp/privacy-gateway/",
            &format!("{}/run/", dir.path().display()),
        );
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

/// [`run_with`] for `check`.
fn check_with(edit: impl FnOnce(&Path)) -> Output {
    run_with(&["check"], edit)
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
    // The files only: the shipped process paths are this machine's business.
    let out = Command::new(support::binary())
        .args(["check", "--files-only", "--config"])
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
        "16 accounts (0 quarantined)",
    ] {
        assert!(stdout.contains(part), "{part} missing from: {stdout}");
    }
}

/// The `policy` and `consents` revisions `check` prints.
fn revisions(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| {
        stdout
            .split(", ")
            .find_map(|part| part.strip_prefix(name))
            .or_else(|| stdout.strip_prefix(&format!("ok: {name}")))
            .and_then(|rest| rest.split([',', ' ']).next())
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .to_string()
    };
    (field("policy "), field("consents "))
}

#[test]
fn the_policy_version_covers_trust_identity_and_signing_and_not_the_consents() {
    let (base, consents) = revisions(&check_with(|_| {}));
    let changed = |edit: &dyn Fn(&Path)| revisions(&check_with(edit));
    // Trusting every peer lets any client claim any identity: a new version.
    let (v, c) = changed(&|d| {
        replace_in(
            d,
            "gateway.toml",
            "trusted_proxies = []",
            "trusted_proxies = [\"0.0.0.0/0\"]",
        )
    });
    assert_ne!(v, base, "trusted_proxies");
    assert_eq!(c, consents);
    let (v, _) = changed(&|d| {
        replace_in(
            d,
            "gateway.toml",
            "identity_header = \"x-authenticated-account\"",
            "identity_header = \"x-user\"",
        )
    });
    assert_ne!(v, base, "identity_header");
    // Signing on, and another key: each a new version, the key never shown.
    let signed = |key: &'static str| {
        move |d: &Path| {
            std::fs::write(d.join("signing.key"), key).expect("write key");
            replace_in(
                d,
                "gateway.toml",
                "# key_file = \"signing.key\"",
                "key_file = \"signing.key\"",
            );
        }
    };
    let one = check_with(signed("first-signing-key-0123456789"));
    let (v1, _) = revisions(&one);
    let (v2, _) = changed(&signed("second-signing-key-0123456789"));
    assert!(v1 != base && v2 != base && v1 != v2, "{base} {v1} {v2}");
    assert!(!String::from_utf8_lossy(&one.stdout).contains("first-signing-key"));
    // A consent change is the consent revision's, not the policy's.
    let (v, c) = changed(&|d| {
        replace_in(
            d,
            "accounts.jsonl",
            "\"plan\": \"pro\", \"api_key_sha256\"",
            "\"plan\": \"pro\", \"training_opt_out\": true, \"api_key_sha256\"",
        )
    });
    assert_eq!(v, base, "accounts are not policy");
    assert_ne!(
        c, consents,
        "the consent revision follows the accounts file"
    );
    // The rules file counts as before.
    let (v, _) = changed(&|d| replace_in(d, "rules.toml", "ipv4_prefix = 24", "ipv4_prefix = 16"));
    assert_ne!(v, base, "rules");
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
fn a_pool_with_unknown_products_or_a_bad_retention_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "pools.toml",
            "products = [\"chat\"]",
            "products = [\"le-chat\"]",
        );
        line = line_of(d, "pools.toml", "name = \"e2b\"") - 1;
    });
    assert_refused(&out, "pools.toml", Some(line), "unknown product `le-chat`");
    let out = check_with(|d| {
        replace_in(
            d,
            "pools.toml",
            "retains_input = \"15d\"",
            "retains_input = \"a fortnight\"",
        );
        line = line_of(d, "pools.toml", "name = \"black-forest-labs\"") - 1;
    });
    assert_refused(
        &out,
        "pools.toml",
        Some(line),
        "retains_input `a fortnight` must be a duration",
    );
}

#[test]
fn a_prefix_length_that_is_more_than_a_part_of_the_address_is_refused() {
    // Spec §3 (e2): /32 or /128 would forward the whole address.
    for (from, to, message) in [
        (
            "ipv4_prefix = 24",
            "ipv4_prefix = 25",
            "ipv4_prefix must be 0 to 24",
        ),
        (
            "ipv4_prefix = 24",
            "ipv4_prefix = 32",
            "ipv4_prefix must be 0 to 24",
        ),
        (
            "ipv6_prefix = 48",
            "ipv6_prefix = 49",
            "ipv6_prefix must be 0 to 48",
        ),
        (
            "ipv6_prefix = 48",
            "ipv6_prefix = 128",
            "ipv6_prefix must be 0 to 48",
        ),
    ] {
        let mut line = 0;
        let out = check_with(|d| {
            replace_in(d, "rules.toml", from, to);
            line = line_of(d, "rules.toml", to);
        });
        assert_refused(&out, "rules.toml", Some(line), message);
    }
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

/// Appends `line_text` to the shipped accounts file and runs `check` (with
/// `extra` arguments); returns the output and the appended line's number.
fn check_with_account_line(line_text: &str, extra: &[&str]) -> (Output, usize) {
    let command: Vec<&str> = ["check", "--files-only"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let out = run_with(&command, |d| append_account(d, line_text));
    let line = support::shipped("accounts.jsonl").lines().count() + 1;
    (out, line)
}

/// A JSON line the gateway cannot fully understand quarantines its account
/// (spec §8): `check` lists it with file:line and still exits 0, the other
/// accounts count; with `--strict` it exits 1.
fn account_quarantined(line_text: &str, message: &str) {
    let (out, line) = check_with_account_line(line_text, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "quarantine is not an error: {stderr}");
    let location = format!("accounts.jsonl:{line}: account quarantined");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&location) && l.contains(message)),
        "expected `{location}...{message}` in:\n{stderr}"
    );
    assert!(
        stdout.contains("(1 quarantined)") || stdout.contains("(2 quarantined)"),
        "{stdout}"
    );
    let (strict, _) = check_with_account_line(line_text, &["--strict"]);
    assert_eq!(
        strict.status.code(),
        Some(1),
        "--strict fails on a quarantine"
    );
}

#[test]
fn an_account_key_hash_must_be_64_hex_digits() {
    account_quarantined(
        r#"{"id":"a1","product":"api","plan":"paid","api_key_sha256":["abc"]}"#,
        "64 hex digits",
    );
}

#[test]
fn a_duplicate_account_id_quarantines_both_lines() {
    let text = r#"{"id":"acct-api-paid","product":"api","plan":"paid"}"#;
    account_quarantined(text, "account id is also defined on line");
    let (out, line) = check_with_account_line(text, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = support::shipped("accounts.jsonl")
        .lines()
        .position(|l| l.contains("\"acct-api-paid\""))
        .expect("demo line")
        + 1;
    assert!(
        stderr.contains(&format!(
            "accounts.jsonl:{first}: account quarantined (its requests are answered 403 consent_record_invalid): account id is also defined on line {line}"
        )),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("15 accounts (2 quarantined)"));
}

#[test]
fn a_key_hash_shared_by_two_accounts_quarantines_both() {
    let paid_hash = support::shipped("accounts.jsonl")
        .lines()
        .find(|l| l.contains("\"acct-api-paid\""))
        .and_then(|l| l.split('"').find(|part| part.len() == 64))
        .expect("the demo paid key hash")
        .to_string();
    let text = format!(
        r#"{{"id":"acct-copy","product":"api","plan":"free","api_key_sha256":["{paid_hash}"]}}"#
    );
    account_quarantined(&text, "an API key hash is also listed on line");
    let (out, _) = check_with_account_line(&text, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("15 accounts (2 quarantined)"));
}

#[test]
fn an_account_on_an_undefined_plan_is_quarantined() {
    account_quarantined(
        r#"{"id":"a2","product":"chat","plan":"enterprise"}"#,
        "plan `enterprise` is not defined",
    );
}

#[test]
fn an_account_opting_out_of_an_undefined_subprocessor_is_quarantined() {
    account_quarantined(
        r#"{"id":"a3","product":"api","plan":"paid","subprocessor_opt_outs":["nobody"]}"#,
        "subprocessor `nobody` is not used by any pool (known: azure, gcp, cerebras, black-forest-labs, brave, e2b)",
    );
}

#[test]
fn an_account_with_an_undefined_residency_is_quarantined() {
    account_quarantined(
        r#"{"id":"a4","product":"api","plan":"paid","residency":"mars"}"#,
        "residency `mars` is not the region of any pool (known: eu, us)",
    );
}

#[test]
fn an_unknown_account_field_is_quarantined() {
    let text = r#"{"id":"a6","product":"api","plan":"paid","zdr_please":true}"#;
    account_quarantined(text, "unknown field `zdr_please`");
    // The file's line says where; serde's "line 1 column 52" would only mislead.
    let (out, _) = check_with_account_line(text, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("column"), "{stderr}");
}

fn append_account(dir: &Path, line: &str) {
    let path = dir.join("accounts.jsonl");
    let mut text = std::fs::read_to_string(&path).expect("read");
    text.push_str(line);
    text.push('\n');
    std::fs::write(&path, text).expect("write");
}

#[test]
fn every_broken_file_is_reported_in_one_run() {
    let (mut rules, mut pools) = (0, 0);
    let out = check_with(|d| {
        replace_in(
            d,
            "rules.toml",
            "ipv4_prefix = 24",
            "ipv4_prefix = 24\nipv4_prefx = 16",
        );
        rules = line_of(d, "rules.toml", "ipv4_prefx");
        replace_in(d, "pools.toml", "name = \"cerebras\"", "name = \"cerebras");
        pools = line_of(d, "pools.toml", "name = \"cerebras");
        append_account(d, r#"{"id":"a7","product":"api","#);
    });
    let accounts = support::shipped("accounts.jsonl").lines().count() + 1;
    assert_refused(
        &out,
        "rules.toml",
        Some(rules),
        "unknown field `ipv4_prefx`",
    );
    assert_refused(&out, "pools.toml", Some(pools), "");
    // The accounts' own syntax is checked even though their plans and
    // pools are unknown while those files are broken.
    assert_refused(&out, "accounts.jsonl", Some(accounts), "EOF");
}

#[test]
fn an_unknown_pool_capability_is_reported_at_its_line_with_the_valid_names() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "pools.toml",
            "capabilities = [\"web_search\"]",
            "capabilities = [\n  \"web_search\",\n  \"telepathy\",\n]",
        );
        line = line_of(d, "pools.toml", "\"telepathy\"");
    });
    assert_refused(
        &out,
        "pools.toml",
        Some(line),
        "pool `brave`: unknown capability `telepathy` (known: chat, embeddings, fine_tuning, feedback, image_generation, web_search, code_interpreter, connector)",
    );
}

#[test]
fn trusted_proxies_may_be_single_addresses_and_a_bad_one_names_its_line() {
    let out = check_with(|d| {
        replace_in(
            d,
            "gateway.toml",
            "trusted_proxies = []",
            "trusted_proxies = [\"127.0.0.1\", \"::1\", \"10.0.0.0/8\"]",
        );
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "gateway.toml",
            "trusted_proxies = []",
            "trusted_proxies = [\n  \"127.0.0.1\",\n  \"lb.internal\",\n]",
        );
        line = line_of(d, "gateway.toml", "lb.internal");
    });
    assert_refused(
        &out,
        "gateway.toml",
        Some(line),
        "trusted proxy `lb.internal` is neither an address nor a CIDR network",
    );
}

#[test]
fn an_admin_address_on_a_listener_is_refused() {
    let mut line = 0;
    let out = check_with(|d| {
        line = line_of(d, "gateway.toml", "127.0.0.1:9090");
        replace_in(
            d,
            "gateway.toml",
            "address = \"127.0.0.1:9090\"",
            "address = \"127.0.0.1:8081\"",
        );
    });
    assert_refused(
        &out,
        "gateway.toml",
        Some(line),
        "admin address 127.0.0.1:8081 collides with listener 127.0.0.1:8081",
    );
}

#[test]
fn listeners_on_one_port_collide_even_through_a_wildcard() {
    let mut line = 0;
    let out = check_with(|d| {
        replace_in(
            d,
            "gateway.toml",
            "address = \"127.0.0.1:8081\"",
            "address = \"0.0.0.0:8080\"",
        );
        line = line_of(d, "gateway.toml", "0.0.0.0:8080");
    });
    // Reported at the second listener's `[[listener]]` line.
    assert_refused(
        &out,
        "gateway.toml",
        Some(line - 1),
        "listener address 0.0.0.0:8080 collides with listener 127.0.0.1:8080",
    );
}

#[test]
fn an_audit_log_in_a_missing_folder_is_refused_by_check_and_run_alike() {
    let edit = |d: &Path| {
        replace_in(
            d,
            "gateway.toml",
            "path = \"-\"",
            "path = \"logs/audit.jsonl\"",
        );
        replace_in(d, "gateway.toml", "format = \"text\"", "format = \"json\"");
    };
    let out = check_with(edit);
    assert_refused(
        &out,
        "gateway.toml",
        None,
        "logs/audit.jsonl cannot be appended to",
    );
    // A build machine checks the files only.
    let out = run_with(&["check", "--files-only"], edit);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `run` refuses it before serving, through the configured (JSON) logger.
    let out = run_with(&["run"], edit);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot be appended to"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let logged: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(logged["level"], "ERROR");
}

#[test]
fn an_upgrade_socket_folder_others_can_enter_is_refused() {
    let edit = |d: &Path| {
        let shared = d.join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let sock = shared.join("upgrade.sock");
        replace_in(
            d,
            "gateway.toml",
            &format!("upgrade_sock = \"{}/run/upgrade.sock\"", d.display()),
            &format!("upgrade_sock = \"{}\"", sock.display()),
        );
    };
    let out = check_with(edit);
    assert_refused(&out, "gateway.toml", None, "is open to others (mode 755)");
    let out = run_with(&["run"], edit);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is open to others"));
}

#[test]
fn a_flag_the_product_does_not_have_is_quarantined() {
    account_quarantined(
        r#"{"id":"a7","product":"chat","plan":"pro","zdr":true}"#,
        "zdr applies to api accounts only",
    );
    account_quarantined(
        r#"{"id":"a8","product":"api","plan":"free","training_opt_in":true}"#,
        "training_opt_in applies to team plans only",
    );
}

#[test]
fn a_torn_account_line_rejects_the_whole_file() {
    for torn in [
        r#"{"id":"a5","product":"api","#,
        "[1, 2]",
        "\"acct\"",
        "not json",
    ] {
        let (out, line) = check_with_account_line(torn, &[]);
        assert_refused(&out, "accounts.jsonl", Some(line), "not a JSON object");
    }
}

/// The shipped files in a temporary folder, `[files] accounts` naming the
/// shipped export compiled into `accounts.pgcs`, and an empty `changes/`.
fn compiled_setup() -> tempfile::TempDir {
    let dir = shipped_copy();
    let gateway = std::fs::read_to_string(dir.path().join("gateway.toml")).expect("read");
    let gateway: Vec<String> = gateway
        .lines()
        .map(|l| {
            if l.starts_with("accounts =") {
                "accounts = \"accounts.pgcs\"\naccount_changes = \"changes\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(dir.path().join("gateway.toml"), gateway.join("\n")).expect("write");
    std::fs::create_dir(dir.path().join("changes")).expect("changes folder");
    support::compile_accounts(dir.path(), "accounts.jsonl", "accounts.pgcs");
    dir
}

/// Runs the gateway binary with `args` and `--config` on `dir`'s gateway.toml.
fn gateway_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(support::binary())
        .args(args)
        .arg("--config")
        .arg(dir.join("gateway.toml"))
        .output()
        .expect("run the gateway binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a successful run that lists `location` (`file:line`) as
/// quarantined for `reason` on standard error and prints `summary`.
fn assert_lists_quarantine(out: &Output, location: &str, reason: &str, summary: &str) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let line = format!(
        "{location}: account quarantined (its requests are answered 403 consent_record_invalid): {reason}"
    );
    assert!(stderr.contains(&line), "expected `{line}` in:\n{stderr}");
    assert!(
        stdout.contains(summary),
        "expected `{summary}` in: {stdout}"
    );
}

/// `explain` of a chat request with API key `key`, as JSON.
fn explain_key(dir: &Path, key: &str) -> serde_json::Value {
    let out = gateway_in(
        dir,
        &[
            "explain",
            "--path",
            "/v1/chat/completions",
            "--header",
            &format!("Authorization: Bearer {key}"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("explain prints JSON")
}

/// demo-chat-free's line of the shipped export, opted out of training.
fn chat_free_opted_out() -> String {
    support::shipped("accounts.jsonl")
        .lines()
        .find(|l| l.contains("\"acct-chat-free\""))
        .expect("line")
        .replacen('{', "{\"training_opt_out\": true, ", 1)
}

#[test]
fn compile_accounts_judges_the_export_as_a_load_does() {
    let dir = compiled_setup();
    let bad = r#"{"id":"a2","product":"chat","plan":"enterprise"}"#;
    append_account(dir.path(), bad);
    let line = support::shipped("accounts.jsonl").lines().count() + 1;
    let compile = |extra: &[&str]| {
        Command::new(support::binary())
            .current_dir(dir.path())
            .args([
                "compile-accounts",
                "--config",
                "gateway.toml",
                "accounts.jsonl",
            ])
            .args(["--output", "again.pgcs"])
            .args(extra)
            .output()
            .expect("compile-accounts")
    };
    assert_lists_quarantine(
        &compile(&[]),
        &format!("accounts.jsonl:{line}"),
        "plan `enterprise` is not defined",
        "compiled 16 accounts (1 quarantined), consents ",
    );
    assert_eq!(compile(&["--strict"]).status.code(), Some(1));

    // A torn export is refused whole, and nothing is written.
    std::fs::remove_file(dir.path().join("again.pgcs")).expect("remove");
    append_account(dir.path(), r#"{"id":"a5","product":"api","#);
    let out = compile(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("accounts.jsonl:{}: not a JSON object", line + 1)),
        "{}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("again.pgcs").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn check_names_the_changes_and_explain_the_one_that_decided() {
    let dir = compiled_setup();
    let (_, consents) = revisions(&gateway_in(dir.path(), &["check", "--files-only"]));
    assert_eq!(
        consents,
        revisions(&check_with(|_| {})).1,
        "compiled or not, one revision"
    );

    let bad = r#"{"id": "acct-api-paid", "product": "api", "plan": "enterprise"}"#;
    std::fs::write(
        dir.path().join("changes/7.jsonl"),
        format!("{}\n{bad}\n", chat_free_opted_out()),
    )
    .expect("change");
    assert_lists_quarantine(
        &gateway_in(dir.path(), &["check", "--files-only"]),
        "changes/7.jsonl:2",
        "plan `enterprise`",
        &format!(
            "15 accounts (1 quarantined), consents {consents}+7 (compiled base, 1 change file(s))"
        ),
    );

    let explained = explain_key(dir.path(), "demo-chat-free");
    assert_eq!(explained["training"], "denied");
    assert_eq!(explained["consent_revision"], format!("{consents}+7"));
    assert_eq!(explained["consent_source"]["change"], 7);
    assert_eq!(explained["consent_source"]["line"], 1);
    assert!(explained["consent_source"]["since"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    let explained = explain_key(dir.path(), "demo-api-paid");
    assert_eq!(explained["status"], 403);
    assert_eq!(explained["quarantine"]["line"], 2);
    let explained = explain_key(dir.path(), "demo-api-free");
    assert_eq!(explained["consent_source"]["file"], "accounts.jsonl");
    assert!(explained["consent_source"].get("change").is_none());

    // A damaged body: the open (explain) does not read it, check does.
    let path = dir.path().join("accounts.pgcs");
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last - 100] ^= 0x10;
    std::fs::write(&path, bytes).expect("write");
    explain_key(dir.path(), "demo-api-free");
    assert_refused(
        &gateway_in(dir.path(), &["check", "--files-only"]),
        "accounts.pgcs",
        None,
        "damaged body: its checksum does not match",
    );
}

#[test]
fn compact_accounts_folds_the_changes_in_and_a_stop_before_their_removal_changes_nothing() {
    let dir = compiled_setup();
    let change = format!("{}\n", chat_free_opted_out());
    std::fs::write(dir.path().join("changes/1.jsonl"), &change).expect("change");
    let out = gateway_in(dir.path(), &["compact-accounts"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("16 accounts")
            && text(&out.stdout).contains("1 change file(s) folded in and removed"),
        "{}",
        text(&out.stdout)
    );
    assert!(!dir.path().join("changes/1.jsonl").exists());
    let check = gateway_in(dir.path(), &["check", "--files-only"]);
    let (_, compacted) = revisions(&check);
    assert!(!compacted.contains('+'), "{compacted}");
    assert!(text(&check.stdout).contains("(compiled base)"));
    let explained = explain_key(dir.path(), "demo-chat-free");
    assert_eq!(explained["training"], "denied");
    assert_eq!(explained["consent_source"]["change"], 1, "{explained}");

    // The compaction stopped before removing its change file: skipped.
    std::fs::write(dir.path().join("changes/1.jsonl"), &change).expect("restore");
    let again = gateway_in(dir.path(), &["check", "--files-only"]);
    assert_eq!(text(&again.stdout), text(&check.stdout));

    // A JSON Lines base cannot be compacted into.
    let out = run_with(&["compact-accounts"], |_| {});
    assert_refused(
        &out,
        "accounts.jsonl",
        None,
        "compaction writes a compiled base",
    );
}

#[test]
fn a_name_gone_from_the_pools_quarantines_its_accounts_in_a_compiled_snapshot() {
    let dir = compiled_setup();
    replace_in(
        dir.path(),
        "pools.toml",
        "subprocessor = \"cerebras\"",
        "subprocessor = \"cerebras-systems\"",
    );
    let line = support::shipped("accounts.jsonl")
        .lines()
        .position(|l| l.contains("\"acct-api-no-cerebras\""))
        .expect("line")
        + 1;
    assert_lists_quarantine(
        &gateway_in(dir.path(), &["check", "--files-only"]),
        &format!("accounts.jsonl:{line}"),
        "subprocessor `cerebras` is not used by any pool",
        "15 accounts (1 quarantined)",
    );
    let explained = explain_key(dir.path(), "demo-api-no-cerebras");
    assert_eq!(explained["status"], 403);
    assert_eq!(explained["quarantine"]["line"], line);
    assert_eq!(explain_key(dir.path(), "demo-api-paid")["status"], 200);
}

#[test]
fn run_refuses_a_truncated_compiled_snapshot_before_it_listens() {
    let dir = compiled_setup();
    let path = dir.path().join("accounts.pgcs");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 1]).expect("truncate");
    let mut child = Command::new(support::binary())
        .args(["run", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("run started on a truncated snapshot");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("accounts.pgcs: the file is"), "{stderr}");
}
