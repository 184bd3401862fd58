//! The consent snapshot as requests see it: one record per account, found by
//! API-key hash or id.
//!
//! The records live in a compiled image ([`super::consent_image`]): a file
//! mapped from disk (shared by every process that maps it, opened at a cost
//! that does not grow with it) or, for a JSON Lines export, the same layout
//! built in memory. Change files form a second, small image, the *overlay*,
//! consulted before the base: newest wins per account.
//!
//! # Quarantine (spec §8)
//!
//! An account line the gateway cannot fully understand is not dropped (its
//! key would then be unknown, or worse, an older line would be believed) and
//! does not hold the whole file back: it is *quarantined*. An image holds,
//! beside the valid accounts, quarantined records (the line's account id
//! when it has a usable one, its file and line, the reason); key and id
//! lookups land on either, and every request of a quarantined record is
//! answered `403 consent_record_invalid` without forwarding anything.
//!
//! Two lines that share a key hash or an id quarantine each other (see
//! [`super::consent_image::ImageBuilder`]). A change that shares a key with
//! a base account it does not replace quarantines both: the overlay then
//! holds a record that *demotes* the base's.
//!
//! Names that depend on the rules and pools (plans, subprocessors, regions)
//! are resolved when the store is built, once per name: an account whose
//! name no longer resolves is quarantined when it is looked up, with the
//! reason a fresh compile would give, without any record being touched.
//!
//! Lookups through the overlay: a key or id it holds answers; otherwise the
//! base answers, unless the overlay holds the base record's id: then that
//! record is superseded (a valid replacement without this key, or a
//! deletion: the key is no longer known; a quarantined replacement: its
//! quarantine).

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::consent_image::{
    flag, ConsentImage, Kind, Line, Meta, NewAccount, RawRecord, SourceFile, NO_REGION,
};
use super::snapshot::PlanNames;
use crate::policy::{Consents, PlanClass, Product, RegionId, SubprocessorSet, MAX_SUBPROCESSORS};

pub use super::consent_image::Origin;

/// The SHA-256 of an API key: the only form in which keys are stored.
pub type KeyHash = [u8; 32];

/// Hashes an API key as the accounts file stores it.
pub fn hash_api_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// One account, as the decision needs it, read from the snapshot.
#[derive(Clone, Copy, Debug)]
pub struct Account<'s> {
    /// Stable account id, stamped as `x-privacy-account`.
    pub id: &'s str,
    /// The product the account belongs to.
    pub product: Product,
    /// The plan's name, as stamped in `x-privacy-plan` (one per plan, shared).
    pub plan: &'s Arc<str>,
    /// The plan's class, as the policy reasons on it.
    pub plan_class: PlanClass,
    /// Consents and rights exercised.
    pub consents: Consents,
    /// The line that decided it (see [`AccountStore::source`]).
    pub origin: Origin,
}

/// An account line that is JSON but not fully understood, or that conflicts
/// with another line: its requests are answered 403, nothing is forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The line's account id, when it names a usable one.
    pub id: Option<Box<str>>,
    /// Where the line is (see [`AccountStore::source`]).
    pub origin: Origin,
    /// What is wrong, for `check`, the log, the audit line and `explain`;
    /// never holds a key or a value copied from the line beyond names.
    pub reason: Box<str>,
}

/// What a key hash or an id leads to.
#[derive(Clone, Debug)]
pub enum Record<'s> {
    /// An account the decision can use.
    Account(Account<'s>),
    /// A quarantined line: answer 403, forward nothing.
    Quarantined(Quarantined),
}

/// The reason given for a record the image cannot decode: never guessed at.
const DAMAGED: &str =
    "the compiled consent snapshot is damaged at this record (`privacy-gateway check` verifies it)";

/// The names an image's records can refer to, as the rules and pools
/// running now define them.
#[derive(Clone, Copy)]
pub struct NameContext<'a> {
    /// Plan names of each product.
    pub plans: &'a PlanNames,
    /// Subprocessor names, by the index the policy knows them by.
    pub subprocessors: &'a [String],
    /// Region names, likewise.
    pub regions: &'a [String],
}

/// A plan of the image, resolved.
#[derive(Debug)]
struct PlanSlot {
    name: Arc<str>,
    product: Option<Product>,
    class: Result<PlanClass, Box<str>>,
}

/// One image's name tables resolved against a [`NameContext`]: cost
/// proportional to the names, not the accounts.
#[derive(Debug)]
struct Names {
    plans: Vec<PlanSlot>,
    /// Image subprocessor bit -> the running index.
    subprocessor_index: [u8; MAX_SUBPROCESSORS],
    /// Whether every image bit is the running index of the same number.
    subprocessors_unchanged: bool,
    /// Image bits whose name no running pool uses.
    subprocessors_gone: u64,
    subprocessor_reasons: Vec<Option<Box<str>>>,
    regions: Vec<Result<RegionId, Box<str>>>,
    /// Valid accounts that name something gone (an upper bound: one naming
    /// two gone names counts twice).
    quarantined: usize,
    /// One sentence per name gone, for the log.
    notes: Vec<String>,
}

impl Names {
    fn resolve(meta: &Meta, ctx: NameContext<'_>) -> Names {
        let mut quarantined = 0u64;
        let mut notes = Vec::new();
        let plans = meta
            .plans
            .iter()
            .map(|p| {
                let product = p.product.parse::<Product>().ok();
                let class = product
                    .and_then(|product| ctx.plans.get(product, &p.name))
                    .ok_or_else(|| super::account_lines::unknown_plan(&p.name, &p.product));
                match &class {
                    Err(reason) if p.accounts > 0 => {
                        quarantined += p.accounts;
                        notes.push(format!("{} account(s) quarantined: {reason}", p.accounts));
                    }
                    Ok(c) if *c != PlanClass::ChatTeam && p.opted_in > 0 => {
                        quarantined += p.opted_in;
                        notes.push(format!(
                            "{} account(s) of plan `{}` quarantined: {}",
                            p.opted_in,
                            p.name,
                            super::account_lines::OPT_IN_TEAM_ONLY
                        ));
                    }
                    _ => {}
                }
                PlanSlot {
                    name: p.name.as_str().into(),
                    product,
                    class: class.map_err(Into::into),
                }
            })
            .collect();
        let mut subprocessor_index = [0u8; MAX_SUBPROCESSORS];
        let mut subprocessors_gone = 0u64;
        let mut subprocessor_reasons = Vec::new();
        let mut subprocessors_unchanged = true;
        for (bit, s) in meta.subprocessors.iter().enumerate() {
            match ctx.subprocessors.iter().position(|n| *n == s.name) {
                Some(i) => {
                    subprocessor_index[bit] = i as u8;
                    subprocessors_unchanged &= i == bit;
                    subprocessor_reasons.push(None);
                }
                None => {
                    subprocessors_gone |= 1 << bit;
                    subprocessors_unchanged = false;
                    let reason =
                        super::account_lines::unknown_subprocessor(&s.name, ctx.subprocessors);
                    if s.accounts > 0 {
                        quarantined += s.accounts;
                        notes.push(format!("{} account(s) quarantined: {reason}", s.accounts));
                    }
                    subprocessor_reasons.push(Some(reason.into()));
                }
            }
        }
        let regions = meta
            .regions
            .iter()
            .map(|r| match ctx.regions.iter().position(|n| *n == r.name) {
                Some(i) => Ok(RegionId(i as u8)),
                None => {
                    let reason = super::account_lines::unknown_region(&r.name, ctx.regions);
                    if r.accounts > 0 {
                        quarantined += r.accounts;
                        notes.push(format!("{} account(s) quarantined: {reason}", r.accounts));
                    }
                    Err(reason.into())
                }
            })
            .collect();
        Names {
            plans,
            subprocessor_index,
            subprocessors_unchanged,
            subprocessors_gone,
            subprocessor_reasons,
            regions,
            quarantined: usize::try_from(quarantined).unwrap_or(usize::MAX),
            notes,
        }
    }

    fn subprocessors(&self, bits: u64) -> Result<SubprocessorSet, &str> {
        if bits & self.subprocessors_gone != 0 {
            let bit = (bits & self.subprocessors_gone).trailing_zeros() as usize;
            return Err(self.subprocessor_reasons[bit].as_deref().unwrap_or(DAMAGED));
        }
        let known = self.subprocessor_reasons.len();
        if known < 64 && bits >> known != 0 {
            return Err(DAMAGED);
        }
        let mut set = SubprocessorSet::EMPTY;
        let mut rest = bits;
        while rest != 0 {
            let bit = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            set.insert(if self.subprocessors_unchanged {
                bit
            } else {
                self.subprocessor_index[bit] as usize
            });
        }
        Ok(set)
    }

    fn region(&self, index: u8) -> Result<Option<RegionId>, &str> {
        if index == NO_REGION {
            return Ok(None);
        }
        match self.regions.get(index as usize) {
            Some(Ok(region)) => Ok(Some(*region)),
            Some(Err(reason)) => Err(reason),
            None => Err(DAMAGED),
        }
    }
}

/// What one record of one image is.
enum Decoded<'s> {
    Account(Account<'s>),
    Quarantined(Quarantined),
    Deleted,
}

/// An image with its names resolved.
#[derive(Debug)]
struct Layer {
    image: ConsentImage,
    names: Names,
}

impl Layer {
    fn new(image: ConsentImage, ctx: NameContext<'_>) -> Layer {
        let names = Names::resolve(image.meta(), ctx);
        Layer { image, names }
    }

    fn id_of<'a>(&'a self, r: &RawRecord<'a>) -> Option<&'a str> {
        self.image.id(r).filter(|id| !id.is_empty())
    }

    /// Record `r` as a quarantined line, for `reason`.
    fn quarantine(&self, r: &RawRecord<'_>, reason: &str) -> Quarantined {
        Quarantined {
            id: self.id_of(r).map(Into::into),
            origin: r.origin(),
            reason: reason.into(),
        }
    }

    fn decode(&self, index: u32) -> Decoded<'_> {
        let Some(r) = self.image.record(index) else {
            return Decoded::Quarantined(Quarantined {
                id: None,
                origin: Origin { source: 0, line: 0 },
                reason: DAMAGED.into(),
            });
        };
        let origin = r.origin();
        let quarantined = |reason: &str| Decoded::Quarantined(self.quarantine(&r, reason));
        match r.kind() {
            Some(Kind::Deleted) => Decoded::Deleted,
            Some(Kind::Quarantined) => quarantined(self.image.reason(&r).unwrap_or(DAMAGED)),
            Some(Kind::Account) => match self.account(&r, origin) {
                Ok(account) => Decoded::Account(account),
                Err(reason) => quarantined(reason),
            },
            None => quarantined(DAMAGED),
        }
    }

    /// Record `index` as a line to build a new image from: deletions and
    /// demotions of the base left out, a record quarantined only for a
    /// conflict given back whole (the new image judges conflicts afresh),
    /// names as the running tables have them.
    fn rebuild_line(&self, index: u32) -> Option<Line> {
        let r = self.image.record(index)?;
        let origin = r.origin();
        let quarantined = |reason: &str| Line::Quarantined(self.quarantine(&r, reason));
        match r.kind() {
            None => Some(quarantined(DAMAGED)),
            Some(Kind::Deleted) => None,
            Some(Kind::Quarantined) if r.flags & flag::DEMOTES_BASE != 0 => None,
            Some(Kind::Quarantined) if r.flags & flag::CONFLICT == 0 => {
                Some(quarantined(self.image.reason(&r).unwrap_or(DAMAGED)))
            }
            Some(Kind::Account | Kind::Quarantined) => Some(match self.account(&r, origin) {
                Ok(a) => Line::Account(NewAccount {
                    id: a.id.into(),
                    product: a.product,
                    plan: (**a.plan).into(),
                    consents: a.consents,
                    origin,
                }),
                Err(reason) => quarantined(reason),
            }),
        }
    }

    /// Calls `f` with every record to rebuild (see [`Layer::rebuild_line`])
    /// that `keep` keeps, with its keys, in file order (records are in key
    /// order; conflicts are judged in the order of the lines).
    fn rebuild(&self, keep: impl Fn(u32) -> bool, f: &mut impl FnMut(Line, &[KeyHash])) {
        let mut keys: Vec<(u32, KeyHash)> = self.image.keys().map(|(k, i)| (i, k)).collect();
        keys.sort_unstable();
        let mut order: Vec<(u16, u32, u32)> = self
            .image
            .record_indexes()
            .filter(|&i| keep(i))
            .map(|i| {
                let origin = self
                    .image
                    .record(i)
                    .map_or((u16::MAX, u32::MAX), |r| (r.source, r.line));
                (origin.0, origin.1, i)
            })
            .collect();
        order.sort_unstable();
        let mut own = Vec::new();
        for (_, _, index) in order {
            own.clear();
            let from = keys.partition_point(|(i, _)| *i < index);
            own.extend(
                keys[from..]
                    .iter()
                    .take_while(|(i, _)| *i == index)
                    .map(|(_, k)| *k),
            );
            if let Some(line) = self.rebuild_line(index) {
                f(line, &own);
            }
        }
    }

    fn account<'a>(&'a self, r: &RawRecord<'a>, origin: Origin) -> Result<Account<'a>, &'a str> {
        let id = self.id_of(r).ok_or(DAMAGED)?;
        let product = r.product().ok_or(DAMAGED)?;
        let slot = self.names.plans.get(r.plan as usize).ok_or(DAMAGED)?;
        if slot.product != Some(product) {
            return Err(DAMAGED);
        }
        let plan_class = slot.class.as_ref().map_err(|reason| &**reason)?;
        let mut consents = r.flag_consents();
        if consents.training_opt_in && *plan_class != PlanClass::ChatTeam {
            return Err(super::account_lines::OPT_IN_TEAM_ONLY);
        }
        if consents.zdr && product != Product::Api {
            return Err(super::account_lines::ZDR_API_ONLY);
        }
        consents.subprocessor_opt_outs = self.names.subprocessors(r.subprocessors)?;
        consents.residency = self.names.region(r.residency)?;
        Ok(Account {
            id,
            product,
            plan: &slot.name,
            plan_class: *plan_class,
            consents,
            origin,
        })
    }
}

/// Every account, indexed for the two ways a request names one.
#[derive(Debug)]
pub struct AccountStore {
    base: Layer,
    overlay: Option<Layer>,
    /// Valid accounts of base and overlay together.
    valid: usize,
    /// Quarantined records of base and overlay together (names gone not counted).
    quarantined: usize,
}

impl AccountStore {
    /// The store of `base`, its names resolved against `ctx`.
    pub fn new(base: ConsentImage, ctx: NameContext<'_>) -> AccountStore {
        let meta = base.meta();
        let (valid, quarantined) = (meta.valid as usize, meta.quarantined as usize);
        AccountStore {
            base: Layer::new(base, ctx),
            overlay: None,
            valid,
            quarantined,
        }
    }

    /// This store with `overlay` (a change set built on this base, its
    /// sources the base's followed by the change files) consulted first.
    pub fn with_overlay(mut self, overlay: ConsentImage, ctx: NameContext<'_>) -> AccountStore {
        let overlay = Layer::new(overlay, ctx);
        let meta = overlay.image.meta();
        self.valid += meta.valid as usize;
        self.quarantined += meta.quarantined as usize;
        for index in overlay.image.record_indexes() {
            let superseded = overlay
                .image
                .record(index)
                .and_then(|r| overlay.id_of(&r))
                .and_then(|id| self.base.image.find_id(id))
                .and_then(|i| self.base.image.record(i));
            match superseded.and_then(|r| r.kind()) {
                Some(Kind::Account) => self.valid -= 1,
                Some(Kind::Quarantined) => self.quarantined -= 1,
                _ => {}
            }
        }
        self.overlay = Some(overlay);
        self
    }

    /// The base image.
    pub fn base(&self) -> &ConsentImage {
        &self.base.image
    }

    /// The overlay image, when change files apply.
    pub fn overlay(&self) -> Option<&ConsentImage> {
        self.overlay.as_ref().map(|o| &o.image)
    }

    /// The record holding API key `key` (hashed here; the key is not kept).
    pub fn by_api_key(&self, key: &[u8]) -> Option<Record<'_>> {
        self.by_key_hash(&hash_api_key(key))
    }

    /// Starts bringing the base snapshot's lines for key hash `key` into
    /// cache (the overlay is small and already there): the one memory miss
    /// of a large snapshot then overlaps whatever runs before
    /// [`by_key_hash`](Self::by_key_hash).
    pub fn prefetch_key(&self, key: &KeyHash) {
        self.base.image.prefetch_key(key);
    }

    /// The record holding key hash `key`.
    pub fn by_key_hash(&self, key: &KeyHash) -> Option<Record<'_>> {
        if let Some(overlay) = &self.overlay {
            if let Some(index) = overlay.image.find_key(key) {
                return record(overlay.decode(index));
            }
        }
        let index = self.base.image.find_key(key)?;
        if let Some(superseding) = self.superseding(index) {
            return match superseding {
                Decoded::Quarantined(q) => Some(Record::Quarantined(q)),
                Decoded::Account(_) | Decoded::Deleted => None,
            };
        }
        record(self.base.decode(index))
    }

    /// The overlay's record for the id of base record `index`, if any.
    fn superseding(&self, index: u32) -> Option<Decoded<'_>> {
        let overlay = self.overlay.as_ref()?;
        let r = self.base.image.record(index)?;
        let id = self.base.id_of(&r)?;
        overlay.image.find_id(id).map(|i| overlay.decode(i))
    }

    /// The record with id `id`, as named by a trusted front service.
    pub fn by_id(&self, id: &str) -> Option<Record<'_>> {
        if let Some(overlay) = &self.overlay {
            if let Some(index) = overlay.image.find_id(id) {
                return record(overlay.decode(index));
            }
        }
        record(self.base.decode(self.base.image.find_id(id)?))
    }

    /// How many accounts are valid (quarantined ones not counted; accounts
    /// naming a plan, subprocessor or region gone from the rules or pools
    /// not subtracted: see [`AccountStore::quarantined_by_names`]).
    pub fn len(&self) -> usize {
        self.valid
    }

    /// Whether no account is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many records are quarantined in the files (base and changes).
    pub fn quarantined_count(&self) -> usize {
        self.quarantined
    }

    /// Valid accounts of the files quarantined because a name they use is
    /// no longer defined (an upper bound), and a sentence per such name.
    pub fn quarantined_by_names(&self) -> (usize, Vec<&str>) {
        let layers = std::iter::once(&self.base).chain(&self.overlay);
        let count = layers.clone().map(|l| l.names.quarantined).sum();
        let notes = layers
            .flat_map(|l| l.names.notes.iter().map(String::as_str))
            .collect();
        (count, notes)
    }

    /// Every record the files quarantine, base then changes, each in file
    /// order (a base record a change supersedes left out). Costs the
    /// quarantined records only.
    pub fn quarantined(&self) -> impl Iterator<Item = Quarantined> + '_ {
        let base = self
            .base
            .image
            .quarantined()
            .filter(|&i| self.superseding(i).is_none())
            .filter_map(|i| quarantine(self.base.decode(i)));
        let overlay = self.overlay.iter().flat_map(|o| {
            o.image
                .quarantined()
                .filter_map(|i| quarantine(o.decode(i)))
        });
        base.chain(overlay)
    }

    /// Every quarantined record, names gone included: reads every record
    /// (for `check`).
    pub fn scan_quarantined(&self) -> Vec<Quarantined> {
        let mut out = Vec::new();
        for i in self.base.image.record_indexes() {
            if self.superseding(i).is_none() {
                out.extend(quarantine(self.base.decode(i)));
            }
        }
        if let Some(o) = &self.overlay {
            for i in o.image.record_indexes() {
                out.extend(quarantine(o.decode(i)));
            }
        }
        out
    }

    /// Calls `f` with every account of base and changes, with its keys, to
    /// build a new base from (compaction): base records a change supersedes,
    /// deletions and demotions left out, conflicts to be judged afresh.
    /// Reads every record.
    pub fn for_each_rebuild_line(&self, mut f: impl FnMut(Line, &[KeyHash])) {
        self.base
            .rebuild(|index| self.superseding(index).is_none(), &mut f);
        if let Some(overlay) = &self.overlay {
            overlay.rebuild(|_| true, &mut f);
        }
    }

    /// Records in base and overlay (an upper bound of a rebuild's lines).
    pub fn records(&self) -> usize {
        let base = self.base.image.meta().records as usize;
        base + self
            .overlay
            .as_ref()
            .map_or(0, |o| o.image.meta().records as usize)
    }

    /// The files records come from (the base's, then the change files).
    pub fn sources(&self) -> &[SourceFile] {
        let layer = self.overlay.as_ref().unwrap_or(&self.base);
        &layer.image.meta().sources
    }

    /// The file a record's line is in.
    pub fn source(&self, origin: Origin) -> Option<&SourceFile> {
        self.sources().get(origin.source as usize)
    }
}

fn record(decoded: Decoded<'_>) -> Option<Record<'_>> {
    match decoded {
        Decoded::Account(a) => Some(Record::Account(a)),
        Decoded::Quarantined(q) => Some(Record::Quarantined(q)),
        Decoded::Deleted => None,
    }
}

fn quarantine(decoded: Decoded<'_>) -> Option<Quarantined> {
    match decoded {
        Decoded::Quarantined(q) => Some(q),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::consent_image::{ImageBuilder, Line, NewAccount};

    fn plans() -> PlanNames {
        let mut plans = PlanNames::default();
        plans.insert(Product::Api, "paid".into(), PlanClass::ApiPaid);
        plans.insert(Product::Chat, "team".into(), PlanClass::ChatTeam);
        plans
    }

    fn names() -> (PlanNames, Vec<String>, Vec<String>) {
        (
            plans(),
            vec!["azure".into(), "gcp".into()],
            vec!["eu".into(), "us".into()],
        )
    }

    fn source(file: &str) -> SourceFile {
        SourceFile {
            file: file.into(),
            modified: None,
            change: None,
        }
    }

    fn at(line: u32) -> Origin {
        Origin { source: 0, line }
    }

    fn account(id: &str, line: u32) -> Line {
        Line::Account(NewAccount {
            id: id.into(),
            product: Product::Api,
            plan: "paid".into(),
            consents: Consents::default(),
            origin: at(line),
        })
    }

    fn quarantined_line(id: Option<&str>, line: u32) -> Line {
        Line::Quarantined(Quarantined {
            id: id.map(Into::into),
            origin: at(line),
            reason: "plan `enterprise` is not defined".into(),
        })
    }

    /// A store of `lines` (each with its keys), names resolved against `names()`.
    fn store(lines: Vec<(Line, Vec<KeyHash>)>) -> AccountStore {
        let (plans, subs, regions) = names();
        let mut b = ImageBuilder::new(
            lines.len(),
            &subs,
            &regions,
            vec![source("accounts.jsonl")],
            7,
        );
        for (line, keys) in lines {
            b.add(line, &keys);
        }
        let ctx = NameContext {
            plans: &plans,
            subprocessors: &subs,
            regions: &regions,
        };
        AccountStore::new(b.into_image("test", (0, Vec::new())), ctx)
    }

    fn valid_id(r: Option<Record<'_>>) -> Option<&str> {
        match r {
            Some(Record::Account(a)) => Some(a.id),
            _ => None,
        }
    }

    fn quarantine_line(r: Option<Record<'_>>) -> Option<u32> {
        match r {
            Some(Record::Quarantined(q)) => Some(q.origin.line),
            _ => None,
        }
    }

    fn k(key: &str) -> KeyHash {
        hash_api_key(key.as_bytes())
    }

    #[test]
    fn accounts_are_found_by_every_key_and_by_id() {
        let store = store(vec![
            (account("one", 1), vec![k("a"), k("b")]),
            (account("two", 2), vec![k("c")]),
        ]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert_eq!(valid_id(store.by_api_key(b"b")), Some("one"));
        assert_eq!(valid_id(store.by_api_key(b"c")), Some("two"));
        assert!(store.by_api_key(b"d").is_none());
        assert_eq!(valid_id(store.by_id("two")), Some("two"));
        assert!(store.by_id("three").is_none());
        assert_eq!(store.len(), 2);
        assert_eq!(store.quarantined().count(), 0);
    }

    #[test]
    fn a_quarantined_line_answers_for_its_keys_and_id_and_others_stay() {
        let store = store(vec![
            (account("one", 1), vec![k("a")]),
            (quarantined_line(Some("bad"), 2), vec![k("b")]),
        ]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert_eq!(quarantine_line(store.by_api_key(b"b")), Some(2));
        assert_eq!(quarantine_line(store.by_id("bad")), Some(2));
        assert_eq!(store.len(), 1);
        assert_eq!(store.quarantined().count(), 1);
    }

    #[test]
    fn a_shared_key_quarantines_both_accounts_and_their_other_keys() {
        let store = store(vec![
            (account("one", 1), vec![k("one-only"), k("shared")]),
            (account("two", 2), vec![k("shared"), k("two-only")]),
            (account("three", 3), vec![k("c")]),
        ]);
        assert!(quarantine_line(store.by_api_key(b"shared")).is_some());
        assert_eq!(quarantine_line(store.by_api_key(b"one-only")), Some(1));
        assert_eq!(quarantine_line(store.by_api_key(b"two-only")), Some(2));
        assert_eq!(quarantine_line(store.by_id("one")), Some(1));
        assert_eq!(quarantine_line(store.by_id("two")), Some(2));
        assert_eq!(valid_id(store.by_id("three")), Some("three"));
        assert_eq!(store.len(), 1);
        let reasons: Vec<(u32, String)> = store
            .quarantined()
            .map(|q| (q.origin.line, q.reason.into()))
            .collect();
        assert_eq!(
            reasons,
            [
                (1, "an API key hash is also listed on line 2".to_string()),
                (2, "an API key hash is also listed on line 1".to_string())
            ]
        );
    }

    #[test]
    fn a_duplicate_id_quarantines_both_lines() {
        let store = store(vec![
            (account("one", 1), vec![k("a")]),
            (account("one", 5), vec![k("b")]),
        ]);
        assert_eq!(quarantine_line(store.by_api_key(b"a")), Some(1));
        assert_eq!(quarantine_line(store.by_api_key(b"b")), Some(5));
        assert_eq!(quarantine_line(store.by_id("one")), Some(1));
        assert_eq!(store.len(), 0);
        assert_eq!(store.quarantined().count(), 2);
    }

    #[test]
    fn a_key_shared_with_a_quarantined_line_quarantines_the_valid_one_too() {
        let store = store(vec![
            (quarantined_line(None, 1), vec![k("shared")]),
            (account("two", 2), vec![k("shared")]),
        ]);
        assert_eq!(quarantine_line(store.by_api_key(b"shared")), Some(1));
        assert_eq!(quarantine_line(store.by_id("two")), Some(2));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn a_key_listed_twice_by_one_account_is_one_key() {
        let store = store(vec![(account("one", 1), vec![k("a"), k("a")])]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert_eq!(store.quarantined().count(), 0);
    }

    #[test]
    fn names_resolve_when_opened_and_a_name_gone_quarantines_its_accounts() {
        let (plans, subs, regions) = names();
        let mut b = ImageBuilder::new(3, &subs, &regions, vec![source("accounts.jsonl")], 7);
        let mut gcp_eu = Consents::default();
        gcp_eu.subprocessor_opt_outs.insert(1);
        gcp_eu.residency = Some(RegionId(0));
        b.add(
            Line::Account(NewAccount {
                id: "opted".into(),
                product: Product::Api,
                plan: "paid".into(),
                consents: gcp_eu,
                origin: at(1),
            }),
            &[k("opted")],
        );
        b.add(account("plain", 2), &[k("plain")]);
        let image = b.into_image("test", (0, Vec::new()));
        let bytes = image_bytes(&image);

        // Pools in another order: the names follow, not the indexes.
        let reordered: Vec<String> = vec!["gcp".into(), "azure".into()];
        let regions_reordered: Vec<String> = vec!["us".into(), "eu".into()];
        let ctx = NameContext {
            plans: &plans,
            subprocessors: &reordered,
            regions: &regions_reordered,
        };
        let store = AccountStore::new(ConsentImage::from_vec(bytes.clone()).unwrap(), ctx);
        let Some(Record::Account(a)) = store.by_api_key(b"opted") else {
            panic!("valid")
        };
        assert!(a.consents.subprocessor_opt_outs.contains(0));
        assert!(!a.consents.subprocessor_opt_outs.contains(1));
        assert_eq!(a.consents.residency, Some(RegionId(1)));

        // gcp gone from the pools: its account is quarantined, not the other.
        let azure_only: Vec<String> = vec!["azure".into()];
        let ctx = NameContext {
            plans: &plans,
            subprocessors: &azure_only,
            regions: &regions,
        };
        let store = AccountStore::new(ConsentImage::from_vec(bytes.clone()).unwrap(), ctx);
        let Some(Record::Quarantined(q)) = store.by_api_key(b"opted") else {
            panic!("quarantined")
        };
        assert!(
            q.reason
                .starts_with("subprocessor `gcp` is not used by any pool"),
            "{}",
            q.reason
        );
        assert_eq!(valid_id(store.by_api_key(b"plain")), Some("plain"));
        assert_eq!(store.quarantined_by_names().0, 1);
        assert_eq!(store.scan_quarantined().len(), 1);

        // The plan gone from the rules: both.
        let no_plans = PlanNames::default();
        let ctx = NameContext {
            plans: &no_plans,
            subprocessors: &subs,
            regions: &regions,
        };
        let store = AccountStore::new(ConsentImage::from_vec(bytes).unwrap(), ctx);
        assert!(quarantine_line(store.by_api_key(b"plain")).is_some());
        assert_eq!(store.quarantined_by_names().0, 2);
    }

    fn image_bytes(image: &ConsentImage) -> Vec<u8> {
        image.as_bytes().to_vec()
    }
}
