//! A minimal upstream for `scripts/bench-peers`: answers every request with
//! the same small JSON body, on one thread; a request that accepts
//! `text/event-stream` gets a stream of events instead, written as fast as
//! the connection takes them, or one every PACE_MS.
//!
//! ```text
//! cargo run --release --example fixed_upstream -- 127.0.0.1:18081 [EVENTS [PACE_MS]]
//! ```
//!
//! EVENTS (default 10,000) is how many events a stream has. PACE_MS (default
//! 0: no wait) is the wait before each event, the first included, as a model
//! sends its header at once and a token whenever one is ready: what a proxy
//! adds to the first event's time is then its own, not the machine's. For plain
//! requests the script uses nginx when it is installed (cheaper per
//! request, so more of the machine is left to the proxies measured).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use privacy_gateway::echo::{event_stream, EchoBody};

/// A chat completion of about 100 bytes, as the peer table's upstream answers.
const BODY: &[u8] = br#"{"id":"cmpl-1","object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;

/// Reads the whole request first. Without this read, one stream in about
/// 150 of 10,000 events lost its end through a proxy (none directly): a
/// proxy sends head and body in two writes, the answer went out with the
/// body unread, the connection was closed with those bytes unread, and a
/// kernel that closes a socket with unread bytes resets the connection,
/// which discards what the proxy had not read yet.
async fn answer(req: Request<Incoming>, events: usize, pace: Duration) -> Response<EchoBody> {
    let stream = req
        .headers()
        .get(http::header::ACCEPT)
        .is_some_and(|a| a.as_bytes().starts_with(b"text/event-stream"));
    if req.into_body().collect().await.is_err() {
        return Response::builder()
            .status(400)
            .body(Full::new(Bytes::new()).boxed())
            .unwrap_or_default();
    }
    if !stream {
        return Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(BODY)).boxed())
            .unwrap_or_default();
    }
    let events = (0..events).map(|i| format!("{{\"index\":{i},\"delta\":\"token\"}}"));
    if pace.is_zero() {
        return event_stream(events, None, 16).unwrap_or_default();
    }
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
    tokio::spawn(async move {
        for event in events.chain(std::iter::once("[DONE]".to_string())) {
            tokio::time::sleep(pace).await;
            if tx
                .send_data(Bytes::from(format!("data: {event}\n\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body.boxed())
        .unwrap_or_default()
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(address) = args.next().and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: fixed_upstream ADDRESS:PORT [EVENTS [PACE_MS]]");
        std::process::exit(2);
    };
    let events = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let pace = Duration::from_millis(args.next().and_then(|n| n.parse().ok()).unwrap_or(0));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(address).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            // As model servers do (asyncio, so uvicorn, sets it): with Nagle's
            // algorithm on, an event written alone after the header waits
            // for the proxy's delayed ACK of the header on a kept-alive
            // connection, tens of ms that are this server's, not the proxy's.
            tcp.set_nodelay(true)?;
            tokio::spawn(async move {
                let service = service_fn(|req| async move {
                    Ok::<_, Infallible>(answer(req, events, pace).await)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
