//! The compiled consent snapshot: an immutable file laid out to be
//! memory-mapped and read in place, so that opening it costs the same for
//! sixteen accounts or a hundred million, and every process that maps it
//! (workers, replicas on one host, the old and new process of an upgrade)
//! shares one copy in the page cache.
//!
//! Layout (every integer little-endian; sections start on 64-byte boundaries):
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic `PGCONSNT` |
//! | 8..12 | format version ([`VERSION`]) |
//! | 16..24 | the file's length |
//! | 24..56 | SHA-256 of bytes `0..records`, both checksum fields zeroed: the cheap check at open |
//! | 56..88 | SHA-256 of bytes `records..end`: the full check, `check`'s business |
//! | 96..224 | directory: eight sections, each `(offset u64, length u64)` |
//! | meta | JSON ([`Meta`]): counts, radix widths, the id hash seed, the name tables, the sources, the changes included |
//! | records | fixed 32-byte records ([`RawRecord`]), in file order, each with a 16-bit check of its own bytes |
//! | keys | `(SHA-256 key hash, record u32, low 32 bits of the record's id hash)`, 40 bytes each, sorted by hash |
//! | key directory | `2^key_bits + 1` u32: where each top-`key_bits` prefix starts in `keys` |
//! | ids | `(xxh3 of the id with the file's seed u64, record u32)`, 12 bytes each, sorted |
//! | id directory | as the key directory, over the id hashes |
//! | heap | each record's id, followed by its quarantine reason |
//! | quarantine | the u32 index of every quarantined record, in file order |
//!
//! Key hashes are SHA-256 outputs and id hashes are xxh3 outputs, both
//! uniform, so a radix directory over their top bits finds a key's bucket
//! (two entries on average) with one read: a lookup touches the directory,
//! the bucket, the record and its id, whatever the size.
//!
//! Names that depend on other files (plans, subprocessors, regions) are kept
//! as names in the meta tables and resolved by the store when it opens the
//! file; records hold indexes into those tables.
//!
//! Reading never trusts the body: every access is bounds-checked, and the
//! open does not read it. What it could get wrong is caught per lookup: a
//! record whose check fails, or a key entry whose record's id does not match
//! it, is reported as damaged (the store answers 403: nothing forwarded, no
//! consent guessed); a damaged directory or table finds nothing (401). The
//! body's checksum and every entry are verified by `check`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use hashbrown::hash_table::{Entry, HashTable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::accounts::KeyHash;
use crate::policy::{Consents, Product, SubprocessorSet, MAX_SUBPROCESSORS};

/// The first eight bytes of every compiled consent snapshot.
pub const MAGIC: [u8; 8] = *b"PGCONSNT";
/// The layout version this binary reads and writes.
pub const VERSION: u32 = 1;

const HEADER_LEN: usize = 96;
const SECTIONS: usize = 8;
const DIRECTORY_END: usize = HEADER_LEN + SECTIONS * 16;
const ALIGN: u64 = 64;
const HEADER_CHECK: Range<usize> = 24..56;
const BODY_CHECK: Range<usize> = 56..88;
/// Larger meta sections are refused at open: reading them is the open's cost.
const MAX_META: u64 = 64 << 20;

/// Bytes per record.
pub const RECORD_LEN: usize = 32;
const KEY_ENTRY_LEN: usize = 40;
const ID_ENTRY_LEN: usize = 12;

/// The sections, in file order.
#[derive(Clone, Copy)]
enum Section {
    Meta,
    Records,
    Keys,
    KeyDirectory,
    Ids,
    IdDirectory,
    Heap,
    Quarantine,
}

/// What a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An account the decision can use.
    Account,
    /// A quarantined line: its requests are answered 403.
    Quarantined,
    /// A deleted account (change files only): it shadows the base's record.
    Deleted,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::Account => 0,
            Kind::Quarantined => 1,
            Kind::Deleted => 2,
        }
    }

    fn from_code(code: u8) -> Option<Kind> {
        match code {
            0 => Some(Kind::Account),
            1 => Some(Kind::Quarantined),
            2 => Some(Kind::Deleted),
            _ => None,
        }
    }
}

/// Record flag bits.
pub mod flag {
    /// `training_opt_out`.
    pub const TRAINING_OPT_OUT: u8 = 1;
    /// `training_opt_in`.
    pub const TRAINING_OPT_IN: u8 = 1 << 1;
    /// `zdr`.
    pub const ZDR: u8 = 1 << 2;
    /// `ip_personalization_opt_out`.
    pub const IP_OPT_OUT: u8 = 1 << 3;
    /// `restricted`.
    pub const RESTRICTED: u8 = 1 << 4;
    /// On a quarantined record: only a conflict with another line quarantines
    /// it, and its account fields are whole (a rebuild re-judges it).
    pub const CONFLICT: u8 = 1 << 6;
    /// On a quarantined record of a change set: it quarantines the base's
    /// record of the same id, and holds no account of its own.
    pub const DEMOTES_BASE: u8 = 1 << 7;
    /// Every bit a record may carry.
    pub const ALL: u8 = TRAINING_OPT_OUT
        | TRAINING_OPT_IN
        | ZDR
        | IP_OPT_OUT
        | RESTRICTED
        | CONFLICT
        | DEMOTES_BASE;
}

/// No residency.
pub const NO_REGION: u8 = u8::MAX;

/// One fixed-size record, as its integers. Names are indexes into the meta
/// tables; the store resolves them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// Heap offset of the id (48 bits); the quarantine reason follows it.
    pub text: u64,
    /// Length of the id (0: a quarantined line without a usable id).
    pub id_len: u16,
    /// Length of the quarantine reason.
    pub reason_len: u16,
    /// [`Kind`] code.
    pub kind: u8,
    /// 0 `api`, 1 `chat`.
    pub product: u8,
    /// Index into [`Meta::plans`].
    pub plan: u16,
    /// [`flag`] bits.
    pub flags: u8,
    /// Index into [`Meta::regions`], or [`NO_REGION`].
    pub residency: u8,
    /// Index into [`Meta::sources`]: the file whose line this is.
    pub source: u16,
    /// The line in that file (1-based).
    pub line: u32,
    /// Bit `i`: opted out of [`Meta::subprocessors`]`[i]`.
    pub subprocessors: u64,
}

impl RawRecord {
    /// The record's kind, when its code is one.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_code(self.kind)
    }

    /// The record's product, when its code is one.
    pub fn product(&self) -> Option<Product> {
        match self.product {
            0 => Some(Product::Api),
            1 => Some(Product::Chat),
            _ => None,
        }
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..6].copy_from_slice(&self.text.to_le_bytes()[..6]);
        b[8..10].copy_from_slice(&self.id_len.to_le_bytes());
        b[10..12].copy_from_slice(&self.reason_len.to_le_bytes());
        b[12] = self.kind;
        b[13] = self.product;
        b[14..16].copy_from_slice(&self.plan.to_le_bytes());
        b[16] = self.flags;
        b[17] = self.residency;
        b[18..20].copy_from_slice(&self.source.to_le_bytes());
        b[20..24].copy_from_slice(&self.line.to_le_bytes());
        b[24..32].copy_from_slice(&self.subprocessors.to_le_bytes());
        let check = record_check(&b);
        b[6..8].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// The record, when its check matches its bytes.
    fn decode(b: &[u8; RECORD_LEN]) -> Option<RawRecord> {
        if record_check(b).to_le_bytes() != b[6..8] {
            return None;
        }
        let mut text = [0u8; 8];
        text[..6].copy_from_slice(&b[0..6]);
        Some(RawRecord {
            text: u64::from_le_bytes(text),
            id_len: u16::from_le_bytes([b[8], b[9]]),
            reason_len: u16::from_le_bytes([b[10], b[11]]),
            kind: b[12],
            product: b[13],
            plan: u16::from_le_bytes([b[14], b[15]]),
            flags: b[16],
            residency: b[17],
            source: u16::from_le_bytes([b[18], b[19]]),
            line: le_u32(&b[20..24]),
            subprocessors: le_u64(&b[24..32]),
        })
    }

    /// The consents of an account record, its names still indexes of the
    /// file's tables (the store maps them onto the running ones).
    pub fn flag_consents(&self) -> Consents {
        Consents {
            training_opt_out: self.flags & flag::TRAINING_OPT_OUT != 0,
            training_opt_in: self.flags & flag::TRAINING_OPT_IN != 0,
            zdr: self.flags & flag::ZDR != 0,
            ip_personalization_opt_out: self.flags & flag::IP_OPT_OUT != 0,
            restricted: self.flags & flag::RESTRICTED != 0,
            ..Consents::NONE
        }
    }
}

/// A record's check: 16 bits of the xxh3 of its other 30 bytes.
fn record_check(b: &[u8; RECORD_LEN]) -> u16 {
    let mut unchecked = *b;
    unchecked[6..8].fill(0);
    xxhash_rust::xxh3::xxh3_64(&unchecked) as u16
}

/// What a key entry holds of its record's id: the low half of the id hash.
fn id_check(id_hash: u64) -> u32 {
    id_hash as u32
}

/// The record index [`ConsentImage::find_key`] gives for a key whose entry
/// does not match its record: no record, so the store answers "damaged".
pub const DAMAGED_RECORD: u32 = u32::MAX;

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// A plan name of the file, with how many valid accounts use it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanName {
    /// `api` or `chat`.
    pub product: String,
    /// The plan's name in the rules.
    pub name: String,
    /// Valid accounts on it.
    pub accounts: u64,
    /// Of those, the ones with `training_opt_in` (quarantined should the
    /// plan stop being a team plan).
    pub opted_in: u64,
}

/// A subprocessor or region name of the file, with how many valid accounts name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameUse {
    /// The name, as the pools file spells it.
    pub name: String,
    /// Valid accounts naming it.
    pub accounts: u64,
}

/// A file some records come from: the export, or a change file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    /// How to name it in `file:line` reports.
    pub file: String,
    /// Its modification time (Unix seconds), when known: the "since" of its records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified: Option<u64>,
    /// Its sequence, for a change file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<u64>,
}

/// A change file a base already includes (compaction left it behind).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncludedChange {
    /// Its sequence.
    pub seq: u64,
    /// SHA-256 of its content, hex.
    pub sha256: String,
}

/// The meta section: everything about the file that is not per account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The consent revision (spec §8): a content hash of what it was compiled from.
    pub revision: String,
    /// Records.
    pub records: u32,
    /// Of which accounts.
    pub valid: u32,
    /// Of which quarantined.
    pub quarantined: u32,
    /// Of which deleted (change sets only).
    pub deleted: u32,
    /// Key table entries.
    pub keys: u32,
    /// Id table entries.
    pub ids: u32,
    /// Width of the key directory's prefix.
    pub key_bits: u8,
    /// Width of the id directory's prefix.
    pub id_bits: u8,
    /// Seed of the id hash (xxh3-64).
    pub id_seed: u64,
    /// Plan names, by record `plan` index.
    pub plans: Vec<PlanName>,
    /// Subprocessor names, by record bit.
    pub subprocessors: Vec<NameUse>,
    /// Region names, by record `residency` index.
    pub regions: Vec<NameUse>,
    /// The files records come from, by record `source` index.
    pub sources: Vec<SourceFile>,
    /// Change files up to this sequence are part of this file.
    pub changes_through: u64,
    /// Those of them that were present when it was written, with their hashes:
    /// such a file left behind is skipped; any other at or below
    /// `changes_through` was written late and is refused.
    pub changes_included: Vec<IncludedChange>,
}

/// Why a compiled snapshot is refused.
#[derive(Debug, Error)]
pub enum ImageError {
    /// It cannot be read.
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    /// It does not start with the magic.
    #[error("not a compiled consent snapshot (no `PGCONSNT` magic)")]
    NotASnapshot,
    /// Another layout version.
    #[error("compiled consent snapshot format {0}, this binary reads format {VERSION}: compile it again with this binary")]
    Version(u32),
    /// Its length is not the one its header states (truncated or appended to).
    #[error("the file is {actual} bytes but its header says {stated}: truncated or damaged")]
    Length {
        /// The header's.
        stated: u64,
        /// The file's.
        actual: u64,
    },
    /// A section lies outside the file or overlaps another.
    #[error("damaged directory: {0}")]
    Directory(String),
    /// The header's checksum does not match.
    #[error("damaged header: its checksum does not match")]
    HeaderChecksum,
    /// The meta section does not parse or does not fit the sections.
    #[error("damaged meta section: {0}")]
    Meta(String),
    /// The body's checksum does not match (full verification only).
    #[error("damaged body: its checksum does not match")]
    BodyChecksum,
    /// A record, key or id entry is inconsistent (full verification only).
    #[error("damaged {0}")]
    Damaged(String),
}

/// The bytes of an image: a read-only mapping of a file, or built in memory
/// (a JSON Lines export, a change set).
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// One opened image.
pub struct ConsentImage {
    bytes: Bytes,
    meta: Meta,
    sections: [Range<usize>; SECTIONS],
}

impl std::fmt::Debug for ConsentImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsentImage")
            .field("bytes", &self.bytes.len())
            .field("records", &self.meta.records)
            .field("revision", &self.meta.revision)
            .finish()
    }
}

/// Whether the file at `path` starts with the compiled snapshot's magic.
pub fn is_compiled(path: &Path) -> io::Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let mut file = File::open(path)?;
    let mut read = 0;
    while read < head.len() {
        match file.read(&mut head[read..])? {
            0 => break,
            n => read += n,
        }
    }
    Ok(read == head.len() && head == MAGIC)
}

impl ConsentImage {
    /// Maps the file at `path` and checks its header: cost proportional to
    /// its meta section, not to its accounts.
    ///
    /// The file must be replaced by rename, never rewritten in place (the
    /// `compile-accounts` and `compact-accounts` commands do so): a mapping
    /// of a file truncated under it would fault.
    pub fn open(path: &Path) -> Result<ConsentImage, ImageError> {
        let file = File::open(path)?;
        // SAFETY: the mapping is read-only and every read of it is
        // bounds-checked against its length; the file is only ever replaced
        // by rename (documented above), which leaves this mapping intact.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        // Lookups land anywhere: read ahead nothing they did not ask for.
        let _ = map.advise(memmap2::Advice::Random);
        ConsentImage::parse(Bytes::Mapped(map))
    }

    /// An image built in memory.
    pub fn from_vec(bytes: Vec<u8>) -> Result<ConsentImage, ImageError> {
        ConsentImage::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<ConsentImage, ImageError> {
        let b: &[u8] = &bytes;
        if b.len() < 8 || b[..8] != MAGIC[..] {
            return Err(ImageError::NotASnapshot);
        }
        if b.len() < DIRECTORY_END {
            return Err(ImageError::Length {
                stated: 0,
                actual: b.len() as u64,
            });
        }
        let version = le_u32(&b[8..12]);
        if version != VERSION {
            return Err(ImageError::Version(version));
        }
        let stated = le_u64(&b[16..24]);
        if stated != b.len() as u64 {
            return Err(ImageError::Length {
                stated,
                actual: b.len() as u64,
            });
        }
        let sections = read_directory(b)?;
        let records_start = sections[Section::Records as usize].start;
        if sections[Section::Meta as usize].len() as u64 > MAX_META {
            return Err(ImageError::Directory("meta section too large".into()));
        }
        if header_checksum(&b[..records_start]) != b[HEADER_CHECK] {
            return Err(ImageError::HeaderChecksum);
        }
        let meta: Meta = serde_json::from_slice(&b[sections[Section::Meta as usize].clone()])
            .map_err(|e| ImageError::Meta(e.to_string()))?;
        check_meta(&meta, &sections)?;
        Ok(ConsentImage {
            bytes,
            meta,
            sections,
        })
    }

    /// Whether it is a mapped file (else it was built in memory).
    pub fn is_mapped(&self) -> bool {
        matches!(self.bytes, Bytes::Mapped(_))
    }

    /// The whole file.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The meta section.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    fn section(&self, s: Section) -> &[u8] {
        // Checked at open to lie within the file.
        &self.bytes[self.sections[s as usize].clone()]
    }

    /// Record `index`, when it lies in the records section.
    pub fn record(&self, index: u32) -> Option<RawRecord> {
        let start = (index as usize).checked_mul(RECORD_LEN)?;
        let bytes = self
            .section(Section::Records)
            .get(start..start.checked_add(RECORD_LEN)?)?;
        RawRecord::decode(bytes.try_into().ok()?)
    }

    fn text(&self, r: &RawRecord, skip: usize, len: usize) -> Option<&str> {
        let start = usize::try_from(r.text).ok()?.checked_add(skip)?;
        let bytes = self
            .section(Section::Heap)
            .get(start..start.checked_add(len)?)?;
        std::str::from_utf8(bytes).ok()
    }

    /// The id of `r` (empty for a quarantined line without a usable one);
    /// `None` when the heap does not hold it.
    pub fn id(&self, r: &RawRecord) -> Option<&str> {
        self.text(r, 0, r.id_len as usize)
    }

    /// The quarantine reason of `r`.
    pub fn reason(&self, r: &RawRecord) -> Option<&str> {
        self.text(r, r.id_len as usize, r.reason_len as usize)
    }

    /// Entries `start..end` of bucket `prefix` of a directory, when sane.
    fn bucket(&self, directory: Section, bits: u8, hash: u64, count: u32) -> Option<Range<usize>> {
        let bucket = bucket_of(hash, bits);
        let dir = self.section(directory);
        let at = |i: usize| -> Option<u32> {
            let o = i.checked_mul(4)?;
            dir.get(o..o + 4).map(le_u32)
        };
        let (start, end) = (at(bucket)?, at(bucket + 1)?);
        (start <= end && end <= count).then_some(start as usize..end as usize)
    }

    /// The record holding key hash `key`, or [`DAMAGED_RECORD`] when the
    /// entry's record is not the one it names (a damaged body).
    pub fn find_key(&self, key: &KeyHash) -> Option<u32> {
        let range = self.bucket(
            Section::KeyDirectory,
            self.meta.key_bits,
            key_prefix(key),
            self.meta.keys,
        )?;
        let keys = self.section(Section::Keys);
        let entries = keys.get(range.start * KEY_ENTRY_LEN..range.end * KEY_ENTRY_LEN)?;
        let entry = entries
            .chunks_exact(KEY_ENTRY_LEN)
            .find(|e| e[..32] == key[..])?;
        let record = le_u32(&entry[32..36]);
        let matches = self
            .record(record)
            .and_then(|r| self.id(&r).map(|id| id_check(self.id_hash(id))))
            == Some(le_u32(&entry[36..40]));
        Some(if matches { record } else { DAMAGED_RECORD })
    }

    /// The hash the id table is sorted by.
    pub fn id_hash(&self, id: &str) -> u64 {
        id_hash(id.as_bytes(), self.meta.id_seed)
    }

    /// The record with id `id`.
    pub fn find_id(&self, id: &str) -> Option<u32> {
        let hash = self.id_hash(id);
        let range = self.bucket(Section::IdDirectory, self.meta.id_bits, hash, self.meta.ids)?;
        let ids = self.section(Section::Ids);
        let entries = ids.get(range.start * ID_ENTRY_LEN..range.end * ID_ENTRY_LEN)?;
        entries
            .chunks_exact(ID_ENTRY_LEN)
            .filter(|e| le_u64(e) == hash)
            .map(|e| le_u32(&e[8..]))
            .find(|&i| self.record(i).is_some_and(|r| self.id(&r) == Some(id)))
    }

    /// The indexes of the quarantined records, in file order.
    pub fn quarantined(&self) -> impl Iterator<Item = u32> + '_ {
        self.section(Section::Quarantine)
            .chunks_exact(4)
            .map(le_u32)
    }

    /// Every key hash with its record (the key table, in key order).
    pub fn keys(&self) -> impl Iterator<Item = (KeyHash, u32)> + '_ {
        self.key_entries().map(|(key, record, _)| (key, record))
    }

    fn key_entries(&self) -> impl Iterator<Item = (KeyHash, u32, u32)> + '_ {
        self.section(Section::Keys)
            .chunks_exact(KEY_ENTRY_LEN)
            .map(|e| {
                let mut key = [0u8; 32];
                key.copy_from_slice(&e[..32]);
                (key, le_u32(&e[32..36]), le_u32(&e[36..40]))
            })
    }

    /// The id entries: `(id hash, record)` in table order.
    fn id_entries(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.section(Section::Ids)
            .chunks_exact(ID_ENTRY_LEN)
            .map(|e| (le_u64(e), le_u32(&e[8..])))
    }

    /// Everything [`ConsentImage::open`] leaves out: the body's checksum,
    /// every record, every index entry. Reads the whole file; for `check`.
    pub fn verify(&self) -> Result<(), ImageError> {
        let body = &self.bytes[self.sections[Section::Records as usize].start..];
        if Sha256::digest(body)[..] != self.bytes[BODY_CHECK] {
            return Err(ImageError::BodyChecksum);
        }
        let m = &self.meta;
        let damaged = |what: String| Err(ImageError::Damaged(what));
        let (mut valid, mut quarantined, mut deleted) = (0u32, 0u32, 0u32);
        for i in 0..m.records {
            let Some(r) = self.record(i) else {
                return damaged(format!("record {i}: its check does not match"));
            };
            if let Err(what) = self.check_record(&r) {
                return damaged(format!("record {i}: {what}"));
            }
            match r.kind() {
                Some(Kind::Account) => valid += 1,
                Some(Kind::Quarantined) => quarantined += 1,
                _ => deleted += 1,
            }
        }
        if (valid, quarantined, deleted) != (m.valid, m.quarantined, m.deleted) {
            return damaged("record counts".into());
        }
        let mut previous = None;
        for i in self.quarantined() {
            if previous.is_some_and(|p| p >= i)
                || self.record(i).and_then(|r| r.kind()) != Some(Kind::Quarantined)
            {
                return damaged("quarantine list".into());
            }
            previous = Some(i);
        }
        let mut previous: Option<KeyHash> = None;
        for (key, record) in self.keys() {
            if previous.is_some_and(|p| p >= key) || record >= m.records {
                return damaged(
                    "key table: not sorted, or naming a record that is not there".into(),
                );
            }
            previous = Some(key);
        }
        if !is_directory_of(
            self.section(Section::KeyDirectory),
            m.key_bits,
            self.keys().map(|(key, _)| key_prefix(&key)),
        ) {
            return damaged("key directory: does not match the key table".into());
        }
        let mut previous = 0u64;
        for (hash, record) in self.id_entries() {
            let id = self.record(record).and_then(|r| self.id(&r));
            if hash < previous || !id.is_some_and(|id| !id.is_empty() && self.id_hash(id) == hash) {
                return damaged(
                    "id table: not sorted, or an entry does not match its record".into(),
                );
            }
            previous = hash;
        }
        if !is_directory_of(
            self.section(Section::IdDirectory),
            m.id_bits,
            self.id_entries().map(|e| e.0),
        ) {
            return damaged("id directory: does not match the id table".into());
        }
        Ok(())
    }

    /// What is wrong with `r`, if anything.
    fn check_record(&self, r: &RawRecord) -> Result<(), &'static str> {
        let m = &self.meta;
        let kind = r.kind().ok_or("unknown kind")?;
        let id = self.id(r).ok_or("id outside the heap or not UTF-8")?;
        self.reason(r)
            .ok_or("reason outside the heap or not UTF-8")?;
        if r.source as usize >= m.sources.len() {
            return Err("unknown source");
        }
        if r.flags & !flag::ALL != 0 {
            return Err("unknown flags");
        }
        let whole_account = kind == Kind::Account
            || (kind == Kind::Quarantined
                && r.flags & flag::CONFLICT != 0
                && r.flags & flag::DEMOTES_BASE == 0);
        if kind != Kind::Quarantined && id.is_empty() {
            return Err("no id");
        }
        if whole_account {
            let product = r.product().ok_or("unknown product")?;
            let plan = m.plans.get(r.plan as usize).ok_or("unknown plan")?;
            if plan.product != product.as_str() {
                return Err("plan of another product");
            }
            if r.residency != NO_REGION && r.residency as usize >= m.regions.len() {
                return Err("unknown region");
            }
            if m.subprocessors.len() < 64 && r.subprocessors >> m.subprocessors.len() != 0 {
                return Err("unknown subprocessor");
            }
        }
        Ok(())
    }
}

/// Reads and checks the directory: sections in order, inside the file.
fn read_directory(b: &[u8]) -> Result<[Range<usize>; SECTIONS], ImageError> {
    let mut sections: [Range<usize>; SECTIONS] = Default::default();
    let mut end = DIRECTORY_END as u64;
    for (i, s) in sections.iter_mut().enumerate() {
        let at = HEADER_LEN + i * 16;
        let offset = le_u64(&b[at..at + 8]);
        let len = le_u64(&b[at + 8..at + 16]);
        let stop = offset
            .checked_add(len)
            .filter(|&stop| offset >= end && stop <= b.len() as u64)
            .ok_or_else(|| ImageError::Directory(format!("section {i} lies outside the file")))?;
        *s = offset as usize..stop as usize;
        end = stop;
    }
    Ok(sections)
}

/// Whether the meta's counts fit the sections' sizes and its tables the record fields.
fn check_meta(m: &Meta, sections: &[Range<usize>; SECTIONS]) -> Result<(), ImageError> {
    let fits =
        |s: Section, count: u64, width: u64| sections[s as usize].len() as u64 == count * width;
    let dir_len = |bits: u8| (1u64 << bits) + 1;
    let problem = if m.key_bits > 31 || m.id_bits > 31 {
        Some("directory widths over 31 bits")
    } else if !fits(Section::Records, m.records.into(), RECORD_LEN as u64) {
        Some("records")
    } else if !fits(Section::Keys, m.keys.into(), KEY_ENTRY_LEN as u64) {
        Some("keys")
    } else if !fits(Section::KeyDirectory, dir_len(m.key_bits), 4) {
        Some("key directory")
    } else if !fits(Section::Ids, m.ids.into(), ID_ENTRY_LEN as u64) {
        Some("ids")
    } else if !fits(Section::IdDirectory, dir_len(m.id_bits), 4) {
        Some("id directory")
    } else if !fits(Section::Quarantine, m.quarantined.into(), 4) {
        Some("quarantine list")
    } else if u64::from(m.valid) + u64::from(m.quarantined) + u64::from(m.deleted)
        != u64::from(m.records)
    {
        Some("record counts")
    } else if m.plans.len() > usize::from(u16::MAX)
        || m.subprocessors.len() > MAX_SUBPROCESSORS
        || m.regions.len() >= usize::from(NO_REGION)
        || m.sources.len() > usize::from(u16::MAX)
    {
        Some("name tables")
    } else {
        None
    };
    match problem {
        Some(what) => Err(ImageError::Meta(format!("{what} do not fit the sections"))),
        None => Ok(()),
    }
}

/// The bucket of `hash` in a directory of width `bits`.
fn bucket_of(hash: u64, bits: u8) -> usize {
    if bits == 0 {
        0
    } else {
        (hash >> (64 - u32::from(bits))) as usize
    }
}

/// The prefix a key's bucket is chosen by.
fn key_prefix(key: &KeyHash) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
}

/// The radix directory of sorted `hashes`, entry by entry: entry `p` is the
/// first position whose top `bits` are at least `p`; one more entry holds
/// the count.
fn radix_directory(
    bits: u8,
    hashes: impl Iterator<Item = u64>,
    mut entry: impl FnMut(u32) -> bool,
) -> bool {
    let buckets = 1usize << bits;
    let mut next = 0usize;
    let mut count = 0u32;
    for hash in hashes {
        let bucket = bucket_of(hash, bits);
        while next <= bucket {
            if !entry(count) {
                return false;
            }
            next += 1;
        }
        count += 1;
    }
    while next <= buckets {
        if !entry(count) {
            return false;
        }
        next += 1;
    }
    true
}

/// Whether `directory` is the radix directory of `hashes` (sorted).
fn is_directory_of(directory: &[u8], bits: u8, hashes: impl Iterator<Item = u64>) -> bool {
    let mut stored = directory.chunks_exact(4).map(le_u32);
    radix_directory(bits, hashes, |count| stored.next() == Some(count)) && stored.next().is_none()
}

/// The directory width for `n` entries: about two entries per bucket.
pub fn radix_bits(n: usize) -> u8 {
    if n < 4 {
        0
    } else {
        (usize::BITS - 1 - n.leading_zeros()) as u8 - 1
    }
}

fn header_checksum(head: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&head[..HEADER_CHECK.start]);
    h.update([0u8; 64]);
    h.update(&head[BODY_CHECK.end..]);
    h.finalize().into()
}

// ------------------------------------------------------------------ building

/// Where a line came from: a source of the image and a line in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Index into the image's sources.
    pub source: u16,
    /// 1-based line.
    pub line: u32,
}

/// A fully understood account line, names already resolved to the builder's tables.
#[derive(Clone, Debug)]
pub struct NewAccount {
    /// Its id.
    pub id: Box<str>,
    /// Its product.
    pub product: Product,
    /// Its plan's name (a plan of the rules for that product).
    pub plan: Box<str>,
    /// Consents, subprocessors and regions as indexes of the builder's tables.
    pub consents: Consents,
    /// Where it is.
    pub origin: Origin,
}

/// A line quarantined whatever else the file holds.
#[derive(Clone, Debug)]
pub struct QuarantinedLine {
    /// Its account id, when usable.
    pub id: Option<Box<str>>,
    /// Where it is.
    pub origin: Origin,
    /// Why.
    pub reason: Box<str>,
}

/// A line to add to an image.
#[derive(Clone, Debug)]
pub enum Line {
    /// A fully understood account.
    Account(NewAccount),
    /// A line that is quarantined whatever else the file holds.
    Quarantined(QuarantinedLine),
    /// A deleted account (a change file's tombstone).
    Deleted {
        /// The account.
        id: Box<str>,
        /// Where the tombstone is.
        origin: Origin,
    },
    /// Quarantines the base's record of `id` (a change set's key conflicts
    /// with it); its keys stay the base's.
    DemotesBase {
        /// The base record's id.
        id: Box<str>,
        /// The base record's origin.
        origin: Origin,
        /// Why.
        reason: Box<str>,
    },
}

impl Line {
    fn id(&self) -> Option<&str> {
        match self {
            Line::Account(a) => Some(&a.id),
            Line::Quarantined(q) => q.id.as_deref(),
            Line::Deleted { id, .. } | Line::DemotesBase { id, .. } => Some(id),
        }
    }

    /// Moves the line to source `source` (a rebuild's own table).
    pub fn set_source(&mut self, source: u16) {
        match self {
            Line::Account(a) => a.origin.source = source,
            Line::Quarantined(q) => q.origin.source = source,
            Line::Deleted { origin, .. } | Line::DemotesBase { origin, .. } => {
                origin.source = source
            }
        }
    }

    /// Where the line is.
    pub fn origin(&self) -> Origin {
        match self {
            Line::Account(a) => a.origin,
            Line::Quarantined(q) => q.origin,
            Line::Deleted { origin, .. } | Line::DemotesBase { origin, .. } => *origin,
        }
    }
}

/// Builds an image line by line, with the export's conflict rules: two lines
/// that share a key hash or an id quarantine each other (the first, already
/// stored as valid, is *demoted*: kept whole, marked, given a reason).
pub struct ImageBuilder {
    records: Vec<RawRecord>,
    heap: Vec<u8>,
    /// Every indexed key hash with its record.
    keys: Vec<(KeyHash, u32)>,
    /// Positions in `keys`, hashed by key hash.
    by_key: HashTable<u32>,
    /// Records, hashed by id (the first record of each id): the id table.
    by_id: HashTable<u32>,
    /// The id hash of each record (with the file's seed).
    id_hashes: Vec<u64>,
    id_seed: u64,
    plans: Vec<PlanName>,
    plan_index: HashMap<(Product, Box<str>), u16>,
    subprocessors: Vec<NameUse>,
    regions: Vec<NameUse>,
    sources: Vec<SourceFile>,
}

/// Key hashes are SHA-256 outputs, already uniform: their first bytes are a
/// good table hash.
fn key_slot(key: &KeyHash) -> u64 {
    key_prefix(key)
}

fn record_id<'a>(records: &[RawRecord], heap: &'a [u8], index: u32) -> &'a [u8] {
    let r = &records[index as usize];
    let start = r.text as usize;
    &heap[start..start + r.id_len as usize]
}

/// The hash the id table is sorted by.
fn id_hash(id: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(id, seed)
}

impl ImageBuilder {
    /// A builder for about `lines` lines, whose records name `subprocessors`
    /// and `regions` by their index in these lists (the pools file's, in its
    /// order), come from `sources`, and are hashed by id with `id_seed`.
    pub fn new(
        lines: usize,
        subprocessors: &[String],
        regions: &[String],
        sources: Vec<SourceFile>,
        id_seed: u64,
    ) -> ImageBuilder {
        let names = |list: &[String]| {
            list.iter()
                .map(|name| NameUse {
                    name: name.clone(),
                    accounts: 0,
                })
                .collect()
        };
        ImageBuilder {
            records: Vec::with_capacity(lines),
            heap: Vec::with_capacity(lines * 20),
            keys: Vec::with_capacity(lines),
            by_key: HashTable::with_capacity(lines),
            by_id: HashTable::with_capacity(lines),
            id_hashes: Vec::with_capacity(lines),
            id_seed,
            plans: Vec::new(),
            plan_index: HashMap::new(),
            subprocessors: names(subprocessors),
            regions: names(regions),
            sources,
        }
    }

    /// The sources so far.
    pub fn sources(&self) -> &[SourceFile] {
        &self.sources
    }

    /// Adds a source; its index.
    pub fn add_source(&mut self, source: SourceFile) -> u16 {
        self.sources.push(source);
        (self.sources.len() - 1) as u16
    }

    fn find_id(&self, id: &str) -> Option<u32> {
        let (records, heap) = (&self.records, &self.heap);
        self.by_id
            .find(id_hash(id.as_bytes(), self.id_seed), |&i| {
                record_id(records, heap, i) == id.as_bytes()
            })
            .copied()
    }

    fn find_key(&self, key: &KeyHash) -> Option<u32> {
        self.by_key
            .find(key_slot(key), |&i| self.keys[i as usize].0 == *key)
            .map(|&i| self.keys[i as usize].1)
    }

    /// Whether a record has id `id` so far.
    pub fn has_id(&self, id: &str) -> bool {
        self.find_id(id).is_some()
    }

    /// Where `of` is, as seen from a line of source `from`: `line N`, or
    /// `line N of FILE` when it is another file's.
    pub fn place(&self, of: Origin, from: u16) -> String {
        if of.source == from {
            format!("line {}", of.line)
        } else {
            let file = self
                .sources
                .get(of.source as usize)
                .map_or("?", |s| s.file.as_str());
            format!("line {} of {file}", of.line)
        }
    }

    fn origin_of(&self, index: u32) -> Origin {
        let r = &self.records[index as usize];
        Origin {
            source: r.source,
            line: r.line,
        }
    }

    fn push_text(&mut self, id: &str, reason: &str) -> (u64, u16, u16) {
        let reason = clip(reason);
        let text = self.heap.len() as u64;
        self.heap.extend_from_slice(id.as_bytes());
        self.heap.extend_from_slice(reason.as_bytes());
        (text, id.len() as u16, reason.len() as u16)
    }

    fn plan(&mut self, product: Product, name: &str) -> u16 {
        let next = self.plans.len() as u16;
        *self
            .plan_index
            .entry((product, name.into()))
            .or_insert_with(|| {
                self.plans.push(PlanName {
                    product: product.as_str().into(),
                    name: name.into(),
                    accounts: 0,
                    opted_in: 0,
                });
                next
            })
    }

    /// Adds one line, reachable by its id and by each of `keys`. A line whose
    /// id or key another line already has is quarantined, and so is that
    /// other line.
    pub fn add(&mut self, line: Line, keys: &[KeyHash]) {
        let origin = line.origin();
        let id_owner = line.id().and_then(|id| self.find_id(id));
        let mut key_owners: Vec<u32> = keys.iter().filter_map(|k| self.find_key(k)).collect();
        key_owners.sort_unstable();
        key_owners.dedup();

        let mut conflict = None;
        if let Some(owner) = id_owner {
            let theirs = self.origin_of(owner);
            conflict = Some(format!(
                "account id is also defined on {}",
                self.place(theirs, origin.source)
            ));
            let reason = format!(
                "account id is also defined on {}",
                self.place(origin, theirs.source)
            );
            self.demote(owner, &reason);
        }
        for &owner in &key_owners {
            let theirs = self.origin_of(owner);
            if conflict.is_none() {
                conflict = Some(format!(
                    "an API key hash is also listed on {}",
                    self.place(theirs, origin.source)
                ));
            }
            let reason = format!(
                "an API key hash is also listed on {}",
                self.place(origin, theirs.source)
            );
            self.demote(owner, &reason);
        }

        let record = self.record_of(line, conflict.as_deref());
        let index = self.records.len() as u32;
        self.records.push(record);
        let hash = id_hash(record_id(&self.records, &self.heap, index), self.id_seed);
        self.id_hashes.push(hash);
        if id_owner.is_none() && record.id_len > 0 {
            let hashes = &self.id_hashes;
            self.by_id
                .insert_unique(hash, index, |&i| hashes[i as usize]);
        }
        for key in keys {
            let position = self.keys.len() as u32;
            let known = &self.keys;
            if let Entry::Vacant(vacant) = self.by_key.entry(
                key_slot(key),
                |&i| known[i as usize].0 == *key,
                |&i| key_slot(&known[i as usize].0),
            ) {
                vacant.insert(position);
                self.keys.push((*key, index));
            }
        }
    }

    /// The record of `line`; quarantined for `conflict` when it has one.
    fn record_of(&mut self, line: Line, conflict: Option<&str>) -> RawRecord {
        let origin = line.origin();
        let mut r = RawRecord {
            text: 0,
            id_len: 0,
            reason_len: 0,
            kind: Kind::Quarantined.code(),
            product: 0,
            plan: 0,
            flags: 0,
            residency: NO_REGION,
            source: origin.source,
            line: origin.line,
            subprocessors: 0,
        };
        match line {
            Line::Account(a) => {
                let reason = conflict.unwrap_or("");
                (r.text, r.id_len, r.reason_len) = self.push_text(&a.id, reason);
                let c = &a.consents;
                r.product = u8::from(a.product == Product::Chat);
                r.plan = self.plan(a.product, &a.plan);
                r.flags = [
                    (c.training_opt_out, flag::TRAINING_OPT_OUT),
                    (c.training_opt_in, flag::TRAINING_OPT_IN),
                    (c.zdr, flag::ZDR),
                    (c.ip_personalization_opt_out, flag::IP_OPT_OUT),
                    (c.restricted, flag::RESTRICTED),
                ]
                .iter()
                .filter(|(on, _)| *on)
                .fold(0, |f, (_, bit)| f | bit);
                r.residency = c.residency.map_or(NO_REGION, |region| region.0);
                r.subprocessors = subprocessor_bits(c.subprocessor_opt_outs);
                if conflict.is_some() {
                    r.flags |= flag::CONFLICT;
                } else {
                    r.kind = Kind::Account.code();
                    self.count_use(&r, 1);
                }
            }
            Line::Quarantined(q) => {
                (r.text, r.id_len, r.reason_len) =
                    self.push_text(q.id.as_deref().unwrap_or(""), &q.reason);
            }
            Line::Deleted { id, .. } => {
                (r.text, r.id_len, _) = self.push_text(&id, "");
                r.kind = Kind::Deleted.code();
            }
            Line::DemotesBase { id, reason, .. } => {
                (r.text, r.id_len, r.reason_len) = self.push_text(&id, &reason);
                r.flags = flag::DEMOTES_BASE | flag::CONFLICT;
            }
        }
        r
    }

    /// Counts (or uncounts) a valid account's use of its names.
    fn count_use(&mut self, r: &RawRecord, delta: i64) {
        let add = |n: &mut u64| *n = n.saturating_add_signed(delta);
        let plan = &mut self.plans[r.plan as usize];
        add(&mut plan.accounts);
        if r.flags & flag::TRAINING_OPT_IN != 0 {
            add(&mut plan.opted_in);
        }
        if let Some(region) = self.regions.get_mut(r.residency as usize) {
            add(&mut region.accounts);
        }
        for (i, s) in self.subprocessors.iter_mut().enumerate() {
            if r.subprocessors & (1 << i) != 0 {
                add(&mut s.accounts);
            }
        }
    }

    /// Quarantines the valid account `index` for `reason`, keeping it whole
    /// (a no-op for a record already quarantined).
    pub fn demote(&mut self, index: u32, reason: &str) {
        let r = self.records[index as usize];
        if r.kind != Kind::Account.code() {
            return;
        }
        self.count_use(&r, -1);
        let id = String::from_utf8_lossy(record_id(&self.records, &self.heap, index)).into_owned();
        let (text, id_len, reason_len) = self.push_text(&id, reason);
        let r = &mut self.records[index as usize];
        (r.text, r.id_len, r.reason_len) = (text, id_len, reason_len);
        r.kind = Kind::Quarantined.code();
        r.flags |= flag::CONFLICT;
    }

    /// Where record `index` is.
    pub fn origin(&self, index: u32) -> Origin {
        self.origin_of(index)
    }

    /// Every key added so far, with its record.
    pub fn key_entries(&self) -> &[(KeyHash, u32)] {
        &self.keys
    }

    /// Whether record `index` is a valid account.
    pub fn is_valid(&self, index: u32) -> bool {
        self.records[index as usize].kind == Kind::Account.code()
    }

    /// Writes the image to `out`: `revision` names its content, and
    /// `changes` say which change files it includes.
    pub fn write(
        mut self,
        revision: &str,
        changes: (u64, Vec<IncludedChange>),
        out: &mut (impl Write + Seek),
    ) -> io::Result<()> {
        if self.records.len() >= DAMAGED_RECORD as usize || self.heap.len() as u64 >= 1 << 48 {
            return Err(io::Error::other(
                "more accounts than one compiled snapshot holds (4 billion records, 256 TiB of ids)",
            ));
        }
        let id_seed = self.id_seed;
        // The id table: the first record of each id, as the lookups found it.
        let mut ids: Vec<(u64, u32)> = self
            .by_id
            .iter()
            .map(|&i| (self.id_hashes[i as usize], i))
            .collect();
        // The lookup tables are done with; free them before the sorts.
        self.by_key = HashTable::new();
        self.by_id = HashTable::new();
        ids.sort_unstable();
        self.keys.sort_unstable_by_key(|k| k.0);

        let (mut valid, mut quarantined, mut deleted) = (0u32, 0u32, 0u32);
        for r in &self.records {
            match Kind::from_code(r.kind) {
                Some(Kind::Account) => valid += 1,
                Some(Kind::Quarantined) => quarantined += 1,
                _ => deleted += 1,
            }
        }
        let key_bits = radix_bits(self.keys.len());
        let id_bits = radix_bits(ids.len());
        let meta = Meta {
            revision: revision.into(),
            records: self.records.len() as u32,
            valid,
            quarantined,
            deleted,
            keys: self.keys.len() as u32,
            ids: ids.len() as u32,
            key_bits,
            id_bits,
            id_seed,
            plans: self.plans,
            subprocessors: self.subprocessors,
            regions: self.regions,
            sources: self.sources,
            changes_through: changes.0,
            changes_included: changes.1,
        };
        let meta_bytes = serde_json::to_vec(&meta).expect("the meta serialises");
        let directory_len = |bits: u8| ((1u64 << bits) + 1) * 4;

        let lengths = [
            meta_bytes.len() as u64,
            (self.records.len() * RECORD_LEN) as u64,
            (self.keys.len() * KEY_ENTRY_LEN) as u64,
            directory_len(key_bits),
            (ids.len() * ID_ENTRY_LEN) as u64,
            directory_len(id_bits),
            self.heap.len() as u64,
            u64::from(quarantined) * 4,
        ];
        let mut head = vec![0u8; DIRECTORY_END];
        head[..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let mut offset = DIRECTORY_END as u64;
        let mut offsets = [0u64; SECTIONS];
        for (i, len) in lengths.iter().enumerate() {
            offset = offset.next_multiple_of(ALIGN);
            offsets[i] = offset;
            let at = HEADER_LEN + i * 16;
            head[at..at + 8].copy_from_slice(&offset.to_le_bytes());
            head[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
            offset += len;
        }
        head[16..24].copy_from_slice(&offset.to_le_bytes());

        // Header, directory, meta: the part the open checks.
        let mut front = head;
        front.resize(offsets[0] as usize, 0);
        front.extend_from_slice(&meta_bytes);
        front.resize(offsets[1] as usize, 0);
        let check = header_checksum(&front);
        front[HEADER_CHECK].copy_from_slice(&check);
        let start = out.stream_position()?;
        out.write_all(&front)?;

        let mut body = HashingWriter {
            inner: &mut *out,
            hash: Sha256::new(),
            written: offsets[1],
        };
        for r in &self.records {
            body.write_all(&r.encode())?;
        }
        body.pad_to(offsets[2])?;
        for (key, record) in &self.keys {
            let check = id_check(self.id_hashes[*record as usize]);
            body.write_all(key)?;
            body.write_all(&record.to_le_bytes())?;
            body.write_all(&check.to_le_bytes())?;
        }
        body.pad_to(offsets[3])?;
        body.write_directory(key_bits, self.keys.iter().map(|k| key_prefix(&k.0)))?;
        body.pad_to(offsets[4])?;
        for (hash, record) in &ids {
            body.write_all(&hash.to_le_bytes())?;
            body.write_all(&record.to_le_bytes())?;
        }
        body.pad_to(offsets[5])?;
        body.write_directory(id_bits, ids.iter().map(|e| e.0))?;
        body.pad_to(offsets[6])?;
        body.write_all(&self.heap)?;
        body.pad_to(offsets[7])?;
        for (i, r) in self.records.iter().enumerate() {
            if r.kind == Kind::Quarantined.code() {
                body.write_all(&(i as u32).to_le_bytes())?;
            }
        }
        let body_check: [u8; 32] = body.hash.finalize().into();
        let end = out.stream_position()?;
        out.seek(SeekFrom::Start(start + BODY_CHECK.start as u64))?;
        out.write_all(&body_check)?;
        out.seek(SeekFrom::Start(end))?;
        out.flush()
    }

    /// The image, built in memory and opened.
    pub fn into_image(self, revision: &str, changes: (u64, Vec<IncludedChange>)) -> ConsentImage {
        let mut out = io::Cursor::new(Vec::new());
        self.write(revision, changes, &mut out)
            .expect("writing to memory does not fail");
        ConsentImage::from_vec(out.into_inner()).expect("a freshly built image opens")
    }
}

/// At most this many bytes of a reason are kept (its length is a u16).
fn clip(reason: &str) -> &str {
    let mut end = reason.len().min(1024);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

fn subprocessor_bits(set: SubprocessorSet) -> u64 {
    (0..MAX_SUBPROCESSORS)
        .filter(|&i| set.contains(i))
        .fold(0, |bits, i| bits | 1 << i)
}

/// Hashes and counts what passes through, padding with zeros on request.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn pad_to(&mut self, offset: u64) -> io::Result<()> {
        let gap = offset.saturating_sub(self.written) as usize;
        self.write_all(&vec![0u8; gap])
    }

    fn write_directory(&mut self, bits: u8, hashes: impl Iterator<Item = u64>) -> io::Result<()> {
        let mut result = Ok(());
        radix_directory(bits, hashes, |entry| {
            result = self.write_all(&entry.to_le_bytes());
            result.is_ok()
        });
        result
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hash_api_key;
    use crate::policy::RegionId;
    use proptest::prelude::*;

    fn source() -> Vec<SourceFile> {
        vec![SourceFile {
            file: "accounts.jsonl".into(),
            modified: Some(1_700_000_000),
            change: None,
        }]
    }

    /// An image of `n` accounts `acct-{i}` with key `key-{i}`, every tenth
    /// quarantined.
    fn image_bytes(n: u32) -> Vec<u8> {
        let subs = vec!["azure".to_string(), "gcp".to_string()];
        let regions = vec!["eu".to_string()];
        let mut b = ImageBuilder::new(n as usize, &subs, &regions, source(), 42);
        for i in 0..n {
            let origin = Origin {
                source: 0,
                line: i + 1,
            };
            let line = if i % 10 == 9 {
                Line::Quarantined(QuarantinedLine {
                    id: Some(format!("acct-{i}").into()),
                    origin,
                    reason: "plan `enterprise` is not defined".into(),
                })
            } else {
                let mut consents = Consents {
                    training_opt_out: i % 2 == 0,
                    residency: (i % 3 == 0).then_some(RegionId(0)),
                    ..Consents::default()
                };
                consents.subprocessor_opt_outs.insert((i % 2) as usize);
                Line::Account(NewAccount {
                    id: format!("acct-{i}").into(),
                    product: Product::Api,
                    plan: "paid".into(),
                    consents,
                    origin,
                })
            };
            b.add(line, &[hash_api_key(format!("key-{i}").as_bytes())]);
        }
        let mut out = io::Cursor::new(Vec::new());
        b.write("abcdef0", (0, Vec::new()), &mut out)
            .expect("write");
        out.into_inner()
    }

    /// Looks up every account of an `n`-account image by key and by id, and
    /// decodes every record: whatever the bytes, nothing may panic.
    fn read_everything(image: &ConsentImage, n: u32) {
        for i in 0..n + 5 {
            if let Some(r) = image.find_key(&hash_api_key(format!("key-{i}").as_bytes())) {
                let _ = image.record(r).map(|r| (image.id(&r), image.reason(&r)));
            }
            let _ = image.find_id(&format!("acct-{i}"));
        }
        for i in 0..image.meta().records.saturating_add(3) {
            let _ = image.record(i).map(|r| (image.id(&r), image.reason(&r)));
        }
        let _ = image.quarantined().count();
        let _ = image.verify();
    }

    #[test]
    fn what_is_written_is_found_by_key_and_id_and_verifies() {
        let image = ConsentImage::from_vec(image_bytes(1000)).expect("opens");
        image.verify().expect("verifies");
        let m = image.meta();
        assert_eq!((m.records, m.valid, m.quarantined), (1000, 900, 100));
        assert_eq!(m.revision, "abcdef0");
        for i in [0u32, 1, 2, 9, 500, 999] {
            let r = image
                .find_key(&hash_api_key(format!("key-{i}").as_bytes()))
                .expect("key found");
            assert_eq!(image.find_id(&format!("acct-{i}")), Some(r));
            let record = image.record(r).expect("record");
            assert_eq!(image.id(&record), Some(format!("acct-{i}").as_str()));
            assert_eq!(record.line, i + 1);
            let expected = if i % 10 == 9 {
                Kind::Quarantined
            } else {
                Kind::Account
            };
            assert_eq!(record.kind(), Some(expected));
        }
        assert!(image.find_key(&hash_api_key(b"key-1000")).is_none());
        assert!(image.find_id("acct-1000").is_none());
        assert_eq!(image.quarantined().count(), 100);
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        assert_eq!(image_bytes(300), image_bytes(300));
    }

    #[test]
    fn an_empty_image_opens_and_finds_nothing() {
        let image = ConsentImage::from_vec(image_bytes(0)).expect("opens");
        image.verify().expect("verifies");
        assert!(image.find_key(&hash_api_key(b"key-0")).is_none());
        assert!(image.find_id("acct-0").is_none());
    }

    #[test]
    fn a_truncated_file_is_refused_at_open_at_every_length() {
        let bytes = image_bytes(50);
        for len in 0..bytes.len() {
            assert!(
                ConsentImage::from_vec(bytes[..len].to_vec()).is_err(),
                "truncated to {len} bytes"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            ConsentImage::from_vec(longer),
            Err(ImageError::Length { .. })
        ));
    }

    #[test]
    fn any_changed_byte_before_the_records_is_refused_at_open() {
        let bytes = image_bytes(50);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let records = image.sections[Section::Records as usize].start;
        for at in (0..records).filter(|at| !BODY_CHECK.contains(at)) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x41;
            assert!(
                ConsentImage::from_vec(damaged).is_err(),
                "byte {at} changed"
            );
        }
    }

    #[test]
    fn a_changed_body_opens_is_never_read_past_and_fails_verification() {
        let bytes = image_bytes(200);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let records = image.sections[Section::Records as usize].start;
        for at in (records..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0xff;
            let image = ConsentImage::from_vec(damaged).expect("the open reads the header only");
            read_everything(&image, 200);
            assert!(image.verify().is_err(), "byte {at} changed unnoticed");
        }
    }

    #[test]
    fn directories_pointing_anywhere_find_nothing_rather_than_read_past() {
        let bytes = image_bytes(100);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        for section in [Section::KeyDirectory, Section::IdDirectory] {
            let mut damaged = bytes.clone();
            for at in image.sections[section as usize].clone().step_by(4) {
                damaged[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            let image = ConsentImage::from_vec(damaged).expect("opens");
            match section {
                Section::KeyDirectory => assert!(image.find_key(&hash_api_key(b"key-1")).is_none()),
                _ => assert!(image.find_id("acct-1").is_none()),
            }
            read_everything(&image, 100);
        }
    }

    #[test]
    fn a_key_entry_naming_another_record_leads_to_no_account() {
        let bytes = image_bytes(100);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let key = hash_api_key(b"key-3");
        let keys = image.sections[Section::Keys as usize].clone();
        let at = keys.start
            + bytes[keys]
                .chunks_exact(KEY_ENTRY_LEN)
                .position(|e| e[..32] == key[..])
                .expect("entry")
                * KEY_ENTRY_LEN;
        let mut damaged = bytes;
        damaged[at + 32..at + 36].copy_from_slice(&4u32.to_le_bytes());
        let image = ConsentImage::from_vec(damaged).expect("opens");
        assert_eq!(image.find_key(&key), Some(DAMAGED_RECORD));
        assert!(image.record(DAMAGED_RECORD).is_none());
    }

    #[test]
    fn a_record_whose_bytes_changed_does_not_decode() {
        let bytes = image_bytes(10);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let records = image.sections[Section::Records as usize].start;
        let flags = records + 2 * RECORD_LEN + 16;
        let mut damaged = bytes;
        damaged[flags] ^= flag::TRAINING_OPT_OUT;
        let image = ConsentImage::from_vec(damaged).expect("opens");
        assert!(image.record(2).is_none(), "an opt-out flipped unnoticed");
        assert!(image.record(1).is_some());
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let mut bytes = image_bytes(5);
        bytes[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let e = ConsentImage::from_vec(bytes).expect_err("refused");
        assert!(e.to_string().contains("compile it again"), "{e}");
        assert!(matches!(
            ConsentImage::from_vec(b"{\"id\": \"a\"}\n".to_vec()),
            Err(ImageError::NotASnapshot)
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Hostile bytes: any few changed bytes, anywhere, and any length:
        /// refused, or opened and read without a panic.
        #[test]
        fn hostile_bytes_never_panic(
            changes in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
            fix_header in any::<bool>(),
        ) {
            let mut bytes = image_bytes(60);
            for (at, value) in changes {
                let len = bytes.len();
                bytes[at % len] = value;
            }
            if fix_header {
                // Keep the cheap check passing, so that the body's damage
                // reaches the reader.
                let records = le_u64(&bytes[HEADER_LEN + 16..HEADER_LEN + 24]) as usize;
                if records <= bytes.len() && records >= BODY_CHECK.end {
                    let check = header_checksum(&bytes[..records]);
                    bytes[HEADER_CHECK].copy_from_slice(&check);
                }
            }
            if cut % 4 == 0 {
                let len = bytes.len();
                bytes.truncate(cut % len);
            }
            if let Ok(image) = ConsentImage::from_vec(bytes) {
                read_everything(&image, 60);
            }
        }
    }
}
