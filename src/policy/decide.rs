//! `decide`: the tables of spec §1 to §4 as one pure function.

use super::basis::Basis;
use super::facts::{Capability, PlanClass, PoolCatalog, PoolSet, Product, RequestFacts};

/// Whether input and output may be used to train models (spec §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Training {
    /// May be used for training.
    Allowed,
    /// Must not be used for training.
    Denied,
}

impl Training {
    /// The value stamped in `x-privacy-training`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Training::Allowed => "allowed",
            Training::Denied => "denied",
        }
    }
}

/// How long downstream services may keep the request's data (spec §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Keep nothing once the output is generated.
    Zdr,
    /// Rolling 30 days, for abuse monitoring.
    Days30,
    /// Until the customer deletes it (fine-tuning files).
    UntilDeleted,
    /// For the conversation only.
    Conversation,
    /// For the life of the account.
    AccountLifetime,
}

impl Retention {
    /// The value stamped in `x-privacy-retention`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Retention::Zdr => "zdr",
            Retention::Days30 => "30d",
            Retention::UntilDeleted => "until-deleted",
            Retention::Conversation => "conversation",
            Retention::AccountLifetime => "account-lifetime",
        }
    }
}

/// Whether the country of the full address may be looked up (spec §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeoUse {
    /// The lookup is allowed.
    pub lookup: bool,
    /// Why.
    pub basis: Basis,
}

/// Where the request may go (spec §4): the permitted pools, and the pools
/// that serve the capability but were removed, by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteDecision {
    /// Pools that may receive the request.
    pub candidates: PoolSet,
    /// Removed because the account opted out of their subprocessor (`6/opt-out`).
    pub removed_opt_out: PoolSet,
    /// Removed because they are outside the account's residency (`7/residency`).
    pub removed_residency: PoolSet,
}

/// Everything the policy decided about one request, each part with its basis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// May the data be trained on.
    pub training: Training,
    /// The row of spec §1 that decided it.
    pub training_basis: Basis,
    /// How long it may be kept.
    pub retention: Retention,
    /// The row of spec §2 that decided it.
    pub retention_basis: Basis,
    /// Whether the country may be looked up.
    pub geo: GeoUse,
    /// Whether the truncated address may be forwarded at all.
    pub forward_client_prefix: bool,
    /// Where it may go.
    pub route: RouteDecision,
}

/// Decides what the policy allows for one request.
pub fn decide(pools: &PoolCatalog, facts: &RequestFacts<'_>) -> Decision {
    let (training, training_basis) = training(facts);
    let (retention, retention_basis) = retention(facts);
    Decision {
        training,
        training_basis,
        retention,
        retention_basis,
        geo: geo_use(facts),
        forward_client_prefix: !facts.consents.ip_personalization_opt_out,
        route: route(pools, facts),
    }
}

/// Spec §1, first matching row wins.
fn training(f: &RequestFacts<'_>) -> (Training, Basis) {
    use PlanClass::*;
    use Training::{Allowed, Denied};
    let c = f.consents;
    let product_plan = f.plan.filter(|p| p.product() == f.product);
    match product_plan {
        _ if c.restricted => (Denied, Basis::Limitation), // T1
        _ if f.capability == Capability::Connector => (Denied, Basis::ThirdParty), // T2
        Some(ApiPaid) => (Denied, Basis::ApiPaid),        // T3
        Some(ApiFree) if c.training_opt_out => (Denied, Basis::ApiObjection), // T4
        Some(ApiFree) => (Allowed, Basis::ApiFree),       // T5
        Some(ChatTeam) if c.training_opt_in => (Allowed, Basis::TeamOptIn), // T6
        Some(ChatTeam) => (Denied, Basis::Team),          // T7
        Some(ChatIndividual) if f.capability == Capability::Feedback => (Allowed, Basis::Feedback), // T8
        Some(ChatIndividual) if c.training_opt_out => (Denied, Basis::ChatOptOut), // T9
        Some(ChatAnonymous) if f.global_privacy_control => (Denied, Basis::Gpc),   // T10
        Some(ChatIndividual | ChatAnonymous) => (Allowed, Basis::ChatDefault),     // T11
        None => (Denied, Basis::DefaultDeny),                                      // T0
    }
}

/// Spec §2, first matching row wins. A plan the rules do not know (T0)
/// gets the shortest retention its product allows: fail closed here too.
fn retention(f: &RequestFacts<'_>) -> (Retention, Basis) {
    let anonymous = f.plan == Some(PlanClass::ChatAnonymous);
    let known_plan = f.plan.is_some_and(|p| p.product() == f.product);
    match f.product {
        Product::Api if f.consents.restricted => (Retention::Zdr, Basis::Limitation), // R0
        Product::Chat if f.consents.restricted => (Retention::Conversation, Basis::Limitation), // R0
        Product::Api if !known_plan => (Retention::Zdr, Basis::DefaultDeny),
        Product::Chat if !known_plan => (Retention::Conversation, Basis::DefaultDeny),
        Product::Api if f.capability == Capability::FineTuning => {
            (Retention::UntilDeleted, Basis::FineTuning) // R1
        }
        Product::Api if f.consents.zdr => (Retention::Zdr, Basis::Zdr), // R2
        Product::Api => (Retention::Days30, Basis::Api30d),             // R3
        Product::Chat if anonymous => (Retention::Conversation, Basis::ChatAnonymous), // R4
        Product::Chat => (Retention::AccountLifetime, Basis::ChatAccount), // R5
    }
}

/// Spec §3: the country is looked up only with consent.
fn geo_use(f: &RequestFacts<'_>) -> GeoUse {
    let anonymous_gpc = f.plan == Some(PlanClass::ChatAnonymous) && f.global_privacy_control;
    let (lookup, basis) = if f.consents.restricted {
        (false, Basis::Limitation)
    } else if f.consents.ip_personalization_opt_out || anonymous_gpc {
        (false, Basis::IpOptOut)
    } else {
        (true, Basis::IpCountry)
    };
    GeoUse { lookup, basis }
}

/// Spec §4: the pools serving the capability, less those the account's
/// subprocessor opt-outs and residency exclude.
fn route(pools: &PoolCatalog, f: &RequestFacts<'_>) -> RouteDecision {
    let serving = pools.serving(f.capability);
    let mut removed_opt_out = PoolSet::EMPTY;
    let mut removed_residency = PoolSet::EMPTY;
    let c = f.consents;
    if !c.subprocessor_opt_outs.is_empty() || c.residency.is_some() {
        for i in serving.iter() {
            let Some(pool) = pools.get(i) else { continue };
            if c.subprocessor_opt_outs.contains(pool.subprocessor) {
                removed_opt_out.insert(i);
            } else if c.residency.is_some_and(|r| r != pool.region) {
                removed_residency.insert(i);
            }
        }
    }
    RouteDecision {
        candidates: serving.without(removed_opt_out).without(removed_residency),
        removed_opt_out,
        removed_residency,
    }
}
