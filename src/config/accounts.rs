//! The consent snapshot: one record per account, found by API-key hash or id.

use std::collections::HashMap;

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
    /// The plan's name, as stamped in `x-privacy-plan`.
    pub plan: Box<str>,
    /// The plan's class, as the policy reasons on it.
    pub plan_class: PlanClass,
    /// Consents and rights exercised.
    pub consents: Consents,
}

/// Every account, indexed for the two ways a request names one.
#[derive(Debug, Default)]
pub struct AccountStore {
    accounts: Vec<Account>,
    by_key: HashMap<KeyHash, u32>,
    by_id: HashMap<Box<str>, u32>,
}

/// Why an account could not be added.
#[derive(Debug, PartialEq, Eq)]
pub enum DuplicateAccount {
    /// Another account already has this id.
    Id,
    /// Another account already has this key hash.
    Key,
}

impl AccountStore {
    /// An empty store with room for `n` accounts.
    pub fn with_capacity(n: usize) -> Self {
        AccountStore {
            accounts: Vec::with_capacity(n),
            by_key: HashMap::with_capacity(n),
            by_id: HashMap::with_capacity(n),
        }
    }

    /// Adds an account reachable by its id and by each of `keys`.
    pub fn insert(&mut self, account: Account, keys: &[KeyHash]) -> Result<(), DuplicateAccount> {
        if self.by_id.contains_key(&account.id) {
            return Err(DuplicateAccount::Id);
        }
        if keys.iter().any(|k| self.by_key.contains_key(k)) {
            return Err(DuplicateAccount::Key);
        }
        let index = self.accounts.len() as u32;
        for key in keys {
            self.by_key.insert(*key, index);
        }
        self.by_id.insert(account.id.clone(), index);
        self.accounts.push(account);
        Ok(())
    }

    /// The account holding API key `key` (hashed here; the key is not kept).
    pub fn by_api_key(&self, key: &[u8]) -> Option<&Account> {
        let hash = hash_api_key(key);
        self.by_key
            .get(&hash)
            .and_then(|&i| self.accounts.get(i as usize))
    }

    /// The account with id `id`, as named by a trusted front service.
    pub fn by_id(&self, id: &str) -> Option<&Account> {
        self.by_id
            .get(id)
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
