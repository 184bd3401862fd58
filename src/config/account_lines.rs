//! `accounts.jsonl` (the consent snapshot as exported) -> [`AccountStore`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::accounts::{Account, AccountStore, DuplicateAccount, KeyHash};
use super::diagnostics::{is_token, one_error, ConfigErrors, FileErrors};
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

/// Reads the consent snapshot line by line: a million accounts are never
/// held as text beside the store being built. Without the `known` plans and
/// pools (their files did not parse), only each line's syntax is checked.
pub(super) fn compile_accounts(
    path: &Path,
    known: Option<(&PlanNames, &Pools)>,
    a: &mut FileErrors<'_>,
) -> Result<AccountStore, ConfigErrors> {
    let io_error = |e: std::io::Error| one_error(path, None, format!("cannot read: {e}"));
    let lines = count_lines(path).map_err(io_error)?;
    let mut store = AccountStore::with_capacity(lines, lines);
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io_error)?);
    let mut raw = String::new();
    let mut keys = Vec::with_capacity(2);
    let mut plan_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut n = 0;
    loop {
        raw.clear();
        if std::io::BufRead::read_line(&mut reader, &mut raw).map_err(io_error)? == 0 {
            break;
        }
        n += 1;
        let line = Some(n);
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let record: AccountLine = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                a.at_line(line, json_message(&e));
                continue;
            }
        };
        let Some((plans, pools)) = known else {
            continue;
        };
        match compile_account(record, plans, pools, &mut keys, &mut plan_names) {
            Ok(account) => match store.insert(account, &keys) {
                Ok(()) => {}
                Err(DuplicateAccount::Id) => {
                    a.at_line(line, "an account with this id is already defined")
                }
                Err(DuplicateAccount::Key) => a.at_line(
                    line,
                    "an API key hash of this account belongs to another account or is listed twice",
                ),
            },
            Err(message) => a.at_line(line, message),
        }
    }
    Ok(store)
}

/// serde's message without its position: each account is one line, so the
/// file's line number (given beside it) is the position worth reading.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    text.strip_suffix(&position).unwrap_or(&text).to_string()
}

/// Lines in a file, to size the store before it is filled.
fn count_lines(path: &Path) -> std::io::Result<usize> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines + 1);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

fn compile_account(
    record: AccountLine,
    plans: &PlanNames,
    pools: &Pools,
    keys: &mut Vec<KeyHash>,
    plan_names: &mut HashMap<String, Arc<str>>,
) -> Result<Account, String> {
    if !is_token(&record.id) || record.id == "anonymous" {
        return Err(format!(
            "account id `{}` must be printable, without spaces, and not `anonymous`",
            record.id
        ));
    }
    let product: Product = record.product.parse()?;
    let plan_class = plans.get(product, &record.plan).ok_or_else(|| {
        format!(
            "plan `{}` is not defined for product `{product}` in the rules",
            record.plan
        )
    })?;
    keys.clear();
    for h in &record.api_key_sha256 {
        keys.push(parse_key_hash(h).ok_or("api_key_sha256 entries must be 64 hex digits")?);
    }
    let mut subprocessor_opt_outs = SubprocessorSet::default();
    for name in &record.subprocessor_opt_outs {
        let i = pools
            .subprocessors
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| {
                format!(
                    "subprocessor `{name}` is not used by any pool (known: {})",
                    pools.subprocessors.join(", ")
                )
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
                    format!(
                        "residency `{region}` is not the region of any pool (known: {})",
                        pools.regions.join(", ")
                    )
                })? as u8,
        )),
    };
    if record.training_opt_in && plan_class != PlanClass::ChatTeam {
        return Err("training_opt_in applies to team plans only".to_string());
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
}
