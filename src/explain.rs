//! `explain`: the full decision for a described request, as JSON, computed
//! by the same code as the hot path ([`evaluate`], [`Admission::upstream_headers`])
//! and sending nothing anywhere.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::config::Snapshot;
use crate::evaluate::{evaluate, Admission, Refusal, RequestHead};
use crate::policy::Product;

/// A request described on the command line.
#[derive(Clone, Debug)]
pub struct DescribedRequest {
    /// Method.
    pub method: Method,
    /// Path, with or without a query.
    pub path: String,
    /// Headers as the client would send them.
    pub headers: HeaderMap,
    /// The TCP peer.
    pub peer: IpAddr,
    /// The client, when it is not the peer: sent as `X-Forwarded-For` (and
    /// believed only if the peer is a trusted proxy, as in real traffic).
    pub client: Option<IpAddr>,
    /// Product of the listener the request arrives on.
    pub listener_product: Product,
    /// Stamp as if this permitted pool were chosen (default: the first candidate).
    pub pool: Option<String>,
    /// Decision id to stamp (reproduces a logged signature).
    pub decision_id: Option<String>,
}

/// Why a request could not be described.
#[derive(Debug, Error)]
pub enum ExplainError {
    /// A `--header` is not `Name: value`.
    #[error("header `{0}` is not of the form `Name: value`")]
    Header(String),
    /// `--pool` names a pool the request may not go to.
    #[error("pool `{0}` is not a candidate for this request")]
    Pool(String),
}

/// Parses `Name: value` into `headers`.
pub fn add_header(headers: &mut HeaderMap, text: &str) -> Result<(), ExplainError> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| ExplainError::Header(text.to_string()))?;
    let name =
        HeaderName::try_from(name.trim()).map_err(|_| ExplainError::Header(text.to_string()))?;
    let value =
        HeaderValue::try_from(value.trim()).map_err(|_| ExplainError::Header(text.to_string()))?;
    headers.append(name, value);
    Ok(())
}

/// The decision on `request` under `snapshot`, as JSON.
pub fn explain(snapshot: &Snapshot, request: &DescribedRequest) -> Result<Value, ExplainError> {
    let mut headers = request.headers.clone();
    if let Some(client) = request.client.filter(|c| *c != request.peer) {
        if let Ok(v) = HeaderValue::try_from(client.to_string()) {
            headers.append("x-forwarded-for", v);
        }
    }
    let path = request.path.split('?').next().unwrap_or("/");
    let head = RequestHead {
        method: &request.method,
        path,
        headers: &headers,
        peer: request.peer,
        listener_product: request.listener_product,
    };
    let decision_id = request
        .decision_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let mut out = Map::new();
    out.insert("decision_id".into(), json!(decision_id));
    out.insert("policy_version".into(), json!(snapshot.policy_version));
    match evaluate(snapshot, &head) {
        Ok(admission) => {
            out.insert("status".into(), json!(200));
            out.insert("action".into(), json!("forward"));
            describe(snapshot, &admission, &mut out);
            let candidates = admission.decision.route.candidates;
            let pool_index = match &request.pool {
                None => candidates.iter().next(),
                Some(name) => candidates
                    .iter()
                    .find(|&i| snapshot.upstreams.pool(i).is_some_and(|p| &p.name == name)),
            }
            .ok_or_else(|| ExplainError::Pool(request.pool.clone().unwrap_or_default()))?;
            if let Some(pool) = snapshot.upstreams.pool(pool_index) {
                out.insert("pool".into(), json!(pool.name));
                let stamped: Map<String, Value> = admission
                    .upstream_headers(snapshot, &decision_id, pool)
                    .into_iter()
                    .map(|(n, v)| (n.to_string(), json!(v)))
                    .collect();
                out.insert("headers".into(), Value::Object(stamped));
            }
        }
        Err(refusal) => {
            out.insert("status".into(), json!(refusal.status()));
            out.insert("action".into(), json!("answer"));
            out.insert(
                "error".into(),
                json!({ "code": refusal.code(), "message": refusal.message() }),
            );
            if let Refusal::NoPermittedRoute(admission) = &refusal {
                describe(snapshot, admission, &mut out);
                let constraints: Vec<_> = admission
                    .decision
                    .route
                    .removed
                    .constraints()
                    .map(|b| b.as_str())
                    .collect();
                out.insert("constraints".into(), json!(constraints));
            }
            out.insert("headers".into(), json!({}));
        }
    }
    Ok(Value::Object(out))
}

/// The decision's fields, shared by forwarded and 451 answers.
fn describe(snapshot: &Snapshot, a: &Admission, out: &mut Map<String, Value>) {
    let d = &a.decision;
    let pool_name = |i: usize| snapshot.upstreams.pool(i).map_or("?", |p| p.name.as_str());
    let removed: Vec<Value> = d
        .route
        .removed
        .pools()
        .map(|(i, basis)| json!({ "pool": pool_name(i), "basis": basis.as_str() }))
        .collect();
    let fields = json!({
        "account": a.account,
        "product": a.product.as_str(),
        "plan": a.plan,
        "capability": a.capability.as_str(),
        "training": d.training.as_str(),
        "training_basis": d.training_basis.as_str(),
        "retention": d.retention.as_str(),
        "retention_basis": d.retention_basis.as_str(),
        "geo_basis": d.geo.basis.as_str(),
        "country": a.country.map(|c| c.to_string()),
        "forwarded_for": a.forwarded_prefix().map(|p| p.address().to_string()),
        "client_prefix": a.forwarded_prefix().map(|p| p.to_string()),
        "candidate_pools": d.route.candidates.iter().map(pool_name).collect::<Vec<_>>(),
        "removed_pools": removed,
        "shadow": snapshot.shadow.as_ref().map(|s| json!({
            "rules": s.name,
            "disagreements": a.shadow_disagreements().iter().map(|x| json!({
                "field": x.field, "enforced": x.enforced, "shadow": x.shadow,
            })).collect::<Vec<_>>(),
        })),
    });
    if let Value::Object(fields) = fields {
        out.extend(fields);
    }
}
