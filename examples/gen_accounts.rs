//! Generates a large consent snapshot for staging load tests:
//!
//! ```text
//! cargo run --release --example gen_accounts -- 1000000 accounts.jsonl
//! ```
//!
//! The file is valid against the shipped `config/rules.toml` and
//! `config/pools.toml`; account `acct-bench-{i}` has API key `bench-key-{i}`
//! (send `Authorization: Bearer bench-key-{i}`). The same count always gives
//! the same file. Point `[files] accounts` of a copy of `config/gateway.toml`
//! at it and check it with `privacy-gateway check --config ...`.

#[path = "../benches/support/accounts.rs"]
mod accounts;

use std::fs::File;
use std::io::BufWriter;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (n, out) = match args.as_slice() {
        [n, out] => match n.replace('_', "").parse::<u64>() {
            Ok(n) => (n, out),
            Err(_) => return usage(&format!("`{n}` is not a count")),
        },
        _ => return usage("expected two arguments"),
    };
    let started = Instant::now();
    let written =
        File::create(out).and_then(|file| accounts::write_accounts(&mut BufWriter::new(file), n));
    if let Err(e) = written {
        eprintln!("gen_accounts: cannot write {out}: {e}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "wrote {n} accounts to {out} in {:.1?}; account acct-bench-{{i}} has API key `bench-key-{{i}}`",
        started.elapsed()
    );
    ExitCode::SUCCESS
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "gen_accounts: {problem}\nusage: cargo run --release --example gen_accounts -- N OUT.jsonl"
    );
    ExitCode::from(2)
}
