//! A generated consent snapshot (`accounts.jsonl`) of any size, valid against
//! the shipped `config/rules.toml` and `config/pools.toml`.
//!
//! Shared by `benches/decide.rs` and `examples/gen_accounts.rs` (included
//! with `#[path]`). Account `i` has id `acct-bench-{i}` and one API key,
//! [`api_key`]`(i)` = `bench-key-{i}`, stored as its SHA-256 like every key.
//! Products, plans and consents are mixed deterministically from `i`, so the
//! same `n` always gives the same file.

use std::io::{self, Write};

use privacy_gateway::config::hash_api_key;

/// The API key of generated account `i`: `bench-key-{i}`.
pub fn api_key(i: u64) -> String {
    format!("bench-key-{i}")
}

/// A well-mixed 64-bit value of `i` (splitmix64), for choosing plans and flags.
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the JSON line (with its newline) of generated account `i`.
///
/// About half the accounts are `api` (free or paid), half `chat` (free, pro,
/// student or team); roughly one in ten has each of: training opt-out, IP
/// personalisation opt-out, a subprocessor opt-out, a residency; one in five
/// paid API accounts has ZDR, one in three teams opted in to training, one
/// in a hundred accounts is restricted. Every combination still leaves a
/// pool for `chat`.
pub fn write_account(out: &mut impl Write, i: u64) -> io::Result<()> {
    let r = mix(i);
    let bit = |shift: u32, one_in: u64| (r >> shift).is_multiple_of(one_in);
    let api = r & 1 == 0;
    let (product, plan) = if api {
        ("api", ["free", "paid"][((r >> 1) & 1) as usize])
    } else {
        (
            "chat",
            ["free", "pro", "student", "team"][((r >> 1) & 3) as usize],
        )
    };
    let key_hash = hex::encode(hash_api_key(api_key(i).as_bytes()));
    write!(
        out,
        r#"{{"id": "acct-bench-{i}", "product": "{product}", "plan": "{plan}", "api_key_sha256": ["{key_hash}"]"#
    )?;
    if plan == "team" {
        if bit(4, 3) {
            out.write_all(br#", "training_opt_in": true"#)?;
        }
    } else if bit(8, 10) {
        out.write_all(br#", "training_opt_out": true"#)?;
    }
    if api && plan == "paid" && bit(12, 5) {
        out.write_all(br#", "zdr": true"#)?;
    }
    if bit(16, 10) {
        out.write_all(br#", "ip_personalization_opt_out": true"#)?;
    }
    if bit(20, 10) {
        let name = ["cerebras", "gcp"][((r >> 40) & 1) as usize];
        write!(out, r#", "subprocessor_opt_outs": ["{name}"]"#)?;
    }
    if bit(24, 10) {
        let region = ["eu", "us"][((r >> 41) & 1) as usize];
        write!(out, r#", "residency": "{region}""#)?;
    }
    if bit(28, 100) {
        out.write_all(br#", "restricted": true"#)?;
    }
    out.write_all(b"}\n")
}

/// Writes a whole snapshot of `n` generated accounts (ids `0..n`), with a
/// comment line first naming the key scheme.
pub fn write_accounts(out: &mut impl Write, n: u64) -> io::Result<()> {
    writeln!(
        out,
        "# {n} generated accounts; account acct-bench-{{i}} has API key `bench-key-{{i}}`"
    )?;
    for i in 0..n {
        write_account(out, i)?;
    }
    out.flush()
}
