//! The header contract with upstream services (spec §6 and spec §7): what a client
//! may never send, what the gateway stamps, and the signature over it.

use std::cell::RefCell;

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue};
use sha2::Sha256;
use thiserror::Error;

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

/// The stamped names as [`HeaderName`]s, built at compile time: inserting
/// one into a header map neither parses nor allocates its name.
mod names {
    use http::HeaderName;

    macro_rules! names {
        ($($name:ident),* $(,)?) => {
            $(pub static $name: HeaderName = HeaderName::from_static(super::$name);)*
        };
    }
    names!(
        DECISION_ID,
        POLICY_VERSION,
        PRODUCT,
        PLAN,
        ACCOUNT,
        TRAINING,
        TRAINING_BASIS,
        RETENTION,
        ZERO_DATA_RETENTION,
        COUNTRY,
        FORWARDED_FOR,
        CLIENT_PREFIX,
        POOL,
        SUBPROCESSOR,
        SIGNATURE,
    );
}

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

/// Whether a client-sent header name is one only the gateway may set
/// (`x-privacy-*`, `x-zero-data-retention`). Names arrive lower-cased.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with("x-privacy-") || name == ZERO_DATA_RETENTION
}

/// The key that signs stamped headers, so an upstream can tell they came
/// from the gateway. Never printed. Kept as HMAC's state after the key is
/// absorbed (the key itself is not kept): each signature starts from a copy
/// instead of hashing the key again, two SHA-256 blocks fewer a request.
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    /// Wraps raw key bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
        let mac =
            Hmac::<Sha256>::new_from_slice(&bytes).expect("HMAC-SHA256 takes a key of any length");
        SigningKey(mac)
    }

    /// A keyed id of the key: the HMAC of a fixed label. It changes with the
    /// key and reveals nothing of it; the policy version is built from it.
    pub fn key_id(&self) -> String {
        let hex = signature(self, [("privacy-gateway key id", &b""[..])]);
        String::from_utf8_lossy(&hex).into_owned()
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

/// Most headers one request is stamped with (the contract has 15).
const MAX_STAMPS: usize = 16;

/// The headers stamped on one attempt, in contract order, signature last:
/// each a name of the contract and a value ready to insert.
///
/// Built without allocating: fixed values are static, and the values of
/// this request (its ids, address, pool, signature...) are written one
/// after the other into a per-thread buffer and handed out as slices of
/// it, which share its memory. The buffer is reused once every value cut
/// from it is dropped, or replaced by a fresh one when it is full: one
/// allocation for hundreds of requests.
pub struct Stamps {
    entries: [(&'static HeaderName, HeaderValue); MAX_STAMPS],
    len: usize,
}

impl Stamps {
    /// The stamped headers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &HeaderValue)> {
        self.entries[..self.len]
            .iter()
            .map(|(n, v)| (n.as_str(), v))
    }

    /// How many headers are stamped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is stamped (never, for a forwarded request).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl IntoIterator for Stamps {
    type Item = (&'static HeaderName, HeaderValue);
    type IntoIter =
        std::iter::Take<std::array::IntoIter<(&'static HeaderName, HeaderValue), MAX_STAMPS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter().take(self.len)
    }
}

/// A value that cannot be sent in a header (a control character in an
/// account id, say): the request is not forwarded.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("the value of `{0}` cannot be sent in a header")]
pub struct UnsendableStamp(pub &'static str);

/// Where a value comes from while the stamps are being written.
#[derive(Clone, Copy)]
enum Value {
    Static(&'static str),
    /// A range of this request's bytes in the buffer.
    Written(usize, usize),
}

/// How much room the per-thread buffer gets when it must grow: the values
/// of one request take about 300 bytes.
const BUFFER_CHUNK: usize = 32 * 1024;

thread_local! {
    static BUFFER: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// The headers to stamp upstream for `input`, in contract order, signed
/// with `key` when there is one.
///
/// The signature is hex HMAC-SHA256 over `name:value\n` for every header
/// before it, in this order; an upstream recomputes it the same way.
pub fn stamps(input: &StampInput<'_>, key: Option<&SigningKey>) -> Result<Stamps, UnsendableStamp> {
    BUFFER.with(|buffer| match buffer.try_borrow_mut() {
        Ok(mut buffer) => write_stamps(&mut buffer, input, key),
        // Not reentrant; should it ever be, use a buffer of its own.
        Err(_) => write_stamps(&mut BytesMut::new(), input, key),
    })
}

/// The stamps of one request while they are written: names, and where
/// each value is.
struct Draft {
    list: [(&'static HeaderName, Value); MAX_STAMPS],
    len: usize,
}

impl Draft {
    fn push(&mut self, name: &'static HeaderName, value: Value) {
        // The contract has fewer headers than MAX_STAMPS.
        self.list[self.len] = (name, value);
        self.len += 1;
    }

    fn entries<'b>(&'b self, buf: &'b [u8]) -> impl Iterator<Item = (&'static str, &'b [u8])> {
        self.list[..self.len].iter().map(move |&(name, value)| {
            let bytes = match value {
                Value::Static(s) => s.as_bytes(),
                Value::Written(a, b) => &buf[a..b],
            };
            (name.as_str(), bytes)
        })
    }
}

/// Appends `text` to `buf`; where it is.
fn written(buf: &mut BytesMut, text: &str) -> Value {
    let start = buf.len();
    buf.extend_from_slice(text.as_bytes());
    Value::Written(start, buf.len())
}

/// Appends `value`'s display form to `buf`; where it is.
fn displayed(buf: &mut BytesMut, value: impl std::fmt::Display) -> Value {
    use std::fmt::Write as _;
    let start = buf.len();
    // Writing into a growable buffer cannot fail.
    let _ = write!(buf, "{value}");
    Value::Written(start, buf.len())
}

/// Appends `prefix` in CIDR form, e.g. `203.0.113.0/24`, as a copy of its
/// `address` already written (formatting an address costs more than
/// copying it) and its length; where it is.
fn with_length(buf: &mut BytesMut, address: Value, prefix: ClientPrefix) -> Value {
    // The longest address text (an IPv6 address with an IPv4 tail) has 45 bytes.
    let mut copy = [0u8; 48];
    let text = match address {
        Value::Written(a, b) if b - a <= copy.len() => {
            copy[..b - a].copy_from_slice(&buf[a..b]);
            &copy[..b - a]
        }
        _ => return displayed(buf, prefix),
    };
    let start = buf.len();
    buf.extend_from_slice(text);
    buf.extend_from_slice(b"/");
    let mut digits = [0u8; 3];
    let len = prefix.prefix_len();
    let shown: &[u8] = match len {
        0..=9 => {
            digits[0] = b'0' + len;
            &digits[..1]
        }
        10..=99 => {
            digits = [b'0' + len / 10, b'0' + len % 10, 0];
            &digits[..2]
        }
        _ => {
            digits = [b'0' + len / 100, b'0' + len / 10 % 10, b'0' + len % 10];
            &digits[..]
        }
    };
    buf.extend_from_slice(shown);
    Value::Written(start, buf.len())
}

fn write_stamps(
    buf: &mut BytesMut,
    input: &StampInput<'_>,
    key: Option<&SigningKey>,
) -> Result<Stamps, UnsendableStamp> {
    buf.clear();
    if buf.capacity() < 1024 {
        // Reclaims the buffer in place when nothing cut from it is alive.
        buf.reserve(BUFFER_CHUNK);
    }
    let d = input.decision;
    let mut draft = Draft {
        list: [(&names::DECISION_ID, Value::Static("")); MAX_STAMPS],
        len: 0,
    };
    draft.push(&names::DECISION_ID, written(buf, input.decision_id));
    draft.push(&names::POLICY_VERSION, written(buf, input.policy_version));
    draft.push(&names::PRODUCT, Value::Static(input.product.as_str()));
    draft.push(&names::PLAN, written(buf, input.plan));
    draft.push(&names::ACCOUNT, written(buf, input.account));
    draft.push(&names::TRAINING, Value::Static(d.training.as_str()));
    draft.push(
        &names::TRAINING_BASIS,
        Value::Static(d.training_basis.as_str()),
    );
    draft.push(&names::RETENTION, Value::Static(d.retention.as_str()));
    if d.retention == Retention::Zdr {
        draft.push(&names::ZERO_DATA_RETENTION, Value::Static("1"));
    }
    if let Some(country) = input.country {
        draft.push(&names::COUNTRY, written(buf, country.as_str()));
    }
    if let Some(prefix) = input.client_prefix {
        let address = displayed(buf, prefix.address());
        draft.push(&names::FORWARDED_FOR, address);
        draft.push(&names::CLIENT_PREFIX, with_length(buf, address, prefix));
    }
    draft.push(&names::POOL, written(buf, input.pool));
    draft.push(&names::SUBPROCESSOR, written(buf, input.subprocessor));
    if let Some(key) = key {
        let hex = signature(key, draft.entries(buf));
        let start = buf.len();
        buf.extend_from_slice(&hex);
        draft.push(&names::SIGNATURE, Value::Written(start, buf.len()));
    }
    let values = buf.split().freeze();
    let mut stamps = Stamps {
        entries: std::array::from_fn(|_| (&names::DECISION_ID, HeaderValue::from_static(""))),
        len: draft.len,
    };
    for (slot, &(name, value)) in stamps.entries.iter_mut().zip(&draft.list[..draft.len]) {
        let value = match value {
            Value::Static(s) => HeaderValue::from_static(s),
            Value::Written(a, b) => HeaderValue::from_maybe_shared(values.slice(a..b))
                .map_err(|_| UnsendableStamp(name.as_str()))?,
        };
        *slot = (name, value);
    }
    Ok(stamps)
}

/// Hex HMAC-SHA256 over `name:value\n` lines.
pub fn signature<'n, 'v>(
    key: &SigningKey,
    headers: impl IntoIterator<Item = (&'n str, &'v [u8])>,
) -> [u8; 64] {
    // The keyed state, copied: no fallback, no made-up signature.
    let mut mac = key.0.clone();
    for (name, value) in headers {
        mac.update(name.as_bytes());
        mac.update(b":");
        mac.update(value);
        mac.update(b"\n");
    }
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(mac.finalize().into_bytes(), &mut hex);
    hex
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
    fn client_prefix_is_written_as_its_cidr_form() {
        use crate::client_ip::PrefixLengths;
        for (ip, v4, v6) in [
            ("203.0.113.77", 24, 48),
            ("203.0.113.77", 32, 48),
            ("203.0.113.77", 0, 48),
            ("203.0.113.77", 8, 48),
            ("2001:db8:abcd:12::9", 24, 48),
            ("2001:db8:abcd:12::9", 24, 128),
            ("2001:db8:abcd:12::9", 24, 7),
            ("::ffff:198.51.100.9", 16, 56),
        ] {
            let lengths = PrefixLengths { ipv4: v4, ipv6: v6 };
            let prefix = ClientPrefix::new(ip.parse().unwrap(), lengths);
            let mut buf = BytesMut::new();
            let address = displayed(&mut buf, prefix.address());
            let Value::Written(a, b) = with_length(&mut buf, address, prefix) else {
                panic!("written");
            };
            assert_eq!(
                &buf[a..b],
                prefix.to_string().as_bytes(),
                "{ip} /{v4} /{v6}"
            );
        }
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
        let a = signature(&key, [(TRAINING, &b"denied"[..])]);
        let b = signature(&key, [(TRAINING, &b"allowed"[..])]);
        assert!(a.iter().all(u8::is_ascii_hexdigit));
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
