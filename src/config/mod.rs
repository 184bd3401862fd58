//! Configuration files -> one validated, compiled [`Snapshot`].
//!
//! Loading reads every file, checks every reference and either returns a
//! complete snapshot or every error found, each with its file and line. A
//! snapshot is immutable; the running one sits behind [`SnapshotHandle`].

mod account_lines;
mod accounts;
mod consent_files;
pub mod consent_image;
mod diagnostics;
mod files;
mod gateway;
mod load;
mod pools;
mod rules;
mod snapshot;

pub use accounts::{
    hash_api_key, Account, AccountStore, KeyHash, NameContext, Origin, Quarantined, Record,
};
pub use consent_files::{compact, compile_export, Compacted, Compiled};
pub use diagnostics::{ConfigError, ConfigErrors};
pub use load::{admin_address, load, LoadOptions};
pub use snapshot::{
    GatewaySettings, Listener, ListenerTls, PlanNames, ShadowRules, Snapshot, SnapshotHandle,
};
