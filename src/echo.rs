//! Echo upstreams: stand-ins for model services that answer with what they
//! received. `demo` runs one per pool so a newcomer can see exactly what a
//! model API would be told; the tests use them as recording upstreams.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The body of an echo answer (a whole echo, or a stream of events).
pub type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// One request as an echo upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers in arrival order (values lossily decoded).
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// Every value of header `name` (case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).first().copied()
    }
}

/// How a streamed (`text/event-stream`) answer is paced.
#[derive(Clone, Debug)]
pub enum StreamPace {
    /// A fixed pause between events.
    Every(Duration),
    /// Each event after the first waits for a permit: the tests release
    /// one only once the client has seen the event before it.
    Gate(Arc<Semaphore>),
}

/// Events sent in a streamed answer.
pub const STREAM_EVENTS: usize = 3;

struct EchoState {
    pool: String,
    pace: StreamPace,
    /// Whether requests and bytes are kept (tests) or not (a long demo).
    recording: AtomicBool,
    requests: Mutex<Vec<Recorded>>,
    received: Mutex<Vec<u8>>,
}

/// A running echo upstream on loopback. Dropping it stops it like a crashed
/// server: the listener closes and every open connection is cut.
pub struct EchoUpstream {
    state: Arc<EchoState>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl EchoUpstream {
    /// Starts an echo upstream for `pool` on `127.0.0.1:0`, pacing streams every 200 ms.
    pub async fn start(pool: &str) -> io::Result<Self> {
        Self::start_with(
            pool,
            TcpListener::bind("127.0.0.1:0").await?,
            StreamPace::Every(Duration::from_millis(200)),
        )
    }

    /// Stops keeping what it receives, so a long-running demo does not grow;
    /// it still echoes every request.
    pub fn stop_recording(&self) {
        self.state.recording.store(false, Ordering::Relaxed);
    }

    /// Starts an echo upstream on an already bound listener.
    pub fn start_with(pool: &str, listener: TcpListener, pace: StreamPace) -> io::Result<Self> {
        Self::start_accepting(pool, listener, pace, |tcp| async move { Ok(tcp) })
    }

    /// Starts an echo upstream whose connections first pass through
    /// `accept` (for example a TLS handshake).
    pub fn start_accepting<F, Fut, S>(
        pool: &str,
        listener: TcpListener,
        pace: StreamPace,
        accept: F,
    ) -> io::Result<Self>
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = io::Result<S>> + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = listener.local_addr()?;
        let state = Arc::new(EchoState {
            pool: pool.to_string(),
            pace,
            recording: AtomicBool::new(true),
            requests: Mutex::new(Vec::new()),
            received: Mutex::new(Vec::new()),
        });
        let accept_state = state.clone();
        let accept = Arc::new(accept);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            // Its connections, so that a stop can end them all and wait.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => break,
                    },
                    _ = stopped.wait_for(|stop| *stop) => break,
                    // Finished connections leave the set: a demo runs for long.
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                // Events leave when written, as a model server's do (see
                // examples/fixed_upstream.rs): not held for the proxy's ACK.
                let _ = tcp.set_nodelay(true);
                let state = accept_state.clone();
                let accept = accept.clone();
                connections.spawn(async move {
                    if let Ok(stream) = accept(tcp).await {
                        serve(state, stream).await;
                    }
                });
            }
            drop(listener);
            connections.shutdown().await;
        });
        Ok(EchoUpstream {
            state,
            addr,
            task,
            stop,
        })
    }

    /// Stops it and returns once its listener and every connection it had
    /// are closed: from then on a connect to its address is refused and a
    /// kept-alive connection to it is dead. (Dropping it stops it too, but
    /// only when the runtime next gets to the aborted task, so a request
    /// just after may still be answered.)
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.task).await;
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its address as a pool address, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Every byte received since the last call, on all connections, leaving
    /// none behind: long tests look at each request's bytes without copying
    /// everything received before.
    pub fn take_received_bytes(&self) -> Vec<u8> {
        self.state
            .received
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// Every byte received so far, on all connections.
    pub fn received_bytes(&self) -> Vec<u8> {
        self.state
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }
}

async fn serve<S>(state: Arc<EchoState>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Recording {
        inner: stream,
        state: state.clone(),
    });
    let service = service_fn(move |req| answer(state.clone(), req));
    // A client that hangs up mid-request is not the echo's concern.
    let _ = http1::Builder::new().serve_connection(io, service).await;
}

async fn answer(
    state: Arc<EchoState>,
    req: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".into(), |p| p.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if state.recording.load(Ordering::Relaxed) {
        if let Ok(mut requests) = state.requests.lock() {
            requests.push(recorded.clone());
        }
    }
    let wants_stream = recorded
        .header("accept")
        .is_some_and(|a| a.contains("text/event-stream"))
        || serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("stream").and_then(|s| s.as_bool()))
            .unwrap_or(false);
    let response = if wants_stream {
        stream_events(&state)
    } else {
        let mut headers = BTreeMap::new();
        for (name, value) in &recorded.headers {
            headers
                .entry(name.clone())
                .and_modify(|v: &mut String| {
                    v.push_str(", ");
                    v.push_str(value);
                })
                .or_insert_with(|| value.clone());
        }
        let json = serde_json::json!({
            "pool": state.pool,
            "method": recorded.method,
            "path": recorded.path,
            "headers": headers,
        });
        let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
        text.push('\n');
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(text)).boxed())
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed())))
}

fn stream_events(state: &EchoState) -> Result<Response<EchoBody>, http::Error> {
    let pool = state.pool.clone();
    let events = (0..STREAM_EVENTS).map(move |i| format!("{{\"pool\":\"{pool}\",\"index\":{i}}}"));
    event_stream(events, Some(state.pace.clone()), 1)
}

/// A `text/event-stream` answer: `data: <event>` for each of `events`,
/// each after the first waiting for `pace` (none: as fast as the connection
/// takes them), then `data: [DONE]`; at most `buffered` events wait unsent.
pub fn event_stream(
    events: impl Iterator<Item = String> + Send + 'static,
    pace: Option<StreamPace>,
    buffered: usize,
) -> Result<Response<EchoBody>, http::Error> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(buffered);
    tokio::spawn(async move {
        for (i, event) in events.enumerate() {
            if i > 0 {
                match &pace {
                    None => {}
                    Some(StreamPace::Every(d)) => tokio::time::sleep(*d).await,
                    Some(StreamPace::Gate(gate)) => match gate.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => return,
                    },
                }
            }
            if tx
                .send_data(Bytes::from(format!("data: {event}\n\n")))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body.boxed())
}

/// Tees every byte read into the upstream's record.
struct Recording<S> {
    inner: S,
    state: Arc<EchoState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if poll.is_ready() && this.state.recording.load(Ordering::Relaxed) {
            if let Ok(mut received) = this.state.received.lock() {
                received.extend_from_slice(&buf.filled()[before..]);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
