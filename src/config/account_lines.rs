//! `accounts.jsonl` (the consent snapshot as exported) -> [`AccountStore`].
//!
//! One bad line must never hold back everyone else's opt-outs (spec §8): a
//! line that is not a JSON object (a torn or truncated export) rejects the
//! whole file, but a JSON object the gateway cannot fully understand only
//! quarantines its own account, and every other line applies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::accounts::{Account, AccountStore, KeyHash, Line, Quarantined};
use super::diagnostics::{is_token, one_error, short_hash, ConfigErrors, FileErrors};
use super::files::AccountLine;
use super::pools::Pools;
use super::snapshot::PlanNames;
use crate::policy::{Consents, PlanClass, Product, RegionId, SubprocessorSet};

fn parse_key_hash(hex_text: &str) -> Option<KeyHash> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

/// The accounts file, compiled.
#[derive(Default)]
pub(super) struct Accounts {
    pub(super) store: AccountStore,
    /// Content hash of the file: the consent revision.
    pub(super) revision: String,
}

/// Reads the consent snapshot line by line: a million accounts are never
/// held as text beside the store being built. The file is opened once, so
/// the revision and the accounts come from the same content even if it is
/// replaced meanwhile. Without the `known` plans and pools (their files did
/// not parse), only each line's syntax is checked.
pub(super) fn compile_accounts(
    path: &Path,
    known: Option<(&PlanNames, &Pools)>,
    a: &mut FileErrors<'_>,
) -> Result<Accounts, ConfigErrors> {
    let io_error = |e: std::io::Error| one_error(path, None, format!("cannot read: {e}"));
    let mut file = std::fs::File::open(path).map_err(io_error)?;
    let (lines, revision) = count_and_hash(&mut file).map_err(io_error)?;
    file.rewind().map_err(io_error)?;
    let mut store = AccountStore::with_capacity(lines, lines);
    let mut reader = BufReader::new(file);
    let mut raw = String::new();
    let mut keys = Vec::with_capacity(2);
    let mut plan_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut n: u32 = 0;
    loop {
        raw.clear();
        if reader.read_line(&mut raw).map_err(io_error)? == 0 {
            break;
        }
        n += 1;
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        keys.clear();
        let line = match serde_json::from_str::<AccountLine>(text) {
            Ok(record) => {
                let Some((plans, pools)) = known else {
                    continue;
                };
                match compile_account(record, n, plans, pools, &mut keys, &mut plan_names) {
                    Ok(account) => Line::Account(account),
                    Err(q) => Line::Quarantined(q),
                }
            }
            Err(e) => match serde_json::from_str::<Map<String, Value>>(text) {
                Ok(object) => Line::Quarantined(salvage(&object, n, &e, &mut keys)),
                Err(e) => {
                    let message = format!("not a JSON object: {}", json_message(&e));
                    a.at_line(Some(n as usize), message);
                    continue;
                }
            },
        };
        store.add(line, &keys);
    }
    Ok(Accounts { store, revision })
}

/// Lines in a file (to size the store before it is filled) and its content hash.
fn count_and_hash(file: &mut std::fs::File) -> std::io::Result<(usize, String)> {
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0;
    let mut hash = Sha256::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((lines + 1, short_hash(hash)));
        }
        hash.update(&buf[..n]);
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

/// An id fit to index and to show: printable, no spaces, not `anonymous`.
fn usable_id(id: &str) -> Option<Box<str>> {
    (is_token(id) && id != "anonymous").then(|| id.into())
}

/// A line that is a JSON object but not an account line: its account id and
/// key hashes, where readable, so that its requests find the quarantine.
fn salvage(
    object: &Map<String, Value>,
    line: u32,
    error: &serde_json::Error,
    keys: &mut Vec<KeyHash>,
) -> Quarantined {
    if let Some(Value::Array(hashes)) = object.get("api_key_sha256") {
        keys.extend(
            hashes
                .iter()
                .filter_map(|h| h.as_str())
                .filter_map(parse_key_hash),
        );
    }
    Quarantined {
        id: object.get("id").and_then(Value::as_str).and_then(usable_id),
        line,
        reason: describe(error).into(),
    }
}

/// serde's message without its position: each account is one line, so the
/// file's line number (given beside it) is the position worth reading.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&position).unwrap_or(&text).to_string()
}

/// [`json_message`] without any quoted value copied from the line: a
/// misplaced key stays out of logs, audit lines and `explain`.
fn describe(error: &serde_json::Error) -> String {
    let text = json_message(error);
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    for c in text.chars() {
        if c == '"' {
            if !quoted {
                out.push_str("\"…\"");
            }
            quoted = !quoted;
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

/// Compiles one understood line; fills `keys` with its readable key hashes
/// even when the line is quarantined, so that they lead to the quarantine.
fn compile_account(
    record: AccountLine,
    line: u32,
    plans: &PlanNames,
    pools: &Pools,
    keys: &mut Vec<KeyHash>,
    plan_names: &mut HashMap<String, Arc<str>>,
) -> Result<Account, Quarantined> {
    let mut bad_key = false;
    for h in &record.api_key_sha256 {
        match parse_key_hash(h) {
            Some(k) => keys.push(k),
            None => bad_key = true,
        }
    }
    let id = usable_id(&record.id);
    let quarantine = |reason: String| Quarantined {
        id: id.clone(),
        line,
        reason: reason.into(),
    };
    if id.is_none() {
        return Err(quarantine(
            "account id must be printable, without spaces, and not `anonymous`".into(),
        ));
    }
    if bad_key {
        return Err(quarantine(
            "api_key_sha256 entries must be 64 hex digits".into(),
        ));
    }
    let product: Product = record.product.parse().map_err(quarantine)?;
    let plan_class = plans.get(product, &record.plan).ok_or_else(|| {
        quarantine(format!(
            "plan `{}` is not defined for product `{product}` in the rules",
            record.plan
        ))
    })?;
    let mut subprocessor_opt_outs = SubprocessorSet::default();
    for name in &record.subprocessor_opt_outs {
        let i = pools
            .subprocessors
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| {
                quarantine(format!(
                    "subprocessor `{name}` is not used by any pool (known: {})",
                    pools.subprocessors.join(", ")
                ))
            })?;
        subprocessor_opt_outs.insert(i);
    }
    let residency = match &record.residency {
        None => None,
        Some(region) => Some(RegionId(
            pools
                .regions
                .iter()
                .position(|r| r == region)
                .ok_or_else(|| {
                    quarantine(format!(
                        "residency `{region}` is not the region of any pool (known: {})",
                        pools.regions.join(", ")
                    ))
                })? as u8,
        )),
    };
    // A flag the plan or product does not have is not guessed at.
    if record.training_opt_in && plan_class != PlanClass::ChatTeam {
        return Err(quarantine(
            "training_opt_in applies to team plans only".into(),
        ));
    }
    if record.zdr && product != Product::Api {
        return Err(quarantine("zdr applies to api accounts only".into()));
    }
    Ok(Account {
        id: record.id.into(),
        product,
        plan: plan_names
            .entry(record.plan)
            .or_insert_with_key(|name| Arc::from(name.as_str()))
            .clone(),
        plan_class,
        consents: Consents {
            training_opt_out: record.training_opt_out,
            training_opt_in: record.training_opt_in,
            zdr: record.zdr,
            ip_personalization_opt_out: record.ip_personalization_opt_out,
            subprocessor_opt_outs,
            residency,
            restricted: record.restricted,
        },
        line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_are_64_hex_digits() {
        assert!(parse_key_hash(&"ab".repeat(32)).is_some());
        assert!(parse_key_hash(&"ab".repeat(31)).is_none());
        assert!(parse_key_hash(&"zz".repeat(32)).is_none());
    }

    #[test]
    fn reasons_copy_no_value_from_the_line() {
        let e = serde_json::from_str::<AccountLine>(
            r#"{"id":"a","product":"api","plan":"paid","zdr":"sk-live-secret"}"#,
        )
        .unwrap_err();
        let reason = describe(&e);
        assert!(!reason.contains("sk-live-secret"), "{reason}");
        assert!(!reason.contains("line 1"), "{reason}");
        assert!(reason.contains("expected a boolean"), "{reason}");
        let e = serde_json::from_str::<AccountLine>(
            r#"{"id":"a","product":"api","plan":"paid","zdr_please":true}"#,
        )
        .unwrap_err();
        assert!(describe(&e).starts_with("unknown field `zdr_please`"));
    }
}
