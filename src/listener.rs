//! The listener: what one client connection may cost, in front of Pingora's
//! HTTP proxy.
//!
//! Pingora's own HTTP/1 loop has no bound a hostile client respects: it sets a
//! 60 s keep-alive before the first request, and parsing each request then
//! replaces it with the client's own wish (for HTTP/1.1, keep alive forever);
//! its head read timeout applies to each read, not to the head, so a header
//! trickled a byte a minute is never cut; it accepts every connection and
//! reads up to 1 MiB of head per connection; and the malformed heads it
//! refuses get a bare `400` that no hook sees. [`GatewayListener`] is the
//! [`ServerApp`] each listener runs instead. Per connection it:
//!
//! 1. takes a slot among `[limits] max_connections`; beyond it, the
//!    connection idle longest (waiting for or reading a request head) is
//!    shed, and when none is idle the new one is refused with a `503`:
//!    requests in progress are never cut;
//! 2. reads each request head itself, within `keepalive_timeout_ms` of
//!    silence between requests, `header_timeout_ms` for the whole head (408)
//!    and `max_header_bytes` (431);
//! 3. checks the raw head ([`request_shape::check_http1_head`]) and answers
//!    what it refuses itself: JSON, a decision id, a metric, an audit line;
//! 4. hands the connection and the bytes read (as a pipelined prefix, which
//!    Pingora parses without reading again) to the HTTP application it wraps
//!    (Pingora's `HttpProxy` with [`crate::proxy::PrivacyProxy`]'s hooks,
//!    inside [`crate::lifecycle::Lingering`]), and takes the connection back
//!    for the next request.
//!
//! Between two requests a connection waits here, not in Pingora: it is
//! closed once the wrapped application's cleanup is over (for `Lingering`,
//! [`crate::lifecycle::IDLE_LINGER`] after the listener closed), so a
//! request already on its way during a stop or an upgrade is still answered.
//!
//! Extending it (PROXY protocol, TLS): Pingora's listener hands over a
//! [`Stream`] after any TLS handshake. A PROXY protocol header belongs at the
//! top of [`GatewayListener::process_new`], read before the first request head
//! under the same slot and deadlines; a stream that negotiated HTTP/2 by ALPN
//! already goes to Pingora's own HTTP/2 handling in `serve_other`, still
//! holding its slot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};

use crate::config::SnapshotHandle;
use crate::lifecycle::Lifecycle;
use crate::observe::{Completed, Observers};
use crate::policy::Product;
use crate::proxy::error_body;
use crate::request_shape::{self, ShapeError};
use crate::stamp;

/// What a client connection may cost (`[limits]` in gateway.toml). The
/// defaults follow nginx's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Silence allowed between two requests on a kept-alive connection
    /// (nginx `keepalive_timeout`, 75 s).
    pub keepalive_timeout: Duration,
    /// Time allowed for a whole request head: from the connection's start
    /// for its first request, from the first byte for later ones (nginx
    /// `client_header_timeout`, 60 s). Past it: 408.
    pub header_timeout: Duration,
    /// Longest request head, request line and headers (nginx
    /// `large_client_header_buffers 4 8k`, 32 KiB). Past it: 431.
    pub max_header_bytes: usize,
    /// Open connections per listener (nginx's `worker_connections` is 512
    /// per worker; 4096 here). Beyond it idle ones are shed, else new ones refused.
    pub max_connections: usize,
    /// Silence allowed between two reads of a request body (nginx
    /// `client_body_timeout`, 60 s). Past it: 408.
    pub body_timeout: Duration,
    /// Silence allowed between two writes to a client that is not reading
    /// (nginx `send_timeout`, 60 s). Past it the connection is closed.
    pub send_timeout: Duration,
    /// Largest request body, when set (nginx `client_max_body_size` is 1 MiB;
    /// unset here, as model inputs can be large). Past it: 413.
    pub max_body_bytes: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            keepalive_timeout: Duration::from_secs(75),
            header_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_connections: 4096,
            body_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
            max_body_bytes: None,
        }
    }
}

/// How an HTTP/2 connection with prior knowledge opens, as RFC 9113 §3.4 has it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one read of a request head asks for at most.
const READ_CHUNK: usize = 8192;

/// The connections of one listener, and which of them are idle and may be shed.
struct ConnectionGate {
    max: usize,
    open: AtomicUsize,
    open_gauge: IntGauge,
    /// Idle connections by when they became idle (oldest first), each with
    /// the signal that sheds it.
    idle: Mutex<BTreeMap<u64, Arc<Notify>>>,
    next_idle: AtomicU64,
}

impl ConnectionGate {
    /// A slot for a new connection, shedding the longest-idle one when the
    /// listener is full; `None` when it is full of busy connections.
    fn enter(&self) -> Option<Slot<'_>> {
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        if open > self.max && !self.shed_longest_idle() {
            self.open.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        self.open_gauge.inc();
        Some(Slot {
            gate: self,
            shed: Arc::new(Notify::new()),
        })
    }

    fn shed_longest_idle(&self) -> bool {
        let victim = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop_first();
        match victim {
            Some((_, shed)) => {
                shed.notify_one();
                true
            }
            None => false,
        }
    }
}

/// One connection's place in its listener.
struct Slot<'g> {
    gate: &'g ConnectionGate,
    shed: Arc<Notify>,
}

impl Slot<'_> {
    /// Marks the connection idle (sheddable) until the guard drops.
    fn idle(&self) -> IdleGuard<'_> {
        let key = self.gate.next_idle.fetch_add(1, Ordering::Relaxed);
        self.gate
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key, self.shed.clone());
        IdleGuard {
            gate: self.gate,
            key,
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::SeqCst);
        self.gate.open_gauge.dec();
    }
}

struct IdleGuard<'g> {
    gate: &'g ConnectionGate,
    key: u64,
}

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        self.gate
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

/// How reading a request head ended.
enum HeadRead {
    /// A complete head, with any body bytes that came with it.
    Complete(BytesMut),
    /// The connection ends without an answer.
    Gone(Gone),
    /// The gateway answers and closes.
    Refused(ShapeError),
}

/// Why a connection ended between requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gone {
    /// The client closed it (or the socket failed).
    Closed,
    /// Silent for `keepalive_timeout` (or `header_timeout` before its first byte).
    IdleTimeout,
    /// Shed to make room for a new connection.
    Shed,
    /// The listener is closed and the wrapped application cleaned up.
    Closing,
}

impl Gone {
    /// The `reason` label of `privacy_gateway_connections_closed_total`, when counted.
    fn reason(self) -> Option<&'static str> {
        match self {
            Gone::IdleTimeout => Some("idle_timeout"),
            Gone::Shed => Some("shed"),
            Gone::Closed | Gone::Closing => None,
        }
    }
}

/// The `ServerApp` of one listener: connection limits and head reading in
/// front of the HTTP application `A` (see the module documentation).
pub struct GatewayListener<A> {
    app: Arc<A>,
    limits: Limits,
    gate: ConnectionGate,
    listener_product: Product,
    snapshots: Arc<SnapshotHandle>,
    observers: Arc<Observers>,
    lifecycle: &'static Lifecycle,
    /// Turns true once `app` is cleaned up: connections between requests close.
    closing: watch::Sender<bool>,
}

impl<A: HttpServerApp + Send + Sync + 'static> GatewayListener<A> {
    /// Wraps `app` for the listener `name` (its address, a metric label)
    /// of `listener_product`, under `limits`, counting its own answers in
    /// `lifecycle`.
    pub fn new(
        app: A,
        name: &str,
        listener_product: Product,
        limits: Limits,
        snapshots: Arc<SnapshotHandle>,
        observers: Arc<Observers>,
        lifecycle: &'static Lifecycle,
    ) -> Self {
        let open_gauge = observers
            .metrics
            .connections_open
            .with_label_values(&[name]);
        GatewayListener {
            app: Arc::new(app),
            limits,
            gate: ConnectionGate {
                max: limits.max_connections.max(1),
                open: AtomicUsize::new(0),
                open_gauge,
                idle: Mutex::new(BTreeMap::new()),
                next_idle: AtomicU64::new(0),
            },
            listener_product,
            snapshots,
            observers,
            lifecycle,
            closing: watch::Sender::new(false),
        }
    }

    /// Serves HTTP/1 requests on `stream` until it closes.
    async fn serve_http1(&self, mut stream: Stream, slot: &Slot<'_>, shutdown: &ShutdownWatch) {
        let mut persistent = None;
        // The first head must be complete within header_timeout of the accept.
        let mut first_byte_within = self.limits.header_timeout;
        let mut first_request = true;
        loop {
            let started = Instant::now();
            let read = {
                let _idle = slot.idle();
                self.read_head(&mut stream, first_byte_within, first_request, &slot.shed)
                    .await
            };
            let head = match read {
                HeadRead::Complete(head) => head,
                HeadRead::Gone(gone) => {
                    if let Some(reason) = gone.reason() {
                        self.observers.metrics.count_connection_closed(reason);
                    }
                    return;
                }
                HeadRead::Refused(refusal) => {
                    return self.refuse(&mut stream, refusal, started).await;
                }
            };
            if let Err(refusal) = request_shape::check_http1_head(&head) {
                return self.refuse(&mut stream, refusal, started).await;
            }
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = persistent.take() {
                // Pipelining stays off, so these never carry bytes of their own.
                HttpPersistentSettings::apply_to_session(settings, &mut session);
            }
            // Pingora parses these bytes without reading from the socket again.
            session.set_pipelined_prefix(head);
            let Some(reused) = self.app.process_new_http(session, shutdown).await else {
                return;
            };
            (stream, persistent) = reused.consume();
            first_byte_within = self.limits.keepalive_timeout;
            first_request = false;
        }
    }

    /// Reads one request head: its first byte within `first_byte_within`,
    /// all of it within `header_timeout` (counted from the connection's
    /// start for the first request, from the first byte afterwards).
    async fn read_head(
        &self,
        stream: &mut Stream,
        first_byte_within: Duration,
        first_request: bool,
        shed: &Notify,
    ) -> HeadRead {
        let limits = &self.limits;
        let mut closing = self.closing.subscribe();
        // Read straight into the head's buffer: memory is only touched as
        // bytes arrive, so an idle connection costs little more than its task.
        let mut buf = BytesMut::new();
        let mut deadline = tokio::time::Instant::now() + first_byte_within;
        let mut scanned = 0;
        loop {
            let room = limits.max_header_bytes + 1 - buf.len().min(limits.max_header_bytes);
            buf.reserve(READ_CHUNK.min(room));
            let waiting = buf.is_empty();
            let read = tokio::select! {
                biased;
                _ = shed.notified() => return HeadRead::Gone(Gone::Shed),
                _ = closing.wait_for(|closed| *closed), if waiting => {
                    return HeadRead::Gone(Gone::Closing)
                }
                read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => read,
            };
            match read {
                Err(_) if waiting => return HeadRead::Gone(Gone::IdleTimeout),
                Err(_) => return HeadRead::Refused(ShapeError::HeadTimeout),
                Ok(Ok(0)) | Ok(Err(_)) => return HeadRead::Gone(Gone::Closed),
                Ok(Ok(_)) => {}
            }
            if waiting && !first_request {
                deadline = tokio::time::Instant::now() + limits.header_timeout;
            }
            match request_shape::head_end(&buf, scanned) {
                Some(end) if end <= limits.max_header_bytes => return HeadRead::Complete(buf),
                None if buf.len() <= limits.max_header_bytes => scanned = buf.len(),
                _ => return HeadRead::Refused(ShapeError::HeadTooLarge),
            }
        }
    }

    /// Answers a refused request head, counts and audits it; the caller closes.
    async fn refuse(&self, stream: &mut Stream, refusal: ShapeError, started: Instant) {
        let _in_flight = self.lifecycle.begin_request();
        let id = stamp::DecisionId::new();
        let decision_id = id.as_str();
        let body = error_body(refusal.code(), &refusal.to_string(), decision_id, None);
        let within = self.limits.send_timeout;
        let answered = answer(stream, refusal.status(), decision_id, &body, within).await;
        let snapshot = self.snapshots.current();
        self.observers.request_done(&Completed {
            decision_id,
            // Refused before its head was trusted to say.
            method: "-",
            path: "-",
            snapshot: &snapshot,
            listener_product: self.listener_product,
            admission: None,
            quarantine: None,
            status: refusal.status(),
            error_code: Some(refusal.code()),
            pool: None,
            total: started.elapsed(),
            upstream: None,
        });
        if answered {
            linger(stream).await;
        }
    }
}

/// Writes a complete JSON answer and shuts the connection's sending side;
/// whether it was written within `within`.
async fn answer(
    stream: &mut Stream,
    status: u16,
    decision_id: &str,
    body: &[u8],
    within: Duration,
) -> bool {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}: {decision_id}\r\nconnection: close\r\n\r\n",
        body.len(),
        stamp::DECISION_ID,
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.flush().await?;
        AsyncWriteExt::shutdown(stream).await
    };
    matches!(tokio::time::timeout(within, write).await, Ok(Ok(())))
}

/// Reads (and drops) briefly what the client still sends after an answer,
/// so that closing does not reset the connection before it reads the answer.
async fn linger(stream: &mut Stream) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for GatewayListener<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(slot) = self.gate.enter() else {
            self.refuse_connection(stream).await;
            return None;
        };
        let mut stream = stream;
        let http2 = match stream.selected_alpn_proto() {
            Some(ALPN::H1) => false,
            // HTTP/2 (or a custom protocol) negotiated by ALPN.
            Some(_) => true,
            None => match self.h2c_prior_knowledge(&mut stream, &slot.shed).await {
                Some(http2) => http2,
                None => return None,
            },
        };
        if http2 {
            // Pingora's own HTTP/2 handling, under this slot.
            return self.serve_other(stream, shutdown).await;
        }
        self.serve_http1(stream, &slot, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
        self.closing.send_replace(true);
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> GatewayListener<A> {
    /// The listener is full of busy connections: `503`, counted, closed.
    async fn refuse_connection(&self, mut stream: Stream) {
        let code = "too_many_connections";
        self.observers.metrics.count_rejected(code);
        let id = stamp::DecisionId::new();
        let decision_id = id.as_str();
        let body = error_body(
            code,
            "the gateway has no room for another connection; retry shortly",
            decision_id,
            None,
        );
        let within = Duration::from_secs(1).min(self.limits.send_timeout);
        answer(&mut stream, 503, decision_id, &body, within).await;
    }

    /// Whether a cleartext connection opens with the HTTP/2 preface, on a
    /// listener that offers h2c; `None` when it sends nothing in time (or
    /// is shed meanwhile) and is closed. Without h2c, or over TLS: HTTP/1.
    async fn h2c_prior_knowledge(&self, stream: &mut Stream, shed: &Notify) -> Option<bool> {
        let h2c = self.app.server_options().is_some_and(|o| o.h2c);
        if !h2c || stream.get_ssl_digest().is_some() {
            return Some(false);
        }
        let mut preface = [0u8; H2_PREFACE.len()];
        let peek = tokio::time::timeout(self.limits.header_timeout, stream.try_peek(&mut preface));
        tokio::select! {
            biased;
            _ = shed.notified() => None,
            peeked = peek => match peeked {
                Ok(Ok(true)) => Some(preface == *H2_PREFACE),
                // A stream that cannot peek is read as HTTP/1.
                Ok(Ok(false)) => Some(false),
                Ok(Err(_)) | Err(_) => None,
            },
        }
    }

    /// A connection that is not HTTP/1: handed to Pingora as it would be without this listener.
    async fn serve_other(&self, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        ServerApp::process_new(&self.app, stream, shutdown).await
    }
}
