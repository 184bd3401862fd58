//! From one request head to its decision: gathers the facts (caller, client
//! address, capability, signals), calls [`policy::decide`], and looks up the
//! country when the decision allows it. The proxy and the command-line tools
//! share this path, so what they report is what the proxy does.

use std::net::IpAddr;
use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, Method};

use crate::client_ip::{client_address, ClientIpError, ClientPrefix};
use crate::config::{Origin, Quarantined, Snapshot};
use crate::geo::CountryCode;
use crate::identity::{self, ApiKey, Caller, Credentials, IdentityError};
use crate::policy::{self, Capability, Consents, Decision, PlanClass, Product, RequestFacts};
use crate::request_target::{RequestTarget, TargetError};
use crate::routing::PoolUpstream;
use crate::stamp::{self, StampInput, Stamps, UnsendableStamp};

/// The parts of a request the gateway decides on.
#[derive(Clone, Copy, Debug)]
pub struct RequestHead<'r> {
    /// HTTP method.
    pub method: &'r Method,
    /// The request target as received (origin- or absolute-form, with its query).
    pub target: &'r [u8],
    /// The same target as the request already holds it parsed (Pingora's
    /// URI), which the normalised target shares when they are equal, the
    /// common case; `None`: the normalised target is a copy.
    pub received: Option<&'r PathAndQuery>,
    /// Request headers as received.
    pub headers: &'r HeaderMap,
    /// The TCP peer.
    pub peer: IpAddr,
    /// Product of the listener that accepted the request.
    pub listener_product: Product,
}

/// A request the gateway will forward, with everything stamped upstream
/// except the pool (chosen per attempt).
#[derive(Clone, Debug)]
pub struct Admission {
    /// Account id, or `anonymous`.
    pub account: Box<str>,
    /// Plan name, or `anonymous` (shared with the account store: no copy).
    pub plan: Arc<str>,
    /// Product.
    pub product: Product,
    /// Capability.
    pub capability: Capability,
    /// The normalised target: the path the route matched, forwarded as is.
    pub target: RequestTarget,
    /// The policy's decision.
    pub decision: Decision,
    /// Country, when the decision allowed the lookup and it found one.
    pub country: Option<CountryCode>,
    /// The truncated client address; forwarded only when the decision allows.
    pub client_prefix: ClientPrefix,
    /// What the shadow rules would have decided, when they disagree.
    pub shadow: Option<ShadowDecision>,
    /// The consent line that decided the account (none when anonymous).
    pub origin: Option<Origin>,
}

/// The shadow rules' view of a request they disagree on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowDecision {
    /// The capability under the shadow routes (`None`: no route matches).
    pub capability: Option<Capability>,
    /// The shadow decision, when a capability was found.
    pub decision: Option<Decision>,
}

/// One way the shadow rules disagree with the enforced ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// What differs: `capability`, `training`, `retention`, `geo` or `route`.
    pub field: &'static str,
    /// The enforced basis (or value).
    pub enforced: &'static str,
    /// The shadow basis (or value).
    pub shadow: &'static str,
}

fn route_outcome(d: &Decision) -> &'static str {
    if d.route.candidates.is_empty() {
        "no_permitted_route"
    } else {
        "permitted"
    }
}

impl Admission {
    /// The prefix to forward, or `None` under `ip_personalization_opt_out`.
    pub fn forwarded_prefix(&self) -> Option<ClientPrefix> {
        self.decision
            .forward_client_prefix
            .then_some(self.client_prefix)
    }

    /// The headers stamped upstream when `pool` receives the request: the
    /// one place that turns an admission into the header contract.
    pub fn stamps(
        &self,
        snapshot: &Snapshot,
        decision_id: &str,
        pool: &PoolUpstream,
    ) -> Result<Stamps, UnsendableStamp> {
        let input = StampInput {
            decision_id,
            policy_version: &snapshot.policy_version,
            product: self.product,
            plan: &self.plan,
            account: &self.account,
            decision: &self.decision,
            country: self.country,
            client_prefix: self.forwarded_prefix(),
            pool: &pool.name,
            subprocessor: &pool.subprocessor,
        };
        stamp::stamps(&input, snapshot.signing_key.as_ref())
    }

    /// Where the shadow rules would have decided otherwise (empty when they agree).
    pub fn shadow_disagreements(&self) -> Vec<Disagreement> {
        let Some(shadow) = self.shadow else {
            return Vec::new();
        };
        let d = &self.decision;
        let Some(s) = shadow.decision else {
            return vec![Disagreement {
                field: "capability",
                enforced: self.capability.as_str(),
                shadow: shadow
                    .capability
                    .map_or("unknown_route", Capability::as_str),
            }];
        };
        let mut out = Vec::new();
        let mut differ = |field, enforced: &'static str, shadow: &'static str| {
            if enforced != shadow {
                out.push(Disagreement {
                    field,
                    enforced,
                    shadow,
                });
            }
        };
        differ(
            "capability",
            self.capability.as_str(),
            shadow
                .capability
                .map_or("unknown_route", Capability::as_str),
        );
        differ(
            "training",
            d.training_basis.as_str(),
            s.training_basis.as_str(),
        );
        differ(
            "retention",
            d.retention_basis.as_str(),
            s.retention_basis.as_str(),
        );
        differ("geo", d.geo.basis.as_str(), s.geo.basis.as_str());
        differ("route", route_outcome(d), route_outcome(&s));
        out
    }
}

/// A request the gateway answers itself.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// The caller could not be established (401).
    Identity(IdentityError),
    /// The client address could not be established (400).
    ClientIp(ClientIpError),
    /// The path could make an upstream see another route than the one decided (400).
    Target(TargetError),
    /// A trusted proxy named more than one account (400).
    AmbiguousIdentity,
    /// No capability route matches method and path (404).
    UnknownRoute,
    /// The account's constraints leave no pool for the capability (451).
    NoPermittedRoute(Box<Admission>),
    /// The account's line in the consent snapshot is quarantined (403).
    ConsentRecordInvalid(Box<Quarantined>),
}

impl Refusal {
    /// The HTTP status answered.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Identity(_) => 401,
            Refusal::ClientIp(_) | Refusal::Target(_) | Refusal::AmbiguousIdentity => 400,
            Refusal::UnknownRoute => 404,
            Refusal::NoPermittedRoute(_) => 451,
            Refusal::ConsentRecordInvalid(_) => 403,
        }
    }

    /// The stable `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Identity(e) => e.code(),
            Refusal::ClientIp(_) => "malformed_forwarded_for",
            Refusal::Target(_) => "invalid_path",
            Refusal::AmbiguousIdentity => "ambiguous_identity",
            Refusal::UnknownRoute => "unknown_route",
            Refusal::NoPermittedRoute(_) => "no_permitted_route",
            Refusal::ConsentRecordInvalid(_) => "consent_record_invalid",
        }
    }

    /// A sentence for the client; never names an address, key or body.
    pub fn message(&self) -> String {
        match self {
            Refusal::Identity(e) => e.to_string(),
            Refusal::ClientIp(e) => e.to_string(),
            Refusal::Target(e) => e.to_string(),
            Refusal::AmbiguousIdentity => {
                "the identity header holds more than one value; a request has one caller".into()
            }
            Refusal::UnknownRoute => "no capability is configured for this method and path".into(),
            Refusal::NoPermittedRoute(a) => format!(
                "the account's privacy settings leave no permitted pool for capability `{}`",
                a.capability
            ),
            Refusal::ConsentRecordInvalid(_) => {
                "the account's consent record could not be understood; nothing is forwarded until it is fixed".into()
            }
        }
    }
}

/// Every element of every field line of `name`: comma-separated, trimmed,
/// empty ones skipped: lists as RFC 9110 §5.6.1 defines them.
fn list_elements<'h>(headers: &'h HeaderMap, name: &str) -> impl Iterator<Item = &'h [u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// The one value of a singleton header: `Some(None)` when absent,
/// `Some(Some(value))` with its only element (empty when the line is blank),
/// `None` when it holds two or more (lines or list elements).
fn single_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Option<&'h [u8]>> {
    if !headers.contains_key(name) {
        return Some(None);
    }
    let mut elements = list_elements(headers, name.as_str());
    let first = elements.next().unwrap_or_default();
    elements.next().is_none().then_some(Some(first))
}

/// The plan name of anonymous callers, shared by all of them.
fn anonymous_plan() -> Arc<str> {
    static ANONYMOUS: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| "anonymous".into());
    ANONYMOUS.clone()
}

/// Decides one request under `snapshot`.
pub fn evaluate(snapshot: &Snapshot, head: &RequestHead<'_>) -> Result<Admission, Refusal> {
    // The account's record is the one memory miss a large snapshot costs:
    // its key is hashed and its record asked for first, so that it arrives
    // while the rest of the head is read. Refusals keep their order below.
    let mut authorization = head.headers.get_all(http::header::AUTHORIZATION).iter();
    let api_key = authorization
        .next()
        .map(|v| ApiKey::read(&snapshot.accounts, v.as_bytes()));
    let target =
        RequestTarget::parse_sharing(head.target, head.received).map_err(Refusal::Target)?;
    let trusted_peer = snapshot.trusted_proxies.contains(head.peer);
    let forwarded_for = head
        .headers
        .get_all("x-forwarded-for")
        .into_iter()
        .map(|v| v.as_bytes());
    let client = client_address(head.peer, forwarded_for, &snapshot.trusted_proxies)
        .map_err(Refusal::ClientIp)?;

    let trusted_identity = match snapshot.identity_header.as_ref().filter(|_| trusted_peer) {
        Some(name) => single_value(head.headers, name).ok_or(Refusal::AmbiguousIdentity)?,
        None => None,
    };
    let credentials = Credentials {
        api_key,
        trusted_identity,
    };
    // Two keys are not a choice the gateway makes for the client.
    if authorization.next().is_some() {
        return Err(Refusal::Identity(IdentityError::MalformedAuthorization));
    }
    // What does not depend on the account is worked out while its record
    // is on its way; the refusals it could give still come after identity's.
    let capability = snapshot.routes.capability(head.method, target.path());
    // Sent more than once, the protective reading wins: on if any value is 1.
    let global_privacy_control = list_elements(head.headers, "sec-gpc").any(|v| v == b"1");
    let client_prefix = ClientPrefix::new(client, snapshot.prefix_lengths);

    let caller = identity::resolve(&snapshot.accounts, head.listener_product, credentials)
        .map_err(Refusal::Identity)?;

    // A quarantined consent record is answered before anything is decided for it.
    let record = match caller {
        Caller::Quarantined(q) => return Err(Refusal::ConsentRecordInvalid(Box::new(q))),
        Caller::Account(a) => Some(a),
        Caller::Anonymous => None,
    };
    let (account, plan, product, plan_class, consents) = match &record {
        Some(a) => (
            a.id,
            Arc::clone(a.plan),
            a.product,
            a.plan_class,
            &a.consents,
        ),
        None => (
            "anonymous",
            anonymous_plan(),
            head.listener_product,
            PlanClass::ChatAnonymous,
            &Consents::NONE,
        ),
    };
    let capability = capability.ok_or(Refusal::UnknownRoute)?;

    let facts = RequestFacts {
        product,
        plan: Some(plan_class),
        consents,
        capability,
        global_privacy_control,
    };
    let decision = policy::decide(&snapshot.pools, &facts);
    let shadow = snapshot.shadow.as_ref().and_then(|rules| {
        let capability = match &rules.routes {
            Some(routes) => routes.capability(head.method, target.path()),
            None => Some(capability),
        };
        let plan = match &record {
            Some(a) => rules.plans.get(a.product, a.plan),
            None => Some(PlanClass::ChatAnonymous),
        };
        let shadow_decision = capability.map(|capability| {
            policy::decide(
                &snapshot.pools,
                &RequestFacts {
                    plan,
                    capability,
                    ..facts
                },
            )
        });
        let differs = capability != Some(facts.capability) || shadow_decision != Some(decision);
        differs.then_some(ShadowDecision {
            capability,
            decision: shadow_decision,
        })
    });

    let country = match &snapshot.geo {
        Some(db) if decision.geo.lookup => db.country(client),
        _ => None,
    };
    let admission = Admission {
        account: account.into(),
        plan,
        product,
        capability,
        target,
        decision,
        country,
        client_prefix,
        shadow,
        origin: record.map(|a| a.origin),
    };
    if decision.route.candidates.is_empty() {
        return Err(Refusal::NoPermittedRoute(Box::new(admission)));
    }
    Ok(admission)
}
