//! Prometheus metrics: what operators alert on and what a privacy team
//! counts (decisions by basis, shadow disagreements, removed routes).

use std::cell::RefCell;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{DefaultHashBuilder, HashTable};
use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::Snapshot;
use crate::policy::{Capability, Product};
use crate::routing::Upstreams;
use crate::view::DecisionView;

/// One upstream address's counters, resolved when a snapshot is installed,
/// so that counting an attempt is one atomic increment on the request path.
#[derive(Clone, Debug)]
pub struct EndpointCounters {
    /// Attempts sent to the address.
    pub attempts: IntCounter,
    /// Connections that failed (refused, timed out).
    pub connect_errors: IntCounter,
    /// Failures after the request was sent (reset, timeout, broken answer).
    pub response_errors: IntCounter,
    /// Answers with a 5xx status.
    pub status_5xx: IntCounter,
}

/// Every metric of the process, in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Tells this instance's series apart in the per-thread cache.
    id: u64,
    /// Requests by product, plan, capability, training decision and status.
    pub requests: IntCounterVec,
    /// Decisions by part (training, retention, geo) and basis id.
    pub decisions: IntCounterVec,
    /// Shadow rule disagreements by shadow set, field and the two bases.
    pub shadow_disagreements: IntCounterVec,
    /// Pools removed from a request's candidates, by reason and pool.
    pub routes_removed: IntCounterVec,
    /// Requests served from a tier above their lowest candidate tier
    /// (`7/eu-first-exception`, spec §4), by capability.
    pub eu_first_exceptions: IntCounterVec,
    /// Time from the first upstream attempt to the end of the response.
    pub upstream_seconds: Histogram,
    /// Time the gateway itself added (total minus upstream).
    pub overhead_seconds: Histogram,
    /// Configuration reloads by result (`success`, `failure`).
    pub reloads: IntCounterVec,
    /// The policy version serving now (value 1, version as label).
    pub policy_version: IntGaugeVec,
    /// Account lines quarantined in the consent snapshot serving now.
    pub accounts_quarantined: IntGauge,
    /// Audit lines dropped because the writer fell behind.
    pub audit_dropped: IntCounter,
    /// Requests the gateway refused (4xx) by `error.code`, and connections
    /// refused by the connection limit (`too_many_connections`).
    pub rejected: IntCounterVec,
    /// Connections closed by a limit, by reason (`idle_timeout`, `shed`).
    pub connections_closed: IntCounterVec,
    /// Open client connections, by listener address.
    pub connections_open: IntGaugeVec,
    /// Attempts by pool and address.
    pool_attempts: IntCounterVec,
    /// Failed attempts by pool, address and kind.
    pool_errors: IntCounterVec,
    /// Whether an address takes requests now, by pool and address (at scrape).
    endpoint_up: IntGaugeVec,
    /// Whether a pool has an address taking requests now, by pool,
    /// subprocessor, region and capability served (at scrape).
    pool_ready: IntGaugeVec,
    /// Connections closed over their PROXY protocol header, by reason.
    pub proxy_headers_refused: IntCounterVec,
}

/// `metric`, registered in `registry`. Names are fixed and unique, so a
/// malformed metric or a collision is a programming error.
fn registered<M: Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(
        registry,
        name,
        IntGaugeVec::new(Opts::new(name, help), labels),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(
        registry,
        name,
        IntCounterVec::new(Opts::new(name, help), labels),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    registered(registry, name, Histogram::with_opts(opts))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric (called once, at start-up).
    pub fn new() -> Self {
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "privacy_gateway_requests_total",
            "Requests by product, plan, capability, training decision and status.",
            &["product", "plan", "capability", "training", "status"],
        );
        let decisions = counter_vec(
            &r,
            "privacy_gateway_decisions_total",
            "Decisions by part (training, retention, geo) and basis id.",
            &["part", "basis"],
        );
        let shadow_disagreements = counter_vec(
            &r,
            "privacy_gateway_shadow_disagreements_total",
            "Requests on which the shadow rules would decide otherwise, by field and bases.",
            &["shadow", "field", "enforced", "candidate"],
        );
        let routes_removed = counter_vec(
            &r,
            "privacy_gateway_routes_removed_total",
            "Pools removed from a request's candidates, by reason (basis) and pool.",
            &["reason", "pool"],
        );
        let eu_first_exceptions = counter_vec(
            &r,
            "privacy_gateway_eu_first_exceptions_total",
            "Requests served from a tier above their lowest candidate tier (7/eu-first-exception), by capability.",
            &["capability"],
        );
        let upstream_seconds = histogram(
            &r,
            "privacy_gateway_upstream_seconds",
            "Time from the first upstream attempt to the end of the response.",
            prometheus::exponential_buckets(0.001, 2.0, 16).unwrap_or_default(),
        );
        let overhead_seconds = histogram(
            &r,
            "privacy_gateway_overhead_seconds",
            "Time the gateway added to a request (total minus upstream).",
            prometheus::exponential_buckets(0.000_025, 2.0, 16).unwrap_or_default(),
        );
        let reloads = counter_vec(
            &r,
            "privacy_gateway_config_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        );
        // Both series exist from the start, so `increase()` sees the first reload.
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let policy_version = gauge_vec(
            &r,
            "privacy_gateway_policy_version_info",
            "The policy version serving now.",
            &["version"],
        );
        let pool_attempts = counter_vec(
            &r,
            "privacy_gateway_pool_requests_total",
            "Attempts sent to a pool address (retries included).",
            &["pool", "address"],
        );
        let pool_errors = counter_vec(
            &r,
            "privacy_gateway_pool_errors_total",
            "Failed attempts by kind: connect, response (after sending), status_5xx.",
            &["pool", "address", "kind"],
        );
        let endpoint_up = gauge_vec(
            &r,
            "privacy_gateway_pool_address_up",
            "1 while a pool address takes requests (healthy, not ejected).",
            &["pool", "address"],
        );
        let pool_ready = gauge_vec(
            &r,
            "privacy_gateway_pool_ready",
            "1 while a pool has an address taking requests, per capability it serves.",
            &["pool", "subprocessor", "region", "capability"],
        );
        // CPU, resident memory, open descriptors, threads (from /proc).
        let _ = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let quarantined = "privacy_gateway_accounts_quarantined";
        let accounts_quarantined = registered(
            &r,
            quarantined,
            IntGauge::new(
                quarantined,
                "Account lines of the serving consent snapshot that are quarantined (answered 403).",
            ),
        );
        let dropped = "privacy_gateway_audit_lines_dropped_total";
        let audit_dropped = registered(
            &r,
            dropped,
            IntCounter::new(
                dropped,
                "Audit lines dropped because the writer fell behind.",
            ),
        );
        let proxy_headers_refused = counter_vec(
            &r,
            "privacy_gateway_proxy_headers_refused_total",
            "Connections closed over their PROXY protocol header, by reason.",
            &["reason"],
        );
        let rejected = counter_vec(
            &r,
            "privacy_gateway_rejected_total",
            "Requests the gateway refused (4xx) by error code, and connections refused by the connection limit.",
            &["reason"],
        );
        let connections_closed = counter_vec(
            &r,
            "privacy_gateway_connections_closed_total",
            "Client connections closed by a limit, by reason (idle_timeout, shed).",
            &["reason"],
        );
        let connections_open = gauge_vec(
            &r,
            "privacy_gateway_connections_open",
            "Open client connections, by listener.",
            &["listener"],
        );
        Metrics {
            registry: r,
            id: NEXT_METRICS_ID.fetch_add(1, Ordering::Relaxed),
            requests,
            decisions,
            shadow_disagreements,
            routes_removed,
            eu_first_exceptions,
            upstream_seconds,
            overhead_seconds,
            reloads,
            policy_version,
            accounts_quarantined,
            audit_dropped,
            pool_attempts,
            pool_errors,
            endpoint_up,
            pool_ready,
            proxy_headers_refused,
            rejected,
            connections_closed,
            connections_open,
        }
    }

    /// Gives every address of `upstreams` its counters (when a snapshot is
    /// installed: the same labels reach the same series across reloads).
    pub fn attach_counters(&self, upstreams: &mut Upstreams) {
        for pool in upstreams.pools_mut() {
            for endpoint in &mut pool.endpoints {
                let address = endpoint.label();
                let labels = [pool.name.as_str(), address.as_str()];
                let error = |kind: &str| {
                    self.pool_errors
                        .with_label_values(&[labels[0], labels[1], kind])
                };
                endpoint.counters = Some(EndpointCounters {
                    attempts: self.pool_attempts.with_label_values(&labels),
                    connect_errors: error("connect"),
                    response_errors: error("response"),
                    status_5xx: error("status_5xx"),
                });
            }
        }
    }

    /// Sets the health gauges from `snapshot`'s pools as they are now
    /// (before each scrape; pools no longer configured disappear).
    pub fn refresh_pool_gauges(&self, snapshot: &Snapshot) {
        self.endpoint_up.reset();
        self.pool_ready.reset();
        let pools = snapshot.upstreams.pools();
        for pool in pools {
            // Health is per resolved address (a host name may have several).
            for address in pool.endpoints.iter().flat_map(|e| e.addresses().to_vec()) {
                self.endpoint_up
                    .with_label_values(&[pool.name.as_str(), &address.socket.to_string()])
                    .set(i64::from(address.health.is_usable()));
            }
        }
        for capability in Capability::ALL {
            for pool in snapshot.pools.serving(capability).iter() {
                if let Some(p) = pools.get(pool) {
                    self.pool_ready
                        .with_label_values(&[
                            p.name.as_str(),
                            p.subprocessor.as_str(),
                            p.region.as_str(),
                            capability.as_str(),
                        ])
                        .set(i64::from(p.is_available()));
                }
            }
        }
    }

    /// Marks `snapshot` as the one serving: its policy version and quarantine.
    pub fn set_serving(&self, snapshot: &Snapshot) {
        self.policy_version.reset();
        self.policy_version
            .with_label_values(&[&snapshot.policy_version])
            .set(1);
        self.accounts_quarantined.set(
            (snapshot.accounts.quarantined_count() + snapshot.accounts.quarantined_by_names().0)
                as i64,
        );
    }

    /// Counts one finished request from its view: the same names the audit
    /// line and `explain` show. `listener_product` labels requests refused
    /// before any account was known.
    pub fn record_request(&self, view: &DecisionView<'_>, listener_product: Product) {
        let Some(d) = &view.decision else {
            self.count_request(listener_product.as_str(), "-", "-", "-", view.status);
            return;
        };
        self.count_request(d.product, d.plan, d.capability, d.training, view.status);
        for (part, basis) in [
            ("training", d.training_basis),
            ("retention", d.retention_basis),
            ("geo", d.geo_basis),
        ] {
            self.inc(Family::Decisions, &[part, basis]);
        }
        for removed in &d.removed_pools {
            self.inc(Family::RoutesRemoved, &[removed.basis, removed.pool]);
        }
        for note in &d.shadow {
            self.shadow_disagreements
                .with_label_values(&[note.rules, note.field, note.enforced, note.shadow])
                .inc();
        }
        if view.served.is_some_and(|s| s.tier_basis.is_some()) {
            self.eu_first_exceptions
                .with_label_values(&[d.capability])
                .inc();
        }
    }

    /// Counts one request in `privacy_gateway_requests_total`.
    fn count_request(
        &self,
        product: &str,
        plan: &str,
        capability: &str,
        training: &str,
        status: u16,
    ) {
        let mut digits = [0u8; 5];
        let status = status_label(status, &mut digits);
        self.inc(
            Family::Requests,
            &[product, plan, capability, training, status],
        );
    }

    /// Counts one request the gateway refused (4xx), or one connection the
    /// connection limit refused, in `privacy_gateway_rejected_total`.
    pub fn count_rejected(&self, reason: &str) {
        self.inc(Family::Rejected, &[reason]);
    }

    /// Counts one connection closed by a limit in
    /// `privacy_gateway_connections_closed_total`.
    pub fn count_connection_closed(&self, reason: &str) {
        self.inc(Family::ConnectionsClosed, &[reason]);
    }

    /// Increments the series of `family` with `labels`, resolved by this
    /// thread once (see [`SeriesCache`]).
    fn inc(&self, family: Family, labels: &[&str]) {
        let vec = match family {
            Family::Requests => &self.requests,
            Family::Decisions => &self.decisions,
            Family::RoutesRemoved => &self.routes_removed,
            Family::Rejected => &self.rejected,
            Family::ConnectionsClosed => &self.connections_closed,
        };
        RESOLVED.with(|cache| match cache.try_borrow_mut() {
            Ok(mut cache) => cache.inc(self.id, family, vec, labels),
            // Not reentrant; should it ever be, count the slow way.
            Err(_) => vec.with_label_values(labels).inc(),
        });
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

static NEXT_METRICS_ID: AtomicU64 = AtomicU64::new(1);

/// The counter families counted on every request (or refused request, or
/// connection closed by a limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    Requests,
    Decisions,
    RoutesRemoved,
    Rejected,
    ConnectionsClosed,
}

/// Most series one thread keeps resolved; past it, the rest are counted
/// through `with_label_values` (label sets are few: plans x capabilities x
/// statuses, bases, pools).
const MAX_RESOLVED: usize = 4096;

/// One resolved series: whose, which labels, and its counter.
struct Resolved {
    hash: u64,
    metrics: u64,
    family: Family,
    labels: Box<[Box<str>]>,
    counter: IntCounter,
}

/// The counter handles one worker thread has resolved. Counting a request
/// is then a hash of its label values and one atomic increment: no lock
/// shared with the other threads (as `with_label_values` takes), no
/// allocation. Each series is resolved once per thread, on first use, so
/// that, as before, only series that happened are exported. The hash is
/// foldhash, not SipHash: a third of the cost, and the label values are
/// the configuration's and the status code, which no client can steer.
#[derive(Default)]
struct SeriesCache {
    hasher: DefaultHashBuilder,
    table: HashTable<Resolved>,
}

impl SeriesCache {
    fn hash(&self, metrics: u64, family: Family, labels: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        (metrics, family).hash(&mut h);
        for label in labels {
            label.hash(&mut h);
        }
        h.finish()
    }

    fn inc(&mut self, metrics: u64, family: Family, vec: &IntCounterVec, labels: &[&str]) {
        let hash = self.hash(metrics, family, labels);
        let same = |r: &Resolved| {
            r.metrics == metrics
                && r.family == family
                && r.labels.len() == labels.len()
                && r.labels.iter().zip(labels).all(|(a, b)| **a == **b)
        };
        if let Some(resolved) = self.table.find(hash, same) {
            resolved.counter.inc();
            return;
        }
        let counter = vec.with_label_values(labels);
        counter.inc();
        if self.table.len() < MAX_RESOLVED {
            let resolved = Resolved {
                hash,
                metrics,
                family,
                labels: labels.iter().map(|l| Box::from(*l)).collect(),
                counter,
            };
            self.table.insert_unique(hash, resolved, |r| r.hash);
        }
    }
}

thread_local! {
    static RESOLVED: RefCell<SeriesCache> = RefCell::new(SeriesCache::default());
}

/// `status` as its decimal label, written into `digits` (no allocation).
fn status_label(status: u16, digits: &mut [u8; 5]) -> &str {
    let mut n = status;
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&digits[start..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_decimal() {
        let mut digits = [0u8; 5];
        for status in [0u16, 7, 200, 451, 503, 999, u16::MAX] {
            assert_eq!(status_label(status, &mut digits), status.to_string());
        }
    }

    #[test]
    fn counts_reach_the_series_of_their_labels_and_instance() {
        let a = Metrics::new();
        let b = Metrics::new();
        for _ in 0..3 {
            a.count_request("api", "paid", "chat", "denied", 200);
        }
        a.count_request("api", "free", "chat", "denied", 200);
        a.count_request("api", "paid", "chat", "denied", 451);
        b.count_request("api", "paid", "chat", "denied", 200);
        // From another thread, with its own cache.
        std::thread::scope(|s| {
            s.spawn(|| a.count_request("api", "paid", "chat", "denied", 200));
        });
        let get = |m: &Metrics, plan: &str, status: &str| {
            m.requests
                .with_label_values(&["api", plan, "chat", "denied", status])
                .get()
        };
        assert_eq!(get(&a, "paid", "200"), 4);
        assert_eq!(get(&a, "free", "200"), 1);
        assert_eq!(get(&a, "paid", "451"), 1);
        assert_eq!(get(&b, "paid", "200"), 1);
    }

    #[test]
    fn refusals_and_closed_connections_reach_their_series() {
        let m = Metrics::new();
        for _ in 0..2 {
            m.count_rejected("invalid_path");
        }
        m.count_rejected("too_many_connections");
        m.count_connection_closed("idle_timeout");
        let rejected = |reason: &str| m.rejected.with_label_values(&[reason]).get();
        assert_eq!(rejected("invalid_path"), 2);
        assert_eq!(rejected("too_many_connections"), 1);
        let closed = |reason: &str| m.connections_closed.with_label_values(&[reason]).get();
        assert_eq!(closed("idle_timeout"), 1);
        assert_eq!(closed("shed"), 0);
    }
}
