//! The PROXY protocol (v1 text, v2 binary) on a listener behind an L4 load
//! balancer (AWS NLB, HAProxy in TCP mode), where the client's address
//! arrives only in a header before the first byte of HTTP or TLS.
//!
//! The header is believed only from a peer in `trusted_proxies`, like
//! `X-Forwarded-For`, and is then required: a trusted balancer passes the
//! client's bytes through, so without the header the client's own
//! `X-Forwarded-For` would be believed. What the protocol says:
//!
//! | peer | header | outcome |
//! | --- | --- | --- |
//! | trusted | valid `PROXY` | the header's source is the client |
//! | trusted | v2 `LOCAL` (the balancer's own connection, e.g. a check) | the peer is the client |
//! | trusted | relayed without a client address (v1 `UNKNOWN`, v2 UNIX or unspecified) | connection closed |
//! | trusted | missing, malformed, truncated, too slow | connection closed |
//! | untrusted | any PROXY header | connection closed |
//! | untrusted | none | the peer is the client, as on any listener |
//!
//! Exactly the header's bytes are consumed; what follows is the client's.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::socket::SocketAddr as PingoraSocketAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Peek, SocketDigest, Stream};
use pingora::server::ShutdownWatch;
use ppp::{v1, v2};
use prometheus::IntCounterVec;
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::client_ip::TrustedProxies;
use crate::config::SnapshotHandle;

/// Longest wait for a whole header (a peer trickling bytes is cut off).
const HEADER_DEADLINE: Duration = Duration::from_secs(5);
/// The v1 signature.
const V1_SIGNATURE: &[u8] = b"PROXY";
/// The start of the v2 signature (`\r\n\r\n\0\r\nQUIT\n`).
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0";
/// A v1 header is at most 107 bytes with its CRLF.
const V1_MAX: usize = 107;
/// The v2 fixed part: signature, version/command, family, length.
const V2_FIXED: usize = 16;
/// Longest v2 address and TLV block accepted (balancers send well under this).
const V2_MAX_PAYLOAD: usize = 2048;

/// Why a connection was closed before any HTTP.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Refused {
    /// A PROXY header from a peer that is not a trusted proxy.
    #[error("a PROXY header from an untrusted peer")]
    UntrustedPeer,
    /// A trusted peer sent no PROXY header.
    #[error("no PROXY header from a trusted peer")]
    Missing,
    /// The header does not parse (or is too long).
    #[error("a malformed PROXY header")]
    Malformed,
    /// The connection ended or stalled inside the header.
    #[error("a truncated PROXY header")]
    Truncated,
    /// A relayed connection whose client address the header does not give.
    #[error("a PROXY header without a client address")]
    NoClientAddress,
    /// The connection has no IP peer to judge.
    #[error("no IP peer")]
    NoPeer,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::UntrustedPeer => "untrusted_peer",
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::Truncated => "truncated",
            Refused::NoClientAddress => "no_client_address",
            Refused::NoPeer => "no_peer",
        }
    }
}

/// The client a v1 header names. `UNKNOWN` relays a client without an
/// address: its bytes would be judged as the balancer's, so it is refused.
fn source_of_v1(addresses: &v1::Addresses) -> Result<Option<SocketAddr>, Refused> {
    match addresses {
        v1::Addresses::Tcp4(a) => Ok(Some(SocketAddr::new(
            IpAddr::V4(a.source_address),
            a.source_port,
        ))),
        v1::Addresses::Tcp6(a) => Ok(Some(SocketAddr::new(
            IpAddr::V6(a.source_address),
            a.source_port,
        ))),
        v1::Addresses::Unknown => Err(Refused::NoClientAddress),
    }
}

/// The client a v2 header names, or none for `LOCAL` (the balancer's own
/// connection, not relayed).
fn source_of_v2(header: &v2::Header<'_>) -> Result<Option<SocketAddr>, Refused> {
    if header.command == v2::Command::Local {
        return Ok(None);
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Ok(Some(SocketAddr::new(
            IpAddr::V4(a.source_address),
            a.source_port,
        ))),
        v2::Addresses::IPv6(a) => Ok(Some(SocketAddr::new(
            IpAddr::V6(a.source_address),
            a.source_port,
        ))),
        // A relayed client must have an IP address; without one its bytes
        // would be judged as the balancer's.
        v2::Addresses::Unix(_) | v2::Addresses::Unspecified => Err(Refused::NoClientAddress),
    }
}

/// Reads one header, consuming exactly its bytes.
async fn read_header<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    v2: bool,
) -> Result<Option<SocketAddr>, Refused> {
    let truncated = |_| Refused::Truncated;
    if v2 {
        let mut header = vec![0u8; V2_FIXED];
        stream.read_exact(&mut header).await.map_err(truncated)?;
        let length = u16::from_be_bytes([header[14], header[15]]) as usize;
        if length > V2_MAX_PAYLOAD {
            return Err(Refused::Malformed);
        }
        header.resize(V2_FIXED + length, 0);
        stream
            .read_exact(&mut header[V2_FIXED..])
            .await
            .map_err(truncated)?;
        let parsed = v2::Header::try_from(header.as_slice()).map_err(|_| Refused::Malformed)?;
        return source_of_v2(&parsed);
    }
    // v1: byte by byte up to the CRLF, never past it.
    let mut line = Vec::with_capacity(V1_MAX);
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(Refused::Malformed);
        }
        let byte = stream.read_u8().await.map_err(truncated)?;
        line.push(byte);
    }
    let text = std::str::from_utf8(&line).map_err(|_| Refused::Malformed)?;
    let parsed = v1::Header::try_from(text).map_err(|_| Refused::Malformed)?;
    source_of_v1(&parsed.addresses)
}

/// Applies the table above to a fresh connection: reads the header if
/// there must be one, and makes its source the connection's peer.
pub async fn accept(stream: &mut L4Stream, trusted: &TrustedProxies) -> Result<(), Refused> {
    let digest = stream.get_socket_digest();
    let peer = digest
        .as_ref()
        .and_then(|d| d.peer_addr())
        .and_then(|a| a.as_inet())
        .copied()
        .ok_or(Refused::NoPeer)?;
    let peer_trusted = trusted.contains(peer.ip());
    let work = async {
        // Five bytes tell the three cases apart (no HTTP request or TLS
        // record starts like either signature); they stay in the stream.
        let mut first = [0u8; 5];
        let peeked = stream
            .try_peek(&mut first)
            .await
            .map_err(|_| Refused::Truncated)?;
        let signature = match (peeked, &first[..]) {
            (true, s) if s == V1_SIGNATURE => Some(false),
            (true, s) if s == V2_SIGNATURE => Some(true),
            _ => None,
        };
        match (signature, peer_trusted) {
            (Some(_), false) => Err(Refused::UntrustedPeer),
            (None, true) => Err(Refused::Missing),
            (None, false) => Ok(None),
            (Some(v2), true) => read_header(stream, v2).await,
        }
    };
    let source = tokio::time::timeout(HEADER_DEADLINE, work)
        .await
        .map_err(|_| Refused::Truncated)??;
    if let Some(source) = source {
        let replaced = SocketDigest::from_raw_fd(stream.as_raw_fd());
        let _ = replaced
            .peer_addr
            .set(Some(PingoraSocketAddr::Inet(source)));
        if let Some(local) = digest.as_ref().and_then(|d| d.local_addr()) {
            let _ = replaced.local_addr.set(Some(local.clone()));
        }
        stream.set_socket_digest(replaced);
    }
    Ok(())
}

/// Reads PROXY headers for one listener, with the trusted proxies of the
/// snapshot serving when the connection arrives, counting refusals.
#[derive(Clone)]
pub struct ProxyHeaders {
    snapshots: Arc<SnapshotHandle>,
    refused: IntCounterVec,
}

impl ProxyHeaders {
    /// Judges with `snapshots`' trusted proxies; counts refusals in `refused` (by reason).
    pub fn new(snapshots: Arc<SnapshotHandle>, refused: IntCounterVec) -> Self {
        ProxyHeaders { snapshots, refused }
    }

    async fn accept(&self, stream: &mut L4Stream) -> Result<(), Refused> {
        let trusted = self.snapshots.current().trusted_proxies.clone();
        let outcome = accept(stream, &trusted).await;
        if let Err(reason) = outcome {
            self.refused.with_label_values(&[reason.label()]).inc();
            tracing::debug!("connection closed before HTTP: {reason}");
        }
        outcome
    }
}

#[async_trait]
impl PreTlsProcess for ProxyHeaders {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        self.accept(stream).await.map_err(|reason| {
            pingora::Error::explain(pingora::ErrorType::HandshakeError, reason.to_string())
        })
    }
}

/// A cleartext listener's application behind the PROXY protocol: reads the
/// header, then hands the connection to `inner`.
pub struct Cleartext<A> {
    inner: Arc<A>,
    headers: ProxyHeaders,
}

impl<A> Cleartext<A> {
    /// `inner` behind `headers`.
    pub fn new(inner: A, headers: ProxyHeaders) -> Self {
        Cleartext {
            inner: Arc::new(inner),
            headers,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Cleartext<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // A TCP listener's connections are L4 streams; anything else is not served.
        let mut l4: Box<L4Stream> = stream.into_any().downcast().ok()?;
        self.headers.accept(&mut l4).await.ok()?;
        let mut next = self.inner.process_new(l4, shutdown).await;
        // A connection handed back for reuse carries no second header.
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8], v2: bool) -> (Result<Option<SocketAddr>, Refused>, Vec<u8>) {
        let mut reader = bytes;
        let result = read_header(&mut reader, v2).await;
        (result, reader.to_vec())
    }

    #[tokio::test]
    async fn v1_headers_are_read_to_their_crlf_and_no_further() {
        let (r, rest) = parse(
            b"PROXY TCP4 203.0.113.77 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n",
            false,
        )
        .await;
        assert_eq!(r, Ok(Some("203.0.113.77:51234".parse().unwrap())));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (r, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 443\r\n", false).await;
        assert_eq!(r, Ok(Some("[2001:db8::1]:51234".parse().unwrap())));
        let (r, _) = parse(b"PROXY UNKNOWN\r\n", false).await;
        assert_eq!(r, Err(Refused::NoClientAddress));
    }

    #[tokio::test]
    async fn broken_v1_headers_are_refused() {
        assert_eq!(
            parse(b"PROXY TCP4 203.0.113.77", false).await.0,
            Err(Refused::Truncated)
        );
        assert_eq!(
            parse(b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n", false)
                .await
                .0,
            Err(Refused::Malformed)
        );
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long, false).await.0, Err(Refused::Malformed));
    }

    fn v2_header(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    #[tokio::test]
    async fn v2_headers_give_their_source_local_gives_none() {
        let mut payload = vec![203, 0, 113, 77, 10, 0, 0, 1];
        payload.extend_from_slice(&51234u16.to_be_bytes());
        payload.extend_from_slice(&443u16.to_be_bytes());
        let bytes = [v2_header(1, 0x11, &payload), b"rest".to_vec()].concat();
        let (r, rest) = parse(&bytes, true).await;
        assert_eq!(r, Ok(Some("203.0.113.77:51234".parse().unwrap())));
        assert_eq!(rest, b"rest");
        let (r, _) = parse(&v2_header(0, 0x00, &[]), true).await;
        assert_eq!(r, Ok(None));
        // PROXY with an unspecified family would leave the balancer as the client.
        assert_eq!(
            parse(&v2_header(1, 0x00, &[]), true).await.0,
            Err(Refused::NoClientAddress)
        );
        assert_eq!(
            parse(&v2_header(1, 0x11, &payload[..5]), true).await.0,
            Err(Refused::Malformed)
        );
        let full = v2_header(1, 0x11, &payload);
        assert_eq!(parse(&full[..20], true).await.0, Err(Refused::Truncated));
    }
}
