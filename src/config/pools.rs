//! `pools.toml` -> the pool catalogue the policy sees and the upstreams the proxy uses.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use pingora::tls::x509::X509;

use super::diagnostics::{is_token, FileErrors};
use super::files::{AddressEntry, HealthCheckEntry, PoolsFile};
use super::load::LoadOptions;
use crate::credential::UpstreamCredential;
use crate::dns::{DnsSettings, HostPort};
use crate::health::{CheckSpec, Probe, Thresholds};
use crate::policy::{
    Capability, CapabilitySet, PoolCatalog, PoolProfile, Product, ProductSet, RegionId, MAX_POOLS,
    MAX_SUBPROCESSORS,
};
use crate::routing::{parse_url, Endpoint, PoolUpstream, UpstreamTimeouts, Upstreams};

/// The pools file, compiled.
pub(super) struct Pools {
    pub(super) catalog: PoolCatalog,
    pub(super) upstreams: Upstreams,
    pub(super) subprocessors: Vec<String>,
    pub(super) regions: Vec<String>,
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

/// Every host name (not IP) the pools' addresses use, to resolve at once.
fn host_names(file: &PoolsFile, options: &LoadOptions) -> BTreeSet<HostPort> {
    let mut names = BTreeSet::new();
    for pool in &file.pools {
        let pool = pool.get_ref();
        let urls: Vec<&str> = match options.pool_addresses.get(&pool.name) {
            Some(urls) => urls.iter().map(String::as_str).collect(),
            None => pool.addresses.iter().map(AddressEntry::url).collect(),
        };
        for url in urls {
            if let Ok((_, host, port)) = parse_url(url) {
                if crate::dns::is_name(&host) {
                    names.insert((host, port));
                }
            }
        }
    }
    names
}

pub(super) fn compile_pools(
    file: &PoolsFile,
    base: &Path,
    options: &LoadOptions,
    timeouts: UpstreamTimeouts,
    dns: &DnsSettings,
    p: &mut FileErrors<'_>,
) -> Pools {
    let mut subprocessors = Vec::new();
    let mut regions = Vec::new();
    let mut profiles = Vec::new();
    let mut upstreams = Vec::new();
    let resolved = crate::dns::resolve_all(dns, &host_names(file, options));
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
            match c.get_ref().parse::<Capability>() {
                Ok(c) => capabilities.insert(c),
                Err(e) => p.at_span(c.span(), format!("pool `{}`: {e}", pool.name)),
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
                &resolved,
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
        let host = pool.host.as_ref().and_then(|h| {
            if let Some(value) = valid_host(h) {
                return Some(value);
            }
            p.at_span(
                span.clone(),
                format!("pool `{}`: host `{h}` is not host or host:port", pool.name),
            );
            None
        });
        let weight = pool.weight.unwrap_or(1);
        if weight == 0 {
            p.at_span(
                span.clone(),
                format!("pool `{}`: weight must be at least 1", pool.name),
            );
        }
        let products = match &pool.products {
            None => ProductSet::BOTH,
            Some(names) => {
                let mut set = ProductSet::EMPTY;
                for name in names {
                    match name.parse::<Product>() {
                        Ok(product) => set.insert(product),
                        Err(e) => p.at_span(span.clone(), format!("pool `{}`: {e}", pool.name)),
                    }
                }
                if set.is_empty() {
                    p.at_span(
                        span.clone(),
                        format!(
                            "pool `{}`: products must name `api`, `chat` or both",
                            pool.name
                        ),
                    );
                }
                set
            }
        };
        let retains_input = pool.retains_input.as_deref().and_then(|text| {
            match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() => Some(d),
                _ => {
                    p.at_span(
                        span.clone(),
                        format!(
                            "pool `{}`: retains_input `{text}` must be a duration such as \"15d\" (leave it out for a pool that keeps nothing)",
                            pool.name
                        ),
                    );
                    None
                }
            }
        });
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
            products,
            retains_input,
            priority: pool.priority.unwrap_or(0),
        });
        let credential = pool.credential.as_ref().and_then(|c| {
            let prefix = c.prefix.as_deref().unwrap_or_default();
            UpstreamCredential::load(&c.header, prefix, &base.join(&c.secret_file))
                .map_err(|e| p.at_span(span.clone(), format!("pool `{}`: {e}", pool.name)))
                .ok()
        });
        upstreams.push(
            PoolUpstream::new(
                pool.name.clone(),
                pool.subprocessor.clone(),
                pool.region.clone(),
                weight.max(1),
                endpoints,
                ca,
                health_check,
            )
            .with_credential(credential)
            .with_host(host),
        );
    }
    Pools {
        catalog: PoolCatalog::new(profiles),
        upstreams: Upstreams::new(upstreams, timeouts),
        subprocessors,
        regions,
    }
}

/// A `Host` value: an authority without userinfo, as a header value.
fn valid_host(host: &str) -> Option<http::HeaderValue> {
    let authority =
        !host.is_empty() && !host.contains('@') && http::uri::Authority::try_from(host).is_ok();
    authority
        .then(|| http::HeaderValue::try_from(host).ok())
        .flatten()
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
