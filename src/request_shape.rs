//! The shape of a request, checked before anything decides on it or forwards
//! it: the raw HTTP/1 head as it came off the socket (framing, `Host`,
//! methods the gateway never proxies), and protocol upgrades.
//!
//! Pingora answers some malformed heads itself with a bare `400` that no hook
//! sees; the listener runs [`check_http1_head`] first, on the same parser
//! (`httparse`), so that every such request is answered by the gateway with a
//! JSON body and a decision id, and counted and audited. The checks are
//! stricter than Pingora's where request smuggling lives: a body framed two
//! ways, or a `Content-Length` sent twice, is refused, never reconciled.

use http::HeaderMap;
use thiserror::Error;

/// Header fields a head may hold (Pingora's own limit).
pub const MAX_HEADERS: usize = 256;

/// Why a request is refused for its shape or for a limit, before any decision.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ShapeError {
    /// Not an HTTP/1.0 or 1.1 request head `httparse` accepts.
    #[error("the request head is not valid HTTP/1.1")]
    Malformed,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("the request has more than 256 header fields")]
    TooManyHeaders,
    /// A line ends in a bare LF; front proxies disagree on those.
    #[error("a line of the request head ends without CR LF")]
    BareLineFeed,
    /// The head is longer than `[limits] max_header_bytes`.
    #[error("the request head is larger than the gateway accepts")]
    HeadTooLarge,
    /// The head did not arrive within `[limits] header_timeout_ms`.
    #[error("the request head did not arrive in time")]
    HeadTimeout,
    /// `CONNECT`: the gateway tunnels nothing.
    #[error("the method is not allowed")]
    MethodNotAllowed,
    /// HTTP/1.1 without `Host`.
    #[error("the Host header is missing")]
    MissingHost,
    /// More than one `Host`, a malformed one, or one that contradicts an absolute target.
    #[error("the Host header is invalid")]
    InvalidHost,
    /// `Content-Length` with `Transfer-Encoding`, `Content-Length` more than
    /// once or as a list, or not a number.
    #[error("the body length is ambiguous (Content-Length with Transfer-Encoding, repeated or malformed Content-Length)")]
    AmbiguousLength,
    /// `Transfer-Encoding` other than exactly `chunked`, or on HTTP/1.0.
    #[error("Transfer-Encoding other than chunked is not supported")]
    UnsupportedTransferEncoding,
    /// `Upgrade` (websocket, h2c, ...): after a 101 a connection is a byte pipe nothing checks.
    #[error("protocol upgrades are not allowed on inference routes")]
    UpgradeRefused,
    /// The body is larger than `[limits] max_body_bytes`.
    #[error("the request body is larger than the gateway accepts")]
    BodyTooLarge,
}

impl ShapeError {
    /// The HTTP status answered.
    pub fn status(self) -> u16 {
        match self {
            ShapeError::HeadTooLarge => 431,
            ShapeError::HeadTimeout => 408,
            ShapeError::MethodNotAllowed => 405,
            ShapeError::BodyTooLarge => 413,
            _ => 400,
        }
    }

    /// The stable `error.code`, also the `reason` of `privacy_gateway_rejected_total`.
    pub fn code(self) -> &'static str {
        match self {
            ShapeError::Malformed | ShapeError::BareLineFeed => "malformed_request",
            ShapeError::TooManyHeaders => "too_many_headers",
            ShapeError::HeadTooLarge => "header_too_large",
            ShapeError::HeadTimeout => "header_timeout",
            ShapeError::MethodNotAllowed => "method_not_allowed",
            ShapeError::MissingHost => "missing_host",
            ShapeError::InvalidHost => "invalid_host",
            ShapeError::AmbiguousLength => "ambiguous_length",
            ShapeError::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            ShapeError::UpgradeRefused => "upgrade_not_allowed",
            ShapeError::BodyTooLarge => "body_too_large",
        }
    }
}

/// Where a complete head ends in `buf` (the index just past its empty
/// line), looking only at bytes from `scanned` on (minus the two before, so
/// a terminator split across reads is found). Blank lines before the
/// request line are skipped, as parsers do. Linear in what arrives, so a
/// head trickled one byte at a time costs no more than one sent whole.
pub fn head_end(buf: &[u8], scanned: usize) -> Option<usize> {
    let start = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    let from = scanned.saturating_sub(2).max(start);
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            match (buf.get(i + 1), buf.get(i + 2)) {
                (Some(b'\n'), _) => return Some(i + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Checks a complete HTTP/1 head (`head` holds at least up to [`head_end`]).
pub fn check_http1_head(head: &[u8]) -> Result<(), ShapeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(ShapeError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(ShapeError::TooManyHeaders),
        Err(_) => return Err(ShapeError::Malformed),
    };
    let raw = &head[..len];
    let leading = raw
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if raw[leading..]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || raw[leading + i - 1] != b'\r'))
    {
        return Err(ShapeError::BareLineFeed);
    }
    if req.method == Some("CONNECT") {
        return Err(ShapeError::MethodNotAllowed);
    }
    let http11 = req.version == Some(1);
    let named = |name: &'static str| {
        req.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };

    let hosts: Vec<&[u8]> = named("host").collect();
    match hosts.as_slice() {
        [] if http11 => return Err(ShapeError::MissingHost),
        [] => {}
        [host] => check_host(host, req.path.unwrap_or_default().as_bytes())?,
        _ => return Err(ShapeError::InvalidHost),
    }

    let lengths: Vec<&[u8]> = named("content-length").collect();
    let encodings: Vec<&[u8]> = named("transfer-encoding").collect();
    match lengths.as_slice() {
        [] => {}
        [value] if encodings.is_empty() && is_decimal(value.trim_ascii()) => {}
        _ => return Err(ShapeError::AmbiguousLength),
    }
    match encodings.as_slice() {
        [] => {}
        [value] if http11 && value.trim_ascii().eq_ignore_ascii_case(b"chunked") => {}
        _ => return Err(ShapeError::UnsupportedTransferEncoding),
    }
    Ok(())
}

/// `Host` must be an authority without userinfo and, for an absolute-form
/// target, the target's own authority, as RFC 9112 §3.2.2 requires.
fn check_host(host: &[u8], target: &[u8]) -> Result<(), ShapeError> {
    let host = host.trim_ascii();
    if host.is_empty() || host.contains(&b'@') || http::uri::Authority::try_from(host).is_err() {
        return Err(ShapeError::InvalidHost);
    }
    let lower = target.to_ascii_lowercase();
    let rest = lower
        .strip_prefix(b"http://")
        .or_else(|| lower.strip_prefix(b"https://"));
    if let Some(rest) = rest {
        let end = rest
            .iter()
            .position(|&b| matches!(b, b'/' | b'?' | b'#'))
            .unwrap_or(rest.len());
        if !rest[..end].eq_ignore_ascii_case(host) {
            return Err(ShapeError::InvalidHost);
        }
    }
    Ok(())
}

/// 1 to 19 ASCII digits: a `Content-Length` that fits in a `u64`.
fn is_decimal(value: &[u8]) -> bool {
    (1..=19).contains(&value.len()) && value.iter().all(u8::is_ascii_digit)
}

/// Refuses a request that asks to switch protocols (spec §7): every route
/// the gateway serves is an inference route, and after a `101` the
/// connection would carry bytes no decision covers.
pub fn refuse_upgrade(headers: &HeaderMap) -> Result<(), ShapeError> {
    if headers.contains_key(http::header::UPGRADE) {
        return Err(ShapeError::UpgradeRefused);
    }
    Ok(())
}

/// Refuses, before any byte of it is read, a body whose declared
/// `Content-Length` is over `max` (`[limits] max_body_bytes`). A chunked
/// body is counted as it streams.
pub fn check_declared_length(headers: &HeaderMap, max: Option<u64>) -> Result<(), ShapeError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    match (declared, max) {
        (Some(length), Some(max)) if length > max => Err(ShapeError::BodyTooLarge),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(head: &str) -> Result<(), ShapeError> {
        check_http1_head(head.as_bytes())
    }

    #[test]
    fn head_end_finds_the_empty_line_across_reads() {
        let head = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        assert_eq!(head_end(&head[..20], 0), None);
        assert_eq!(head_end(head, 27), Some(head.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n", 0), Some(16));
        assert_eq!(head_end(b"\r\n\r\n", 0), None);
    }

    #[test]
    fn a_plain_request_passes() {
        assert_eq!(
            check("POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n"),
            Ok(())
        );
        assert_eq!(check("GET / HTTP/1.0\r\n\r\n"), Ok(()));
        assert_eq!(
            check("POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(())
        );
    }

    #[test]
    fn framing_two_ways_or_twice_is_refused() {
        for head in [
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: 2,2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: +2\r\n\r\n",
        ] {
            assert_eq!(check(head), Err(ShapeError::AmbiguousLength), "{head}");
        }
        for head in [
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                check(head),
                Err(ShapeError::UnsupportedTransferEncoding),
                "{head}"
            );
        }
    }

    #[test]
    fn host_is_required_single_and_consistent() {
        assert_eq!(
            check("GET / HTTP/1.1\r\n\r\n"),
            Err(ShapeError::MissingHost)
        );
        for head in [
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n",
        ] {
            assert_eq!(check(head), Err(ShapeError::InvalidHost), "{head}");
        }
        assert_eq!(check("GET http://A/x HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(()));
    }

    #[test]
    fn what_pingora_would_refuse_is_refused_here() {
        assert_eq!(check("GET / HTTP/1.2\r\n\r\n"), Err(ShapeError::Malformed));
        assert_eq!(check("GET /\r\n\r\n"), Err(ShapeError::Malformed));
        assert_eq!(
            check("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n"),
            Err(ShapeError::Malformed)
        );
        assert_eq!(
            check("GET / HTTP/1.1\nHost: a\n\n"),
            Err(ShapeError::BareLineFeed)
        );
        assert_eq!(
            check("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"),
            Err(ShapeError::MethodNotAllowed)
        );
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS)
        );
        assert_eq!(check(&many), Err(ShapeError::TooManyHeaders));
    }
}
