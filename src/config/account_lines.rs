//! One line of an accounts file (an export or a change file) -> a [`Line`]
//! for the image builder, with the messages every report of it uses.
//!
//! One bad line must never hold back everyone else's opt-outs (spec §8): a
//! line that is not a JSON object (a torn or truncated file) rejects the
//! whole file, but a JSON object the gateway cannot fully understand only
//! quarantines its own account, and every other line applies.

use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::accounts::KeyHash;
use super::accounts::Quarantined;
use super::consent_image::{Line, NewAccount, Origin};
use super::diagnostics::{is_token, one_error, ConfigErrors, FileErrors};
use super::files::AccountLine;
use super::pools::Pools;
use super::snapshot::PlanNames;
use crate::policy::{Consents, PlanClass, Product, RegionId, SubprocessorSet};

/// Why an account with `training_opt_in` on another plan is quarantined.
pub(super) const OPT_IN_TEAM_ONLY: &str = "training_opt_in applies to team plans only";
/// Why a chat account with `zdr` is quarantined.
pub(super) const ZDR_API_ONLY: &str = "zdr applies to api accounts only";

/// Why an account on plan `name` of `product` is quarantined.
pub(super) fn unknown_plan(name: &str, product: &str) -> String {
    format!("plan `{name}` is not defined for product `{product}` in the rules")
}

/// Why an account opting out of subprocessor `name` is quarantined.
pub(super) fn unknown_subprocessor(name: &str, known: &[String]) -> String {
    format!(
        "subprocessor `{name}` is not used by any pool (known: {})",
        known.join(", ")
    )
}

/// Why an account with residency `name` is quarantined.
pub(super) fn unknown_region(name: &str, known: &[String]) -> String {
    format!(
        "residency `{name}` is not the region of any pool (known: {})",
        known.join(", ")
    )
}

fn parse_key_hash(hex_text: &str) -> Option<KeyHash> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

/// A change file's deletion of an account: `{"id": "...", "deleted": true}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Tombstone {
    id: String,
    deleted: bool,
}

/// What the lines of one file are read against.
#[derive(Clone, Copy)]
pub(super) struct LineRules<'a> {
    /// The plans and pools names resolve against; without them (their
    /// files did not parse) only each line's syntax is checked.
    pub(super) known: Option<(&'a PlanNames, &'a Pools)>,
    /// Whether tombstones are allowed (change files).
    pub(super) tombstones: bool,
    /// The file's index among the image's sources.
    pub(super) source: u16,
}

/// A file read line by line: its line count (to size what is built from
/// it) and SHA-256, taken in one pass before the lines are read.
pub(super) struct LineFile {
    reader: BufReader<std::fs::File>,
    /// Lines in the file.
    pub(super) lines: usize,
    /// SHA-256 of its content.
    pub(super) sha256: [u8; 32],
}

impl LineFile {
    /// Opens `path` once, so that the hash and the lines come from the same
    /// content even if the file is replaced meanwhile.
    pub(super) fn open(path: &Path) -> Result<LineFile, ConfigErrors> {
        let io_error = |e: std::io::Error| one_error(path, None, format!("cannot read: {e}"));
        let mut file = std::fs::File::open(path).map_err(io_error)?;
        let (lines, sha256) = count_and_hash(&mut file).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        Ok(LineFile {
            reader: BufReader::new(file),
            lines,
            sha256,
        })
    }

    /// Reads every line (a million accounts are never held as text), calls
    /// `add` with each understood or quarantined one and its key hashes, and
    /// reports each torn one in `errors`.
    pub(super) fn read(
        mut self,
        path: &Path,
        rules: LineRules<'_>,
        errors: &mut FileErrors<'_>,
        mut add: impl FnMut(Line, &[KeyHash]),
    ) -> Result<(), ConfigErrors> {
        let io_error = |e: std::io::Error| one_error(path, None, format!("cannot read: {e}"));
        let mut raw = String::new();
        let mut keys = Vec::with_capacity(2);
        let mut n: u32 = 0;
        loop {
            raw.clear();
            if self.reader.read_line(&mut raw).map_err(io_error)? == 0 {
                return Ok(());
            }
            n += 1;
            let text = raw.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            keys.clear();
            let origin = Origin {
                source: rules.source,
                line: n,
            };
            match parse_line(text, origin, rules, &mut keys) {
                Ok(Some(line)) => add(line, &keys),
                Ok(None) => {}
                Err(message) => errors.at_line(Some(n as usize), message),
            }
        }
    }
}

/// One line that is not blank or a comment: `Ok(None)` when only its
/// syntax could be checked, `Err` when it is not a JSON object.
fn parse_line(
    text: &str,
    origin: Origin,
    rules: LineRules<'_>,
    keys: &mut Vec<KeyHash>,
) -> Result<Option<Line>, String> {
    if rules.tombstones {
        if let Ok(t) = serde_json::from_str::<Tombstone>(text) {
            if t.deleted {
                return Ok(rules.known.map(|_| match usable_id(&t.id) {
                    Some(id) => Line::Deleted { id, origin },
                    None => Line::Quarantined(Quarantined {
                        id: None,
                        origin,
                        reason: BAD_ID.into(),
                    }),
                }));
            }
        }
    }
    match serde_json::from_str::<AccountLine>(text) {
        Ok(record) => Ok(rules.known.map(|(plans, pools)| {
            match compile_account(record, origin, plans, pools, keys) {
                Ok(account) => Line::Account(account),
                Err(q) => Line::Quarantined(q),
            }
        })),
        Err(e) => match serde_json::from_str::<Map<String, Value>>(text) {
            Ok(object) => Ok(rules
                .known
                .map(|_| Line::Quarantined(salvage(&object, origin, &e, keys)))),
            Err(e) => Err(format!("not a JSON object: {}", json_message(&e))),
        },
    }
}

/// Lines in a file (to size the store before it is filled) and its SHA-256.
fn count_and_hash(file: &mut std::fs::File) -> std::io::Result<(usize, [u8; 32])> {
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0;
    let mut hash = Sha256::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((lines + 1, hash.finalize().into()));
        }
        hash.update(&buf[..n]);
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

const BAD_ID: &str = "account id must be printable, without spaces, and not `anonymous`";

/// An id fit to index and to show: printable, no spaces, not `anonymous`.
fn usable_id(id: &str) -> Option<Box<str>> {
    (is_token(id) && id != "anonymous").then(|| id.into())
}

/// A line that is a JSON object but not an account line: its account id and
/// key hashes, where readable, so that its requests find the quarantine.
fn salvage(
    object: &Map<String, Value>,
    origin: Origin,
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
        origin,
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
    origin: Origin,
    plans: &PlanNames,
    pools: &Pools,
    keys: &mut Vec<KeyHash>,
) -> Result<NewAccount, Quarantined> {
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
        origin,
        reason: reason.into(),
    };
    let Some(id) = id.clone() else {
        return Err(quarantine(BAD_ID.into()));
    };
    if bad_key {
        return Err(quarantine(
            "api_key_sha256 entries must be 64 hex digits".into(),
        ));
    }
    let product: Product = record.product.parse().map_err(quarantine)?;
    let plan_class = plans
        .get(product, &record.plan)
        .ok_or_else(|| quarantine(unknown_plan(&record.plan, product.as_str())))?;
    let mut subprocessor_opt_outs = SubprocessorSet::default();
    for name in &record.subprocessor_opt_outs {
        let i = pools
            .subprocessors
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| quarantine(unknown_subprocessor(name, &pools.subprocessors)))?;
        subprocessor_opt_outs.insert(i);
    }
    let residency = match &record.residency {
        None => None,
        Some(region) => Some(RegionId(
            pools
                .regions
                .iter()
                .position(|r| r == region)
                .ok_or_else(|| quarantine(unknown_region(region, &pools.regions)))?
                as u8,
        )),
    };
    // A flag the plan or product does not have is not guessed at.
    if record.training_opt_in && plan_class != PlanClass::ChatTeam {
        return Err(quarantine(OPT_IN_TEAM_ONLY.into()));
    }
    if record.zdr && product != Product::Api {
        return Err(quarantine(ZDR_API_ONLY.into()));
    }
    Ok(NewAccount {
        id,
        product,
        plan: record.plan.into(),
        consents: Consents {
            training_opt_out: record.training_opt_out,
            training_opt_in: record.training_opt_in,
            zdr: record.zdr,
            ip_personalization_opt_out: record.ip_personalization_opt_out,
            subprocessor_opt_outs,
            residency,
            restricted: record.restricted,
        },
        origin,
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
