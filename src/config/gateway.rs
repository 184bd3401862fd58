//! `gateway.toml` -> process settings, and the trust and signing parts of the snapshot.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::HeaderName;
use ipnet::IpNet;

use super::diagnostics::FileErrors;
use super::files::{GatewayFile, LimitsEntry};
use super::snapshot::{GatewaySettings, Listener, ListenerTls};
use crate::admin::AdminToken;
use crate::audit::AuditTarget;
use crate::client_ip::TrustedProxies;
use crate::dns::DnsSettings;
use crate::listener::Limits;
use crate::policy::Product;
use crate::routing::UpstreamTimeouts;
use crate::stamp::SigningKey;
use crate::tls_listener::ServerCertificate;

/// `gateway.toml`, compiled: the process settings and what the snapshot
/// takes from it.
pub(super) struct Gateway {
    pub settings: GatewaySettings,
    pub trusted_proxies: TrustedProxies,
    pub identity_header: Option<HeaderName>,
    pub strip_headers: Vec<HeaderName>,
    pub signing_key: Option<SigningKey>,
    pub timeouts: UpstreamTimeouts,
    pub admin_token: Option<AdminToken>,
    pub tls_certificates: Vec<(SocketAddr, Arc<ServerCertificate>)>,
    pub dns: DnsSettings,
    /// Files named here that the snapshot depends on (the signing key, the admin token).
    pub sources: Vec<PathBuf>,
}

/// Compiles `gateway` (whose folder is `base`), reporting problems to `g`.
pub(super) fn compile_gateway(
    gateway: &GatewayFile,
    base: &Path,
    g: &mut FileErrors<'_>,
) -> Gateway {
    let settings = gateway_settings(gateway, base, g);
    let mut trusted = Vec::new();
    for net in &gateway.trust.trusted_proxies {
        match parse_trusted(net.get_ref()) {
            Some(n) => trusted.push(n),
            None => g.at_span(
                net.span(),
                format!(
                    "trusted proxy `{}` is neither an address nor a CIDR network",
                    net.get_ref()
                ),
            ),
        }
    }
    let identity_header = match gateway.trust.identity_header.as_deref() {
        None => None,
        Some(name) => match HeaderName::try_from(name) {
            Ok(h) if crate::stamp::is_reserved(h.as_str()) => {
                g.at_line(None, format!("identity header `{name}` is a reserved name"));
                None
            }
            Ok(h) if crate::stamp::is_underscore_name(h.as_str()) => {
                g.at_line(
                    None,
                    format!("identity header `{name}` has an underscore: such headers are dropped on arrival"),
                );
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
    let strip_headers = strip_headers(&gateway.trust.strip_headers, g);
    let mut sources = Vec::new();
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
    let admin_token = gateway
        .admin
        .as_ref()
        .and_then(|a| a.token_file.as_ref())
        .and_then(|file| {
            let path = base.join(file);
            sources.push(path.clone());
            AdminToken::load(&path).map_err(|e| g.at_line(None, e)).ok()
        });
    let mut tls_certificates = Vec::new();
    for listener in &settings.listeners {
        let Some(tls) = &listener.tls else { continue };
        sources.extend([tls.cert_file.clone(), tls.key_file.clone()]);
        match ServerCertificate::load(&tls.cert_file, &tls.key_file) {
            Ok(c) => tls_certificates.push((listener.address, Arc::new(c))),
            Err(e) => g.at_line(None, e),
        }
    }
    let timeouts = {
        let d = UpstreamTimeouts::default();
        let ms = std::time::Duration::from_millis;
        UpstreamTimeouts {
            connect: gateway.upstream.connect_timeout_ms.map_or(d.connect, ms),
            read: gateway.upstream.read_timeout_ms.map_or(d.read, ms),
            ejection: gateway.upstream.ejection_ms.map_or(d.ejection, ms),
        }
    };
    let mut dns = DnsSettings::default();
    for server in &gateway.upstream.dns_servers {
        match server.parse::<SocketAddr>() {
            Ok(addr) => dns.servers.push(addr),
            Err(_) => g.at_line(None, format!("DNS server `{server}` is not ip:port")),
        }
    }
    if let Some(ms) = gateway.upstream.dns_refresh_ms {
        dns.refresh = std::time::Duration::from_millis(ms);
    }
    Gateway {
        settings,
        dns,
        trusted_proxies: TrustedProxies::new(trusted),
        identity_header,
        strip_headers,
        signing_key,
        timeouts,
        admin_token,
        tls_certificates,
        sources,
    }
}

/// A trusted proxy: a CIDR network, or one address (as a /32 or /128).
fn parse_trusted(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether two listening addresses cannot both be bound: the same port and
/// the same address, or an unspecified one (`0.0.0.0`, `[::]`) on either side.
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `[trust] strip_headers`: header names, none that forwarding needs.
fn strip_headers(names: &[String], g: &mut FileErrors<'_>) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for name in names {
        match HeaderName::try_from(name.as_str()) {
            Ok(h) if [HOST, CONTENT_LENGTH, TRANSFER_ENCODING].contains(&h) => g.at_line(
                None,
                format!("strip header `{name}` is needed to forward a request"),
            ),
            Ok(h) => out.push(h),
            Err(_) => g.at_line(None, format!("strip header `{name}` is not a header name")),
        }
    }
    out
}

/// `[limits]`, over nginx-like defaults.
fn limits(entry: &LimitsEntry, g: &mut FileErrors<'_>) -> Limits {
    let d = Limits::default();
    let mut duration = |name: &str, value: Option<u64>, default: Duration| match value {
        Some(0) => {
            g.at_line(None, format!("[limits] {name} must be at least 1"));
            default
        }
        Some(ms) => Duration::from_millis(ms),
        None => default,
    };
    let keepalive_timeout = duration(
        "keepalive_timeout_ms",
        entry.keepalive_timeout_ms,
        d.keepalive_timeout,
    );
    let header_timeout = duration(
        "header_timeout_ms",
        entry.header_timeout_ms,
        d.header_timeout,
    );
    let body_timeout = duration("body_timeout_ms", entry.body_timeout_ms, d.body_timeout);
    let send_timeout = duration("send_timeout_ms", entry.send_timeout_ms, d.send_timeout);
    let max_header_bytes = entry.max_header_bytes.unwrap_or(d.max_header_bytes);
    if !(1024..=MAX_HEADER_BYTES).contains(&max_header_bytes) {
        g.at_line(
            None,
            format!("[limits] max_header_bytes must be between 1024 and {MAX_HEADER_BYTES}"),
        );
    }
    let max_connections = entry.max_connections.unwrap_or(d.max_connections);
    if max_connections == 0 {
        g.at_line(None, "[limits] max_connections must be at least 1");
    }
    if entry.max_body_bytes == Some(0) {
        g.at_line(
            None,
            "[limits] max_body_bytes must be at least 1 (leave it out for no limit)",
        );
    }
    Limits {
        keepalive_timeout,
        header_timeout,
        max_header_bytes: max_header_bytes.clamp(1024, MAX_HEADER_BYTES),
        max_connections: max_connections.max(1),
        body_timeout,
        send_timeout,
        max_body_bytes: entry.max_body_bytes,
    }
}

/// Pingora refuses request heads from 1 MiB on; the limit stays below.
const MAX_HEADER_BYTES: usize = 1024 * 1024 - 1;

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
        if l.h2c && l.tls.is_some() {
            g.at_span(
                span.clone(),
                "h2c is for cleartext listeners; a TLS listener offers h2 through ALPN",
            );
        }
        let tls = l.tls.as_ref().map(|t| ListenerTls {
            cert_file: base.join(&t.cert_file),
            key_file: base.join(&t.key_file),
        });
        match (address, product) {
            (Ok(address), Ok(product)) => {
                if let Some(other) = listeners
                    .iter()
                    .find(|o: &&Listener| collide(o.address, address))
                {
                    g.at_span(
                        span,
                        format!(
                            "listener address {address} collides with listener {}",
                            other.address
                        ),
                    );
                }
                listeners.push(Listener {
                    address,
                    product,
                    h2c: l.h2c,
                    tls,
                    proxy_protocol: l.proxy_protocol,
                })
            }
            (Err(_), _) => g.at_span(
                span,
                format!("listener address `{}` is not host:port", l.address),
            ),
            (_, Err(e)) => g.at_span(span, e),
        }
    }
    let admin = gateway.admin.as_ref().and_then(|a| {
        let (span, text) = (a.address.span(), a.address.get_ref());
        match text.parse::<SocketAddr>() {
            Ok(admin) => {
                if let Some(l) = listeners.iter().find(|l| collide(l.address, admin)) {
                    g.at_span(
                        span,
                        format!("admin address {admin} collides with listener {}", l.address),
                    );
                }
                Some(admin)
            }
            Err(_) => {
                g.at_span(span, format!("admin address `{text}` is not host:port"));
                None
            }
        }
    });
    let process = &gateway.process;
    // Relative to gateway.toml's folder, like every other path in it.
    let path = |set: &Option<String>, default: &str| {
        base.join(set.as_deref().unwrap_or(default))
            .to_string_lossy()
            .into_owned()
    };
    GatewaySettings {
        listeners,
        threads: gateway.threads.unwrap_or(2).max(1),
        upgrade_sock: path(&process.upgrade_sock, "/tmp/privacy-gateway/upgrade.sock"),
        pid_file: path(
            &process.pid_file,
            "/tmp/privacy-gateway/privacy-gateway.pid",
        ),
        grace_period_seconds: process.grace_period_seconds.unwrap_or(5),
        graceful_shutdown_timeout_seconds: process.graceful_shutdown_timeout_seconds.unwrap_or(300),
        admin,
        audit: gateway.audit.as_ref().map(|a| match a.path.as_str() {
            "-" => AuditTarget::Stdout,
            path => AuditTarget::File(base.join(path)),
        }),
        audit_buffer: gateway
            .audit
            .as_ref()
            .and_then(|a| a.buffer)
            .unwrap_or(65_536),
        log_access: gateway.log.access.unwrap_or(true),
        limits: limits(&gateway.limits, g),
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
