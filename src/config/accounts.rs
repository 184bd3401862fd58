//! The consent snapshot: one record per account, found by API-key hash or id.
//!
//! Laid out for a million accounts: the records sit in one vector, and the
//! two indexes hold only 4-byte positions into it, so nothing (id, key hash,
//! plan name) is stored twice. During a reload two snapshots live side by
//! side, so every byte per account counts twice.

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
}

/// Every account, indexed for the two ways a request names one.
#[derive(Debug, Default)]
pub struct AccountStore {
    accounts: Vec<Account>,
    /// Every API key hash with the position of its account.
    keys: Vec<(KeyHash, u32)>,
    /// Positions in `keys`, hashed by key hash.
    by_key: HashTable<u32>,
    /// Positions in `accounts`, hashed by id.
    by_id: HashTable<u32>,
    id_hasher: RandomState,
}

/// Why an account could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum DuplicateAccount {
    /// Another account already has this id.
    Id,
    /// Another account already has this key hash.
    Key,
}

/// Key hashes are SHA-256 outputs, already uniform: their first bytes are
/// a good table hash, and the file that fills the table is trusted.
fn key_slot(key: &KeyHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    u64::from_le_bytes(first)
}

impl AccountStore {
    /// An empty store with room for `accounts` accounts and `keys` keys.
    pub fn with_capacity(accounts: usize, keys: usize) -> Self {
        AccountStore {
            accounts: Vec::with_capacity(accounts),
            keys: Vec::with_capacity(keys),
            by_key: HashTable::with_capacity(keys),
            by_id: HashTable::with_capacity(accounts),
            id_hasher: RandomState::new(),
        }
    }

    /// Adds an account reachable by its id and by each of `keys`.
    pub fn insert(&mut self, account: Account, keys: &[KeyHash]) -> Result<(), DuplicateAccount> {
        let index = self.accounts.len() as u32;
        let id_hash = self.id_hasher.hash_one(&*account.id);
        let accounts = &self.accounts;
        if self
            .by_id
            .find(id_hash, |&i| accounts[i as usize].id == account.id)
            .is_some()
        {
            return Err(DuplicateAccount::Id);
        }
        let known = &self.keys;
        let taken = |k: &KeyHash| {
            self.by_key
                .find(key_slot(k), |&i| known[i as usize].0 == *k)
                .is_some()
        };
        if keys
            .iter()
            .enumerate()
            .any(|(n, k)| taken(k) || keys[..n].contains(k))
        {
            return Err(DuplicateAccount::Key);
        }
        for key in keys {
            let position = self.keys.len() as u32;
            self.keys.push((*key, index));
            let known = &self.keys;
            if let Entry::Vacant(slot) = self.by_key.entry(
                key_slot(key),
                |&i| known[i as usize].0 == *key,
                |&i| key_slot(&known[i as usize].0),
            ) {
                slot.insert(position);
            }
        }
        let hasher = &self.id_hasher;
        let accounts = &self.accounts;
        self.by_id.insert_unique(id_hash, index, |&i| {
            hasher.hash_one(&*accounts[i as usize].id)
        });
        self.accounts.push(account);
        Ok(())
    }

    /// The account holding API key `key` (hashed here; the key is not kept).
    pub fn by_api_key(&self, key: &[u8]) -> Option<&Account> {
        let hash = hash_api_key(key);
        self.by_key
            .find(key_slot(&hash), |&i| self.keys[i as usize].0 == hash)
            .and_then(|&i| self.accounts.get(self.keys[i as usize].1 as usize))
    }

    /// The account with id `id`, as named by a trusted front service.
    pub fn by_id(&self, id: &str) -> Option<&Account> {
        self.by_id
            .find(self.id_hasher.hash_one(id), |&i| {
                &*self.accounts[i as usize].id == id
            })
            .and_then(|&i| self.accounts.get(i as usize))
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(id: &str) -> Account {
        Account {
            id: id.into(),
            product: Product::Api,
            plan: Arc::from("paid"),
            plan_class: PlanClass::ApiPaid,
            consents: Consents::default(),
        }
    }

    #[test]
    fn accounts_are_found_by_every_key_and_by_id() {
        let mut store = AccountStore::with_capacity(2, 3);
        let (a, b, c) = (hash_api_key(b"a"), hash_api_key(b"b"), hash_api_key(b"c"));
        store.insert(account("one"), &[a, b]).unwrap();
        store.insert(account("two"), &[c]).unwrap();
        assert_eq!(store.by_api_key(b"a").map(|x| &*x.id), Some("one"));
        assert_eq!(store.by_api_key(b"b").map(|x| &*x.id), Some("one"));
        assert_eq!(store.by_api_key(b"c").map(|x| &*x.id), Some("two"));
        assert!(store.by_api_key(b"d").is_none());
        assert_eq!(store.by_id("two").map(|x| &*x.id), Some("two"));
        assert!(store.by_id("three").is_none());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn duplicates_are_refused_and_change_nothing() {
        let mut store = AccountStore::with_capacity(2, 2);
        let a = hash_api_key(b"a");
        store.insert(account("one"), &[a]).unwrap();
        assert_eq!(store.insert(account("one"), &[]), Err(DuplicateAccount::Id));
        assert_eq!(
            store.insert(account("two"), &[a]),
            Err(DuplicateAccount::Key)
        );
        let b = hash_api_key(b"b");
        assert_eq!(
            store.insert(account("two"), &[b, b]),
            Err(DuplicateAccount::Key)
        );
        assert!(store.by_id("two").is_none());
        assert!(store.by_api_key(b"b").is_none());
        assert_eq!(store.len(), 1);
    }
}
