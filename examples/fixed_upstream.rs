//! A minimal upstream for `scripts/bench-peers` on machines without nginx:
//! answers every request with the same small JSON body, on one thread.
//!
//! ```text
//! cargo run --release --example fixed_upstream -- 127.0.0.1:18081
//! ```
//!
//! With nginx installed the script uses nginx instead (cheaper per
//! request, so more of the machine is left to the proxies measured).

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;

/// A chat completion of about 100 bytes, as the peer table's upstream answers.
const BODY: &[u8] = br#"{"id":"cmpl-1","object":"chat.completion","choices":[{"message":{"role":"assistant","content":"hello"}}]}"#;

fn main() -> std::io::Result<()> {
    let Some(address) = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        eprintln!("usage: fixed_upstream ADDRESS:PORT");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(address).await?;
        loop {
            let (tcp, _) = listener.accept().await?;
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(BODY)))
                            .unwrap_or_default(),
                    )
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
