//! The decision, pure: what the privacy policy allows for one request.
//!
//! Nothing here does I/O, reads a clock or draws a random number, so every
//! rule can be read, tested and benchmarked alone. The proxy gathers
//! [`RequestFacts`], calls [`decide`] and applies the [`Decision`].

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
