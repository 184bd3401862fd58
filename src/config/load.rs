//! Reading and validating the files into a [`Snapshot`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{HeaderName, Method};
use ipnet::IpNet;
use pingora::tls::x509::X509;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::accounts::{Account, AccountStore, DuplicateAccount, KeyHash};
use super::files::{
    AccountLine, AddressEntry, GatewayFile, HealthCheckEntry, PlansEntry, PoolsFile, RouteEntry,
    RulesFile,
};
use super::snapshot::{GatewaySettings, Listener, PlanNames, ShadowRules, Snapshot};
use crate::audit::AuditTarget;
use crate::capability::{CapabilityRoute, CapabilityRoutes};
use crate::client_ip::{PrefixLengths, TrustedProxies};
use crate::geo::GeoDb;
use crate::health::{CheckSpec, HealthRegistry, Probe, Thresholds};
use crate::policy::{
    Capability, CapabilitySet, Consents, PlanClass, PoolCatalog, PoolProfile, Product, RegionId,
    SubprocessorSet, MAX_POOLS, MAX_SUBPROCESSORS,
};
use crate::routing::{Endpoint, PoolUpstream, UpstreamTimeouts, Upstreams};
use crate::stamp::SigningKey;

/// One problem in one file, with its line when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found; a configuration with any is not used.
#[derive(Debug, Clone, Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Adjustments made by the program rather than the files.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Replace the addresses of these pools (the demo's local echo upstreams).
    pub pool_addresses: HashMap<String, Vec<String>>,
    /// Where endpoint health is kept across snapshots.
    pub health: Arc<HealthRegistry>,
}

/// Stops collecting after this many errors in one file.
const MAX_ERRORS_PER_FILE: usize = 20;

/// Collects the errors of one file.
struct FileErrors<'a> {
    file: PathBuf,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> FileErrors<'a> {
    fn new(file: &Path, text: &'a str) -> Self {
        FileErrors {
            file: file.to_path_buf(),
            text,
            errors: Vec::new(),
        }
    }

    fn at_line(&mut self, line: Option<usize>, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS_PER_FILE {
            self.errors.push(ConfigError {
                file: self.file.clone(),
                line,
                message: message.into(),
            });
        }
    }

    fn at_span(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let line = line_of(self.text, span.start);
        self.at_line(Some(line), message);
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| one_error(path, None, format!("cannot read: {e}")))
}

fn one_error(file: &Path, line: Option<usize>, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    }])
}

fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        one_error(path, line, e.message().to_string())
    })
}

/// Loads `gateway.toml` and every file it names.
pub fn load(
    gateway_path: &Path,
    options: &LoadOptions,
) -> Result<(GatewaySettings, Snapshot), ConfigErrors> {
    let base = gateway_path.parent().unwrap_or(Path::new("."));
    let gateway_text = read(gateway_path)?;
    let gateway: GatewayFile = parse_toml(gateway_path, &gateway_text)?;
    let mut errors = Vec::new();

    let mut g = FileErrors::new(gateway_path, &gateway_text);
    let settings = gateway_settings(&gateway, base, &mut g);
    let mut trusted = Vec::new();
    for net in &gateway.trust.trusted_proxies {
        match net.parse::<IpNet>() {
            Ok(n) => trusted.push(n),
            Err(_) => g.at_line(None, format!("trusted proxy `{net}` is not a CIDR network")),
        }
    }
    let identity_header = match gateway.trust.identity_header.as_deref() {
        None => None,
        Some(name) => match HeaderName::try_from(name) {
            Ok(h) if crate::stamp::is_reserved(h.as_str()) => {
                g.at_line(None, format!("identity header `{name}` is a reserved name"));
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                g.at_line(
                    None,
                    format!("identity header `{name}` is not a header name"),
                );
                None
            }
        },
    };
    let mut sources = vec![gateway_path.to_path_buf()];
    let signing_key = match &gateway.signing.key_file {
        None => None,
        Some(file) => {
            let path = base.join(file);
            sources.push(path.clone());
            match std::fs::read(&path) {
                Ok(bytes) if bytes.trim_ascii().len() >= 16 => {
                    Some(SigningKey::new(bytes.trim_ascii().to_vec()))
                }
                Ok(_) => {
                    g.at_line(
                        None,
                        format!("signing key {} is shorter than 16 bytes", path.display()),
                    );
                    None
                }
                Err(e) => {
                    g.at_line(
                        None,
                        format!("cannot read signing key {}: {e}", path.display()),
                    );
                    None
                }
            }
        }
    };
    let timeouts = {
        let d = UpstreamTimeouts::default();
        let ms = std::time::Duration::from_millis;
        UpstreamTimeouts {
            connect: gateway.upstream.connect_timeout_ms.map_or(d.connect, ms),
            read: gateway.upstream.read_timeout_ms.map_or(d.read, ms),
            ejection: gateway.upstream.ejection_ms.map_or(d.ejection, ms),
        }
    };
    errors.append(&mut g.errors);

    let rules_path = base.join(&gateway.files.rules);
    let pools_path = base.join(&gateway.files.pools);
    let accounts_path = base.join(&gateway.files.accounts);
    sources.extend([
        rules_path.clone(),
        pools_path.clone(),
        accounts_path.clone(),
    ]);

    let rules_text = read(&rules_path)?;
    let pools_text = read(&pools_path)?;
    let rules_file: RulesFile = parse_toml(&rules_path, &rules_text)?;
    let pools_file: PoolsFile = parse_toml(&pools_path, &pools_text)?;

    let mut r = FileErrors::new(&rules_path, &rules_text);
    let rules = compile_rules(&rules_file, &mut r);
    errors.append(&mut r.errors);

    let mut p = FileErrors::new(&pools_path, &pools_text);
    let pools = compile_pools(&pools_file, base, options, timeouts, &mut p);
    sources.extend(
        pools_file
            .pools
            .iter()
            .filter_map(|p| p.get_ref().tls_ca_file.as_ref().map(|f| base.join(f))),
    );
    errors.append(&mut p.errors);

    for c in Capability::ALL {
        if rules.routed.contains(c) && pools.catalog.serving(c).is_empty() {
            errors.push(ConfigError {
                file: pools_path.clone(),
                line: None,
                message: format!("capability `{c}` has a route in the rules but no pool serves it"),
            });
        }
    }

    let mut a = FileErrors::new(&accounts_path, "");
    let accounts = compile_accounts(&accounts_path, &rules.plans, &pools, &mut a)?;
    errors.append(&mut a.errors);

    let geo = match &gateway.files.geo {
        None => None,
        Some(file) => {
            let path = base.join(file);
            sources.push(path.clone());
            match GeoDb::open(&path) {
                Ok(db) => Some(db),
                Err(e) => {
                    errors.push(ConfigError {
                        file: path,
                        line: None,
                        message: e.to_string(),
                    });
                    None
                }
            }
        }
    };

    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }

    let policy_version = format!(
        "{}+r{}",
        rules_file.policy_date,
        revision(&[rules_text.as_bytes(), pools_text.as_bytes()])
    );
    let snapshot = Snapshot {
        policy_version,
        pools: pools.catalog,
        upstreams: pools.upstreams,
        routes: rules.routes,
        prefix_lengths: rules.prefix_lengths,
        plan_count: rules.plans.len(),
        shadow: rules.shadow,
        accounts,
        geo,
        trusted_proxies: TrustedProxies::new(trusted),
        identity_header,
        signing_key,
        sources,
    };
    Ok((settings, snapshot))
}

/// Short content hash of the policy files: the rules revision.
fn revision(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())[..7].to_string()
}

fn gateway_settings(gateway: &GatewayFile, base: &Path, g: &mut FileErrors<'_>) -> GatewaySettings {
    let mut listeners = Vec::new();
    if gateway.listeners.is_empty() {
        g.at_line(None, "at least one [[listener]] is required");
    }
    for entry in &gateway.listeners {
        let span = entry.span();
        let l = entry.get_ref();
        let address = l.address.parse::<SocketAddr>();
        let product = l.product.parse::<Product>();
        match (address, product) {
            (Ok(address), Ok(product)) => listeners.push(Listener { address, product }),
            (Err(_), _) => g.at_span(
                span,
                format!("listener address `{}` is not host:port", l.address),
            ),
            (_, Err(e)) => g.at_span(span, e),
        }
    }
    let process = &gateway.process;
    GatewaySettings {
        listeners,
        threads: gateway.threads.unwrap_or(2).max(1),
        upgrade_sock: process
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| "/tmp/privacy-gateway-upgrade.sock".into()),
        pid_file: process
            .pid_file
            .clone()
            .unwrap_or_else(|| "/tmp/privacy-gateway.pid".into()),
        grace_period_seconds: process.grace_period_seconds.unwrap_or(5),
        graceful_shutdown_timeout_seconds: process.graceful_shutdown_timeout_seconds.unwrap_or(300),
        admin: gateway
            .admin
            .as_ref()
            .and_then(|a| match a.address.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    g.at_line(
                        None,
                        format!("admin address `{}` is not host:port", a.address),
                    );
                    None
                }
            }),
        audit: gateway.audit.as_ref().map(|a| match a.path.as_str() {
            "-" => AuditTarget::Stdout,
            path => AuditTarget::File(base.join(path)),
        }),
        audit_buffer: gateway
            .audit
            .as_ref()
            .and_then(|a| a.buffer)
            .unwrap_or(65_536),
        log_json: match gateway.log.format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                g.at_line(
                    None,
                    format!("log format `{other}` must be `text` or `json`"),
                );
                false
            }
        },
    }
}

/// The rules file, compiled.
struct Rules {
    prefix_lengths: PrefixLengths,
    plans: PlanNames,
    routes: CapabilityRoutes,
    routed: CapabilitySet,
    shadow: Option<ShadowRules>,
}

/// Plan names -> classes, on top of `base` (the enforced plans, for a shadow set).
fn compile_plans(entry: &PlansEntry, base: PlanNames, r: &mut FileErrors<'_>) -> PlanNames {
    let mut plans = base;
    let products: [(Product, &BTreeMap<String, toml::Spanned<String>>); 2] =
        [(Product::Api, &entry.api), (Product::Chat, &entry.chat)];
    for (product, names) in products {
        for (name, class) in names {
            if name == "anonymous" {
                r.at_span(
                    class.span(),
                    "`anonymous` is built in and cannot be redefined",
                );
                continue;
            }
            match class.get_ref().parse::<PlanClass>() {
                Ok(c) if c.product() == product => {
                    plans.insert(product, name.clone(), c);
                }
                Ok(_) => r.at_span(
                    class.span(),
                    format!(
                        "plan `{name}` of product `{product}` cannot have class `{}`",
                        class.get_ref()
                    ),
                ),
                Err(e) => r.at_span(class.span(), e),
            }
        }
    }

    plans
}

/// `[[route]]` tables -> compiled routes, and the capabilities they reach.
fn compile_routes(
    entries: &[toml::Spanned<RouteEntry>],
    r: &mut FileErrors<'_>,
) -> (CapabilityRoutes, CapabilitySet) {
    let mut routes = Vec::new();
    let mut routed = CapabilitySet::default();
    for entry in entries {
        let span = entry.span();
        let route = entry.get_ref();
        let method = match route
            .method
            .as_deref()
            .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
        {
            None => None,
            Some(Ok(m)) => Some(m),
            Some(Err(_)) => {
                r.at_span(
                    span,
                    format!(
                        "`{}` is not an HTTP method",
                        route.method.as_deref().unwrap_or("")
                    ),
                );
                continue;
            }
        };
        let capability = match route.capability.get_ref().parse::<Capability>() {
            Ok(c) => c,
            Err(e) => {
                r.at_span(route.capability.span(), e);
                continue;
            }
        };
        match CapabilityRoute::new(method, &route.path, capability) {
            Ok(compiled) => {
                routed.insert(capability);
                routes.push(compiled);
            }
            Err(e) => r.at_span(span, e),
        }
    }
    (CapabilityRoutes::new(routes), routed)
}

fn compile_rules(file: &RulesFile, r: &mut FileErrors<'_>) -> Rules {
    let mut prefix_lengths = PrefixLengths::default();
    if let Some(v4) = &file.client_ip.ipv4_prefix {
        if *v4.get_ref() > 32 {
            r.at_span(v4.span(), "ipv4_prefix must be 0 to 32");
        }
        prefix_lengths.ipv4 = *v4.get_ref();
    }
    if let Some(v6) = &file.client_ip.ipv6_prefix {
        if *v6.get_ref() > 128 {
            r.at_span(v6.span(), "ipv6_prefix must be 0 to 128");
        }
        prefix_lengths.ipv6 = *v6.get_ref();
    }

    let plans = compile_plans(&file.plans, PlanNames::default(), r);
    let (routes, routed) = compile_routes(&file.routes, r);
    let shadow = file.shadow.as_ref().map(|shadow| ShadowRules {
        name: shadow.name.clone(),
        plans: compile_plans(&shadow.plans, plans.clone(), r),
        routes: shadow
            .routes
            .as_ref()
            .map(|routes| compile_routes(routes, r).0),
    });
    Rules {
        prefix_lengths,
        plans,
        routes,
        routed,
        shadow,
    }
}

/// The pools file, compiled.
struct Pools {
    catalog: PoolCatalog,
    upstreams: Upstreams,
    subprocessors: Vec<String>,
    regions: Vec<String>,
}

fn index_of(names: &mut Vec<String>, name: &str) -> usize {
    match names.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            names.push(name.to_string());
            names.len() - 1
        }
    }
}

fn compile_pools(
    file: &PoolsFile,
    base: &Path,
    options: &LoadOptions,
    timeouts: UpstreamTimeouts,
    p: &mut FileErrors<'_>,
) -> Pools {
    let mut subprocessors = Vec::new();
    let mut regions = Vec::new();
    let mut profiles = Vec::new();
    let mut upstreams = Vec::new();
    if file.pools.len() > MAX_POOLS {
        p.at_line(None, format!("at most {MAX_POOLS} pools are supported"));
    }
    for entry in file.pools.iter().take(MAX_POOLS) {
        let span = entry.span();
        let pool = entry.get_ref();
        if profiles.len() != upstreams.len() {
            break;
        }
        if upstreams.iter().any(|u: &PoolUpstream| u.name == pool.name) {
            p.at_span(
                span.clone(),
                format!("pool `{}` is defined twice", pool.name),
            );
            continue;
        }
        if !is_token(&pool.name) || !is_token(&pool.subprocessor) || !is_token(&pool.region) {
            p.at_span(
                span.clone(),
                "pool name, subprocessor and region must be non-empty and printable without spaces",
            );
            continue;
        }
        let mut capabilities = CapabilitySet::default();
        for c in &pool.capabilities {
            match c.parse::<Capability>() {
                Ok(c) => capabilities.insert(c),
                Err(e) => p.at_span(span.clone(), format!("pool `{}`: {e}", pool.name)),
            }
        }
        let overridden: Option<Vec<AddressEntry>> = options
            .pool_addresses
            .get(&pool.name)
            .map(|urls| urls.iter().cloned().map(AddressEntry::Url).collect());
        let addresses = overridden.as_ref().unwrap_or(&pool.addresses);
        if addresses.is_empty() {
            p.at_span(
                span.clone(),
                format!("pool `{}` has no addresses", pool.name),
            );
        }
        let mut endpoints = Vec::new();
        for address in addresses {
            if address.weight() == 0 {
                p.at_span(
                    span.clone(),
                    format!("pool `{}`: address weight must be at least 1", pool.name),
                );
            }
            match Endpoint::parse(
                address.url(),
                pool.tls_server_name.as_deref(),
                address.weight(),
                &options.health,
            ) {
                Ok(e) => endpoints.push(e),
                Err(e) => p.at_span(span.clone(), format!("pool `{}`: {e}", pool.name)),
            }
        }
        let health_check = pool
            .health_check
            .as_ref()
            .and_then(|h| match check_spec(h) {
                Ok(spec) => Some(spec),
                Err(e) => {
                    p.at_span(span.clone(), format!("pool `{}`: {e}", pool.name));
                    None
                }
            });
        let ca = match &pool.tls_ca_file {
            None => None,
            Some(file) => {
                let path = base.join(file);
                let certs = std::fs::read(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|pem| X509::stack_from_pem(&pem).map_err(|e| e.to_string()));
                match certs {
                    Ok(certs) if !certs.is_empty() => Some(Arc::new(certs.into_boxed_slice())),
                    Ok(_) => {
                        p.at_span(
                            span.clone(),
                            format!("{} holds no certificate", path.display()),
                        );
                        None
                    }
                    Err(e) => {
                        p.at_span(
                            span.clone(),
                            format!("cannot read CA file {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
        };
        let weight = pool.weight.unwrap_or(1);
        if weight == 0 {
            p.at_span(
                span.clone(),
                format!("pool `{}`: weight must be at least 1", pool.name),
            );
        }
        let subprocessor = index_of(&mut subprocessors, &pool.subprocessor);
        let region = index_of(&mut regions, &pool.region);
        if subprocessor >= MAX_SUBPROCESSORS || region > u8::MAX as usize {
            p.at_span(span.clone(), "too many distinct subprocessors or regions");
            continue;
        }
        profiles.push(PoolProfile {
            subprocessor,
            region: RegionId(region as u8),
            capabilities,
        });
        upstreams.push(PoolUpstream::new(
            pool.name.clone(),
            pool.subprocessor.clone(),
            pool.region.clone(),
            weight.max(1),
            endpoints,
            ca,
            health_check,
        ));
    }
    Pools {
        catalog: PoolCatalog::new(profiles),
        upstreams: Upstreams::new(upstreams, timeouts),
        subprocessors,
        regions,
    }
}

fn check_spec(entry: &HealthCheckEntry) -> Result<CheckSpec, String> {
    let probe = match entry.kind.as_str() {
        "tcp" => Probe::Tcp,
        "http" => {
            let path = entry.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || http::Uri::try_from(path.as_str()).is_err() {
                return Err(format!(
                    "health check path `{path}` must be an absolute path"
                ));
            }
            Probe::Http { path }
        }
        other => {
            return Err(format!(
                "health check kind `{other}` must be `http` or `tcp`"
            ))
        }
    };
    let ms = std::time::Duration::from_millis;
    let interval = ms(entry.interval_ms.unwrap_or(1000));
    let timeout = ms(entry.timeout_ms.unwrap_or(1000));
    if interval.is_zero() || timeout.is_zero() {
        return Err("health check interval_ms and timeout_ms must be at least 1".into());
    }
    let thresholds = Thresholds {
        healthy: entry.healthy_threshold.unwrap_or(1).max(1),
        unhealthy: entry.unhealthy_threshold.unwrap_or(2).max(1),
    };
    Ok(CheckSpec {
        probe,
        interval,
        timeout,
        thresholds,
    })
}

/// Printable ASCII without spaces: safe in a header value and a log line.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

fn parse_key_hash(hex_text: &str) -> Option<KeyHash> {
    if hex_text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

/// Reads the consent snapshot line by line: a million accounts are never
/// held as text beside the store being built.
fn compile_accounts(
    path: &Path,
    plans: &PlanNames,
    pools: &Pools,
    a: &mut FileErrors<'_>,
) -> Result<AccountStore, ConfigErrors> {
    let io_error = |e: std::io::Error| one_error(path, None, format!("cannot read: {e}"));
    let lines = count_lines(path).map_err(io_error)?;
    let mut store = AccountStore::with_capacity(lines, lines);
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).map_err(io_error)?);
    let mut raw = String::new();
    let mut keys = Vec::with_capacity(2);
    let mut plan_names: HashMap<String, Arc<str>> = HashMap::new();
    let mut n = 0;
    loop {
        raw.clear();
        if std::io::BufRead::read_line(&mut reader, &mut raw).map_err(io_error)? == 0 {
            break;
        }
        n += 1;
        let line = Some(n);
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let record: AccountLine = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                a.at_line(line, e.to_string());
                continue;
            }
        };
        match compile_account(record, plans, pools, &mut keys, &mut plan_names) {
            Ok(account) => match store.insert(account, &keys) {
                Ok(()) => {}
                Err(DuplicateAccount::Id) => {
                    a.at_line(line, "an account with this id is already defined")
                }
                Err(DuplicateAccount::Key) => a.at_line(
                    line,
                    "an API key hash of this account belongs to another account or is listed twice",
                ),
            },
            Err(message) => a.at_line(line, message),
        }
    }
    Ok(store)
}

/// Lines in a file, to size the store before it is filled.
fn count_lines(path: &Path) -> std::io::Result<usize> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut lines = 0;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(lines + 1);
        }
        lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
    }
}

fn compile_account(
    record: AccountLine,
    plans: &PlanNames,
    pools: &Pools,
    keys: &mut Vec<KeyHash>,
    plan_names: &mut HashMap<String, Arc<str>>,
) -> Result<Account, String> {
    if !is_token(&record.id) || record.id == "anonymous" {
        return Err(format!(
            "account id `{}` must be printable, without spaces, and not `anonymous`",
            record.id
        ));
    }
    let product: Product = record.product.parse()?;
    let plan_class = plans.get(product, &record.plan).ok_or_else(|| {
        format!(
            "plan `{}` is not defined for product `{product}` in the rules",
            record.plan
        )
    })?;
    keys.clear();
    for h in &record.api_key_sha256 {
        keys.push(parse_key_hash(h).ok_or("api_key_sha256 entries must be 64 hex digits")?);
    }
    let mut subprocessor_opt_outs = SubprocessorSet::default();
    for name in &record.subprocessor_opt_outs {
        let i = pools
            .subprocessors
            .iter()
            .position(|s| s == name)
            .ok_or_else(|| format!("subprocessor `{name}` is not used by any pool"))?;
        subprocessor_opt_outs.insert(i);
    }
    let residency = match &record.residency {
        None => None,
        Some(region) => Some(RegionId(
            pools
                .regions
                .iter()
                .position(|r| r == region)
                .ok_or_else(|| format!("residency `{region}` is not the region of any pool"))?
                as u8,
        )),
    };
    if record.training_opt_in && plan_class != PlanClass::ChatTeam {
        return Err("training_opt_in applies to team plans only".to_string());
    }
    Ok(Account {
        id: record.id.into(),
        product,
        plan: plan_names
            .entry(record.plan)
            .or_insert_with_key(|name| Arc::from(name.as_str()))
            .clone(),
        plan_class,
        consents: Consents {
            training_opt_out: record.training_opt_out,
            training_opt_in: record.training_opt_in,
            zdr: record.zdr,
            ip_personalization_opt_out: record.ip_personalization_opt_out,
            subprocessor_opt_outs,
            residency,
            restricted: record.restricted,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }

    #[test]
    fn key_hashes_are_64_hex_digits() {
        assert!(parse_key_hash(&"ab".repeat(32)).is_some());
        assert!(parse_key_hash(&"ab".repeat(31)).is_none());
        assert!(parse_key_hash(&"zz".repeat(32)).is_none());
    }
}
