//! The compiled, immutable configuration, and the handle that swaps it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderName;

use super::accounts::AccountStore;
use super::diagnostics::ConfigError;
use crate::audit::AuditTarget;
use crate::capability::CapabilityRoutes;
use crate::client_ip::{PrefixLengths, TrustedProxies};
use crate::geo::GeoDb;
use crate::listener::Limits;
use crate::policy::{PlanClass, PoolCatalog, Product};
use crate::routing::Upstreams;
use crate::stamp::SigningKey;
use crate::tls_listener::ServerCertificate;

/// One listening address and the product of its anonymous traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    /// Where to listen.
    pub address: SocketAddr,
    /// Product of requests without credentials.
    pub product: Product,
    /// Accept HTTP/2 with prior knowledge (cleartext listeners).
    pub h2c: bool,
    /// Certificate and key files, when the listener serves TLS.
    pub tls: Option<ListenerTls>,
    /// Whether a PROXY protocol header comes first (required from trusted proxies).
    pub proxy_protocol: bool,
}

/// Where a TLS listener's certificate and key are (their contents are in the snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerTls {
    /// PEM certificate chain, leaf first.
    pub cert_file: std::path::PathBuf,
    /// PEM private key.
    pub key_file: std::path::PathBuf,
}

/// Settings fixed for the life of the process (sockets and threads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewaySettings {
    /// Listeners.
    pub listeners: Vec<Listener>,
    /// Worker threads per listener.
    pub threads: usize,
    /// Socket for handing listeners to an upgraded process.
    pub upgrade_sock: String,
    /// Pid file.
    pub pid_file: String,
    /// Seconds to keep accepting after a shutdown or upgrade signal.
    pub grace_period_seconds: u64,
    /// Seconds in-flight requests may take to finish after that.
    pub graceful_shutdown_timeout_seconds: u64,
    /// The admin listener, when configured.
    pub admin: Option<SocketAddr>,
    /// Where audit lines go, when configured.
    pub audit: Option<AuditTarget>,
    /// Pending audit lines before dropping.
    pub audit_buffer: usize,
    /// Logs as JSON lines.
    pub log_json: bool,
    /// An `access` log line per request.
    pub log_access: bool,
    /// What one client connection may cost.
    pub limits: Limits,
}

/// Everything a request is decided and forwarded under. One is loaded at the
/// start of each request and used for all of its phases.
#[derive(Debug)]
pub struct Snapshot {
    /// `policy_date+r<revision>`, stamped as `x-privacy-policy-version`.
    pub policy_version: String,
    /// The pools as the policy sees them.
    pub pools: PoolCatalog,
    /// The pools' addresses.
    pub upstreams: Upstreams,
    /// Method + path -> capability.
    pub routes: CapabilityRoutes,
    /// Truncation of client addresses.
    pub prefix_lengths: PrefixLengths,
    /// How many plan names the rules define.
    pub plan_count: usize,
    /// A candidate rule set evaluated beside the enforced one.
    pub shadow: Option<ShadowRules>,
    /// The consent snapshot.
    pub accounts: AccountStore,
    /// Where it was read from (quarantined lines are reported as `file:line`).
    pub accounts_path: PathBuf,
    /// The consent revision (spec §8): the base's content hash, followed by
    /// `+<sequence>` of the last change file applied.
    pub consent_revision: String,
    /// Country database, when configured.
    pub geo: Option<GeoDb>,
    /// Peers believed about the client and caller.
    pub trusted_proxies: TrustedProxies,
    /// Header naming the account, from trusted peers only.
    pub identity_header: Option<HeaderName>,
    /// `[trust] strip_headers`: address-carrying headers beyond the built-in list.
    pub strip_headers: Vec<HeaderName>,
    /// Key for `x-privacy-signature`.
    pub signing_key: Option<SigningKey>,
    /// The bearer token `/metrics` requires, when configured.
    pub admin_token: Option<crate::admin::AdminToken>,
    /// The certificate of each TLS listener, by listening address.
    pub tls_certificates: Vec<(SocketAddr, Arc<ServerCertificate>)>,
    /// How pool host names are resolved.
    pub dns: crate::dns::DnsSettings,
    /// Where address health is kept across snapshots (and re-resolutions).
    pub health: Arc<crate::health::HealthRegistry>,
    /// Every file the snapshot was built from (what a reload watches).
    pub sources: Vec<PathBuf>,
}

impl Snapshot {
    /// The quarantined account lines of the consent files, as `file:line:
    /// account quarantined ...`, base then changes, each in file order: what
    /// a load logs. At most `limit`; costs the lines listed.
    pub fn quarantine_report(&self, limit: usize) -> Vec<ConfigError> {
        super::consent_files::quarantine_report(
            &self.accounts,
            self.accounts.quarantined().take(limit),
        )
    }

    /// Every quarantined account, those naming a plan, subprocessor or region
    /// gone from the rules or pools included: what `check` lists. Reads
    /// every record.
    pub fn full_quarantine_report(&self) -> Vec<ConfigError> {
        super::consent_files::quarantine_report(&self.accounts, self.accounts.scan_quarantined())
    }
}

impl Snapshot {
    /// The certificate the TLS listener on `address` serves now.
    pub fn tls_certificate(&self, address: SocketAddr) -> Option<&ServerCertificate> {
        self.tls_certificates
            .iter()
            .find(|(a, _)| *a == address)
            .map(|(_, c)| &**c)
    }
}

/// Plan names of each product and the class each maps to.
#[derive(Clone, Debug, Default)]
pub struct PlanNames {
    api: HashMap<String, PlanClass>,
    chat: HashMap<String, PlanClass>,
}

impl PlanNames {
    fn of(&self, product: Product) -> &HashMap<String, PlanClass> {
        match product {
            Product::Api => &self.api,
            Product::Chat => &self.chat,
        }
    }

    /// The class of plan `name` of `product`.
    pub fn get(&self, product: Product, name: &str) -> Option<PlanClass> {
        self.of(product).get(name).copied()
    }

    /// Defines (or redefines) plan `name` of `product`.
    pub fn insert(&mut self, product: Product, name: String, class: PlanClass) {
        match product {
            Product::Api => self.api.insert(name, class),
            Product::Chat => self.chat.insert(name, class),
        };
    }

    /// How many plan names there are.
    pub fn len(&self) -> usize {
        self.api.len() + self.chat.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A candidate rule set: decided on every request beside the enforced
/// rules, compared, never applied.
#[derive(Debug)]
pub struct ShadowRules {
    /// Its name, in metrics and logs.
    pub name: String,
    /// Plan name -> class under the candidate.
    pub plans: PlanNames,
    /// Capability routes under the candidate, when it changes them.
    pub routes: Option<CapabilityRoutes>,
}

/// The running snapshot: read lock-free by every request, replaced whole.
#[derive(Debug)]
pub struct SnapshotHandle(ArcSwap<Snapshot>);

impl SnapshotHandle {
    /// Starts with `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        SnapshotHandle(ArcSwap::from_pointee(snapshot))
    }

    /// The current snapshot, to be held for the whole request.
    pub fn current(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    /// Replaces the snapshot; requests in flight keep theirs.
    pub fn replace(&self, snapshot: Snapshot) {
        self.0.store(Arc::new(snapshot));
    }
}
