//! The serde shapes of the configuration files, field by field. The
//! commented examples under `config/` show each of them in use.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// `gateway.toml`: process settings and where the other files are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// Where to listen, each listener with the product of its anonymous traffic.
    #[serde(rename = "listener")]
    pub listeners: Vec<Spanned<ListenerEntry>>,
    /// The other files, relative to `gateway.toml`'s folder.
    pub files: FilesEntry,
    /// Which peers are believed about the client and caller.
    #[serde(default)]
    pub trust: TrustEntry,
    /// Signing of the stamped headers.
    #[serde(default)]
    pub signing: SigningEntry,
    /// Upstream connection settings.
    #[serde(default)]
    pub upstream: UpstreamEntry,
    /// What one client connection may cost.
    #[serde(default)]
    pub limits: LimitsEntry,
    /// Worker threads per listener service (default 2).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Process lifecycle: graceful upgrade and shutdown.
    #[serde(default)]
    pub process: ProcessEntry,
    /// The admin listener (metrics, health).
    #[serde(default)]
    pub admin: Option<AdminEntry>,
    /// The audit log.
    #[serde(default)]
    pub audit: Option<AuditEntry>,
    /// Diagnostic logs.
    #[serde(default)]
    pub log: LogEntry,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminEntry {
    /// `host:port` of `/metrics`, `/healthz`, `/readyz`; keep it off the public network.
    pub address: Spanned<String>,
    /// File holding a bearer token `/metrics` then requires (health endpoints stay open).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// `[audit]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// File to append JSON lines to (relative to gateway.toml), or `-` for standard output.
    pub path: String,
    /// Lines that may wait for the writer before new ones are dropped (default 65536).
    #[serde(default)]
    pub buffer: Option<usize>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogEntry {
    /// `text` (default) or `json`. The level comes from `RUST_LOG` (default: warnings, plus access lines).
    #[serde(default)]
    pub format: Option<String>,
    /// One `access` line per request at info level (default true), unless
    /// `RUST_LOG` says otherwise about the `access` target.
    #[serde(default)]
    pub access: Option<bool>,
}

/// `[process]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessEntry {
    /// Unix socket over which a new process (`run --upgrade`) takes the
    /// listening sockets of the old one, in a folder only this user can
    /// enter, created so when missing (default `/tmp/privacy-gateway/upgrade.sock`).
    #[serde(default)]
    pub upgrade_sock: Option<String>,
    /// Where `run --daemon` writes its pid (default `/tmp/privacy-gateway/privacy-gateway.pid`).
    #[serde(default)]
    pub pid_file: Option<String>,
    /// After `SIGTERM`, how long to keep accepting (answering with
    /// `Connection: close`, not ready) before closing the listeners, in
    /// seconds (default 5). After `SIGQUIT` the hand-over window is Pingora's fixed 5 s.
    #[serde(default)]
    pub grace_period_seconds: Option<u64>,
    /// Then how long in-flight requests (long streams) may take to finish, in
    /// seconds (default 300); the process exits as soon as the last is answered.
    #[serde(default)]
    pub graceful_shutdown_timeout_seconds: Option<u64>,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerEntry {
    /// `host:port`, e.g. `0.0.0.0:8080`.
    pub address: String,
    /// `api` or `chat`: the product of requests that carry no credentials.
    pub product: String,
    /// Accept HTTP/2 with prior knowledge on this cleartext listener (default false).
    #[serde(default)]
    pub h2c: bool,
    /// Serve TLS (ALPN `h2`, `http/1.1`) with this certificate and key.
    #[serde(default)]
    pub tls: Option<ListenerTlsEntry>,
    /// Read a PROXY protocol header (v1 or v2) from trusted proxies (default false).
    #[serde(default)]
    pub proxy_protocol: bool,
}

/// `[listener.tls]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsEntry {
    /// PEM certificate chain, leaf first (relative to gateway.toml's folder).
    pub cert_file: PathBuf,
    /// PEM private key of the leaf.
    pub key_file: PathBuf,
}

/// `[files]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesEntry {
    /// The rules file (TOML).
    pub rules: PathBuf,
    /// The pools file (TOML).
    pub pools: PathBuf,
    /// The consent snapshot: a compiled snapshot (`compile-accounts`) or a
    /// JSON Lines export, told apart by the compiled file's magic.
    pub accounts: PathBuf,
    /// A folder of change files applied on top of it, newest wins.
    #[serde(default)]
    pub account_changes: Option<PathBuf>,
    /// A MaxMind-format country database; without one no country is stamped.
    #[serde(default)]
    pub geo: Option<PathBuf>,
}

/// `[trust]`. Serialised whole into the policy version: every trust and
/// identity setting can change a decision.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustEntry {
    /// Trusted proxies: CIDR networks or single addresses, e.g. `["10.0.0.0/8", "192.0.2.7"]`.
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    /// Header naming the account, set by a trusted front service.
    #[serde(default)]
    pub identity_header: Option<String>,
    /// More headers that carry a client address, removed from every request
    /// like the built-in list (e.g. a CDN's own `x-cdn-client-addr`).
    #[serde(default)]
    pub strip_headers: Vec<String>,
}

/// `[signing]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningEntry {
    /// File holding the HMAC key (its contents without leading or trailing
    /// whitespace); when set, `x-privacy-signature` is stamped.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[upstream]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamEntry {
    /// TCP (and TLS) connect timeout in milliseconds (default 2000).
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    /// Longest silence while reading a response, in milliseconds (default 120000:
    /// model streams can pause).
    #[serde(default)]
    pub read_timeout_ms: Option<u64>,
    /// How long an address that refused a connection is left out, in
    /// milliseconds (default 5000); active checks can end it sooner.
    #[serde(default)]
    pub ejection_ms: Option<u64>,
    /// Name servers (`ip:port`) for pool host names (default: the system's).
    #[serde(default)]
    pub dns_servers: Vec<String>,
    /// Longest time between two resolutions of a pool host name, in
    /// milliseconds (default 30000; sooner when the record's TTL ends).
    #[serde(default)]
    pub dns_refresh_ms: Option<u64>,
}

/// `[limits]`: what one client connection may cost. Defaults follow nginx.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsEntry {
    /// Silence allowed between requests on a kept-alive connection, in milliseconds (default 75000).
    #[serde(default)]
    pub keepalive_timeout_ms: Option<u64>,
    /// Time allowed for a whole request head, in milliseconds (default 60000); then 408.
    #[serde(default)]
    pub header_timeout_ms: Option<u64>,
    /// Longest request head in bytes (default 32768); then 431.
    #[serde(default)]
    pub max_header_bytes: Option<usize>,
    /// Open connections per listener (default 4096); beyond it idle ones are shed, else new ones refused.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Silence allowed between two reads of a request body, in milliseconds (default 60000); then 408.
    #[serde(default)]
    pub body_timeout_ms: Option<u64>,
    /// Silence allowed while a client does not read its answer, in milliseconds (default 60000).
    #[serde(default)]
    pub send_timeout_ms: Option<u64>,
    /// Largest request body in bytes; no limit when absent. Then 413.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
}

/// `rules.toml`: what the policy needs to know about plans, paths and addresses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    /// Date of the privacy policy these rules implement, e.g. `2025-02-06`.
    pub policy_date: String,
    /// Prefix lengths for client-address truncation.
    #[serde(default)]
    pub client_ip: ClientIpEntry,
    /// Plan names per product, each mapped to a plan class.
    pub plans: PlansEntry,
    /// Method + path -> capability, first match wins.
    #[serde(rename = "route")]
    pub routes: Vec<Spanned<RouteEntry>>,
    /// A candidate rule set evaluated beside the enforced one, never applied.
    #[serde(default)]
    pub shadow: Option<ShadowEntry>,
}

/// `[shadow]`: rules tried on live traffic before they are enforced.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowEntry {
    /// Names the candidate in metrics and logs.
    pub name: String,
    /// Plan names whose class the candidate changes (the rest as enforced).
    #[serde(default)]
    pub plans: PlansEntry,
    /// Capability routes replacing the enforced ones, when present.
    #[serde(default, rename = "route")]
    pub routes: Option<Vec<Spanned<RouteEntry>>>,
}

/// `[client_ip]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientIpEntry {
    /// IPv4 prefix length, 0 to 24 (default 24).
    #[serde(default)]
    pub ipv4_prefix: Option<Spanned<u8>>,
    /// IPv6 prefix length, 0 to 48 (default 48).
    #[serde(default)]
    pub ipv6_prefix: Option<Spanned<u8>>,
}

/// `[plans]`: `[plans.api]` and `[plans.chat]`, each `name = "class"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlansEntry {
    /// La Plateforme plans; classes `api-free`, `api-paid`.
    #[serde(default)]
    pub api: BTreeMap<String, Spanned<String>>,
    /// Le Chat plans; classes `chat-individual`, `chat-team`.
    #[serde(default)]
    pub chat: BTreeMap<String, Spanned<String>>,
}

/// One `[[route]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteEntry {
    /// HTTP method; any method when absent.
    #[serde(default)]
    pub method: Option<String>,
    /// Path pattern; `{name}` matches one non-empty segment.
    pub path: String,
    /// The capability such requests use.
    pub capability: Spanned<String>,
}

/// `pools.toml`: the upstream pools.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsFile {
    /// Every pool; at most 64.
    #[serde(rename = "pool")]
    pub pools: Vec<Spanned<PoolEntry>>,
}

/// One `[[pool]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// Unique name, stamped as `x-privacy-pool`.
    pub name: String,
    /// Who runs it, stamped as `x-privacy-subprocessor`; accounts opt out by this name.
    pub subprocessor: String,
    /// Where it keeps data (`eu`, `us`, ...); accounts' `residency` refers to it.
    pub region: String,
    /// Capabilities it serves.
    pub capabilities: Vec<Spanned<String>>,
    /// Share of traffic relative to the other candidate pools (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// The products the pool may serve, `api` and/or `chat` (default both):
    /// a subprocessor engaged for one product's purpose serves only that one.
    #[serde(default)]
    pub products: Option<Vec<String>>,
    /// How long the subprocessor keeps input, e.g. `"15d"`, when it keeps any:
    /// a `zdr` request never goes to such a pool.
    #[serde(default)]
    pub retains_input: Option<String>,
    /// Tier, lower first (default 0): a higher tier is used only while every
    /// candidate address of the lower tiers is down (EU first).
    #[serde(default)]
    pub priority: Option<u32>,
    /// `http://host:port` or `https://host:port` endpoints, each a string
    /// or `{ url = "...", weight = N }`.
    pub addresses: Vec<AddressEntry>,
    /// Name to send in TLS SNI and to verify the certificate against
    /// (default: the host of the address).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// PEM file of CA certificates to verify the pool's certificate with
    /// (default: the system's).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// `Host` sent with every request to the pool, `host` or `host:port`
    /// (default: each address's own host, and port when not the default).
    #[serde(default)]
    pub host: Option<String>,
    /// Active health checks of the pool's addresses; none when absent.
    #[serde(default)]
    pub health_check: Option<HealthCheckEntry>,
    /// The operator's credential for this pool, sent on every request to it.
    #[serde(default)]
    pub credential: Option<CredentialEntry>,
}

/// `[pool.credential]`: `header: <prefix><contents of secret_file>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialEntry {
    /// The header, e.g. `authorization` or `api-key`.
    pub header: String,
    /// Text before the secret, e.g. `Bearer ` (default none).
    #[serde(default)]
    pub prefix: Option<String>,
    /// File holding the secret (relative to gateway.toml's folder); reloaded when it changes.
    pub secret_file: PathBuf,
}

/// One pool address.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum AddressEntry {
    /// `http://host:port`, weight 1.
    Url(String),
    /// An address with a weight.
    Weighted {
        /// `http://host:port` or `https://host:port`.
        url: String,
        /// Share of the pool's traffic relative to its other addresses (default 1).
        #[serde(default)]
        weight: Option<u32>,
    },
}

impl AddressEntry {
    /// The address.
    pub fn url(&self) -> &str {
        match self {
            AddressEntry::Url(url) | AddressEntry::Weighted { url, .. } => url,
        }
    }

    /// Its weight.
    pub fn weight(&self) -> u32 {
        match self {
            AddressEntry::Url(_) => 1,
            AddressEntry::Weighted { weight, .. } => weight.unwrap_or(1),
        }
    }
}

/// `[pool.health_check]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckEntry {
    /// `http` (GET `path`, expects 200) or `tcp` (connect only).
    pub kind: String,
    /// Path for `http` checks (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// Time between checks in milliseconds (default 1000).
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// Longest wait for one check in milliseconds (default 1000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Consecutive passes to become healthy (default 1).
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    /// Consecutive failures to become unhealthy (default 2).
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
}

/// One line of `accounts.jsonl`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLine {
    /// Stable account id.
    pub id: String,
    /// `api` or `chat`.
    pub product: String,
    /// A plan name of the rules file for that product.
    pub plan: String,
    /// SHA-256 hashes (64 hex digits) of the account's API keys.
    #[serde(default)]
    pub api_key_sha256: Vec<String>,
    /// Objection / opt-out of training.
    #[serde(default)]
    pub training_opt_out: bool,
    /// Team opt-in to training.
    #[serde(default)]
    pub training_opt_in: bool,
    /// Zero data retention.
    #[serde(default)]
    pub zdr: bool,
    /// No IP-based personalisation.
    #[serde(default)]
    pub ip_personalization_opt_out: bool,
    /// Subprocessor names the account opted out of.
    #[serde(default)]
    pub subprocessor_opt_outs: Vec<String>,
    /// Region name the account's data must stay in.
    #[serde(default)]
    pub residency: Option<String>,
    /// Right to limitation exercised.
    #[serde(default)]
    pub restricted: bool,
}
