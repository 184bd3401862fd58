//! The compiled consent snapshot: an immutable file laid out to be
//! memory-mapped and read in place, so that opening it costs the same for
//! sixteen accounts or a hundred million, and every process that maps it
//! (workers, replicas on one host, the old and new process of an upgrade)
//! shares one copy in the page cache.
//!
//! Layout (every integer little-endian; sections start on 128-byte boundaries):
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic `PGCONSNT` |
//! | 8..12 | format version ([`VERSION`]) |
//! | 16..24 | the file's length |
//! | 24..56 | SHA-256 of bytes `0..records`, both checksum fields zeroed: the cheap check at open |
//! | 56..88 | SHA-256 of bytes `records..end`: the full check, `check`'s business |
//! | 96..224 | directory: eight sections, each `(offset u64, length u64)` |
//! | meta | JSON ([`Meta`]): counts, the table's size, radix widths, the id hash seed, the name tables, the sources, the changes included |
//! | records | 128-byte records ([`RawRecord`]): the key table (records with a key, at their key's place), then the records without one |
//! | extra keys | an account's second and further keys: `(SHA-256, record u32, low half of the record's id hash)`, 40 bytes each, sorted |
//! | extra key directory | as the key directory, over the extra keys |
//! | ids | `(xxh3 of the id with the file's seed u64, record u32)`, 12 bytes each, sorted |
//! | id directory | as the key directory, over the id hashes |
//! | heap | ids longer than 64 bytes and quarantine reasons |
//! | quarantine | the u32 index of every quarantined record, in file order |
//!
//! A record is one 128-byte block holding an account's first API key hash,
//! its fields and its id (inline up to 64 bytes). The records with a key
//! form a table read without any index: key hashes are SHA-256 outputs,
//! uniform, so a key's place is its hash scaled to the table (`hash ×
//! capacity / 2^64`). The records are sorted by key and each sits at its
//! place or just after (the table is a quarter empty), so a lookup reads
//! the record at the key's place and walks forward (1.5 records on
//! average, adjacent) until it meets the key, a greater one or an empty
//! slot. One memory access, whatever the size; a directory in front of the
//! records costs a second one (measured: README, "A hundred million
//! accounts"). Lookups by id read the id table, then the record.
//!
//! Names that depend on other files (plans, subprocessors, regions) are kept
//! as names in the meta tables and resolved by the store when it opens the
//! file; records hold indexes into those tables.
//!
//! Reading never trusts the body: every access is bounds-checked, and the
//! open does not read it. What it could get wrong is caught per lookup: a
//! record whose 16-bit check fails, or an extra key whose record's id does
//! not match it, is reported as damaged (the store answers 403: nothing
//! forwarded, no consent guessed); a damaged directory or table finds
//! nothing (401). The body's checksum and every entry are verified by
//! `check`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use hashbrown::hash_table::{Entry, HashTable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::accounts::{KeyHash, Quarantined};
use crate::policy::{Consents, Product, SubprocessorSet, MAX_SUBPROCESSORS};

/// The first eight bytes of every compiled consent snapshot.
pub const MAGIC: [u8; 8] = *b"PGCONSNT";
/// The layout version this binary reads and writes.
pub const VERSION: u32 = 1;

const HEADER_LEN: usize = 96;
const SECTIONS: usize = 8;
const DIRECTORY_END: usize = HEADER_LEN + SECTIONS * 16;
/// Section alignment: a record never straddles a 128-byte block (the pair
/// of cache lines one miss brings in).
const ALIGN: u64 = 128;
const HEADER_CHECK: Range<usize> = 24..56;
const BODY_CHECK: Range<usize> = 56..88;
/// Larger meta sections are refused at open: reading them is the open's cost.
const MAX_META: u64 = 64 << 20;

/// Bytes per record.
pub const RECORD_LEN: usize = 128;
/// Ids up to this long live in their record.
const INLINE_ID: usize = 64;
/// The key table's capacity per keyed record: 4/3, a quarter empty.
const CAPACITY: (usize, usize) = (4, 3);
/// A lookup walks at most this many records from a key's place (a real
/// table stays under 40; a damaged one must not cost a scan).
const MAX_WALK: usize = 1024;
/// Slots read at once from a key's place: 87% of keys sit within three of
/// theirs at this capacity.
const TOUCH: usize = 3;
const EXTRA_KEY_LEN: usize = 40;
const ID_ENTRY_LEN: usize = 12;

/// The sections, in file order.
#[derive(Clone, Copy)]
enum Section {
    Meta,
    Records,
    ExtraKeys,
    ExtraDirectory,
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

/// A record's fields, without its key and id: names are indexes into the
/// meta tables (the store resolves them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    /// Heap offset (48 bits) of the id when it is longer than 64 bytes,
    /// then of the quarantine reason.
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

impl Fields {
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

    /// The line the record comes from.
    pub fn origin(&self) -> Origin {
        Origin {
            source: self.source,
            line: self.line,
        }
    }

    /// Bytes the record's text takes in the heap.
    fn heap_len(&self) -> usize {
        let long_id = if self.id_len as usize > INLINE_ID {
            self.id_len as usize
        } else {
            0
        };
        long_id + self.reason_len as usize
    }
}

/// One record as read: its fields and its 128 bytes (key, inline id).
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    bytes: &'a [u8; RECORD_LEN],
    fields: Fields,
}

impl std::ops::Deref for RawRecord<'_> {
    type Target = Fields;
    fn deref(&self) -> &Fields {
        &self.fields
    }
}

/// Byte ranges of a record.
mod at {
    use std::ops::Range;
    pub const KEY: Range<usize> = 0..32;
    pub const TEXT: Range<usize> = 32..38;
    pub const CHECK: Range<usize> = 38..40;
    pub const INLINE_ID: Range<usize> = 64..128;
}

/// Encodes a record: `key` (zeros for none), its fields, its id when inline.
fn encode(key: &KeyHash, f: &Fields, id: &[u8]) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[at::KEY].copy_from_slice(key);
    b[at::TEXT].copy_from_slice(&f.text.to_le_bytes()[..6]);
    b[40..42].copy_from_slice(&f.id_len.to_le_bytes());
    b[42..44].copy_from_slice(&f.reason_len.to_le_bytes());
    b[44] = f.kind;
    b[45] = f.product;
    b[46..48].copy_from_slice(&f.plan.to_le_bytes());
    b[48] = f.flags;
    b[49] = f.residency;
    b[50..52].copy_from_slice(&f.source.to_le_bytes());
    b[52..56].copy_from_slice(&f.line.to_le_bytes());
    b[56..64].copy_from_slice(&f.subprocessors.to_le_bytes());
    if id.len() <= INLINE_ID {
        b[at::INLINE_ID.start..at::INLINE_ID.start + id.len()].copy_from_slice(id);
    }
    let check = record_check(&b);
    b[at::CHECK].copy_from_slice(&check.to_le_bytes());
    b
}

/// The record, when its check matches its bytes.
fn decode(b: &[u8; RECORD_LEN]) -> Option<RawRecord<'_>> {
    if record_check(b).to_le_bytes() != b[at::CHECK] {
        return None;
    }
    let mut text = [0u8; 8];
    text[..6].copy_from_slice(&b[at::TEXT]);
    Some(RawRecord {
        bytes: b,
        fields: Fields {
            text: u64::from_le_bytes(text),
            id_len: u16::from_le_bytes([b[40], b[41]]),
            reason_len: u16::from_le_bytes([b[42], b[43]]),
            kind: b[44],
            product: b[45],
            plan: u16::from_le_bytes([b[46], b[47]]),
            flags: b[48],
            residency: b[49],
            source: u16::from_le_bytes([b[50], b[51]]),
            line: le_u32(&b[52..56]),
            subprocessors: le_u64(&b[56..64]),
        },
    })
}

/// A record's check: 16 bits of the xxh3 of its other 126 bytes.
fn record_check(b: &[u8; RECORD_LEN]) -> u16 {
    let mut unchecked = *b;
    unchecked[at::CHECK].fill(0);
    xxhash_rust::xxh3::xxh3_64(&unchecked) as u16
}

/// What an extra key entry holds of its record's id: the low half of the id hash.
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
    /// Of which those with an API key hash, in the key table.
    pub keyed: u32,
    /// The key table's capacity: a key's place is `hash × capacity / 2^64`.
    pub capacity: u32,
    /// The key table's length in records (at least the capacity; the last
    /// records may sit past it).
    pub table: u32,
    /// Of which accounts.
    pub valid: u32,
    /// Of which quarantined.
    pub quarantined: u32,
    /// Of which deleted (change sets only).
    pub deleted: u32,
    /// Extra key entries.
    pub extra_keys: u32,
    /// Id table entries.
    pub ids: u32,
    /// Width of the extra key directory's prefix.
    pub extra_bits: u8,
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
        // Huge pages where the page cache has them (a file written in large
        // chunks, or read in 2 MiB pieces on a fault with this advice): a
        // lookup then costs one miss, not a miss and a page walk.
        let _ = map.advise(memmap2::Advice::HugePage);
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

    fn record_bytes(&self, index: usize) -> Option<&[u8; RECORD_LEN]> {
        let start = index.checked_mul(RECORD_LEN)?;
        self.section(Section::Records)
            .get(start..start.checked_add(RECORD_LEN)?)?
            .try_into()
            .ok()
    }

    /// Record `index`, when it lies in the records section and its check
    /// matches.
    pub fn record(&self, index: u32) -> Option<RawRecord<'_>> {
        decode(self.record_bytes(index as usize)?)
    }

    fn heap_text(&self, r: &RawRecord<'_>, skip: usize, len: usize) -> Option<&str> {
        let start = usize::try_from(r.text).ok()?.checked_add(skip)?;
        let bytes = self
            .section(Section::Heap)
            .get(start..start.checked_add(len)?)?;
        std::str::from_utf8(bytes).ok()
    }

    /// The id of `r` (empty for a quarantined line without a usable one);
    /// `None` when it cannot be read.
    pub fn id<'a>(&'a self, r: &RawRecord<'a>) -> Option<&'a str> {
        let len = r.id_len as usize;
        if len <= INLINE_ID {
            std::str::from_utf8(&r.bytes[at::INLINE_ID.start..at::INLINE_ID.start + len]).ok()
        } else {
            self.heap_text(r, 0, len)
        }
    }

    /// The quarantine reason of `r`.
    pub fn reason<'a>(&'a self, r: &RawRecord<'a>) -> Option<&'a str> {
        let skip = if r.id_len as usize > INLINE_ID {
            r.id_len as usize
        } else {
            0
        };
        self.heap_text(r, skip, r.reason_len as usize)
    }

    /// Entries `start..end` of the bucket of `hash` in a directory, when sane.
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

    /// The record holding key hash `key`, or [`DAMAGED_RECORD`] when an
    /// extra key's entry does not name the record it was written for.
    pub fn find_key(&self, key: &KeyHash) -> Option<u32> {
        if let Some(index) = self.find_own_key(key) {
            return Some(index);
        }
        let m = &self.meta;
        if m.extra_keys == 0 {
            return None;
        }
        let prefix = key_prefix(key);
        let bucket = self.bucket(Section::ExtraDirectory, m.extra_bits, prefix, m.extra_keys)?;
        let entries = self
            .section(Section::ExtraKeys)
            .get(bucket.start * EXTRA_KEY_LEN..bucket.end * EXTRA_KEY_LEN)?;
        let entry = entries
            .chunks_exact(EXTRA_KEY_LEN)
            .find(|e| e[..32] == key[..])?;
        let record = le_u32(&entry[32..36]);
        let matches = self
            .record(record)
            .and_then(|r| self.id(&r).map(|id| id_check(self.id_hash(id))))
            == Some(le_u32(&entry[36..40]));
        Some(if matches { record } else { DAMAGED_RECORD })
    }

    /// Asks the processor for the lines a lookup of `key` reads first,
    /// without waiting for them: called as soon as a key is hashed, the
    /// memory miss of a large table overlaps the work done before the
    /// lookup. A hint only: it changes no result.
    pub fn prefetch_key(&self, key: &KeyHash) {
        let start = place(key, self.meta.capacity) * RECORD_LEN;
        let records = self.section(Section::Records);
        let end = records.len().min(start.saturating_add(TOUCH * RECORD_LEN));
        for line in (start..end).step_by(CACHE_LINE) {
            prefetch(&records[line]);
        }
    }

    /// The record of the key table whose own key is `key`.
    fn find_own_key(&self, key: &KeyHash) -> Option<u32> {
        let m = &self.meta;
        let start = place(key, m.capacity);
        let end = (m.table as usize).min(start.saturating_add(MAX_WALK));
        // Read the first lines of the key's place and the next slots at
        // once: the walk then finds them arriving together instead of
        // waiting for one after the other.
        let records = self.section(Section::Records);
        for line in (start * 2..(start + TOUCH).min(end) * 2).step_by(1) {
            std::hint::black_box(records.get(line * (RECORD_LEN / 2)).copied());
        }
        for index in start..end {
            let own = &self.record_bytes(index)?[at::KEY];
            match own.cmp(&key[..]) {
                std::cmp::Ordering::Equal => return Some(index as u32),
                std::cmp::Ordering::Less if own != NO_KEY => {}
                // A greater key or an empty slot: it would have been here.
                _ => return None,
            }
        }
        None
    }

    /// The hash the id table is sorted by.
    pub fn id_hash(&self, id: &str) -> u64 {
        id_hash(id.as_bytes(), self.meta.id_seed)
    }

    /// The record with id `id`.
    pub fn find_id(&self, id: &str) -> Option<u32> {
        let hash = self.id_hash(id);
        let range = self.bucket(Section::IdDirectory, self.meta.id_bits, hash, self.meta.ids)?;
        let entries = self
            .section(Section::Ids)
            .get(range.start * ID_ENTRY_LEN..range.end * ID_ENTRY_LEN)?;
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

    /// Every key hash with its record: the records' own keys, then the
    /// extra keys.
    pub fn keys(&self) -> impl Iterator<Item = (KeyHash, u32)> + '_ {
        let own = (0..self.meta.table).filter_map(|i| {
            let b = self.record_bytes(i as usize)?;
            let key: KeyHash = b[at::KEY].try_into().ok()?;
            (key != NO_KEY).then_some((key, i))
        });
        own.chain(self.extra_entries().map(|(key, record, _)| (key, record)))
    }

    fn extra_entries(&self) -> impl Iterator<Item = (KeyHash, u32, u32)> + '_ {
        self.section(Section::ExtraKeys)
            .chunks_exact(EXTRA_KEY_LEN)
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

    /// Slots in the records section: the key table, then the records
    /// without a key.
    fn record_count(&self) -> usize {
        self.section(Section::Records).len() / RECORD_LEN
    }

    /// The index of every record (the key table's empty slots left out).
    pub fn record_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        let table = self.meta.table as usize;
        (0..self.record_count() as u32).filter(move |&i| {
            i as usize >= table
                || self
                    .record_bytes(i as usize)
                    .is_some_and(|b| b[at::KEY] != NO_KEY)
        })
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
        let (mut valid, mut quarantined, mut deleted, mut keyed) = (0u32, 0u32, 0u32, 0u32);
        let mut previous: Option<&[u8]> = None;
        // The last empty slot of the key table: no key between its place
        // and its record may pass one.
        let mut last_empty: Option<usize> = None;
        for i in 0..self.record_count() {
            let bytes = self.record_bytes(i).expect("within the records section");
            let key = &bytes[at::KEY];
            if i < m.table as usize && key == NO_KEY {
                if bytes.iter().any(|&b| b != 0) {
                    return damaged(format!("slot {i}: empty but not zero"));
                }
                last_empty = Some(i);
                continue;
            }
            let Some(r) = decode(bytes) else {
                return damaged(format!("record {i}: its check does not match"));
            };
            if let Err(what) = self.check_record(&r) {
                return damaged(format!("record {i}: {what}"));
            }
            if i < m.table as usize {
                let home = place(key.try_into().expect("32 bytes"), m.capacity);
                if previous.is_some_and(|p| p >= key)
                    || home > i
                    || last_empty.is_some_and(|e| e >= home)
                {
                    return damaged(format!("record {i}: not at its key's place"));
                }
                previous = Some(key);
                keyed += 1;
            } else if key != NO_KEY {
                return damaged(format!("record {i}: a key past the key table"));
            }
            match r.kind() {
                Some(Kind::Account) => valid += 1,
                Some(Kind::Quarantined) => quarantined += 1,
                _ => deleted += 1,
            }
        }
        if (valid, quarantined, deleted, keyed) != (m.valid, m.quarantined, m.deleted, m.keyed) {
            return damaged("record counts".into());
        }
        let mut listed = vec![false; self.record_count()];
        for i in self.quarantined() {
            let first = match listed.get_mut(i as usize) {
                Some(seen) if !*seen => {
                    *seen = true;
                    true
                }
                _ => false,
            };
            if !first || self.record(i).and_then(|r| r.kind()) != Some(Kind::Quarantined) {
                return damaged("quarantine list".into());
            }
        }
        let mut previous: Option<KeyHash> = None;
        for (key, record, check) in self.extra_entries() {
            let id = self.record(record).and_then(|r| self.id(&r));
            let own = self.find_own_key(&key);
            if previous.is_some_and(|p| p >= key)
                || own.is_some()
                || id.is_none_or(|id| id_check(self.id_hash(id)) != check)
            {
                return damaged(
                    "extra keys: not sorted, or an entry does not match its record".into(),
                );
            }
            previous = Some(key);
        }
        if !is_directory_of(
            self.section(Section::ExtraDirectory),
            m.extra_bits,
            self.extra_entries().map(|(key, _, _)| key_prefix(&key)),
        ) {
            return damaged("extra key directory: does not match the extra keys".into());
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
    fn check_record(&self, r: &RawRecord<'_>) -> Result<(), &'static str> {
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
    let problem = if m.extra_bits > 31 || m.id_bits > 31 {
        Some("directory widths over 31 bits")
    } else if m.keyed > m.records
        || m.capacity > m.table
        || (m.capacity == 0) != (m.keyed == 0)
        || !fits(
            Section::Records,
            u64::from(m.table) + u64::from(m.records - m.keyed),
            RECORD_LEN as u64,
        )
    {
        Some("records")
    } else if !fits(
        Section::ExtraKeys,
        m.extra_keys.into(),
        EXTRA_KEY_LEN as u64,
    ) {
        Some("extra keys")
    } else if !fits(Section::ExtraDirectory, dir_len(m.extra_bits), 4) {
        Some("extra key directory")
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

/// The bytes one memory access brings into cache on the machines this runs on.
const CACHE_LINE: usize = 64;

/// Starts bringing the cache line holding `byte` in, and returns at once.
#[cfg(target_arch = "x86_64")]
fn prefetch(byte: &u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch is a hint that reads nothing the program sees and
    // never faults, and `byte` is a live reference in any case.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(byte).cast()) }
}

/// Elsewhere the lookup's own reads bring the lines in.
#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_byte: &u8) {}

/// The prefix a key's bucket is chosen by.
fn key_prefix(key: &KeyHash) -> u64 {
    u64::from_be_bytes(key[..8].try_into().expect("8 bytes"))
}

/// The key of an empty slot (no SHA-256 output is all zeros in practice; the
/// builder keeps such a key out of the key table).
const NO_KEY: KeyHash = [0u8; 32];

/// A key's place in a key table of `capacity`: its hash scaled to it.
fn place(key: &KeyHash, capacity: u32) -> usize {
    ((u128::from(key_prefix(key)) * u128::from(capacity)) >> 64) as usize
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

/// A line to add to an image.
#[derive(Clone, Debug)]
pub enum Line {
    /// A fully understood account.
    Account(NewAccount),
    /// A line that is quarantined whatever else the file holds.
    Quarantined(Quarantined),
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
    /// Records in the order added; `text` is an offset into `heap`.
    records: Vec<Fields>,
    /// Each record's id followed by its reason.
    heap: Vec<u8>,
    /// Every indexed key hash with its record, in the order added: a
    /// record's first is its own key, the others are extra keys.
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

fn record_id<'a>(records: &[Fields], heap: &'a [u8], index: u32) -> &'a [u8] {
    let r = &records[index as usize];
    let start = r.text as usize;
    &heap[start..start + r.id_len as usize]
}

fn record_reason<'a>(records: &[Fields], heap: &'a [u8], index: u32) -> &'a [u8] {
    let r = &records[index as usize];
    let start = r.text as usize + r.id_len as usize;
    &heap[start..start + r.reason_len as usize]
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

    /// Where record `index` is.
    pub fn origin(&self, index: u32) -> Origin {
        self.records[index as usize].origin()
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
        // The all-zero hash is no key's (it marks an empty slot of the key
        // table): listed, it could never be matched anyway.
        let owned: Vec<KeyHash>;
        let keys = if keys.contains(&NO_KEY) {
            owned = keys.iter().filter(|k| **k != NO_KEY).copied().collect();
            &owned[..]
        } else {
            keys
        };
        let origin = line.origin();
        let id_owner = line.id().and_then(|id| self.find_id(id));
        let mut key_owners: Vec<u32> = keys.iter().filter_map(|k| self.find_key(k)).collect();
        key_owners.sort_unstable();
        key_owners.dedup();

        let mut conflict = None;
        if let Some(owner) = id_owner {
            self.conflict(
                owner,
                origin,
                "account id is also defined on",
                &mut conflict,
            );
        }
        for &owner in &key_owners {
            self.conflict(
                owner,
                origin,
                "an API key hash is also listed on",
                &mut conflict,
            );
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

    /// A line at `origin` conflicts with record `owner` (`what` they share):
    /// the owner is demoted, naming the line, and the line's reason, unless
    /// it has one already, names the owner.
    fn conflict(&mut self, owner: u32, origin: Origin, what: &str, reason: &mut Option<String>) {
        let theirs = self.origin(owner);
        if reason.is_none() {
            *reason = Some(format!("{what} {}", self.place(theirs, origin.source)));
        }
        let demotion = format!("{what} {}", self.place(origin, theirs.source));
        self.demote(owner, &demotion);
    }

    /// The record of `line`; quarantined for `conflict` when it has one.
    fn record_of(&mut self, line: Line, conflict: Option<&str>) -> Fields {
        let origin = line.origin();
        let mut r = Fields {
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
    fn count_use(&mut self, r: &Fields, delta: i64) {
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

    /// Every key added so far, with its record.
    pub fn key_entries(&self) -> &[(KeyHash, u32)] {
        &self.keys
    }

    /// Writes the image to `out`: `revision` names its content, and
    /// `changes` say which change files it includes.
    pub fn write(
        mut self,
        revision: &str,
        changes: (u64, Vec<IncludedChange>),
        out: &mut (impl Write + Seek),
    ) -> io::Result<()> {
        let n = self.records.len();
        if n >= DAMAGED_RECORD as usize || self.heap.len() as u64 >= 1 << 48 {
            return Err(io::Error::other(
                "more accounts than one compiled snapshot holds (4 billion records, 256 TiB of ids)",
            ));
        }
        // Each record's own key is the first of its keys added; the others
        // are extra keys.
        let mut own_key = vec![u32::MAX; n];
        let mut extra_positions = Vec::new();
        for (position, (_, record)) in self.keys.iter().enumerate() {
            match &mut own_key[*record as usize] {
                slot @ &mut u32::MAX => *slot = position as u32,
                _ => extra_positions.push(position as u32),
            }
        }
        // Keyed records sorted by their key, each at its key's place or
        // the first free slot after it; then the others in file order.
        let mut sorted: Vec<u32> = (0..n as u32)
            .filter(|&i| own_key[i as usize] != u32::MAX)
            .collect();
        let keyed = sorted.len();
        sorted.sort_unstable_by_key(|&i| self.keys[own_key[i as usize] as usize].0);
        let capacity = (keyed * CAPACITY.0).div_ceil(CAPACITY.1);
        if capacity >= DAMAGED_RECORD as usize {
            return Err(io::Error::other(
                "too many keyed accounts for one key table",
            ));
        }
        let mut new_index = vec![0u32; n];
        let mut free = 0usize;
        for &old in &sorted {
            let key = &self.keys[own_key[old as usize] as usize].0;
            let at = place(key, capacity as u32).max(free);
            new_index[old as usize] = at as u32;
            free = at + 1;
        }
        let table = capacity.max(free);
        let mut slots: Vec<u32> = vec![u32::MAX; table];
        for &old in &sorted {
            slots[new_index[old as usize] as usize] = old;
        }
        drop(sorted);
        let mut order = slots;
        for old in (0..n as u32).filter(|&i| own_key[i as usize] == u32::MAX) {
            new_index[old as usize] = order.len() as u32;
            order.push(old);
        }
        // The id table: the first record of each id, as the lookups found it.
        let mut ids: Vec<(u64, u32)> = self
            .by_id
            .iter()
            .map(|&i| (self.id_hashes[i as usize], new_index[i as usize]))
            .collect();
        self.by_key = HashTable::new();
        self.by_id = HashTable::new();
        ids.sort_unstable();
        let mut extra: Vec<(KeyHash, u32, u32)> = extra_positions
            .iter()
            .map(|&p| {
                let (key, record) = self.keys[p as usize];
                (
                    key,
                    new_index[record as usize],
                    id_check(self.id_hashes[record as usize]),
                )
            })
            .collect();
        extra.sort_unstable_by_key(|e| e.0);
        let quarantine: Vec<u32> = (0..n as u32)
            .filter(|&i| self.records[i as usize].kind == Kind::Quarantined.code())
            .map(|i| new_index[i as usize])
            .collect();

        let (mut valid, mut deleted) = (0u32, 0u32);
        for r in &self.records {
            match Kind::from_code(r.kind) {
                Some(Kind::Account) => valid += 1,
                Some(Kind::Deleted) => deleted += 1,
                _ => {}
            }
        }
        let heap_len: u64 = self.records.iter().map(|r| r.heap_len() as u64).sum();
        let (extra_bits, id_bits) = (radix_bits(extra.len()), radix_bits(ids.len()));
        let meta = Meta {
            revision: revision.into(),
            records: n as u32,
            keyed: keyed as u32,
            capacity: capacity as u32,
            table: table as u32,
            valid,
            quarantined: quarantine.len() as u32,
            deleted,
            extra_keys: extra.len() as u32,
            ids: ids.len() as u32,
            extra_bits,
            id_bits,
            id_seed: self.id_seed,
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
            (order.len() * RECORD_LEN) as u64,
            (extra.len() * EXTRA_KEY_LEN) as u64,
            directory_len(extra_bits),
            (ids.len() * ID_ENTRY_LEN) as u64,
            directory_len(id_bits),
            heap_len,
            quarantine.len() as u64 * 4,
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
        let mut heap = Vec::with_capacity(heap_len as usize);
        for &old in &order {
            if old == u32::MAX {
                body.write_all(&[0u8; RECORD_LEN])?;
                continue;
            }
            let mut fields = self.records[old as usize];
            let id = record_id(&self.records, &self.heap, old);
            let reason = record_reason(&self.records, &self.heap, old);
            fields.text = heap.len() as u64;
            if id.len() > INLINE_ID {
                heap.extend_from_slice(id);
            }
            heap.extend_from_slice(reason);
            let key = match own_key[old as usize] {
                u32::MAX => &NO_KEY,
                position => &self.keys[position as usize].0,
            };
            body.write_all(&encode(key, &fields, id))?;
        }
        body.pad_to(offsets[2])?;
        for (key, record, check) in &extra {
            body.write_all(key)?;
            body.write_all(&record.to_le_bytes())?;
            body.write_all(&check.to_le_bytes())?;
        }
        body.pad_to(offsets[3])?;
        body.write_directory(extra_bits, extra.iter().map(|e| key_prefix(&e.0)))?;
        body.pad_to(offsets[4])?;
        for (hash, record) in &ids {
            body.write_all(&hash.to_le_bytes())?;
            body.write_all(&record.to_le_bytes())?;
        }
        body.pad_to(offsets[5])?;
        body.write_directory(id_bits, ids.iter().map(|e| e.0))?;
        body.pad_to(offsets[6])?;
        body.write_all(&heap)?;
        body.pad_to(offsets[7])?;
        for index in &quarantine {
            body.write_all(&index.to_le_bytes())?;
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
                Line::Quarantined(Quarantined {
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
            let mut keys = vec![hash_api_key(format!("key-{i}").as_bytes())];
            if i % 7 == 3 {
                keys.push(hash_api_key(format!("extra-{i}").as_bytes()));
            }
            b.add(line, &keys);
        }
        let mut out = io::Cursor::new(Vec::new());
        b.write("abcdef0", (0, Vec::new()), &mut out)
            .expect("write");
        out.into_inner()
    }

    /// Prefetches and looks up every account of an `n`-account image by key
    /// and by id, and decodes every record: whatever the bytes, nothing may
    /// panic.
    fn read_everything(image: &ConsentImage, n: u32) {
        // The prefetch reads from a key's place to three slots on: at the
        // table's two ends too.
        image.prefetch_key(&[0u8; 32]);
        image.prefetch_key(&[0xffu8; 32]);
        for i in 0..n + 5 {
            let key = hash_api_key(format!("key-{i}").as_bytes());
            image.prefetch_key(&key);
            if let Some(r) = image.find_key(&key) {
                let _ = image.record(r).map(|r| (image.id(&r), image.reason(&r)));
            }
            let _ = image.find_id(&format!("acct-{i}"));
        }
        for i in image.record_indexes().chain([u32::MAX - 1, DAMAGED_RECORD]) {
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
        for section in [Section::ExtraDirectory, Section::IdDirectory] {
            let mut damaged = bytes.clone();
            for at in image.sections[section as usize].clone().step_by(4) {
                damaged[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
            }
            let image = ConsentImage::from_vec(damaged).expect("opens");
            match section {
                Section::ExtraDirectory => {
                    assert!(image.find_key(&hash_api_key(b"extra-3")).is_none());
                    assert!(image.find_key(&hash_api_key(b"key-3")).is_some());
                }
                _ => assert!(image.find_id("acct-1").is_none()),
            }
            read_everything(&image, 100);
        }
    }

    #[test]
    fn an_extra_key_entry_naming_another_record_leads_to_no_account() {
        let bytes = image_bytes(100);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let key = hash_api_key(b"extra-3");
        let owner = image.find_key(&key).expect("an extra key");
        assert_eq!(image.find_key(&hash_api_key(b"key-3")), Some(owner));
        let extra = image.sections[Section::ExtraKeys as usize].clone();
        let at = extra.start
            + bytes[extra]
                .chunks_exact(EXTRA_KEY_LEN)
                .position(|e| e[..32] == key[..])
                .expect("entry")
                * EXTRA_KEY_LEN;
        let mut damaged = bytes;
        let other = if owner == 4 { 5u32 } else { 4 };
        damaged[at + 32..at + 36].copy_from_slice(&other.to_le_bytes());
        let image = ConsentImage::from_vec(damaged).expect("opens");
        assert_eq!(image.find_key(&key), Some(DAMAGED_RECORD));
        assert!(image.record(DAMAGED_RECORD).is_none());
    }

    #[test]
    fn long_ids_live_in_the_heap_and_keyless_accounts_are_found_by_id() {
        let long = "acct-".to_string() + &"x".repeat(100);
        let mut b = ImageBuilder::new(2, &[], &[], source(), 1);
        for (i, (id, keys)) in [
            (long.as_str(), vec![hash_api_key(b"long")]),
            ("no-key", vec![]),
        ]
        .into_iter()
        .enumerate()
        {
            b.add(
                Line::Account(NewAccount {
                    id: id.into(),
                    product: Product::Chat,
                    plan: "pro".into(),
                    consents: Consents::default(),
                    origin: Origin {
                        source: 0,
                        line: i as u32 + 1,
                    },
                }),
                &keys,
            );
        }
        let image = b.into_image("r", (0, Vec::new()));
        image.verify().expect("verifies");
        let r = image
            .record(image.find_key(&hash_api_key(b"long")).expect("found"))
            .expect("record");
        assert_eq!(image.id(&r), Some(long.as_str()));
        assert_eq!(image.find_id(&long), image.find_key(&hash_api_key(b"long")));
        let r = image
            .record(image.find_id("no-key").expect("found"))
            .expect("record");
        assert_eq!(image.id(&r), Some("no-key"));
        assert_eq!(image.meta().keyed, 1);
    }

    #[test]
    fn a_record_whose_bytes_changed_does_not_decode() {
        let bytes = image_bytes(10);
        let image = ConsentImage::from_vec(bytes.clone()).expect("opens");
        let records = image.sections[Section::Records as usize].start;
        let index = image.find_key(&hash_api_key(b"key-2")).expect("found");
        let other = image.find_key(&hash_api_key(b"key-1")).expect("found");
        let flags = records + index as usize * RECORD_LEN + 48;
        let mut damaged = bytes;
        damaged[flags] ^= flag::TRAINING_OPT_OUT;
        let image = ConsentImage::from_vec(damaged).expect("opens");
        assert!(
            image.record(index).is_none(),
            "an opt-out flipped unnoticed"
        );
        assert!(image.record(other).is_some());
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
