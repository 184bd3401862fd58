//! The audit log: one JSON line per request, written by its own thread so
//! the request path never waits on a disk. When the writer falls behind,
//! lines are dropped and counted, never queued without bound.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use prometheus::IntCounter;

/// Where audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// A handle to the audit writer.
pub struct AuditLog {
    lines: SyncSender<String>,
    dropped: IntCounter,
}

impl AuditLog {
    /// Opens `target` and starts its writer with room for `capacity` pending lines.
    pub fn open(target: &AuditTarget, capacity: usize, dropped: IntCounter) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (lines, rx) = mpsc::sync_channel::<String>(capacity.max(1));
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_lines(rx, BufWriter::new(out)))?;
        Ok(AuditLog { lines, dropped })
    }

    /// Queues one line; drops (and counts) it if the writer is behind.
    pub fn record(&self, line: String) {
        match self.lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

fn write_lines(rx: mpsc::Receiver<String>, mut out: BufWriter<Box<dyn Write + Send>>) {
    while let Ok(line) = rx.recv() {
        let mut batch = Some(line);
        // Write what is queued, then flush once.
        while let Some(line) = batch.take() {
            if out
                .write_all(line.as_bytes())
                .and_then(|_| out.write_all(b"\n"))
                .is_err()
            {
                tracing::error!("cannot write the audit log");
            }
            batch = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            tracing::error!("cannot flush the audit log");
        }
    }
}

/// One audit line. Holds the client prefix, never the address, and never a
/// request or response body.
#[derive(Debug, serde::Serialize)]
pub struct AuditRecord<'a> {
    /// When the request ended, RFC 3339 UTC.
    pub ts: String,
    /// The request's decision id.
    pub decision_id: &'a str,
    /// Rules it was decided under.
    pub policy_version: &'a str,
    /// HTTP status answered.
    pub status: u16,
    /// `error.code` when the gateway answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// The decision, when one was made.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub decision: Option<AuditDecision<'a>>,
    /// Pool that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<&'a str>,
    /// Its subprocessor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subprocessor: Option<&'a str>,
    /// Milliseconds from the first upstream attempt to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Milliseconds in all.
    pub total_ms: f64,
}

/// The decision part of an audit line.
#[derive(Debug, serde::Serialize)]
pub struct AuditDecision<'a> {
    /// Account id or `anonymous`.
    pub account: &'a str,
    /// `api` or `chat`.
    pub product: &'a str,
    /// Plan name.
    pub plan: &'a str,
    /// Capability.
    pub capability: &'a str,
    /// `allowed` or `denied`.
    pub training: &'a str,
    /// Its basis.
    pub training_basis: &'a str,
    /// Retention class.
    pub retention: &'a str,
    /// Its basis.
    pub retention_basis: &'a str,
    /// Basis of the country lookup decision.
    pub geo_basis: &'a str,
    /// Country, when looked up and found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The truncated client address.
    pub client_prefix: String,
    /// Where shadow rules would have decided otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowNote>,
}

/// One shadow disagreement in an audit line.
#[derive(Debug, serde::Serialize)]
pub struct ShadowNote {
    /// The shadow rule set.
    pub rules: String,
    /// What differs.
    pub field: &'static str,
    /// Enforced basis.
    pub enforced: &'static str,
    /// Shadow basis.
    pub shadow: &'static str,
}

impl<'a> AuditDecision<'a> {
    /// The decision part for `admission`, with `shadow_name`'s disagreements.
    pub fn of(admission: &'a crate::evaluate::Admission, shadow_name: Option<&str>) -> Self {
        let d = &admission.decision;
        AuditDecision {
            account: &admission.account,
            product: admission.product.as_str(),
            plan: &admission.plan,
            capability: admission.capability.as_str(),
            training: d.training.as_str(),
            training_basis: d.training_basis.as_str(),
            retention: d.retention.as_str(),
            retention_basis: d.retention_basis.as_str(),
            geo_basis: d.geo.basis.as_str(),
            country: admission.country.map(|c| c.to_string()),
            client_prefix: admission.client_prefix.to_string(),
            shadow: admission
                .shadow_disagreements()
                .into_iter()
                .map(|x| ShadowNote {
                    rules: shadow_name.unwrap_or("shadow").to_string(),
                    field: x.field,
                    enforced: x.enforced,
                    shadow: x.shadow,
                })
                .collect(),
        }
    }
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
