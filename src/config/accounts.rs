//! The consent snapshot: one record per account, found by API-key hash or id.
//!
//! Laid out for a million accounts: the records sit in one vector, and the
//! two indexes hold only 4-byte slots into it, so nothing (id, key hash,
//! plan name) is stored twice. During a reload two snapshots live side by
//! side, so every byte per account counts twice.
//!
//! # Quarantine (spec §8)
//!
//! An account line the gateway cannot fully understand is not dropped (its
//! key would then be unknown, or worse, an older line would be believed) and
//! does not hold the whole file back: it is *quarantined*. The store keeps,
//! beside the valid [`Account`]s, a list of [`Quarantined`] entries (the
//! line's account id when it has a usable one, its line number, the reason).
//! Both indexes resolve a key hash or an id to a [`Record`]: either a valid
//! account or a quarantine entry, which every request answers `403
//! consent_record_invalid` without forwarding anything.
//!
//! Two lines that share a key hash or an id quarantine each other: the first
//! one, already stored as valid, is *demoted* (kept in place, mapped to its
//! own quarantine entry), the second is stored quarantined. Nothing decides
//! which of two conflicting consent records is the right one.
//!
//! A slot is a `u32`: below [`QUARANTINED`] an index into the accounts, with
//! that bit set an index into the quarantine list. A compiled store that
//! replaces this one must carry the same three things: valid records,
//! quarantine entries, and key/id lookups that can land on either.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::hash_table::{Entry, HashTable};
use sha2::{Digest, Sha256};

use crate::policy::{Consents, PlanClass, Product};

/// The SHA-256 of an API key: the only form in which keys are stored.
pub type KeyHash = [u8; 32];

/// Hashes an API key as the accounts file stores it.
pub fn hash_api_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// One account, as the decision needs it.
#[derive(Clone, Debug)]
pub struct Account {
    /// Stable account id, stamped as `x-privacy-account`.
    pub id: Box<str>,
    /// The product the account belongs to.
    pub product: Product,
    /// The plan's name, as stamped in `x-privacy-plan` (shared between accounts).
    pub plan: Arc<str>,
    /// The plan's class, as the policy reasons on it.
    pub plan_class: PlanClass,
    /// Consents and rights exercised.
    pub consents: Consents,
    /// The line of the accounts file that defines it (names it when a later
    /// line conflicts with it).
    pub line: u32,
}

/// An account line that is JSON but not fully understood, or that conflicts
/// with another line: its requests are answered 403, nothing is forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quarantined {
    /// The line's account id, when it names a usable one.
    pub id: Option<Box<str>>,
    /// Its line in the accounts file (1-based).
    pub line: u32,
    /// What is wrong, for `check`, the log, the audit line and `explain`;
    /// never holds a key or a value copied from the line beyond names.
    pub reason: Box<str>,
}

/// What a key hash or an id leads to.
#[derive(Clone, Copy, Debug)]
pub enum Record<'s> {
    /// An account the decision can use.
    Account(&'s Account),
    /// A quarantined line: answer 403, forward nothing.
    Quarantined(&'s Quarantined),
}

/// A line to add to the store.
#[derive(Clone, Debug)]
pub enum Line {
    /// A fully understood account.
    Account(Account),
    /// A line that is quarantined whatever else the file holds.
    Quarantined(Quarantined),
}

impl Line {
    fn id(&self) -> Option<&str> {
        match self {
            Line::Account(a) => Some(&a.id),
            Line::Quarantined(q) => q.id.as_deref(),
        }
    }

    fn line(&self) -> u32 {
        match self {
            Line::Account(a) => a.line,
            Line::Quarantined(q) => q.line,
        }
    }
}

/// The bit that marks a slot as an index into the quarantine list.
pub const QUARANTINED: u32 = 1 << 31;

/// Every account, indexed for the two ways a request names one.
#[derive(Debug, Default)]
pub struct AccountStore {
    accounts: Vec<Account>,
    quarantined: Vec<Quarantined>,
    /// Valid accounts later found to conflict: account index -> quarantine index.
    demoted: HashMap<u32, u32>,
    /// Every indexed API key hash with its slot.
    keys: Vec<(KeyHash, u32)>,
    /// Positions in `keys`, hashed by key hash.
    by_key: HashTable<u32>,
    /// Slots, hashed by id.
    by_id: HashTable<u32>,
    id_hasher: RandomState,
}

/// Key hashes are SHA-256 outputs, already uniform: their first bytes are
/// a good table hash, and the file that fills the table is trusted.
fn key_slot(key: &KeyHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_le_bytes(first)
}

/// The id of `slot` (empty for a quarantined line without a usable id).
fn slot_id<'a>(accounts: &'a [Account], quarantined: &'a [Quarantined], slot: u32) -> &'a str {
    if slot & QUARANTINED != 0 {
        quarantined
            .get((slot & !QUARANTINED) as usize)
            .and_then(|q| q.id.as_deref())
            .unwrap_or("")
    } else {
        accounts.get(slot as usize).map_or("", |a| &a.id)
    }
}

impl AccountStore {
    /// An empty store with room for `accounts` accounts and `keys` keys.
    pub fn with_capacity(accounts: usize, keys: usize) -> Self {
        AccountStore {
            accounts: Vec::with_capacity(accounts),
            keys: Vec::with_capacity(keys),
            by_key: HashTable::with_capacity(keys),
            by_id: HashTable::with_capacity(accounts),
            ..AccountStore::default()
        }
    }

    /// The id a slot is indexed under.
    fn id_of(&self, slot: u32) -> &str {
        slot_id(&self.accounts, &self.quarantined, slot)
    }

    fn line_of(&self, slot: u32) -> u32 {
        if slot & QUARANTINED != 0 {
            self.quarantined[(slot & !QUARANTINED) as usize].line
        } else {
            self.accounts[slot as usize].line
        }
    }

    fn find_id(&self, id: &str) -> Option<u32> {
        self.by_id
            .find(self.id_hasher.hash_one(id), |&slot| self.id_of(slot) == id)
            .copied()
    }

    fn find_key(&self, key: &KeyHash) -> Option<u32> {
        self.by_key
            .find(key_slot(key), |&i| self.keys[i as usize].0 == *key)
            .map(|&i| self.keys[i as usize].1)
    }

    /// Adds one line of the accounts file, reachable by its id and by each
    /// of `keys`. A line whose id or key another line already has is
    /// quarantined, and so is that other line (see the module's notes).
    pub fn add(&mut self, line: Line, keys: &[KeyHash]) {
        let number = line.line();
        let id_owner = line.id().and_then(|id| self.find_id(id));
        let mut key_owners: Vec<u32> = keys.iter().filter_map(|k| self.find_key(k)).collect();
        key_owners.sort_unstable();
        key_owners.dedup();

        let mut conflict = None;
        if let Some(owner) = id_owner {
            let reason = format!("account id is also defined on line {number}");
            conflict = Some(format!(
                "account id is also defined on line {}",
                self.line_of(owner)
            ));
            self.demote(owner, reason);
        }
        for &owner in &key_owners {
            let reason = format!("an API key hash is also listed on line {number}");
            conflict.get_or_insert_with(|| {
                format!(
                    "an API key hash is also listed on line {}",
                    self.line_of(owner)
                )
            });
            self.demote(owner, reason);
        }
        let line = match (line, conflict) {
            (Line::Account(a), Some(reason)) => Line::Quarantined(Quarantined {
                id: Some(a.id),
                line: a.line,
                reason: reason.into(),
            }),
            (line, _) => line,
        };

        let slot = match line {
            Line::Account(a) => {
                self.accounts.push(a);
                (self.accounts.len() - 1) as u32
            }
            Line::Quarantined(q) => {
                self.quarantined.push(q);
                (self.quarantined.len() - 1) as u32 | QUARANTINED
            }
        };
        let id = slot_id(&self.accounts, &self.quarantined, slot);
        if id_owner.is_none() && !id.is_empty() {
            let hash = self.id_hasher.hash_one(id);
            let (accounts, quarantined, hasher) =
                (&self.accounts, &self.quarantined, &self.id_hasher);
            self.by_id.insert_unique(hash, slot, |&s| {
                hasher.hash_one(slot_id(accounts, quarantined, s))
            });
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
                self.keys.push((*key, slot));
            }
        }
    }

    /// Quarantines the valid account in `slot` (a no-op for a slot already
    /// quarantined or demoted).
    fn demote(&mut self, slot: u32, reason: String) {
        if slot & QUARANTINED != 0 || self.demoted.contains_key(&slot) {
            return;
        }
        let account = &self.accounts[slot as usize];
        self.quarantined.push(Quarantined {
            id: Some(account.id.clone()),
            line: account.line,
            reason: reason.into(),
        });
        self.demoted
            .insert(slot, (self.quarantined.len() - 1) as u32);
    }

    fn record(&self, slot: u32) -> Option<Record<'_>> {
        if slot & QUARANTINED != 0 {
            return self
                .quarantined
                .get((slot & !QUARANTINED) as usize)
                .map(Record::Quarantined);
        }
        if !self.demoted.is_empty() {
            if let Some(&q) = self.demoted.get(&slot) {
                return self.quarantined.get(q as usize).map(Record::Quarantined);
            }
        }
        self.accounts.get(slot as usize).map(Record::Account)
    }

    /// The record holding API key `key` (hashed here; the key is not kept).
    pub fn by_api_key(&self, key: &[u8]) -> Option<Record<'_>> {
        self.find_key(&hash_api_key(key))
            .and_then(|slot| self.record(slot))
    }

    /// The record with id `id`, as named by a trusted front service.
    pub fn by_id(&self, id: &str) -> Option<Record<'_>> {
        self.find_id(id).and_then(|slot| self.record(slot))
    }

    /// How many accounts are valid (quarantined ones not counted).
    pub fn len(&self) -> usize {
        self.accounts.len() - self.demoted.len()
    }

    /// Whether no account is valid.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every quarantined line, in file order.
    pub fn quarantined(&self) -> Vec<&Quarantined> {
        let mut all: Vec<&Quarantined> = self.quarantined.iter().collect();
        all.sort_by_key(|q| q.line);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str, line: u32) -> Line {
        Line::Account(Account {
            id: id.into(),
            product: Product::Api,
            plan: Arc::from("paid"),
            plan_class: PlanClass::ApiPaid,
            consents: Consents::default(),
            line,
        })
    }

    fn quarantined_line(id: Option<&str>, line: u32) -> Line {
        Line::Quarantined(Quarantined {
            id: id.map(Into::into),
            line,
            reason: "plan `enterprise` is not defined".into(),
        })
    }

    fn valid_id(r: Option<Record<'_>>) -> Option<&str> {
        match r {
            Some(Record::Account(a)) => Some(&a.id),
            _ => None,
        }
    }

    fn quarantine_line(r: Option<Record<'_>>) -> Option<u32> {
        match r {
            Some(Record::Quarantined(q)) => Some(q.line),
            _ => None,
        }
    }

    #[test]
    fn accounts_are_found_by_every_key_and_by_id() {
        let mut store = AccountStore::with_capacity(2, 3);
        let (a, b, c) = (hash_api_key(b"a"), hash_api_key(b"b"), hash_api_key(b"c"));
        store.add(account("one", 1), &[a, b]);
        store.add(account("two", 2), &[c]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert_eq!(valid_id(store.by_api_key(b"b")), Some("one"));
        assert_eq!(valid_id(store.by_api_key(b"c")), Some("two"));
        assert!(store.by_api_key(b"d").is_none());
        assert_eq!(valid_id(store.by_id("two")), Some("two"));
        assert!(store.by_id("three").is_none());
        assert_eq!(store.len(), 2);
        assert!(store.quarantined().is_empty());
    }

    #[test]
    fn a_quarantined_line_answers_for_its_keys_and_id_and_others_stay() {
        let mut store = AccountStore::with_capacity(2, 2);
        store.add(account("one", 1), &[hash_api_key(b"a")]);
        store.add(quarantined_line(Some("bad"), 2), &[hash_api_key(b"b")]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert_eq!(quarantine_line(store.by_api_key(b"b")), Some(2));
        assert_eq!(quarantine_line(store.by_id("bad")), Some(2));
        assert_eq!(store.len(), 1);
        assert_eq!(store.quarantined().len(), 1);
    }

    #[test]
    fn a_shared_key_quarantines_both_accounts_and_their_other_keys() {
        let mut store = AccountStore::with_capacity(3, 4);
        let shared = hash_api_key(b"shared");
        store.add(account("one", 1), &[hash_api_key(b"one-only"), shared]);
        store.add(account("two", 2), &[shared, hash_api_key(b"two-only")]);
        store.add(account("three", 3), &[hash_api_key(b"c")]);
        for key in [&b"shared"[..], b"one-only"] {
            assert!(quarantine_line(store.by_api_key(key)).is_some(), "{key:?}");
        }
        assert_eq!(quarantine_line(store.by_api_key(b"one-only")), Some(1));
        assert_eq!(quarantine_line(store.by_api_key(b"two-only")), Some(2));
        assert_eq!(quarantine_line(store.by_id("one")), Some(1));
        assert_eq!(quarantine_line(store.by_id("two")), Some(2));
        assert_eq!(valid_id(store.by_id("three")), Some("three"));
        assert_eq!(store.len(), 1);
        let reasons: Vec<(u32, &str)> = store
            .quarantined()
            .iter()
            .map(|q| (q.line, &*q.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                (1, "an API key hash is also listed on line 2"),
                (2, "an API key hash is also listed on line 1")
            ]
        );
    }

    #[test]
    fn a_duplicate_id_quarantines_both_lines() {
        let mut store = AccountStore::with_capacity(2, 2);
        store.add(account("one", 1), &[hash_api_key(b"a")]);
        store.add(account("one", 5), &[hash_api_key(b"b")]);
        assert_eq!(quarantine_line(store.by_api_key(b"a")), Some(1));
        assert_eq!(quarantine_line(store.by_api_key(b"b")), Some(5));
        assert!(quarantine_line(store.by_id("one")).is_some());
        assert_eq!(store.len(), 0);
        assert_eq!(store.quarantined().len(), 2);
    }

    #[test]
    fn a_key_shared_with_a_quarantined_line_quarantines_the_valid_one_too() {
        let mut store = AccountStore::with_capacity(2, 2);
        let shared = hash_api_key(b"shared");
        store.add(quarantined_line(None, 1), &[shared]);
        store.add(account("two", 2), &[shared]);
        assert_eq!(quarantine_line(store.by_api_key(b"shared")), Some(1));
        assert_eq!(quarantine_line(store.by_id("two")), Some(2));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn a_key_listed_twice_by_one_account_is_one_key() {
        let mut store = AccountStore::with_capacity(1, 2);
        let a = hash_api_key(b"a");
        store.add(account("one", 1), &[a, a]);
        assert_eq!(valid_id(store.by_api_key(b"a")), Some("one"));
        assert!(store.quarantined().is_empty());
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_record_stays_56_bytes() {
        // A reload holds two stores of a million records: the line number
        // fits in what was padding.
        assert_eq!(std::mem::size_of::<Account>(), 56);
    }
}
