//! Observation of finished requests: metrics, the access line and the
//! audit record. Kept apart from the proxy so that the adapter stays a thin
//! shell and the cost of observing a request is visible in one place.

use std::time::Duration;

use crate::audit::{self, AuditLog, AuditRecord};
use crate::config::{Quarantined, Snapshot};
use crate::evaluate::Admission;
use crate::metrics::Metrics;
use crate::policy::Product;
use crate::view::{DecisionView, RequestLine};

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
    /// The caller's quarantined consent record, when that was the answer.
    pub quarantine: Option<&'a Quarantined>,
    /// The status answered (0 when no answer was written).
    pub status: u16,
    /// `error.code` when the gateway answered itself.
    pub error_code: Option<&'static str>,
    /// The pool (index) of the last attempt.
    pub pool: Option<usize>,
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

    /// Counts, logs and audits one finished request, all from one view of it.
    pub fn request_done(&self, done: &Completed<'_>) {
        let Completed {
            decision_id,
            method,
            path,
            snapshot,
            listener_product,
            admission,
            quarantine,
            status,
            error_code,
            pool,
            total,
            upstream,
        } = *done;
        let request = RequestLine {
            method,
            path,
            listener: listener_product,
        };
        let mut view =
            DecisionView::new(snapshot, decision_id, request, status).refused(error_code);
        if let Some(q) = quarantine {
            view = view.quarantined(q);
        }
        if let Some(a) = admission {
            view = view.admitted(a);
        }
        if let Some(pool) = pool {
            view = view.served_by(pool);
        }
        let metrics = &self.metrics;
        if let Some(code) = error_code.filter(|_| (400..500).contains(&status)) {
            metrics.count_rejected(code);
        }
        metrics.record_request(&view, listener_product);
        match &view.decision {
            Some(d) => tracing::info!(
                target: "access",
                decision_id = %decision_id,
                status,
                error = view.error.unwrap_or("-"),
                account = %d.account,
                capability = %d.capability,
                training_basis = %d.training_basis,
                retention_basis = %d.retention_basis,
                pool = view.served.map_or("-", |s| s.pool),
                tier_basis = view.served.and_then(|s| s.tier_basis).unwrap_or("-"),
                client_prefix = %d
                    .client_prefix
                    .as_ref()
                    .map_or(&"-" as &dyn std::fmt::Display, |p| p),
                total_us = total.as_micros() as u64,
            ),
            None => tracing::info!(
                target: "access",
                decision_id = %decision_id,
                status,
                error = view.error.unwrap_or("-"),
                total_us = total.as_micros() as u64,
            ),
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
                ts: audit::Timestamp::now(),
                view: &view,
                upstream_ms: upstream.map(|d| d.as_secs_f64() * 1000.0),
                total_ms: total.as_secs_f64() * 1000.0,
            };
            audit.record(&record);
        }
    }
}
