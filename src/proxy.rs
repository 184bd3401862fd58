//! The Pingora `ProxyHttp` adapter: a thin shell that gathers the request
//! head, calls [`evaluate`], and applies the result (answer, or strip, stamp
//! and forward). No policy lives here: it compares no plan and reads no flag.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::config::{Quarantined, Snapshot, SnapshotHandle};
use crate::evaluate::{evaluate, Admission, Refusal, RequestHead};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::listener::Limits;
use crate::metrics::EndpointCounters;
use crate::observe::{Completed, Observers};
use crate::policy::Product;
use crate::request_shape::{self, ShapeError};
use crate::routing::Target;
use crate::stamp::{self, DecisionId};

/// The custom error raised when every permitted endpoint has been tried.
const NO_PERMITTED_ENDPOINT: ErrorType = ErrorType::Custom("permitted_pools_unavailable");

/// The custom error raised when a streamed body passes `max_body_bytes`.
const BODY_TOO_LARGE: ErrorType = ErrorType::Custom("body_too_large");

/// One listener's proxy logic.
pub struct PrivacyProxy {
    snapshots: Arc<SnapshotHandle>,
    listener_product: Product,
    observers: Arc<Observers>,
    lifecycle: &'static Lifecycle,
    limits: Limits,
}

impl PrivacyProxy {
    /// A proxy for a listener of `listener_product`, reading `snapshots`,
    /// reporting to `observers`, counting its requests in `lifecycle`,
    /// holding request bodies and answers to `limits`.
    pub fn new(
        snapshots: Arc<SnapshotHandle>,
        listener_product: Product,
        observers: Arc<Observers>,
        lifecycle: &'static Lifecycle,
        limits: Limits,
    ) -> Self {
        PrivacyProxy {
            snapshots,
            listener_product,
            observers,
            lifecycle,
            limits,
        }
    }

    /// During an upgrade every answer closes its connection, so that the
    /// client's next request opens a new one (which the new process, or
    /// this one while it still accepts, takes) instead of racing the close
    /// of an idle one. (After a stop, Pingora closes them once the listener
    /// is closed: see [`crate::lifecycle::Lingering`].)
    fn close_when_draining(&self, session: &mut Session) {
        if self.lifecycle.is_draining() {
            session.set_keepalive(None);
        }
    }
}

/// Per-request state, carried through every phase.
pub struct RequestCtx {
    started: Instant,
    decision_id: DecisionId,
    /// The one snapshot this request is decided and forwarded under.
    snapshot: Arc<Snapshot>,
    admission: Option<Admission>,
    /// The caller's quarantined consent record, when that was the answer.
    quarantine: Option<Quarantined>,
    /// Targets already attempted; retries never repeat one.
    tried: Vec<Target>,
    target: Option<Target>,
    /// The `error.code` when the gateway answered itself.
    error_code: Option<&'static str>,
    /// When the first upstream attempt began.
    upstream_started: Option<Instant>,
    /// Counts the request in flight until it is over.
    _in_flight: InFlight,
    /// Request body bytes received so far.
    body_bytes: u64,
}

impl RequestCtx {
    /// The counters of the address of the current attempt.
    fn attempt_counters(&self) -> Option<&EndpointCounters> {
        self.target
            .and_then(|t| self.snapshot.upstreams.counters(t))
    }

    fn admitted(&self) -> Result<&Admission> {
        self.admission
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request was not admitted"))
    }
}

/// The JSON body of an answer the gateway gives itself.
pub(crate) fn error_body(
    code: &str,
    message: &str,
    decision_id: &str,
    extra: Option<serde_json::Value>,
) -> Bytes {
    let mut error = serde_json::json!({
        "code": code,
        "message": message,
        "decision_id": decision_id,
    });
    if let (Some(serde_json::Value::Object(extra)), Some(obj)) = (extra, error.as_object_mut()) {
        obj.extend(extra);
    }
    Bytes::from(serde_json::json!({ "error": error }).to_string())
}

async fn respond_json(
    session: &mut Session,
    status: u16,
    decision_id: &str,
    body: Bytes,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(stamp::DECISION_ID, decision_id)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Whether the client hung up or stopped reading: nobody is left to answer.
fn client_went_away(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed
            | ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::WriteTimedout
    )
}

/// An upstream attempt that failed after the request was (partly) sent and
/// before any answer came back: what decides whether it may be sent again.
#[derive(Debug, Clone, Copy)]
struct FailedAttempt {
    /// The connection came from the pool rather than being opened for this request.
    reused_connection: bool,
    /// The whole request body read so far is still held for a resend.
    body_buffered: bool,
    /// The method may be repeated without a different effect, as RFC 9110 §9.2.2 defines.
    idempotent: bool,
}

impl FailedAttempt {
    /// Whether to send the request again (on a fresh connection, to a
    /// permitted target). A pooled connection that fails on the first write
    /// or read, before any answer, is nearly always one the upstream closed
    /// while it lay idle: sent again whatever the method (an upstream that
    /// took the whole request and then dropped it unanswered sees it twice).
    /// Anything else is resent only for an idempotent method, as Pingora
    /// does. Never without the whole body.
    fn may_resend(self, e: &Error) -> bool {
        if !self.body_buffered {
            return false;
        }
        let closed_while_idle = matches!(e.retry, pingora::RetryType::ReusedOnly)
            || matches!(e.etype(), ErrorType::WriteError);
        if self.reused_connection && closed_while_idle {
            return true;
        }
        if !self.idempotent {
            return false;
        }
        let mut retry = e.retry;
        retry.decide_reuse(self.reused_connection);
        retry.retry()
    }
}

/// What a 451 or 503 names: the capability and the account's constraints
/// that narrowed its pools (never another customer's data).
fn route_refusal_detail(admission: &Admission) -> serde_json::Value {
    let constraints: Vec<&str> = admission
        .decision
        .route
        .removed
        .constraints()
        .map(|b| b.as_str())
        .collect();
    serde_json::json!({
        "capability": admission.capability.as_str(),
        "constraints": constraints,
    })
}

fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Removes every header whose name satisfies `doomed`, in any case and number.
fn remove_headers_where(req: &mut RequestHeader, doomed: impl Fn(&str) -> bool) {
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|name| doomed(name.as_str()))
        .cloned()
        .collect();
    for name in names {
        req.remove_header(&name);
    }
}

/// Whether `name` is a header a client may never decide (spec §7): the
/// gateway's own, an underscore name, a client address, one the operator
/// strips, the identity header, a pool's credential. (`Authorization` goes
/// too, but by name: see [`strip_client_controlled`].)
fn client_controlled(name: &HeaderName, snapshot: &Snapshot) -> bool {
    let text = name.as_str();
    stamp::is_reserved(text)
        || stamp::is_underscore_name(text)
        || stamp::ADDRESS_HEADERS.contains(&text)
        || snapshot.strip_headers.contains(name)
        || snapshot.identity_header.as_ref() == Some(name)
        || snapshot.upstreams.credential_headers().any(|c| c == name)
}

/// Removes what a client may never decide (spec §7) from the upstream
/// request's headers: one look at each name the client sent, then a removal
/// for each found (none but the key, in the common case).
fn strip_client_controlled(headers: &mut HeaderMap, snapshot: &Snapshot) {
    // The gateway authenticated the caller; the key stays here.
    headers.remove(http::header::AUTHORIZATION);
    // Empty, so not allocated, unless the client sent such a header.
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|name| client_controlled(name, snapshot))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// The request as it leaves for `target`: what the client may not decide
/// removed, the decided target in origin form with the pool's `Host`, the
/// header contract stamped. (Public for the benchmarks, which count what it
/// allocates.)
///
/// Edited as plain [`http::request::Parts`], taken out of Pingora's
/// `RequestHeader` and put back: Pingora's own `insert_header` parses each
/// name anew and keeps a second map of name spellings, which cost more than
/// the rest of the gateway's work together. Without that map, Pingora writes
/// the names in lower case (a few standard ones title-cased), which HTTP
/// treats alike; everything else leaves as before.
pub fn rewrite_upstream_request(
    req: &mut RequestHeader,
    snapshot: &Snapshot,
    admission: &Admission,
    decision_id: &str,
    target: Target,
) -> Result<()> {
    let no_target = || Error::explain(ErrorType::InternalError, "no target chosen");
    let upstreams = &snapshot.upstreams;
    let pool = upstreams.pool(target.pool).ok_or_else(no_target)?;
    let host = upstreams.host(target).ok_or_else(no_target)?;
    let stamps = admission
        .stamps(snapshot, decision_id, pool)
        .map_err(|e| Error::explain(ErrorType::InternalError, e.to_string()))?;
    let end_stream = req.send_end_stream();
    let mut parts = http::request::Parts::from(std::mem::replace(req, empty_request()));
    // The request that goes upstream is the one decided (spec §7): the
    // normalised path in origin form, and the pool's Host, never the client's.
    parts.uri = admission.target.uri();
    let headers = &mut parts.headers;
    strip_client_controlled(headers, snapshot);
    let too_many = |_| Error::explain(ErrorType::InvalidHTTPHeader, "too many headers");
    headers.try_reserve(stamps.len() + 2).map_err(too_many)?;
    headers
        .try_insert(http::header::HOST, host.clone())
        .map_err(too_many)?;
    for (name, value) in stamps {
        headers.try_insert(name.clone(), value).map_err(too_many)?;
    }
    if let Some(credential) = &pool.credential {
        headers
            .try_insert(credential.header().clone(), credential.value().clone())
            .map_err(too_many)?;
    }
    // From `Parts`, the target is the URI's (as `set_uri` would make it).
    *req = RequestHeader::from(parts);
    if end_stream == Some(false) {
        req.set_send_end_stream(false);
    }
    Ok(())
}

/// A request head with nothing in it (allocates nothing), to stand in while
/// the real one is edited.
fn empty_request() -> RequestHeader {
    RequestHeader::from(http::Request::new(()).into_parts().0)
}

#[async_trait]
impl ProxyHttp for PrivacyProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> Self::CTX {
        RequestCtx {
            started: Instant::now(),
            decision_id: DecisionId::new(),
            snapshot: self.snapshots.current(),
            admission: None,
            quarantine: None,
            tried: Vec::new(),
            target: None,
            error_code: None,
            upstream_started: None,
            _in_flight: self.lifecycle.begin_request(),
            body_bytes: 0,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Between-read and between-write silences (nginx client_body_timeout, send_timeout).
        session.set_read_timeout(Some(self.limits.body_timeout));
        session.set_write_timeout(Some(self.limits.send_timeout));
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        self.close_when_draining(session);
        let Some(peer) = peer_ip(session) else {
            let body = error_body(
                "no_peer_address",
                "the connection has no IP peer",
                ctx.decision_id.as_str(),
                None,
            );
            respond_json(session, 400, ctx.decision_id.as_str(), body).await?;
            return Ok(true);
        };
        let headers = &session.req_header().headers;
        let shape = request_shape::refuse_upgrade(headers).and_then(|()| {
            request_shape::check_declared_length(headers, self.limits.max_body_bytes)
        });
        if let Err(refusal) = shape {
            ctx.error_code = Some(refusal.code());
            let body = error_body(
                refusal.code(),
                &refusal.to_string(),
                ctx.decision_id.as_str(),
                None,
            );
            respond_json(session, refusal.status(), ctx.decision_id.as_str(), body).await?;
            return Ok(true);
        }
        // Underscore names go before anything reads the request (spec §7).
        remove_headers_where(session.req_header_mut(), stamp::is_underscore_name);
        let req = session.req_header();
        let head = RequestHead {
            method: &req.method,
            target: req.raw_path(),
            received: req.uri.path_and_query(),
            headers: &req.headers,
            peer,
            listener_product: self.listener_product,
        };
        match evaluate(&ctx.snapshot, &head) {
            Ok(admission) => {
                ctx.admission = Some(admission);
                Ok(false)
            }
            Err(refusal) => {
                let extra = match &refusal {
                    Refusal::NoPermittedRoute(a) => Some(route_refusal_detail(a)),
                    _ => None,
                };
                let body = error_body(
                    refusal.code(),
                    &refusal.message(),
                    ctx.decision_id.as_str(),
                    extra,
                );
                ctx.error_code = Some(refusal.code());
                let status = refusal.status();
                match refusal {
                    Refusal::NoPermittedRoute(admission) => ctx.admission = Some(*admission),
                    Refusal::ConsentRecordInvalid(q) => ctx.quarantine = Some(*q),
                    _ => {}
                }
                respond_json(session, status, ctx.decision_id.as_str(), body).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx.admitted()?.decision.route;
        ctx.upstream_started.get_or_insert_with(Instant::now);
        let upstreams = &ctx.snapshot.upstreams;
        let tiers = route.tiers(&ctx.snapshot.pools).map(|t| t.pools);
        let target = upstreams
            .choose(tiers, &ctx.tried)
            .ok_or_else(|| Error::explain(NO_PERMITTED_ENDPOINT, "no permitted endpoint left"))?;
        let peer = upstreams
            .peer(target)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "target out of range"))?;
        ctx.target = Some(target);
        if let Some(c) = ctx.attempt_counters() {
            c.attempts.inc();
        }
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(c) = ctx.attempt_counters() {
            c.connect_errors.inc();
        }
        if let Some(target) = ctx.target.take() {
            ctx.snapshot.upstreams.eject(target);
            ctx.tried.push(target);
        }
        // Nothing was sent yet: try another permitted endpoint, if one is left.
        let more = ctx.admission.as_ref().is_some_and(|a| {
            ctx.snapshot
                .upstreams
                .has_choice(a.decision.route.candidates, &ctx.tried)
        });
        if more {
            e.set_retry(true);
            return e;
        }
        Error::because(NO_PERMITTED_ENDPOINT, "every permitted endpoint failed", e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        if let Some(c) = ctx.attempt_counters() {
            c.response_errors.inc();
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        let attempt = FailedAttempt {
            reused_connection: client_reused,
            body_buffered: !session.as_ref().retry_buffer_truncated(),
            idempotent: session.req_header().method.is_idempotent(),
        };
        let resend = attempt.may_resend(&e);
        e.set_retry(resend);
        e
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        match self.limits.max_body_bytes {
            Some(max) if ctx.body_bytes > max => {
                Error::e_explain(BODY_TOO_LARGE, "request body larger than max_body_bytes")
            }
            _ => Ok(()),
        }
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let admission = ctx.admitted()?;
        let target = ctx
            .target
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no target chosen"))?;
        rewrite_upstream_request(
            upstream_request,
            &ctx.snapshot,
            admission,
            ctx.decision_id.as_str(),
            target,
        )
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.close_when_draining(session);
        if upstream_response.status.is_server_error() {
            if let Some(c) = ctx.attempt_counters() {
                c.status_5xx.inc();
            }
        }
        // An upstream that reflects a credential does not show it to the client.
        for name in ctx.snapshot.upstreams.credential_headers() {
            upstream_response.remove_header(name);
        }
        upstream_response.insert_header(stamp::DECISION_ID, ctx.decision_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let too_large = ShapeError::BodyTooLarge;
        let (status, code, message): (u16, &'static str, String) = match (e.etype(), e.esource()) {
            (t, _) if *t == NO_PERMITTED_ENDPOINT => (
                503,
                "permitted_pools_unavailable",
                "every pool permitted for this request is unavailable".into(),
            ),
            (t, _) if *t == BODY_TOO_LARGE => (413, too_large.code(), too_large.to_string()),
            (ErrorType::HTTPStatus(s), _) => {
                (*s, "http_error", "the request could not be proxied".into())
            }
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => (
                408,
                "body_timeout",
                "the request body stopped arriving".into(),
            ),
            (_, ErrorSource::Downstream) if client_went_away(e) => (0, "", String::new()),
            (_, ErrorSource::Upstream) => (502, "upstream_error", "the upstream failed".into()),
            (_, ErrorSource::Downstream) => (
                400,
                "malformed_body",
                "the request body is malformed".into(),
            ),
            _ => (500, "internal_error", "the gateway failed".into()),
        };
        if !code.is_empty() {
            ctx.error_code = Some(code);
        }
        if status > 0 {
            // The connection is not reused after a failure (see below): say
            // so, or a keep-alive client would write its next request into it.
            session.set_keepalive(None);
            let extra = ctx
                .admission
                .as_ref()
                .filter(|_| status == 503)
                .map(route_refusal_detail);
            let body = error_body(code, &message, ctx.decision_id.as_str(), extra);
            // The client may be gone; there is nobody left to tell.
            let _ = respond_json(session, status, ctx.decision_id.as_str(), body).await;
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Pingora logs every failed request at ERROR. A 503 because every
    /// permitted pool is down is an answer the policy chose (pool health is
    /// logged when it changes, and counted), and what a client does (hang
    /// up, stop reading or sending, send a malformed body) is the client's
    /// business: neither is an error of the gateway.
    fn suppress_error_log(&self, _session: &Session, ctx: &Self::CTX, e: &Error) -> bool {
        // Answered (when anyone is left), counted and audited; logged at debug.
        let client_side = *e.esource() == ErrorSource::Downstream;
        if client_side {
            tracing::debug!(decision_id = %ctx.decision_id, error = e.etype().as_str(), "client side ended the request");
        }
        *e.etype() == NO_PERMITTED_ENDPOINT || client_side
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Self::CTX) {
        let now = Instant::now();
        let req = session.req_header();
        // An admitted request is recorded under the path it was decided and forwarded on.
        let path = ctx
            .admission
            .as_ref()
            .map_or(req.uri.path(), |a| a.target.path());
        let method = req.method.as_str();
        self.observers.request_done(&Completed {
            decision_id: ctx.decision_id.as_str(),
            method,
            path,
            snapshot: &ctx.snapshot,
            listener_product: self.listener_product,
            admission: ctx.admission.as_ref(),
            quarantine: ctx.quarantine.as_ref(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            error_code: ctx.error_code,
            pool: ctx.target.map(|t| t.pool),
            total: now.saturating_duration_since(ctx.started),
            upstream: ctx
                .upstream_started
                .map(|t| now.saturating_duration_since(t)),
        });
    }

    fn request_summary(&self, session: &Session, ctx: &Self::CTX) -> String {
        // Method and path only: never the client address or credentials.
        let req = session.req_header();
        format!(
            "{} {} decision={}",
            req.method,
            req.uri.path(),
            ctx.decision_id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(etype: ErrorType, retry: pingora::RetryType) -> Box<Error> {
        let mut e = Error::explain(etype, "test");
        e.retry = retry;
        e
    }

    const POST_ON_POOLED: FailedAttempt = FailedAttempt {
        reused_connection: true,
        body_buffered: true,
        idempotent: false,
    };

    #[test]
    fn a_post_on_a_pooled_connection_the_upstream_closed_is_sent_again() {
        // The write of the request, or the read of its answer, finds the
        // connection closed: Pingora marks the read "reused only" and the
        // write as a plain write error.
        let closed_read = error(ErrorType::ConnectionClosed, pingora::RetryType::ReusedOnly);
        let broken_write = error(ErrorType::WriteError, false.into());
        assert!(POST_ON_POOLED.may_resend(&closed_read));
        assert!(POST_ON_POOLED.may_resend(&broken_write));
    }

    #[test]
    fn a_post_on_a_fresh_connection_or_without_its_body_is_not_sent_again() {
        let broken_write = error(ErrorType::WriteError, false.into());
        let fresh = FailedAttempt {
            reused_connection: false,
            ..POST_ON_POOLED
        };
        assert!(!fresh.may_resend(&broken_write));
        let truncated = FailedAttempt {
            body_buffered: false,
            ..POST_ON_POOLED
        };
        assert!(!truncated.may_resend(&broken_write));
        // A timeout is not a closed connection: the upstream may be working on it.
        let timeout = error(ErrorType::ReadTimedout, false.into());
        assert!(!POST_ON_POOLED.may_resend(&timeout));
    }

    #[test]
    fn an_idempotent_request_follows_the_error_s_own_retry_flag() {
        let get = FailedAttempt {
            idempotent: true,
            reused_connection: false,
            ..POST_ON_POOLED
        };
        assert!(get.may_resend(&error(ErrorType::ReadError, true.into())));
        assert!(!get.may_resend(&error(ErrorType::ReadError, false.into())));
        assert!(!get.may_resend(&error(ErrorType::ReadError, pingora::RetryType::ReusedOnly)));
    }
}
