//! Observation of finished requests: metrics, the access line and the
//! audit record. Kept apart from the proxy so that the adapter stays a thin
//! shell and the cost of observing a request is visible in one place.

use std::time::Duration;

use crate::audit::{self, AuditDecision, AuditLog, AuditRecord};
use crate::config::Snapshot;
use crate::evaluate::Admission;
use crate::metrics::Metrics;
use crate::policy::Product;
use crate::routing::PoolUpstream;

/// Where the proxy reports what it did: metrics and, when configured, the audit log.
pub struct Observers {
    /// The process's metrics.
    pub metrics: std::sync::Arc<Metrics>,
    /// The audit log.
    pub audit: Option<AuditLog>,
}

/// What is known of a request once it is over.
#[derive(Clone, Copy)]
pub struct Completed<'a> {
    /// Its decision id.
    pub decision_id: &'a str,
    /// Its method.
    pub method: &'a str,
    /// Its path, without the query string.
    pub path: &'a str,
    /// The snapshot it was decided under.
    pub snapshot: &'a Snapshot,
    /// Product of the listener that accepted it.
    pub listener_product: Product,
    /// The decision, when one was made.
    pub admission: Option<&'a Admission>,
    /// The status answered (0 when no answer was written).
    pub status: u16,
    /// `error.code` when the gateway answered itself.
    pub error_code: Option<&'static str>,
    /// The pool of the last attempt.
    pub pool: Option<&'a PoolUpstream>,
    /// From the start of the request to now.
    pub total: Duration,
    /// From the first upstream attempt to now.
    pub upstream: Option<Duration>,
}

impl Observers {
    /// Writes out what is still queued (before the process exits).
    pub fn flush(&self) {
        if let Some(audit) = &self.audit {
            if !audit.flush(std::time::Duration::from_secs(2)) {
                tracing::warn!("the audit writer did not catch up before exit");
            }
        }
    }

    /// Counts, logs and audits one finished request.
    pub fn request_done(&self, done: &Completed<'_>) {
        let Completed {
            decision_id,
            method,
            path,
            snapshot,
            listener_product,
            admission,
            status,
            error_code,
            pool,
            total,
            upstream,
        } = *done;
        let shadow_name = snapshot.shadow.as_ref().map(|s| s.name.as_str());
        let metrics = &self.metrics;
        let status_label = status.to_string();
        match admission {
            Some(a) => {
                metrics
                    .requests
                    .with_label_values(&[
                        a.product.as_str(),
                        &a.plan,
                        a.capability.as_str(),
                        a.decision.training.as_str(),
                        &status_label,
                    ])
                    .inc();
                let upstreams = &snapshot.upstreams;
                metrics.record_decision(
                    a,
                    |i| {
                        upstreams
                            .pool(i)
                            .map_or_else(String::new, |p| p.name.clone())
                    },
                    shadow_name.unwrap_or(""),
                );
                tracing::info!(
                    target: "access",
                    decision_id = %decision_id,
                    status,
                    account = %a.account,
                    capability = %a.capability,
                    training_basis = %a.decision.training_basis,
                    retention_basis = %a.decision.retention_basis,
                    pool = pool.map_or("-", |p| p.name.as_str()),
                    client_prefix = %a.client_prefix,
                    total_us = total.as_micros() as u64,
                );
            }
            None => {
                metrics
                    .requests
                    .with_label_values(&[listener_product.as_str(), "-", "-", "-", &status_label])
                    .inc();
                tracing::info!(
                    target: "access",
                    decision_id = %decision_id,
                    status,
                    error = error_code.unwrap_or("-"),
                    total_us = total.as_micros() as u64,
                );
            }
        }
        if let Some(upstream) = upstream {
            metrics.upstream_seconds.observe(upstream.as_secs_f64());
        }
        metrics.overhead_seconds.observe(
            total
                .saturating_sub(upstream.unwrap_or_default())
                .as_secs_f64(),
        );
        if let Some(audit) = &self.audit {
            let record = AuditRecord {
                ts: audit::timestamp(),
                decision_id,
                method,
                path: audit::recorded_path(path),
                listener: listener_product.as_str(),
                policy_version: &snapshot.policy_version,
                status,
                error: error_code,
                decision: admission.map(|a| AuditDecision::of(a, shadow_name)),
                pool: pool.map(|p| p.name.as_str()),
                subprocessor: pool.map(|p| p.subprocessor.as_str()),
                upstream_ms: upstream.map(|d| d.as_secs_f64() * 1000.0),
                total_ms: total.as_secs_f64() * 1000.0,
            };
            if let Ok(line) = serde_json::to_string(&record) {
                audit.record(line);
            }
        }
    }
}
