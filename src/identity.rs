//! Who is asking: an API key or a trusted identity header, resolved to an account.

use thiserror::Error;

use crate::config::{hash_api_key, Account, AccountStore, KeyHash, Quarantined, Record};
use crate::policy::Product;

/// The caller of one request.
#[derive(Clone, Debug)]
pub enum Caller<'s> {
    /// A known account.
    Account(Account<'s>),
    /// An account whose line in the consent snapshot is quarantined: no
    /// decision is guessed for it (spec §8).
    Quarantined(Quarantined),
    /// No credentials, on a listener whose product allows it (Le Chat).
    Anonymous,
}

impl<'s> From<Record<'s>> for Caller<'s> {
    fn from(record: Record<'s>) -> Self {
        match record {
            Record::Account(a) => Caller::Account(a),
            Record::Quarantined(q) => Caller::Quarantined(q),
        }
    }
}

/// Why the caller could not be established; each is answered with `401`.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum IdentityError {
    /// The product needs an API key and none was sent.
    #[error("an API key is required")]
    MissingApiKey,
    /// `Authorization` is present but not `Bearer <key>`.
    #[error("the Authorization header is not of the form `Bearer <key>`")]
    MalformedAuthorization,
    /// No account holds this key.
    #[error("the API key is not known")]
    UnknownApiKey,
    /// A trusted front service named an account that does not exist.
    #[error("the account named by the identity header is not known")]
    UnknownAccount,
}

impl IdentityError {
    /// The stable `error.code` of the JSON answer.
    pub const fn code(self) -> &'static str {
        match self {
            IdentityError::MissingApiKey => "missing_api_key",
            IdentityError::MalformedAuthorization => "malformed_authorization",
            IdentityError::UnknownApiKey => "unknown_api_key",
            IdentityError::UnknownAccount => "unknown_account",
        }
    }
}

/// An `Authorization` header value, read: the bearer key's SHA-256 (the
/// key itself is not kept), or not a bearer key at all. Its `Debug` shows
/// which, never the hash: that names an account in the snapshot.
#[derive(Clone, Copy)]
pub enum ApiKey {
    /// `Bearer <key>`, the key hashed.
    Hashed(KeyHash),
    /// Anything else: answered `401 malformed_authorization`.
    Malformed,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiKey::Hashed(_) => "ApiKey::Hashed(..)",
            ApiKey::Malformed => "ApiKey::Malformed",
        })
    }
}

impl ApiKey {
    /// Reads `authorization` and asks for the memory its account's record
    /// lies in: done first thing, the one memory miss of a large consent
    /// snapshot overlaps the rest of the request's reading.
    pub fn read(accounts: &AccountStore, authorization: &[u8]) -> ApiKey {
        match bearer_token(authorization) {
            Some(key) => {
                let hash = hash_api_key(key);
                accounts.prefetch_key(&hash);
                ApiKey::Hashed(hash)
            }
            None => ApiKey::Malformed,
        }
    }
}

/// What a request says about its caller. `trusted_identity` must only be
/// filled when the TCP peer is a trusted proxy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'r> {
    /// The `Authorization` header, read.
    pub api_key: Option<ApiKey>,
    /// The identity header's value, from a trusted peer only.
    pub trusted_identity: Option<&'r [u8]>,
}

/// Resolves the caller. A trusted identity header wins over an API key.
pub fn resolve<'s>(
    accounts: &'s AccountStore,
    listener_product: Product,
    credentials: Credentials<'_>,
) -> Result<Caller<'s>, IdentityError> {
    if let Some(id) = credentials.trusted_identity {
        let id = std::str::from_utf8(id).map_err(|_| IdentityError::UnknownAccount)?;
        return accounts
            .by_id(id.trim())
            .map(Caller::from)
            .ok_or(IdentityError::UnknownAccount);
    }
    match credentials.api_key {
        Some(ApiKey::Hashed(key)) => accounts
            .by_key_hash(&key)
            .map(Caller::from)
            .ok_or(IdentityError::UnknownApiKey),
        Some(ApiKey::Malformed) => Err(IdentityError::MalformedAuthorization),
        None if listener_product == Product::Chat => Ok(Caller::Anonymous),
        None => Err(IdentityError::MissingApiKey),
    }
}

fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_key_shows_no_hash_when_debug_printed() {
        let hash = hash_api_key(b"sk-secret");
        let credentials = Credentials {
            api_key: Some(ApiKey::Hashed(hash)),
            trusted_identity: None,
        };
        let printed = format!("{credentials:?}");
        assert!(printed.contains("Hashed"), "{printed}");
        // Neither as hex nor as the array of bytes `Debug` would print.
        assert!(!printed.contains(&hex::encode(hash)[..8]), "{printed}");
        assert!(
            !printed.contains(&format!("{:?}", &hash[..4])[1..10]),
            "{printed}"
        );
    }

    #[test]
    fn bearer_tokens_parse() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }
}
