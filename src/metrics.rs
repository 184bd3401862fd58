//! Prometheus metrics: what operators alert on and what a privacy team
//! counts (decisions by basis, shadow disagreements, removed routes).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::evaluate::Admission;

/// Every metric of the process, in its own registry.
pub struct Metrics {
    registry: Registry,
    /// Requests by product, plan, capability, training decision and status.
    pub requests: IntCounterVec,
    /// Decisions by part (training, retention, geo) and basis id.
    pub decisions: IntCounterVec,
    /// Shadow rule disagreements by shadow set, field and the two bases.
    pub shadow_disagreements: IntCounterVec,
    /// Pools removed from a request's candidates, by reason and pool.
    pub routes_removed: IntCounterVec,
    /// Time from the first upstream attempt to the end of the response.
    pub upstream_seconds: Histogram,
    /// Time the gateway itself added (total minus upstream).
    pub overhead_seconds: Histogram,
    /// Configuration reloads by result (`success`, `failure`).
    pub reloads: IntCounterVec,
    /// The policy version serving now (value 1, version as label).
    pub policy_version: IntGaugeVec,
    /// Audit lines dropped because the writer fell behind.
    pub audit_dropped: IntCounter,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    // Names are fixed and unique, so registration cannot collide.
    let _ = registry.register(Box::new(metric.clone()));
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .unwrap_or_else(|e| panic!("metric {name} is malformed: {e}"));
    let _ = registry.register(Box::new(metric.clone()));
    metric
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
        let policy_version = IntGaugeVec::new(
            Opts::new(
                "privacy_gateway_policy_version_info",
                "The policy version serving now.",
            ),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("metric is malformed: {e}"));
        let _ = r.register(Box::new(policy_version.clone()));
        let audit_dropped = IntCounter::new(
            "privacy_gateway_audit_lines_dropped_total",
            "Audit lines dropped because the writer fell behind.",
        )
        .unwrap_or_else(|e| panic!("metric is malformed: {e}"));
        let _ = r.register(Box::new(audit_dropped.clone()));
        Metrics {
            registry: r,
            requests,
            decisions,
            shadow_disagreements,
            routes_removed,
            upstream_seconds,
            overhead_seconds,
            reloads,
            policy_version,
            audit_dropped,
        }
    }

    /// Marks `version` as the one serving.
    pub fn set_policy_version(&self, version: &str) {
        self.policy_version.reset();
        self.policy_version.with_label_values(&[version]).set(1);
    }

    /// Counts what the decision of one admitted request said.
    pub fn record_decision(
        &self,
        admission: &Admission,
        pool_names: impl Fn(usize) -> String,
        shadow: &str,
    ) {
        let d = &admission.decision;
        for (part, basis) in [
            ("training", d.training_basis.as_str()),
            ("retention", d.retention_basis.as_str()),
            ("geo", d.geo.basis.as_str()),
        ] {
            self.decisions.with_label_values(&[part, basis]).inc();
        }
        for (reason, set) in [
            (
                crate::policy::Basis::SubprocessorOptOut,
                d.route.removed_opt_out,
            ),
            (crate::policy::Basis::Residency, d.route.removed_residency),
        ] {
            for pool in set.iter() {
                self.routes_removed
                    .with_label_values(&[reason.as_str(), &pool_names(pool)])
                    .inc();
            }
        }
        for disagreement in admission.shadow_disagreements() {
            self.shadow_disagreements
                .with_label_values(&[
                    shadow,
                    disagreement.field,
                    disagreement.enforced,
                    disagreement.shadow,
                ])
                .inc();
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
