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

/// Headers that carry a client address (spec §7): removed from every request
/// before it is forwarded, whether the peer is trusted or not; only the
/// gateway's own truncated `x-forwarded-for` goes upstream. Edge proxies and
/// CDNs add these themselves, so a client behind one arrives with several.
/// `[trust] strip_headers` adds names; underscore spellings never get this
/// far (see [`is_underscore_name`]).
pub const ADDRESS_HEADERS: [&str; 26] = [
    // Believed from a trusted proxy (`x-forwarded-for`), then replaced.
    "x-forwarded-for",
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "cf-connecting-ip",
    // The spec's list (e2).
    "x-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "forwarded-for",
    "x-forwarded",
    "x-envoy-external-address",
    "cloudfront-viewer-address",
    "x-azure-clientip",
    "x-azure-socketip",
    "fastly-client-ip",
    "cf-connecting-ipv6",
    "cf-pseudo-ipv4",
    "x-proxyuser-ip",
    // Other common spellings (application servers, PaaS edges).
    "client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "proxy-client-ip",
    "wl-proxy-client-ip",
    "fly-client-ip",
    "x-appengine-user-ip",
];

/// Whether a client-sent header name contains an underscore. Such headers are
/// dropped on arrival, before the decision, and never forwarded (spec §7, as
/// nginx does by default): CGI, WSGI and PHP upstreams read
/// `x_privacy_training` as `X-Privacy-Training`.
pub fn is_underscore_name(name: &str) -> bool {
    name.contains('_')
}

/// A fresh decision id: a UUIDv7 as 32 hex digits (time-ordered, so audit
/// lines sort), for every request, forwarded or answered by the gateway.
pub fn new_decision_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

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
    // No fallback: an empty signature would be forwarded as if signed.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC-SHA256 accepts keys of any length");
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
    fn address_headers_are_lower_case_unique_and_none_is_reserved() {
        let mut seen = std::collections::HashSet::new();
        for name in ADDRESS_HEADERS {
            assert_eq!(name, name.to_ascii_lowercase());
            assert!(http::HeaderName::try_from(name).is_ok(), "{name}");
            assert!(seen.insert(name), "{name} listed twice");
            assert!(!is_reserved(name) && !is_underscore_name(name), "{name}");
        }
    }

    #[test]
    fn signature_depends_on_every_byte() {
        let key = SigningKey::new(b"k".to_vec());
        let a = sign(&key, &[(TRAINING, "denied".into())]);
        let b = sign(&key, &[(TRAINING, "allowed".into())]);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
