//! The orchestrator: reads `gateway.toml` and every file it names, compiles
//! each with its own module, checks what crosses files, and returns one
//! [`Snapshot`] or every error found.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::consent_files::open_consents;
use super::diagnostics::{parse_toml, read, short_hash, ConfigError, ConfigErrors, FileErrors};
use super::files::{GatewayFile, PoolsFile, RulesFile, TrustEntry};
use super::gateway::{compile_gateway, Gateway};
use super::pools::{compile_pools, Pools};
use super::rules::{compile_rules, Rules};
use super::snapshot::{GatewaySettings, Snapshot};
use crate::geo::GeoDb;
use crate::health::HealthRegistry;
use crate::policy::Capability;
use crate::stamp::SigningKey;

/// Adjustments made by the program rather than the files.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Replace the addresses of these pools (the demo's local echo upstreams).
    pub pool_addresses: HashMap<String, Vec<String>>,
    /// Where endpoint health is kept across snapshots.
    pub health: Arc<HealthRegistry>,
    /// Verify a compiled consent snapshot whole (its checksum and every
    /// record), not only its header: `check`'s thoroughness, proportional to
    /// its size.
    pub verify_accounts: bool,
}

/// Loads `gateway.toml` and every file it names.
pub fn load(
    gateway_path: &Path,
    options: &LoadOptions,
) -> Result<(GatewaySettings, Snapshot), ConfigErrors> {
    let policy = read_policy_files(gateway_path, options)?;
    let (gateway_file, gateway, base) = (policy.gateway_file, policy.gateway, policy.base);
    let (rules, pools) = (policy.rules, policy.pools);
    let (accounts_path, mut sources, mut errors) =
        (policy.accounts_path, policy.sources, policy.errors);
    let (rules_source, pools_source) = (policy.rules_source, policy.pools_source);

    let known = rules
        .as_ref()
        .zip(pools.as_ref())
        .map(|(r, p)| (&r.plans, p));
    let consents = open_consents(
        &accounts_path,
        policy.changes_path.as_deref(),
        known,
        options.verify_accounts,
        &mut errors,
    );

    let geo = match &gateway_file.files.geo {
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

    let (
        Some((rules_text, rules_file)),
        Some((pools_text, _)),
        Some(rules),
        Some(pools),
        Some(consents),
    ) = (rules_source, pools_source, rules, pools, consents)
    else {
        return Err(ConfigErrors(errors));
    };
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    sources.extend(consents.sources);

    let policy_version = policy_version(&PolicyInputs {
        date: &rules_file.policy_date,
        rules: &rules_text,
        pools: &pools_text,
        trust: &gateway_file.trust,
        signing_key: gateway.signing_key.as_ref(),
    });
    let snapshot = Snapshot {
        policy_version,
        pools: pools.catalog,
        upstreams: pools.upstreams,
        routes: rules.routes,
        prefix_lengths: rules.prefix_lengths,
        plan_count: rules.plans.len(),
        shadow: rules.shadow,
        accounts: consents.store,
        accounts_path,
        consent_revision: consents.revision,
        geo,
        trusted_proxies: gateway.trusted_proxies,
        identity_header: gateway.identity_header,
        strip_headers: gateway.strip_headers,
        signing_key: gateway.signing_key,
        admin_token: gateway.admin_token,
        tls_certificates: gateway.tls_certificates,
        dns: gateway.dns,
        health: options.health.clone(),
        sources,
    };
    Ok((gateway.settings, snapshot))
}

/// `gateway.toml` and the files the accounts are judged against, read and
/// compiled; what failed is in `errors` (and its part is `None`).
pub(super) struct PolicyFiles {
    gateway_file: GatewayFile,
    gateway: Gateway,
    base: PathBuf,
    rules_source: Option<(String, RulesFile)>,
    pools_source: Option<(String, PoolsFile)>,
    pub(super) rules: Option<Rules>,
    pub(super) pools: Option<Pools>,
    /// `[files] accounts`.
    pub(super) accounts_path: PathBuf,
    /// `[files] account_changes`.
    pub(super) changes_path: Option<PathBuf>,
    sources: Vec<PathBuf>,
    /// Every problem found so far.
    pub(super) errors: Vec<ConfigError>,
}

/// Reads `gateway.toml`, the rules and the pools (everything but the
/// accounts and the geo database), collecting every error.
pub(super) fn read_policy_files(
    gateway_path: &Path,
    options: &LoadOptions,
) -> Result<PolicyFiles, ConfigErrors> {
    let base = gateway_path
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let gateway_text = read(gateway_path)?;
    let gateway_file: GatewayFile = parse_toml(gateway_path, &gateway_text)?;
    let mut errors = Vec::new();

    let mut g = FileErrors::new(gateway_path, &gateway_text);
    let gateway = compile_gateway(&gateway_file, &base, &mut g);
    let mut sources = vec![gateway_path.to_path_buf()];
    sources.extend(gateway.sources.iter().cloned());
    errors.append(&mut g.errors);

    let rules_path = base.join(&gateway_file.files.rules);
    let pools_path = base.join(&gateway_file.files.pools);
    let accounts_path = base.join(&gateway_file.files.accounts);
    let changes_path = gateway_file
        .files
        .account_changes
        .as_ref()
        .map(|c| base.join(c));
    sources.extend([rules_path.clone(), pools_path.clone()]);

    // Each file is read and parsed on its own, so that one run reports the
    // mistakes of every file; what depends on a file that did not parse waits.
    let rules_source = read_toml::<RulesFile>(&rules_path, &mut errors);
    let pools_source = read_toml::<PoolsFile>(&pools_path, &mut errors);

    let rules = rules_source.as_ref().map(|(text, file)| {
        let mut r = FileErrors::new(&rules_path, text);
        let rules = compile_rules(file, &mut r);
        errors.append(&mut r.errors);
        rules
    });

    let pools = pools_source.as_ref().map(|(text, file)| {
        let mut p = FileErrors::new(&pools_path, text);
        let pools = compile_pools(file, &base, options, gateway.timeouts, &gateway.dns, &mut p);
        sources.extend(
            file.pools
                .iter()
                .filter_map(|p| p.get_ref().tls_ca_file.as_ref().map(|f| base.join(f))),
        );
        sources.extend(file.pools.iter().filter_map(|p| {
            let credential = p.get_ref().credential.as_ref();
            credential.map(|c| base.join(&c.secret_file))
        }));
        errors.append(&mut p.errors);
        pools
    });

    if let (Some(rules), Some(pools)) = (&rules, &pools) {
        for c in Capability::ALL {
            if rules.routed.contains(c) && pools.catalog.serving(c).is_empty() {
                errors.push(ConfigError {
                    file: pools_path.clone(),
                    line: None,
                    message: format!(
                        "capability `{c}` has a route in the rules but no pool serves it"
                    ),
                });
            }
        }
    }
    Ok(PolicyFiles {
        gateway_file,
        gateway,
        base,
        rules_source,
        pools_source,
        rules,
        pools,
        accounts_path,
        changes_path,
        sources,
        errors,
    })
}

/// Reads and parses one TOML file; on failure, records why and gives nothing.
fn read_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    errors: &mut Vec<ConfigError>,
) -> Option<(String, T)> {
    let parsed = read(path).and_then(|text| {
        let file = parse_toml(path, &text)?;
        Ok((text, file))
    });
    parsed.map_err(|mut e| errors.append(&mut e.0)).ok()
}

/// Everything that decides, besides the accounts and the geo database (they
/// have revisions of their own).
struct PolicyInputs<'a> {
    date: &'a str,
    rules: &'a str,
    pools: &'a str,
    trust: &'a TrustEntry,
    signing_key: Option<&'a SigningKey>,
}

/// `<policy date>+r<revision>`: the revision changes whenever anything that
/// can change a decision changes (spec §8): the rules and pools files, the
/// trust and identity settings, the signing key (by its keyed id, never the
/// key) and the decision tables of this binary. (Listeners are bound for the
/// life of the process and are not part of a snapshot.)
fn policy_version(inputs: &PolicyInputs<'_>) -> String {
    let trust = serde_json::to_vec(inputs.trust).expect("trust settings serialise");
    let key_id = inputs
        .signing_key
        .map_or_else(|| "unsigned".to_string(), SigningKey::key_id);
    let revision = revision(&[
        crate::policy::DECISION_TABLES.as_bytes(),
        inputs.rules.as_bytes(),
        inputs.pools.as_bytes(),
        &trust,
        key_id.as_bytes(),
    ]);
    format!("{}+r{revision}", inputs.date)
}

/// The admin listener's address from `gateway.toml` alone (nothing else is
/// read: a health probe must stay cheap with a million accounts).
pub fn admin_address(gateway_path: &Path) -> Result<Option<SocketAddr>, ConfigErrors> {
    let text = read(gateway_path)?;
    let file: GatewayFile = parse_toml(gateway_path, &text)?;
    file.admin
        .as_ref()
        .map(|a| {
            let text = a.address.get_ref();
            text.parse()
                .map_err(|_| format!("admin address `{text}` is not host:port"))
        })
        .transpose()
        .map_err(|message| {
            ConfigErrors(vec![ConfigError {
                file: gateway_path.to_path_buf(),
                line: None,
                message,
            }])
        })
}

/// Short content hash of the policy files: the rules revision.
fn revision(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    short_hash(h)
}
