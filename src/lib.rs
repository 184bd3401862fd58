//! `privacy-gateway`: an inline Pingora reverse proxy that enforces an AI
//! provider's privacy policy on every inference request.
//!
//! Data flows one way: request -> facts -> decision -> rewrite -> forward.
//!
//! - [`policy`]: the decision, pure (training, retention, geo, permitted pools).
//! - [`config`]: files -> validated, immutable [`config::Snapshot`].
//! - [`identity`]: API key / trusted identity header -> account.
//! - [`client_ip`]: peer + trusted hops -> client address -> [`client_ip::ClientPrefix`].
//! - [`geo`]: country of an address from a `.mmdb` file.
//! - [`request_target`]: the raw target -> the one normalised path routes match and upstreams get.
//! - [`capability`]: method + path -> capability.
//! - [`evaluate`]: one request head -> facts -> decision (shared by the proxy and tools).
//! - [`explain`]: the decision for a described request, as JSON.
//! - [`routing`]: pool addresses and the choice among permitted pools.
//! - [`credential`]: the operator's credential for a pool, from a secret file.
//! - [`health`]: active and passive health of pool addresses.
//! - [`dns`]: pool host names, resolved at load and re-resolved as answers expire.
//! - [`stamp`]: the upstream header contract and its signature.
//! - [`request_shape`]: raw HTTP/1 heads and upgrades, checked before anything decides.
//! - [`listener`]: per-connection limits in front of Pingora's proxy.
//! - [`proxy`]: the Pingora `ProxyHttp` adapter.
//! - [`proxy_protocol`]: the client address from an L4 balancer's PROXY header.
//! - [`reload`]: file watching and `SIGHUP` -> validated snapshot swap.
//! - [`observe`]: a finished request -> metrics, access line, audit record.
//! - [`view`]: one serialisable view of a decision, for `explain`, audit, access line and metrics.
//! - [`metrics`], [`audit`], [`admin`]: what happened, for operators and the privacy team.
//! - [`server`]: assembles Pingora services from the settings.
//! - [`lifecycle`]: listening sockets bound up front; upgrades and stops that lose no request.
//! - [`logging`]: diagnostic logs, Pingora's included (client addresses taken out), at the levels an operator needs.
//! - [`preflight`]: what `run` needs from the host (writable paths, a private upgrade socket).
//! - [`tls_listener`]: a listener's certificate, taken from the snapshot at each handshake.
//! - [`echo`]: echo upstreams for `demo` and tests.

#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod capability;
pub mod client_ip;
pub mod config;
pub mod credential;
pub mod dns;
pub mod echo;
pub mod evaluate;
pub mod explain;
pub mod geo;
pub mod health;
pub mod identity;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod preflight;
pub mod proxy;
pub mod proxy_protocol;
pub mod reload;
pub mod request_shape;
pub mod request_target;
pub mod routing;
pub mod server;
pub mod stamp;
pub mod tls_listener;
pub mod view;
