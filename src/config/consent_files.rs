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
    is_compiled, ConsentImage, ImageBuilder, IncludedChange, Line, SourceFile,
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
    Ok(export.map(|(builder, sha)| builder.into_image(&short(&sha), (0, Vec::new()))))
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
    let mut builder = known.map(|(_, pools)| {
        ImageBuilder::new(
            lines,
            &pools.subprocessors,
            &pools.regions,
            sources,
            seed(&sha),
        )
    });
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

    let mut builder = ImageBuilder::new(
        changes.len(),
        &pools.subprocessors,
        &pools.regions,
        sources,
        0,
    );
    for (line, keys) in changes {
        builder.add(line, &keys);
    }
    demote_shared_with_base(&mut builder, base);
    (builder.into_image("overlay", (0, Vec::new())), applied)
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
            let origin = record.origin();
            let valid = record.kind() == Some(super::consent_image::Kind::Account);
            conflicts.push((*change, id.to_owned(), origin, valid));
        }
    }
    for (change, base_id, base_origin, base_valid) in conflicts {
        let change_origin = builder.origin(change);
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
        builder.write(&revision, (changes_through.unwrap_or(0), included), out)
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

    let seed = seed(&Sha256::digest(revision.as_bytes()).into());
    let mut builder = ImageBuilder::new(
        store.records(),
        &pools.subprocessors,
        &pools.regions,
        Vec::new(),
        seed,
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
    let records = included.iter().map(|(c, _)| c.clone()).collect();
    write_atomically(accounts, |out| {
        builder.write(&revision, (through, records), out)
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
        // Large writes leave large folios in the page cache, which a
        // mapping then maps with huge pages.
        let mut out = BufWriter::with_capacity(8 << 20, File::create(&tmp)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, Record, Snapshot};

    /// The shipped configuration in a temporary folder, with a change folder
    /// `changes/`; `accounts` names the base file.
    struct Setup {
        dir: tempfile::TempDir,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().expect("tempdir");
            let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
            for name in ["rules.toml", "pools.toml", "accounts.jsonl"] {
                std::fs::copy(shipped.join(name), dir.path().join(name)).expect("copy");
            }
            std::fs::create_dir(dir.path().join("changes")).expect("changes folder");
            let setup = Setup { dir };
            setup.use_base("accounts.jsonl");
            setup
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn gateway(&self) -> PathBuf {
            self.path("gateway.toml")
        }

        fn use_base(&self, accounts: &str) {
            let text = format!(
                "[[listener]]\naddress = \"127.0.0.1:1\"\nproduct = \"api\"\n[files]\n\
                 rules = \"rules.toml\"\npools = \"pools.toml\"\naccounts = \"{accounts}\"\n\
                 account_changes = \"changes\"\n"
            );
            std::fs::write(self.gateway(), text).expect("gateway.toml");
        }

        fn change(&self, name: &str, lines: &[&str]) {
            std::fs::write(self.path("changes").join(name), lines.join("\n") + "\n")
                .expect("change file");
        }

        fn load(&self) -> Result<Snapshot, ConfigErrors> {
            load(&self.gateway(), &LoadOptions::default()).map(|(_, s)| s)
        }

        fn compile(&self) {
            compile_export(
                &self.gateway(),
                &self.path("accounts.jsonl"),
                &self.path("accounts.pgcs"),
                None,
            )
            .expect("compiles");
            self.use_base("accounts.pgcs");
        }
    }

    /// What the key `demo-{name}` leads to, in a word or two.
    fn by_key(s: &Snapshot, name: &str) -> String {
        describe(s.accounts.by_api_key(format!("demo-{name}").as_bytes()))
    }

    fn describe(record: Option<Record<'_>>) -> String {
        match record {
            None => "unknown".into(),
            Some(Record::Quarantined(q)) => format!("quarantined: {}", q.reason),
            Some(Record::Account(a)) => format!(
                "{}{}",
                a.id,
                if a.consents.training_opt_out {
                    " opted out"
                } else {
                    ""
                }
            ),
        }
    }

    const HASH_CHAT_FREE: &str = "6a5e48f15857310e35ee251a7cfb528b9d11e998a589be2ec8e2446a9b9eabcd";
    const HASH_API_PAID: &str = "8194312b7d6b06e27f919edb03fa6f9e28e67ca865f5503d5e6e60571ed291b3";

    fn chat_free(extra: &str, key: &str) -> String {
        format!(
            r#"{{"id": "acct-chat-free", "product": "chat", "plan": "free", "api_key_sha256": ["{key}"]{extra}}}"#
        )
    }

    #[test]
    fn the_newest_line_of_an_account_wins_and_a_tombstone_deletes() {
        let setup = Setup::new();
        let opted_out = chat_free(r#", "training_opt_out": true"#, HASH_CHAT_FREE);
        let plain = chat_free("", HASH_CHAT_FREE);
        setup.change("1.jsonl", &[&opted_out, &plain, &opted_out]);
        setup.change(
            "0002.jsonl",
            &["# a comment", r#"{"id": "acct-api-paid", "deleted": true}"#],
        );
        let s = setup.load().expect("loads");
        assert_eq!(by_key(&s, "chat-free"), "acct-chat-free opted out");
        assert_eq!(by_key(&s, "api-paid"), "unknown");
        assert!(s.accounts.by_id("acct-api-paid").is_none());
        assert_eq!(by_key(&s, "api-free"), "acct-api-free");
        assert!(s.consent_revision.ends_with("+2"), "{}", s.consent_revision);
        assert_eq!(s.accounts.len(), 15);

        // Sequence order, not name order: 10 comes after 2.
        setup.change("10.jsonl", &[&plain]);
        let s = setup.load().expect("loads");
        assert_eq!(by_key(&s, "chat-free"), "acct-chat-free");
        let Some(Record::Account(a)) = s.accounts.by_id("acct-chat-free") else {
            panic!("valid")
        };
        let source = s.accounts.source(a.origin).expect("source");
        assert!(source.file.ends_with("10.jsonl"), "{source:?}");
        assert_eq!((source.change, a.origin.line), (Some(10), 1));
    }

    #[test]
    fn a_key_rotated_away_stops_working_at_once() {
        let setup = Setup::new();
        let new_key = hex::encode(crate::config::hash_api_key(b"rotated"));
        setup.change("1.jsonl", &[&chat_free("", &new_key)]);
        let s = setup.load().expect("loads");
        assert_eq!(by_key(&s, "chat-free"), "unknown");
        assert_eq!(
            describe(s.accounts.by_api_key(b"rotated")),
            "acct-chat-free"
        );
    }

    #[test]
    fn a_key_shared_with_a_base_account_quarantines_both() {
        let setup = Setup::new();
        // A new account listing demo-api-paid's key.
        let copy = format!(
            r#"{{"id": "acct-copy", "product": "api", "plan": "free", "api_key_sha256": ["{HASH_API_PAID}"]}}"#
        );
        setup.change("1.jsonl", &[&copy]);
        let s = setup.load().expect("loads");
        let paid_line = include_str!("../../config/accounts.jsonl")
            .lines()
            .position(|l| l.contains("\"acct-api-paid\""))
            .expect("line")
            + 1;
        let by_key = by_key(&s, "api-paid");
        assert!(
            by_key.starts_with("quarantined: an API key hash is also listed on line")
                && by_key.ends_with(&format!(
                    "line {paid_line} of {}",
                    setup.path("accounts.jsonl").display()
                )),
            "{by_key}"
        );
        let base = describe(s.accounts.by_id("acct-api-paid"));
        assert!(base.ends_with("1.jsonl"), "{base}");
        assert!(describe(s.accounts.by_id("acct-copy")).starts_with("quarantined"));
        let reported: Vec<String> = s
            .quarantine_report(10)
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(reported.len(), 2, "{reported:?}");
        assert!(
            reported.iter().any(|r| r
                .contains(&format!("accounts.jsonl:{paid_line}: account quarantined"))
                && r.ends_with(&format!(
                    "line 1 of {}",
                    setup.path("changes/1.jsonl").display()
                ))),
            "{reported:?}"
        );

        // Moving the key: the base account's replacement no longer lists it.
        let paid_without = r#"{"id": "acct-api-paid", "product": "api", "plan": "paid"}"#;
        setup.change("2.jsonl", &[paid_without]);
        let s = setup.load().expect("loads");
        assert_eq!(
            describe(s.accounts.by_api_key(b"demo-api-paid")),
            "acct-copy"
        );
        assert_eq!(describe(s.accounts.by_id("acct-api-paid")), "acct-api-paid");
        assert_eq!(s.quarantine_report(10).len(), 0);
    }

    #[test]
    fn a_bad_change_line_quarantines_its_account_and_a_torn_one_refuses_the_file() {
        let setup = Setup::new();
        let opted_out = chat_free(r#", "training_opt_out": true"#, HASH_CHAT_FREE);
        let bad = r#"{"id": "acct-api-paid", "product": "api", "plan": "enterprise"}"#;
        setup.change("1.jsonl", &[&opted_out, bad]);
        let s = setup.load().expect("a quarantine is not an error");
        assert_eq!(by_key(&s, "chat-free"), "acct-chat-free opted out");
        assert!(by_key(&s, "api-paid").contains("plan `enterprise` is not defined"));
        let report = s.quarantine_report(10);
        assert_eq!(report.len(), 1);
        assert!(report[0]
            .to_string()
            .contains("1.jsonl:2: account quarantined"));

        setup.change("2.jsonl", &[&opted_out, r#"{"id": "acct-x", "#]);
        let e = setup.load().expect_err("torn");
        assert!(
            e.to_string().contains("2.jsonl:2: not a JSON object"),
            "{e}"
        );
    }

    #[test]
    fn change_file_names_are_sequences_and_temporary_files_are_hidden() {
        let setup = Setup::new();
        let opted_out = chat_free(r#", "training_opt_out": true"#, HASH_CHAT_FREE);
        setup.change(".3.jsonl.tmp", &["{not even json"]);
        setup.change("1.jsonl", &[&opted_out]);
        assert!(setup.load().is_ok());
        setup.change("01.jsonl", &[&opted_out]);
        let e = setup.load().expect_err("two files of one sequence");
        assert!(
            e.to_string().contains("sequence 1 is also the sequence of"),
            "{e}"
        );
        std::fs::remove_file(setup.path("changes/01.jsonl")).expect("remove");
        setup.change("2.json", &[&opted_out]);
        let e = setup.load().expect_err("not a change file name");
        assert!(e.to_string().contains("2.json: not a change file"), "{e}");
        std::fs::remove_file(setup.path("changes/2.json")).expect("remove");
        // A sequence past u64 is refused, never wrapped into an early place.
        setup.change("99999999999999999999999.jsonl", &[&opted_out]);
        let e = setup.load().expect_err("a sequence too large");
        assert!(
            e.to_string()
                .contains("99999999999999999999999.jsonl: not a change file"),
            "{e}"
        );
    }

    #[test]
    fn a_compiled_base_answers_as_its_export_does() {
        let setup = Setup::new();
        let from_lines = setup.load().expect("loads");
        setup.compile();
        let compiled = setup.load().expect("loads");
        assert!(compiled.accounts.base().is_mapped());
        assert_eq!(compiled.consent_revision, from_lines.consent_revision);
        for line in include_str!("../../config/accounts.jsonl").lines() {
            let Some(id) = line.split('"').nth(3).filter(|_| line.starts_with('{')) else {
                continue;
            };
            let key = id.replacen("acct-", "demo-", 1);
            for s in [&from_lines, &compiled] {
                let Some(Record::Account(a)) = s.accounts.by_api_key(key.as_bytes()) else {
                    panic!("{key}")
                };
                assert_eq!(a.id, id);
            }
            let (Some(Record::Account(a)), Some(Record::Account(b))) =
                (from_lines.accounts.by_id(id), compiled.accounts.by_id(id))
            else {
                panic!("{id}")
            };
            assert_eq!(
                (a.product, a.plan, a.plan_class, a.consents, a.origin.line),
                (b.product, b.plan, b.plan_class, b.consents, b.origin.line)
            );
        }
    }

    #[test]
    fn compaction_folds_the_changes_in_and_no_stop_forgets_or_repeats_one() {
        let setup = Setup::new();
        setup.compile();
        let opted_out = chat_free(r#", "training_opt_out": true"#, HASH_CHAT_FREE);
        let plain = chat_free("", HASH_CHAT_FREE);
        setup.change("1.jsonl", &[&plain]);
        setup.change(
            "2.jsonl",
            &[&opted_out, r#"{"id": "acct-api-paid", "deleted": true}"#],
        );
        let before = setup.load().expect("loads");
        let keys = ["chat-free", "api-paid", "api-free", "chat-team"];
        let expected: Vec<String> = keys.iter().map(|k| by_key(&before, k)).collect();
        let saved: Vec<(PathBuf, Vec<u8>)> = ["1.jsonl", "2.jsonl"]
            .iter()
            .map(|n| {
                let p = setup.path("changes").join(n);
                let bytes = std::fs::read(&p).expect("read");
                (p, bytes)
            })
            .collect();

        let done = compact(&setup.gateway()).expect("compacts");
        assert_eq!(done.removed.len(), 2);
        assert_eq!(
            std::fs::read_dir(setup.path("changes"))
                .expect("dir")
                .count(),
            0
        );
        let after = setup.load().expect("loads");
        assert_eq!(keys.map(|k| by_key(&after, k)).to_vec(), expected);
        assert!(!after.consent_revision.contains('+'));
        assert_eq!(after.accounts.base().meta().changes_through, 2);
        // The line that decided survives the compaction.
        let Some(Record::Account(a)) = after.accounts.by_id("acct-chat-free") else {
            panic!("valid")
        };
        assert_eq!(
            after.accounts.source(a.origin).and_then(|s| s.change),
            Some(2)
        );

        // Stopped after the rename, before the removal: the files are
        // skipped by their sequence, not applied again.
        for (path, bytes) in &saved {
            std::fs::write(path, bytes).expect("restore");
        }
        let left_behind = setup.load().expect("loads");
        assert_eq!(keys.map(|k| by_key(&left_behind, k)).to_vec(), expected);
        assert_eq!(left_behind.consent_revision, after.consent_revision);
        // A file at or below the base's sequence that it does not include
        // was written late: refused, not silently skipped.
        std::fs::write(&saved[0].0, plain.replace("free\"", "pro\"") + "\n").expect("rewrite");
        let e = setup.load().expect_err("late");
        assert!(
            e.to_string().contains("which the base already includes"),
            "{e}"
        );
        std::fs::write(&saved[0].0, &saved[0].1).expect("restore");

        // A later compaction removes what an earlier one left behind, and
        // a change written meanwhile stays pending.
        setup.change("3.jsonl", &[&plain]);
        let done = compact(&setup.gateway()).expect("compacts");
        assert_eq!(done.removed.len(), 3);
        let last = setup.load().expect("loads");
        assert_eq!(by_key(&last, "chat-free"), "acct-chat-free");
        assert_eq!(last.accounts.base().meta().changes_through, 3);
    }

    #[test]
    fn a_stop_before_the_rename_leaves_the_old_base_and_every_change() {
        let setup = Setup::new();
        setup.compile();
        let opted_out = chat_free(r#", "training_opt_out": true"#, HASH_CHAT_FREE);
        setup.change("1.jsonl", &[&opted_out]);
        let before = setup.load().expect("loads");
        // What a compaction writes before its rename, left behind.
        std::fs::write(
            setup.path(".accounts.pgcs.999.tmp"),
            b"PGCONSNT half written",
        )
        .expect("tmp");
        let after = setup.load().expect("loads");
        assert_eq!(before.consent_revision, after.consent_revision);
        assert_eq!(by_key(&after, "chat-free"), "acct-chat-free opted out");
        // And a compaction run then simply overwrites it.
        compact(&setup.gateway()).expect("compacts");
        assert_eq!(
            by_key(&setup.load().expect("loads"), "chat-free"),
            "acct-chat-free opted out"
        );
    }

    #[test]
    fn a_damaged_compiled_base_is_refused_at_open_and_check_finds_body_damage() {
        let setup = Setup::new();
        setup.compile();
        let path = setup.path("accounts.pgcs");
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 10]).expect("truncate");
        let e = setup.load().expect_err("truncated");
        assert!(e.to_string().contains("truncated or damaged"), "{e}");

        let mut damaged = bytes.clone();
        let last = damaged.len() - 1;
        damaged[last - 40] ^= 1;
        std::fs::write(&path, &damaged).expect("write");
        assert!(setup.load().is_ok(), "the open reads the header only");
        let verify = LoadOptions {
            verify_accounts: true,
            ..LoadOptions::default()
        };
        let e = load(&setup.gateway(), &verify).expect_err("verified");
        assert!(e.to_string().contains("damaged"), "{e}");
    }
}
