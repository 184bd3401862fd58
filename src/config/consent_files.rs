//! The consent snapshot's files -> one [`AccountStore`]: a *base* (a
//! compiled snapshot, mapped; or a JSON Lines export, compiled in memory)
//! and an optional folder of *change files* on top of it, newest wins per
//! account. And the two commands that write compiled bases:
//! [`compile_export`] (`compile-accounts`) and [`compact`]
//! (`compact-accounts`).
//!
//! # Change files
//!
//! A change file is named `<sequence>.jsonl` (decimal; `000042.jsonl` is
//! sequence 42) and holds account lines as the export does, plus tombstones
//! (`{"id": "acct-1", "deleted": true}`). Files apply in sequence order,
//! lines in file order; the last line of an account wins. Names starting with
//! `.` are ignored (a writer's temporary file, renamed into place when
//! whole); any other name is refused. A change file with a torn line is
//! refused whole, as an export is; a line it cannot fully understand only
//! quarantines its account.
//!
//! A compiled base records the sequence it includes changes through, and
//! the hashes of the change files present when it was written: such a file
//! still lying there (a compaction that stopped before removing it) is
//! skipped, never applied twice; any other file at or below that sequence
//! was written late and is refused (applying it would reorder changes).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use super::account_lines::{LineFile, LineRules};
use super::accounts::{AccountStore, KeyHash, NameContext};
use super::consent_image::{
    is_compiled, ConsentImage, ImageBuilder, IncludedChange, Line, Origin, SourceFile,
};
use super::diagnostics::{one_error, ConfigError, ConfigErrors, FileErrors};
use super::load::{read_policy_files, LoadOptions};
use super::pools::Pools;
use super::snapshot::PlanNames;

/// The consent files, opened.
pub(super) struct ConsentFiles {
    pub(super) store: AccountStore,
    /// The consent revision: the base's, `+<sequence>` of the last change applied.
    pub(super) revision: String,
    /// What to watch: the base, the change folder, each change file.
    pub(super) sources: Vec<PathBuf>,
    /// The change files applied, in order, each with the hash of the
    /// content that was read.
    applied: Vec<(IncludedChange, PathBuf)>,
}

/// Opens the base at `accounts` and the changes in `changes` on top of it,
/// names resolved against `known` (without it, their files did not parse:
/// only syntax is checked and nothing is returned). Problems go to `errors`.
pub(super) fn open_consents(
    accounts: &Path,
    changes: Option<&Path>,
    known: Option<(&PlanNames, &Pools)>,
    verify: bool,
    errors: &mut Vec<ConfigError>,
) -> Option<ConsentFiles> {
    let base = match open_base(accounts, known, verify) {
        Ok(base) => base,
        Err(mut e) => {
            errors.append(&mut e.0);
            return None;
        }
    };
    let (plans, pools) = known?;
    let base = base?;
    let ctx = NameContext {
        plans,
        subprocessors: &pools.subprocessors,
        regions: &pools.regions,
    };
    let mut sources = vec![accounts.to_path_buf()];
    let mut revision = base.meta().revision.clone();
    let store = AccountStore::new(base, ctx);
    let Some(dir) = changes else {
        return Some(ConsentFiles {
            store,
            revision,
            sources,
            applied: Vec::new(),
        });
    };
    sources.push(dir.to_path_buf());
    let pending = match pending_changes(dir, store.base()) {
        Ok(pending) => pending,
        Err(mut e) => {
            errors.append(&mut e.0);
            return None;
        }
    };
    sources.extend(pending.iter().map(|c| c.path.clone()));
    let Some(last) = pending.last().map(|c| c.seq) else {
        return Some(ConsentFiles {
            store,
            revision,
            sources,
            applied: Vec::new(),
        });
    };
    let before = errors.len();
    let (overlay, applied) = build_overlay(store.base(), &pending, (plans, pools), errors);
    if errors.len() > before {
        return None;
    }
    revision.push_str(&format!("+{last}"));
    Some(ConsentFiles {
        store: store.with_overlay(overlay, ctx),
        revision,
        sources,
        applied,
    })
}

/// The base: mapped when compiled, else compiled in memory from JSON Lines
/// (`None` without `known`, once its syntax is checked).
fn open_base(
    path: &Path,
    known: Option<(&PlanNames, &Pools)>,
    verify: bool,
) -> Result<Option<ConsentImage>, ConfigErrors> {
    let refused = |e: &dyn std::fmt::Display| one_error(path, None, e.to_string());
    if is_compiled(path).map_err(|e| one_error(path, None, format!("cannot read: {e}")))? {
        let image = ConsentImage::open(path).map_err(|e| refused(&e))?;
        if verify {
            image.verify().map_err(|e| refused(&e))?;
        }
        return Ok(Some(image));
    }
    let export = read_export(path, known)?;
    Ok(export.map(|(builder, sha)| builder.into_image(&short(&sha), seed(&sha), (0, Vec::new()))))
}

/// Reads the JSON Lines export at `path` into a builder (none without
/// `known`), with its SHA-256; a torn line rejects it whole.
fn read_export(
    path: &Path,
    known: Option<(&PlanNames, &Pools)>,
) -> Result<Option<(ImageBuilder, [u8; 32])>, ConfigErrors> {
    let file = LineFile::open(path)?;
    let (lines, sha) = (file.lines, file.sha256);
    let sources = vec![source_file(path, path.display().to_string(), None)];
    let mut builder = known
        .map(|(_, pools)| ImageBuilder::new(lines, &pools.subprocessors, &pools.regions, sources));
    let mut errors = FileErrors::new(path, "");
    let rules = LineRules {
        known,
        tombstones: false,
        source: 0,
    };
    file.read(path, rules, &mut errors, |line, keys| {
        if let Some(b) = builder.as_mut() {
            b.add(line, keys);
        }
    })?;
    if !errors.errors.is_empty() {
        return Err(ConfigErrors(errors.errors));
    }
    Ok(builder.map(|b| (b, sha)))
}

/// `file` as a source, with its modification time.
fn source_file(path: &Path, name: String, change: Option<u64>) -> SourceFile {
    SourceFile {
        file: name,
        modified: std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        change,
    }
}

/// The first 7 hex digits: a revision label.
fn short(sha: &[u8; 32]) -> String {
    hex::encode(&sha[..4])[..7].to_string()
}

/// The id hash seed of an image compiled from content hashed `sha`: the
/// same export always gives the same file.
fn seed(sha: &[u8; 32]) -> u64 {
    u64::from_le_bytes(sha[8..16].try_into().expect("8 bytes"))
}

/// One change file of the folder.
#[derive(Clone, Debug)]
struct ChangeFile {
    seq: u64,
    path: PathBuf,
}

/// Every change file of `dir`, in sequence order.
fn list_changes(dir: &Path) -> Result<Vec<ChangeFile>, ConfigErrors> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| one_error(dir, None, format!("cannot read: {e}")))?;
    let mut files: Vec<ChangeFile> = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| one_error(dir, None, format!("cannot read: {e}")))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let seq = name
            .strip_suffix(".jsonl")
            .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|digits| digits.parse::<u64>().ok());
        match seq {
            Some(seq) => files.push(ChangeFile {
                seq,
                path: entry.path(),
            }),
            None => errors.push(ConfigError {
                file: entry.path(),
                line: None,
                message: "not a change file: change files are named `<sequence>.jsonl` \
                          (temporary files must start with `.`)"
                    .into(),
            }),
        }
    }
    files.sort_by_key(|c| c.seq);
    for pair in files.windows(2) {
        if pair[0].seq == pair[1].seq {
            errors.push(ConfigError {
                file: pair[1].path.clone(),
                line: None,
                message: format!(
                    "sequence {} is also the sequence of {}",
                    pair[1].seq,
                    pair[0].path.display()
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(files)
    } else {
        Err(ConfigErrors(errors))
    }
}

fn sha256_hex(path: &Path) -> Result<String, ConfigErrors> {
    let bytes =
        std::fs::read(path).map_err(|e| one_error(path, None, format!("cannot read: {e}")))?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

/// The change files of `dir` that `base` does not include; a file at or
/// below its sequence that it does not include is refused.
fn pending_changes(dir: &Path, base: &ConsentImage) -> Result<Vec<ChangeFile>, ConfigErrors> {
    let meta = base.meta();
    let mut pending = Vec::new();
    let mut errors = Vec::new();
    for change in list_changes(dir)? {
        if change.seq > meta.changes_through {
            pending.push(change);
            continue;
        }
        let sha = sha256_hex(&change.path)?;
        let included = meta
            .changes_included
            .iter()
            .any(|c| c.seq == change.seq && c.sha256 == sha);
        if !included {
            errors.push(ConfigError {
                file: change.path,
                line: None,
                message: format!(
                    "sequence {} is at or below {}, which the base already includes, but this \
                     file is not part of the base: a change written late would be applied out \
                     of order; write it again with a sequence above {}",
                    change.seq, meta.changes_through, meta.changes_through
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(pending)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// One line of a change set, with its keys.
type Change = (Line, Vec<KeyHash>);

/// The overlay of `pending` on `base`: every change file read (a torn line
/// rejects its file: reported in `errors`), merged newest-wins per account,
/// and checked against the base for shared keys.
fn build_overlay(
    base: &ConsentImage,
    pending: &[ChangeFile],
    (plans, pools): (&PlanNames, &Pools),
    errors: &mut Vec<ConfigError>,
) -> (ConsentImage, Vec<(IncludedChange, PathBuf)>) {
    let mut sources = base.meta().sources.clone();
    let mut applied = Vec::new();
    let mut latest: HashMap<Box<str>, Change> = HashMap::new();
    let mut without_id: Vec<Change> = Vec::new();
    for change in pending {
        let source = sources.len() as u16;
        sources.push(source_file(
            &change.path,
            change.path.display().to_string(),
            Some(change.seq),
        ));
        let mut file_errors = FileErrors::new(&change.path, "");
        let read = LineFile::open(&change.path).and_then(|file| {
            applied.push((
                IncludedChange {
                    seq: change.seq,
                    sha256: hex::encode(file.sha256),
                },
                change.path.clone(),
            ));
            let rules = LineRules {
                known: Some((plans, pools)),
                tombstones: true,
                source,
            };
            file.read(&change.path, rules, &mut file_errors, |line, keys| {
                let id = match &line {
                    Line::Account(a) => Some(a.id.clone()),
                    Line::Quarantined(q) => q.id.clone(),
                    Line::Deleted { id, .. } => Some(id.clone()),
                    Line::DemotesBase { .. } => None,
                };
                match id {
                    Some(id) => {
                        latest.insert(id, (line, keys.to_vec()));
                    }
                    None => without_id.push((line, keys.to_vec())),
                }
            })
        });
        if let Err(mut e) = read {
            errors.append(&mut e.0);
        }
        errors.append(&mut file_errors.errors);
    }
    let mut changes: Vec<Change> = latest.into_values().chain(without_id).collect();
    changes.sort_by_key(|(line, _)| {
        let o = line.origin();
        (o.source, o.line)
    });

    let mut builder =
        ImageBuilder::new(changes.len(), &pools.subprocessors, &pools.regions, sources);
    for (line, keys) in changes {
        builder.add(line, &keys);
    }
    demote_shared_with_base(&mut builder, base);
    (builder.into_image("overlay", 0, (0, Vec::new())), applied)
}

/// A change's key that a base account it does not replace also holds
/// quarantines both, as two lines of one export would.
fn demote_shared_with_base(builder: &mut ImageBuilder, base: &ConsentImage) {
    let mut conflicts = Vec::new();
    for (key, change) in builder.key_entries() {
        let Some(index) = base.find_key(key) else {
            continue;
        };
        let Some(record) = base.record(index) else {
            continue;
        };
        let id = base.id(&record).unwrap_or("");
        let replaced = !id.is_empty() && builder.has_id(id);
        if !replaced {
            let origin = Origin {
                source: record.source,
                line: record.line,
            };
            let valid = record.kind() == Some(super::consent_image::Kind::Account);
            conflicts.push((*change, id.to_owned(), origin, valid));
        }
    }
    for (change, base_id, base_origin, base_valid) in conflicts {
        let (_, change_origin) = builder.describe(change);
        let reason = format!(
            "an API key hash is also listed on {}",
            builder.place(base_origin, change_origin.source)
        );
        builder.demote(change, &reason);
        if base_valid && !builder.has_id(&base_id) {
            let reason = format!(
                "an API key hash is also listed on {}",
                builder.place(change_origin, base_origin.source)
            );
            builder.add(
                Line::DemotesBase {
                    id: base_id.into(),
                    origin: base_origin,
                    reason: reason.into(),
                },
                &[],
            );
        }
    }
}

/// What [`compile_export`] wrote.
#[derive(Debug)]
pub struct Compiled {
    /// Valid accounts.
    pub accounts: usize,
    /// Every quarantined line, as `file:line: account quarantined ...`.
    pub quarantined: Vec<ConfigError>,
    /// The consent revision.
    pub revision: String,
    /// Bytes written.
    pub bytes: u64,
}

/// Compiles the JSON Lines export at `export` into a compiled consent
/// snapshot at `output` (written beside it and renamed into place), judged
/// against the rules and pools `gateway_path` names, exactly as a load would
/// judge it. `changes_through`: the export already includes the change
/// files up to that sequence (those present are recorded as included).
pub fn compile_export(
    gateway_path: &Path,
    export: &Path,
    output: &Path,
    changes_through: Option<u64>,
) -> Result<Compiled, ConfigErrors> {
    let policy = read_policy_files(gateway_path, &LoadOptions::default())?;
    let (Some(rules), Some(pools)) = (&policy.rules, &policy.pools) else {
        return Err(ConfigErrors(policy.errors));
    };
    if !policy.errors.is_empty() {
        return Err(ConfigErrors(policy.errors));
    }
    let (builder, sha) = read_export(export, Some((&rules.plans, pools)))?
        .expect("with the names known, the export is built");
    let included = match (changes_through, &policy.changes_path) {
        (Some(through), Some(dir)) => list_changes(dir)?
            .into_iter()
            .filter(|c| c.seq <= through)
            .map(|c| {
                Ok(IncludedChange {
                    seq: c.seq,
                    sha256: sha256_hex(&c.path)?,
                })
            })
            .collect::<Result<Vec<_>, ConfigErrors>>()?,
        _ => Vec::new(),
    };
    let revision = short(&sha);
    let bytes = write_atomically(output, |out| {
        builder.write(
            &revision,
            seed(&sha),
            (changes_through.unwrap_or(0), included),
            out,
        )
    })?;
    let image = ConsentImage::open(output).map_err(|e| one_error(output, None, e.to_string()))?;
    let ctx = NameContext {
        plans: &rules.plans,
        subprocessors: &pools.subprocessors,
        regions: &pools.regions,
    };
    let store = AccountStore::new(image, ctx);
    Ok(Compiled {
        accounts: store.len(),
        quarantined: quarantine_report(&store, store.quarantined()),
        revision,
        bytes,
    })
}

/// What [`compact`] did.
#[derive(Debug)]
pub struct Compacted {
    /// Valid accounts in the new base.
    pub accounts: usize,
    /// The new base's consent revision.
    pub revision: String,
    /// The change files it includes, now removed.
    pub removed: Vec<PathBuf>,
    /// Change files it includes that could not be removed (skipped by
    /// sequence until they are).
    pub left: Vec<(PathBuf, String)>,
}

/// Compacts the compiled base `gateway_path` names and its change files into
/// a new base: written beside the old one and renamed over it, recording
/// the changes it includes, and only then are those change files removed.
/// A stop at any point leaves a state that loads to the same accounts: the
/// old base and every change, or the new base and change files it skips.
pub fn compact(gateway_path: &Path) -> Result<Compacted, ConfigErrors> {
    let policy = read_policy_files(gateway_path, &LoadOptions::default())?;
    let (Some(rules), Some(pools)) = (&policy.rules, &policy.pools) else {
        return Err(ConfigErrors(policy.errors));
    };
    if !policy.errors.is_empty() {
        return Err(ConfigErrors(policy.errors));
    }
    let accounts = &policy.accounts_path;
    if !is_compiled(accounts).map_err(|e| one_error(accounts, None, format!("cannot read: {e}")))? {
        return Err(one_error(
            accounts,
            None,
            "compaction writes a compiled base: compile the export first (`privacy-gateway \
             compile-accounts`) and name the compiled file in `[files] accounts`"
                .into(),
        ));
    }
    let mut errors = Vec::new();
    let consents = open_consents(
        accounts,
        policy.changes_path.as_deref(),
        Some((&rules.plans, pools)),
        false,
        &mut errors,
    );
    let Some(consents) = consents.filter(|_| errors.is_empty()) else {
        return Err(ConfigErrors(errors));
    };
    let store = &consents.store;
    let base_meta = store.base().meta();

    // The change files the new base includes: those just applied (with the
    // hash of what was read), and those an earlier compaction included and
    // left behind, still on disk.
    let mut included: Vec<(IncludedChange, PathBuf)> = Vec::new();
    if let Some(dir) = &policy.changes_path {
        for change in list_changes(dir)? {
            if change.seq > base_meta.changes_through {
                continue;
            }
            let sha = sha256_hex(&change.path)?;
            if let Some(c) = base_meta
                .changes_included
                .iter()
                .find(|c| c.seq == change.seq && c.sha256 == sha)
            {
                included.push((c.clone(), change.path));
            }
        }
    }
    let mut through = base_meta.changes_through;
    for (change, path) in &consents.applied {
        through = through.max(change.seq);
        included.push((change.clone(), path.clone()));
    }
    let applied: Vec<&str> = consents
        .applied
        .iter()
        .map(|(c, _)| c.sha256.as_str())
        .collect();
    let revision = {
        let mut h = Sha256::new();
        h.update(base_meta.revision.as_bytes());
        for sha in applied {
            h.update(sha.as_bytes());
        }
        short(&h.finalize().into())
    };

    let mut builder = ImageBuilder::new(
        store.records(),
        &pools.subprocessors,
        &pools.regions,
        Vec::new(),
    );
    let mut source_map: HashMap<u16, u16> = HashMap::new();
    let mut too_many_sources = false;
    store.for_each_rebuild_line(|mut line, keys| {
        let old = line.origin().source;
        let new = match source_map.get(&old) {
            Some(&new) => new,
            None => {
                let file = store.sources().get(old as usize).cloned();
                let (Some(file), false) = (file, builder.sources().len() >= usize::from(u16::MAX))
                else {
                    too_many_sources = true;
                    return;
                };
                let new = builder.add_source(file);
                source_map.insert(old, new);
                new
            }
        };
        line.set_source(new);
        builder.add(line, keys);
    });
    if too_many_sources {
        return Err(one_error(
            accounts,
            None,
            "too many change files to compact at once (at most 65535 source files)".into(),
        ));
    }
    let seed = u64::from_le_bytes(
        Sha256::digest(revision.as_bytes())[..8]
            .try_into()
            .expect("8 bytes"),
    );
    let records = included.iter().map(|(c, _)| c.clone()).collect();
    write_atomically(accounts, |out| {
        builder.write(&revision, seed, (through, records), out)
    })?;

    // Only now that the new base is in place: a file removed before would be
    // a change forgotten. One whose content is no longer what was included
    // stays (and is refused as written late, loudly).
    let mut removed = Vec::new();
    let mut left = Vec::new();
    for (change, path) in included {
        match sha256_hex(&path) {
            Ok(sha) if sha == change.sha256 => match std::fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) => left.push((path, e.to_string())),
            },
            _ => left.push((path, "its content changed after it was read".into())),
        }
    }
    if let Some(dir) = &policy.changes_path {
        sync_dir(dir);
    }
    let image =
        ConsentImage::open(accounts).map_err(|e| one_error(accounts, None, e.to_string()))?;
    Ok(Compacted {
        accounts: image.meta().valid as usize,
        revision,
        removed,
        left,
    })
}

/// Writes `output` through a hidden temporary file in its folder, flushed to
/// disk, then renamed over it: readers see the old file or the new one,
/// whole. Returns the bytes written.
fn write_atomically(
    output: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<u64, ConfigErrors> {
    let fail = |e: std::io::Error| one_error(output, None, format!("cannot write: {e}"));
    let dir = output
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut out = BufWriter::new(File::create(&tmp)?);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        let bytes = file.metadata()?.len();
        std::fs::rename(&tmp, output)?;
        Ok(bytes)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let bytes = result.map_err(fail)?;
    sync_dir(dir);
    Ok(bytes)
}

/// Flushes a folder's entries (a rename, a removal) to disk; best effort.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// `quarantined` as `file:line: account quarantined ...` lines.
pub(super) fn quarantine_report(
    store: &AccountStore,
    quarantined: impl IntoIterator<Item = super::accounts::Quarantined>,
) -> Vec<ConfigError> {
    quarantined
        .into_iter()
        .map(|q| ConfigError {
            file: store
                .source(q.origin)
                .map_or_else(PathBuf::new, |s| PathBuf::from(&s.file)),
            line: Some(q.origin.line as usize),
            message: format!(
                "account quarantined (its requests are answered 403 consent_record_invalid): {}",
                q.reason
            ),
        })
        .collect()
}
