//! The header contract with upstream services (spec §6 and spec §7): what a client
//! may never send, what the gateway stamps, and the signature over it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::client_ip::ClientPrefix;
use crate::geo::CountryCode;
use crate::policy::{Decision, Product, Retention};

/// Unique per request; also returned to the client.
pub const DECISION_ID: &str = "x-privacy-decision-id";
/// Policy date plus rules revision.
pub const POLICY_VERSION: &str = "x-privacy-policy-version";
/// `api` or `chat`.
pub const PRODUCT: &str = "x-privacy-product";
/// The plan name, or `anonymous`.
pub const PLAN: &str = "x-privacy-plan";
/// The account id, or `anonymous`.
pub const ACCOUNT: &str = "x-privacy-account";
/// `allowed` or `denied`.
pub const TRAINING: &str = "x-privacy-training";
/// Basis id of the training decision.
pub const TRAINING_BASIS: &str = "x-privacy-training-basis";
/// Retention class.
pub const RETENTION: &str = "x-privacy-retention";
/// `1` when retention is `zdr`.
pub const ZERO_DATA_RETENTION: &str = "x-zero-data-retention";
/// ISO country, only when allowed and found.
pub const COUNTRY: &str = "x-privacy-country";
/// The truncated client address.
pub const FORWARDED_FOR: &str = "x-forwarded-for";
/// The client prefix in CIDR form.
pub const CLIENT_PREFIX: &str = "x-privacy-client-prefix";
/// The pool that received the request.
pub const POOL: &str = "x-privacy-pool";
/// That pool's subprocessor.
pub const SUBPROCESSOR: &str = "x-privacy-subprocessor";
/// HMAC-SHA256 over the stamped headers.
pub const SIGNATURE: &str = "x-privacy-signature";

/// A request's decision id: a UUIDv7 (time-ordered, so ids sort by when
/// requests came) as 32 lower-case hex digits, made without a system call
/// (the clock through the vDSO, the random part from a thread-local
/// generator) and kept inline, without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DecisionId([u8; 32]);

impl DecisionId {
    /// A new id.
    pub fn new() -> Self {
        let mut hex = [0u8; 32];
        uuid::Uuid::now_v7().simple().encode_lower(&mut hex);
        DecisionId(hex)
    }

    /// The id as stamped and logged.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into it.
        std::str::from_utf8(&self.0).expect("a decision id is ASCII hex")
    }
}

impl Default for DecisionId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for DecisionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for DecisionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecisionId({})", self.as_str())
    }
}

/// Headers that carry a client address; they never leave the gateway as sent.
pub const ADDRESS_HEADERS: [&str; 5] = [
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
];

/// Whether a client-sent header name is one only the gateway may set
/// (`x-privacy-*`, `x-zero-data-retention`). Names arrive lower-cased.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("x-privacy-") || name == ZERO_DATA_RETENTION
}

/// The key that signs stamped headers, so an upstream can tell they came
/// from the gateway. Never printed.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Wraps raw key bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        SigningKey(bytes)
    }

    /// A keyed id of the key: the HMAC of a fixed label. It changes with the
    /// key and reveals nothing of it; the policy version is built from it.
    pub fn key_id(&self) -> String {
        sign(self, &[("privacy-gateway key id", String::new())])
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// Everything the stamped headers say about one forwarded request.
#[derive(Clone, Copy, Debug)]
pub struct StampInput<'a> {
    /// The request's decision id.
    pub decision_id: &'a str,
    /// e.g. `2025-02-06+r3f9a1c`.
    pub policy_version: &'a str,
    /// As resolved.
    pub product: Product,
    /// Plan name or `anonymous`.
    pub plan: &'a str,
    /// Account id or `anonymous`.
    pub account: &'a str,
    /// The decision.
    pub decision: &'a Decision,
    /// Country, when the decision allowed the lookup and it found one.
    pub country: Option<CountryCode>,
    /// The client prefix, when the decision allows forwarding it.
    pub client_prefix: Option<ClientPrefix>,
    /// The pool that receives this attempt.
    pub pool: &'a str,
    /// That pool's subprocessor.
    pub subprocessor: &'a str,
}

/// The headers to stamp upstream, in contract order, signature last.
///
/// The signature is hex HMAC-SHA256 over `name:value\n` for every header
/// before it, in this order; an upstream recomputes it the same way.
pub fn upstream_headers(
    input: &StampInput<'_>,
    key: Option<&SigningKey>,
) -> Vec<(&'static str, String)> {
    let d = input.decision;
    let mut headers: Vec<(&'static str, String)> = Vec::with_capacity(16);
    headers.push((DECISION_ID, input.decision_id.to_string()));
    headers.push((POLICY_VERSION, input.policy_version.to_string()));
    headers.push((PRODUCT, input.product.as_str().to_string()));
    headers.push((PLAN, input.plan.to_string()));
    headers.push((ACCOUNT, input.account.to_string()));
    headers.push((TRAINING, d.training.as_str().to_string()));
    headers.push((TRAINING_BASIS, d.training_basis.as_str().to_string()));
    headers.push((RETENTION, d.retention.as_str().to_string()));
    if d.retention == Retention::Zdr {
        headers.push((ZERO_DATA_RETENTION, "1".to_string()));
    }
    if let Some(country) = input.country {
        headers.push((COUNTRY, country.to_string()));
    }
    if let Some(prefix) = input.client_prefix {
        headers.push((FORWARDED_FOR, prefix.address().to_string()));
        headers.push((CLIENT_PREFIX, prefix.to_string()));
    }
    headers.push((POOL, input.pool.to_string()));
    headers.push((SUBPROCESSOR, input.subprocessor.to_string()));
    if let Some(key) = key {
        let signature = sign(key, &headers);
        headers.push((SIGNATURE, signature));
    }
    headers
}

/// Hex HMAC-SHA256 over `name:value\n` lines.
pub fn sign(key: &SigningKey, headers: &[(&str, String)]) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&key.0) else {
        return String::new();
    };
    for (name, value) in headers {
        mac.update(name.as_bytes());
        mac.update(b":");
        mac.update(value.as_bytes());
        mac.update(b"\n");
    }
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_cover_the_contract() {
        for name in [
            TRAINING,
            SIGNATURE,
            ZERO_DATA_RETENTION,
            "x-privacy-anything",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        assert!(!is_reserved("x-request-id"));
    }

    #[test]
    fn signature_depends_on_every_byte() {
        let key = SigningKey::new(b"k".to_vec());
        let a = sign(&key, &[(TRAINING, "denied".into())]);
        let b = sign(&key, &[(TRAINING, "allowed".into())]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn decision_ids_are_hex_unique_and_time_ordered() {
        let ids: Vec<DecisionId> = (0..1000).map(|_| DecisionId::new()).collect();
        for id in &ids {
            assert_eq!(id.as_str().len(), 32);
            assert!(id
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        let mut sorted: Vec<&str> = ids.iter().map(DecisionId::as_str).collect();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "an id repeated");
        // Version 7: made later, sorts later (the millisecond time leads).
        assert!(ids[0].as_str() < ids[999].as_str());
    }
}
