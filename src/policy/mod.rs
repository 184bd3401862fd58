//! The decision, pure: what the privacy policy allows for one request.
//!
//! Nothing here does I/O, reads a clock or draws a random number, so every
//! rule can be read, tested and benchmarked alone. The proxy gathers
//! [`RequestFacts`], calls [`decide`] and applies the [`Decision`].

/// The version of the decision tables compiled into this binary: spec §1
/// to spec §4 as code in [`decide`]. It is part of `x-privacy-policy-version`,
/// so an upstream can tell when the same files are decided by other tables.
///
/// Bump it whenever `decide` can answer differently for some facts: the test
/// `decision_tables_version_names_what_decide_does` in `tests/policy_rows.rs`
/// fingerprints `decide` over every combination of facts and fails until the
/// new behaviour has a new version.
pub const DECISION_TABLES: &str = "e2";

mod basis;
mod decide;
mod facts;

pub use basis::Basis;
pub use decide::{
    decide, Decision, GeoUse, RemovedPools, Retention, RouteConstraint, RouteDecision, Served,
    Training,
};
pub use facts::{
    Capability, CapabilitySet, Consents, PlanClass, PoolCatalog, PoolProfile, PoolSet, Product,
    ProductSet, RegionId, RequestFacts, SubprocessorSet, Tier, MAX_POOLS, MAX_SUBPROCESSORS,
};
