//! `decide`: the tables of spec §1 to spec §4 as one pure function.

use super::basis::Basis;
use super::facts::{Capability, PlanClass, PoolCatalog, PoolSet, Product, RequestFacts, Tier};

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

/// One of the account's or the request's constraints that keep a pool
/// serving the capability from being a candidate (spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteConstraint {
    /// The pool's subprocessor serves another product only (`6/purpose`).
    Purpose,
    /// The account opted out of the pool's subprocessor (`6/opt-out`).
    SubprocessorOptOut,
    /// The pool is outside the account's residency (`7/residency`).
    Residency,
    /// The request is `zdr` and the pool's subprocessor keeps input (`5/zdr`).
    Zdr,
}

impl RouteConstraint {
    /// Every constraint, in the order they are applied: a pool removed by
    /// one is not counted again by a later one.
    pub const ALL: [RouteConstraint; 4] = [
        RouteConstraint::Purpose,
        RouteConstraint::SubprocessorOptOut,
        RouteConstraint::Residency,
        RouteConstraint::Zdr,
    ];

    /// The basis id it is reported under.
    pub const fn basis(self) -> Basis {
        match self {
            RouteConstraint::Purpose => Basis::Purpose,
            RouteConstraint::SubprocessorOptOut => Basis::SubprocessorOptOut,
            RouteConstraint::Residency => Basis::Residency,
            RouteConstraint::Zdr => Basis::Zdr,
        }
    }
}

/// The pools that serve the capability but may not receive the request, by
/// the constraint that removed them: the one name for "pools removed, by
/// basis" that the 451 and 503 answers, `explain`, the audit log and the
/// metrics all read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RemovedPools([PoolSet; RouteConstraint::ALL.len()]);

impl RemovedPools {
    /// The pools `constraint` removed.
    pub const fn by(&self, constraint: RouteConstraint) -> PoolSet {
        self.0[constraint as usize]
    }

    /// Every removed pool.
    pub fn all(&self) -> PoolSet {
        self.0
            .iter()
            .fold(PoolSet::EMPTY, |all, set| all.union(*set))
    }

    /// Whether no pool was removed.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|set| set.is_empty())
    }

    /// The bases of the constraints that removed at least one pool, in the
    /// order they apply: what a 451 or 503 names.
    pub fn constraints(&self) -> impl Iterator<Item = Basis> + '_ {
        RouteConstraint::ALL
            .into_iter()
            .filter(|c| !self.by(*c).is_empty())
            .map(RouteConstraint::basis)
    }

    /// Every removed pool (by index) with the basis that removed it,
    /// constraint by constraint.
    pub fn pools(&self) -> impl Iterator<Item = (usize, Basis)> + '_ {
        RouteConstraint::ALL
            .into_iter()
            .flat_map(|c| self.by(c).iter().map(move |i| (i, c.basis())))
    }

    fn insert(&mut self, constraint: RouteConstraint, pool: usize) {
        self.0[constraint as usize].insert(pool);
    }
}

/// Where the request may go (spec §4): the permitted pools, and the pools
/// that serve the capability but were removed, by reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteDecision {
    /// Pools that may receive the request.
    pub candidates: PoolSet,
    /// Pools that serve the capability but may not receive it, by reason.
    pub removed: RemovedPools,
}

/// What serving a request from one candidate pool means (spec §4, EU first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// The priority tier of the pool.
    pub tier: u32,
    /// `7/eu-first-exception` when a lower candidate tier exists: the
    /// request went to a tier the policy uses only in exceptional cases.
    pub exception: Option<Basis>,
}

impl RouteDecision {
    /// The candidates by priority tier, lowest first; routing uses the first
    /// tier that still has a healthy address (policy §7: EU first).
    pub fn tiers<'c>(&self, pools: &'c PoolCatalog) -> impl Iterator<Item = Tier> + 'c {
        let candidates = self.candidates;
        pools.tiers().iter().filter_map(move |t| {
            let pools = t.pools.intersect(candidates);
            (!pools.is_empty()).then_some(Tier {
                priority: t.priority,
                pools,
            })
        })
    }

    /// The tier of candidate `pool`, and whether serving from it is an
    /// exception to EU first (a lower candidate tier exists).
    pub fn served_by(&self, pools: &PoolCatalog, pool: usize) -> Served {
        let tier = pools.get(pool).map_or(0, |p| p.priority);
        let lowest = self.tiers(pools).next().map_or(tier, |t| t.priority);
        Served {
            tier,
            exception: (tier > lowest).then_some(Basis::EuFirstException),
        }
    }
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
        route: route(pools, facts, retention),
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
        _ if f.capability == Capability::WebSearch => (Denied, Basis::ThirdPartyContent), // T2w
        Some(ApiPaid) => (Denied, Basis::ApiPaid),        // T3
        Some(ApiFree) if c.zdr => (Denied, Basis::Zdr),   // TZ
        Some(ApiFree) if c.training_opt_out => (Denied, Basis::ApiObjection), // T4
        Some(ApiFree) => (Allowed, Basis::ApiFree),       // T5
        Some(ChatTeam) if c.training_opt_in && !c.training_opt_out => (Allowed, Basis::TeamOptIn), // T6
        Some(ChatTeam) => (Denied, Basis::Team), // T7
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

/// Spec §4: the pools serving the capability, less those a constraint
/// excludes; each removed pool is counted under the first constraint (in
/// [`RouteConstraint::ALL`] order) that excludes it.
fn route(pools: &PoolCatalog, f: &RequestFacts<'_>, retention: Retention) -> RouteDecision {
    let serving = pools.serving(f.capability);
    let mut removed = RemovedPools::default();
    let c = f.consents;
    for i in serving.iter() {
        let Some(pool) = pools.get(i) else { continue };
        let excluded_by = if !pool.products.contains(f.product) {
            Some(RouteConstraint::Purpose)
        } else if c.subprocessor_opt_outs.contains(pool.subprocessor) {
            Some(RouteConstraint::SubprocessorOptOut)
        } else if c.residency.is_some_and(|r| r != pool.region) {
            Some(RouteConstraint::Residency)
        } else if retention == Retention::Zdr && pool.retains_input.is_some() {
            Some(RouteConstraint::Zdr)
        } else {
            None
        };
        if let Some(constraint) = excluded_by {
            removed.insert(constraint, i);
        }
    }
    RouteDecision {
        candidates: serving.without(removed.all()),
        removed,
    }
}
