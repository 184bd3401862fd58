//! A bare Pingora passthrough: the floor the gateway is measured against.
//!
//! ```text
//! cargo run --release --example bare_pingora -- --listen 127.0.0.1:18080 --upstream 127.0.0.1:18081
//! ```
//!
//! Built with this project's own `pingora` dependency (same version, same
//! features, same release profile), it forwards every request unchanged to
//! one upstream over pooled keep-alive connections and does nothing else: no
//! decision, no header rewrite, no metrics, no log. `scripts/bench-peers`
//! runs it beside the gateway, nginx and HAProxy; the gateway's cost is
//! quoted as a ratio to this one's.

use std::net::SocketAddr;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// A bare Pingora passthrough to one upstream.
#[derive(Parser)]
struct Args {
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// The one upstream (plain HTTP).
    #[arg(long)]
    upstream: SocketAddr,
    /// Worker threads (as the gateway's `threads`).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Pingora's `work_stealing` (the gateway's setting; see its README).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    work_stealing: bool,
}

/// The gateway's allocator, so that the two differ only in what they do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        work_stealing: args.work_stealing,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Passthrough {
            upstream: args.upstream,
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    server.run_forever();
}
