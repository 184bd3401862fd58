//! `explain`: the full decision for a described request, as JSON, computed
//! by the same code as the hot path ([`evaluate`], [`Admission::stamps`])
//! and sending nothing anywhere.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::config::Snapshot;
use crate::credential::REDACTED;
use crate::evaluate::{evaluate, Admission, Refusal, RequestHead};
use crate::policy::Product;
use crate::view::{pool_name, DecisionView, RequestLine};

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
    /// A stamped value cannot be sent (the gateway would not forward it).
    #[error(transparent)]
    Unsendable(#[from] crate::stamp::UnsendableStamp),
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

/// What `explain` prints: the request's [`DecisionView`] (the fields of its
/// audit line, by construction) and what only a described request shows.
#[derive(Debug, Serialize)]
struct Explained<'a> {
    #[serde(flatten)]
    view: DecisionView<'a>,
    /// `forward` or `answer`.
    action: &'static str,
    /// The sentence a refused client reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// The `x-forwarded-for` value stamped.
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarded_for: Option<String>,
    /// The candidates by tier, lowest first: the order routing tries them in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    candidate_tiers: Vec<TierView<'a>>,
    /// The headers stamped upstream, in contract order.
    headers: Map<String, Value>,
}

/// One tier of candidates.
#[derive(Debug, Serialize)]
struct TierView<'a> {
    priority: u32,
    pools: Vec<&'a str>,
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
        target: request.path.as_bytes(),
        received: None,
        headers: &headers,
        peer: request.peer,
        listener_product: request.listener_product,
    };
    let decision_id = request
        .decision_id
        .clone()
        .unwrap_or_else(|| crate::stamp::DecisionId::new().to_string());
    let outcome = evaluate(snapshot, &head);
    let status = outcome.as_ref().map_or_else(Refusal::status, |_| 200);
    // As the proxy records it: the normalised path once a decision was made.
    let decided = match &outcome {
        Ok(admission) => Some(admission),
        Err(Refusal::NoPermittedRoute(admission)) => Some(&**admission),
        Err(_) => None,
    };
    let path = decided.map_or(path, |a| a.target.path());
    let request_line = RequestLine {
        method: request.method.as_str(),
        path,
        listener: request.listener_product,
    };
    let view = DecisionView::new(snapshot, &decision_id, request_line, status);
    let explained = match &outcome {
        Ok(admission) => {
            let route = &admission.decision.route;
            let pool_index = match &request.pool {
                None => route
                    .tiers(&snapshot.pools)
                    .next()
                    .and_then(|t| t.pools.iter().next()),
                Some(name) => route
                    .candidates
                    .iter()
                    .find(|&i| snapshot.upstreams.pool(i).is_some_and(|p| &p.name == name)),
            }
            .ok_or_else(|| ExplainError::Pool(request.pool.clone().unwrap_or_default()))?;
            let stamped = match snapshot.upstreams.pool(pool_index) {
                None => None,
                Some(pool) => {
                    let mut stamped: Map<String, Value> = admission
                        .stamps(snapshot, &decision_id, pool)?
                        .iter()
                        .map(|(n, v)| (n.to_string(), json!(String::from_utf8_lossy(v.as_bytes()))))
                        .collect();
                    // The pool's credential is sent too; its value is never shown.
                    if let Some(credential) = &pool.credential {
                        stamped.insert(credential.header().to_string(), json!(REDACTED));
                    }
                    Some(stamped)
                }
            };
            Explained {
                view: view.admitted(admission).served_by(pool_index),
                action: "forward",
                message: None,
                forwarded_for: forwarded_for(admission),
                candidate_tiers: candidate_tiers(snapshot, admission),
                headers: stamped.unwrap_or_default(),
            }
        }
        Err(refusal) => {
            let mut view = view.refused(Some(refusal.code()));
            let mut candidate_tiers = Vec::new();
            match refusal {
                Refusal::NoPermittedRoute(admission) => {
                    view = view.admitted(admission);
                    candidate_tiers = self::candidate_tiers(snapshot, admission);
                }
                Refusal::ConsentRecordInvalid(q) => view = view.quarantined(q),
                _ => {}
            }
            Explained {
                view,
                action: "answer",
                message: Some(refusal.message()),
                forwarded_for: None,
                candidate_tiers,
                headers: Map::new(),
            }
        }
    };
    Ok(serde_json::to_value(&explained).expect("a view serialises: every key is a string"))
}

fn forwarded_for(a: &Admission) -> Option<String> {
    a.forwarded_prefix().map(|p| p.address().to_string())
}

fn candidate_tiers<'a>(snapshot: &'a Snapshot, a: &Admission) -> Vec<TierView<'a>> {
    a.decision
        .route
        .tiers(&snapshot.pools)
        .map(|t| TierView {
            priority: t.priority,
            pools: t.pools.iter().map(|i| pool_name(snapshot, i)).collect(),
        })
        .collect()
}
