//! One view of a decision, serialised the same way wherever it is shown:
//! `explain` prints it, the audit log writes it, and the access line and the
//! metrics read its fields. Their field names agree by construction, and a
//! field added here appears in all of them.

use serde::Serialize;

use crate::client_ip::ClientPrefix;
use crate::config::{Origin, Quarantined, Snapshot};
use crate::evaluate::Admission;
use crate::policy::Product;

/// What the gateway decided about one request, as its readers see it.
///
/// Optional parts are left out when empty, so a line holds what applied.
/// Never holds a full client address, an API key or a body.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionView<'a> {
    /// The request's decision id (also returned to the client).
    pub decision_id: &'a str,
    /// Its method, path and listener: what `explain` needs to rebuild the
    /// decision. The path is cut at 256 bytes; the query string is never
    /// recorded (it may carry personal data, and no decision reads it).
    pub method: &'a str,
    /// See `method`.
    pub path: &'a str,
    /// Product of the listener that accepted it (`explain --listener`).
    pub listener: &'static str,
    /// What decides: rules, pools, trust, signing, decision tables.
    pub policy_version: &'a str,
    /// The consent snapshot it was decided under: the base's content hash,
    /// `+<sequence>` of the last change file applied.
    pub consent_revision: &'a str,
    /// Build epoch of the geo database, `null` when none is configured.
    pub geo_revision: Option<u64>,
    /// Status answered (or, for `explain`, that would be).
    pub status: u16,
    /// `error.code` when the gateway answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// The caller's quarantined consent record (403 `consent_record_invalid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineView<'a>>,
    /// The consent line that decided the account (or quarantined it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent_source: Option<ConsentSourceView<'a>>,
    /// The decision, when one was made.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecidedView<'a>>,
    /// The pool that received the request, when one did.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub served: Option<ServedView<'a>>,
    /// The admission, kept to place a pool in its tier.
    #[serde(skip)]
    admission: Option<&'a Admission>,
    /// The snapshot the request was decided under.
    #[serde(skip)]
    snapshot: &'a Snapshot,
}

/// A quarantined account line, as a request that named it sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct QuarantineView<'a> {
    /// The line's account id, when it has a usable one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<&'a str>,
    /// Its line in the accounts file.
    pub line: u32,
    /// Why it is quarantined.
    pub reason: &'a str,
}

/// Where the account's consent line is: the export's or a change file's
/// line, and since when that file says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ConsentSourceView<'a> {
    /// The file, as the consent files name it.
    pub file: &'a str,
    /// The line in it.
    pub line: u32,
    /// The change file's sequence (none for the export).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<u64>,
    /// When that file was written (RFC 3339, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Since>,
}

/// A time in Unix seconds, shown as RFC 3339.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Since(pub u64);

impl Serialize for Since {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.0);
        s.collect_str(&humantime::format_rfc3339_seconds(time))
    }
}

/// The decision's fields.
#[derive(Clone, Debug, Serialize)]
pub struct DecidedView<'a> {
    /// Account id or `anonymous`.
    pub account: &'a str,
    /// `api` or `chat`.
    pub product: &'static str,
    /// Plan name or `anonymous`.
    pub plan: &'a str,
    /// Capability.
    pub capability: &'static str,
    /// `allowed` or `denied`.
    pub training: &'static str,
    /// Its basis (spec §1).
    pub training_basis: &'static str,
    /// Retention class.
    pub retention: &'static str,
    /// Its basis (spec §2).
    pub retention_basis: &'static str,
    /// Basis of the country lookup decision (spec §3).
    pub geo_basis: &'static str,
    /// Country, when looked up and found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<&'a str>,
    /// The truncated client address as forwarded (none under
    /// `ip_personalization_opt_out`: no part of it is kept then).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[serde(serialize_with = "as_text")]
    pub client_prefix: Option<ClientPrefix>,
    /// Pools that serve the capability but may not have the request, each
    /// with the basis that removed it (spec §4).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_pools: Vec<RemovedPool<'a>>,
    /// Where shadow rules would have decided otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowNote<'a>>,
}

/// One pool removed from a request's candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RemovedPool<'a> {
    /// Its name.
    pub pool: &'a str,
    /// The constraint's basis, e.g. `6/opt-out`.
    pub basis: &'static str,
}

/// One shadow disagreement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ShadowNote<'a> {
    /// The shadow rule set.
    pub rules: &'a str,
    /// What differs.
    pub field: &'static str,
    /// Enforced basis.
    pub enforced: &'static str,
    /// Shadow basis.
    pub shadow: &'static str,
}

/// The pool that received the request, and its tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ServedView<'a> {
    /// Its name.
    pub pool: &'a str,
    /// Its subprocessor.
    pub subprocessor: &'a str,
    /// Its priority tier (spec §4, EU first).
    pub tier: u32,
    /// `7/eu-first-exception` when a lower candidate tier exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier_basis: Option<&'static str>,
}

/// The request a view is of, as it arrived.
#[derive(Clone, Copy, Debug)]
pub struct RequestLine<'a> {
    /// Its method.
    pub method: &'a str,
    /// Its path, without the query string.
    pub path: &'a str,
    /// Product of the listener that accepted it.
    pub listener: Product,
}

impl<'a> DecisionView<'a> {
    /// `request`, answered `status` under `snapshot`, before anything else is known.
    pub fn new(
        snapshot: &'a Snapshot,
        decision_id: &'a str,
        request: RequestLine<'a>,
        status: u16,
    ) -> Self {
        DecisionView {
            decision_id,
            method: request.method,
            path: recorded_path(request.path),
            listener: request.listener.as_str(),
            policy_version: &snapshot.policy_version,
            consent_revision: &snapshot.consent_revision,
            geo_revision: snapshot.geo.as_ref().map(|g| g.build_epoch()),
            status,
            error: None,
            quarantine: None,
            consent_source: None,
            decision: None,
            served: None,
            admission: None,
            snapshot,
        }
    }

    /// The gateway answered itself with `code`.
    pub fn refused(mut self, code: Option<&'a str>) -> Self {
        self.error = code;
        self
    }

    /// The caller's consent record is quarantined.
    pub fn quarantined(mut self, q: &'a Quarantined) -> Self {
        self.quarantine = Some(QuarantineView {
            account: q.id.as_deref(),
            line: q.origin.line,
            reason: &q.reason,
        });
        self.decided_by(Some(q.origin))
    }

    /// The consent line at `origin` decided the account.
    fn decided_by(mut self, origin: Option<Origin>) -> Self {
        self.consent_source = origin.and_then(|o| {
            let source = self.snapshot.accounts.source(o)?;
            Some(ConsentSourceView {
                file: &source.file,
                line: o.line,
                change: source.change,
                since: source.modified.map(Since),
            })
        });
        self
    }

    /// The decision `admission` holds.
    pub fn admitted(mut self, admission: &'a Admission) -> Self {
        let snapshot = self.snapshot;
        let d = &admission.decision;
        let shadow_name = snapshot
            .shadow
            .as_ref()
            .map_or("shadow", |s| s.name.as_str());
        self.decision = Some(DecidedView {
            account: &admission.account,
            product: admission.product.as_str(),
            plan: &admission.plan,
            capability: admission.capability.as_str(),
            training: d.training.as_str(),
            training_basis: d.training_basis.as_str(),
            retention: d.retention.as_str(),
            retention_basis: d.retention_basis.as_str(),
            geo_basis: d.geo.basis.as_str(),
            country: admission.country.as_ref().map(|c| c.as_str()),
            client_prefix: admission.forwarded_prefix(),
            removed_pools: d
                .route
                .removed
                .pools()
                .map(|(i, basis)| RemovedPool {
                    pool: pool_name(snapshot, i),
                    basis: basis.as_str(),
                })
                .collect(),
            shadow: admission
                .shadow_disagreements()
                .into_iter()
                .map(|x| ShadowNote {
                    rules: shadow_name,
                    field: x.field,
                    enforced: x.enforced,
                    shadow: x.shadow,
                })
                .collect(),
        });
        self.admission = Some(admission);
        self.decided_by(admission.origin)
    }

    /// Pool `index` received the request (the last attempt's, after failover).
    pub fn served_by(mut self, index: usize) -> Self {
        let Some(pool) = self.snapshot.upstreams.pool(index) else {
            return self;
        };
        let served = self
            .admission
            .map(|a| a.decision.route.served_by(&self.snapshot.pools, index));
        self.served = Some(ServedView {
            pool: &pool.name,
            subprocessor: &pool.subprocessor,
            tier: served.map_or(0, |s| s.tier),
            tier_basis: served.and_then(|s| s.exception).map(|b| b.as_str()),
        });
        self
    }
}

/// A value by its display form, written straight into the output (a field
/// skipped when `None`).
fn as_text<S: serde::Serializer, T: std::fmt::Display>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => serializer.collect_str(v),
        None => serializer.serialize_none(),
    }
}

/// `path` cut to at most 256 bytes, on a character boundary.
pub fn recorded_path(path: &str) -> &str {
    let mut end = path.len().min(256);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// The name of pool `index` of `snapshot`.
pub fn pool_name(snapshot: &Snapshot, index: usize) -> &str {
    snapshot
        .upstreams
        .pool(index)
        .map_or("?", |p| p.name.as_str())
}
