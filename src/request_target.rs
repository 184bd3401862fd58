//! The request target, normalised once: the path capability routes are
//! matched on is exactly the path forwarded upstream (spec §7, e2).
//!
//! Upstreams and the servers behind them decode paths in different ways
//! (nginx merges `..`, Tomcat strips `;` parameters, some frameworks decode
//! twice), so anything that could make them see another path than the one
//! decided is refused rather than guessed at:
//!
//! - percent-encoded unreserved characters are decoded (`%61` -> `a`) and
//!   other escapes get upper-case hex, so equal paths have one spelling;
//! - an encoded slash or backslash (`%2F`, `%5C`), a raw backslash, an
//!   encoded `%` (`%25`, double encoding), a NUL or other control character,
//!   raw or encoded, and a dot segment (`.`, `..`, also as `%2E`, or with
//!   `;` parameters as in `..;x`) are refused;
//! - bytes outside RFC 3986's path characters, bad escapes and fragments are
//!   refused.
//!
//! The query is kept and forwarded unchanged after the normalised path: the
//! policy reads nothing from it. It may hold only visible ASCII.
//!
//! An absolute-form target (`http://host/path`) is reduced to its path and
//! query: what goes upstream is always origin-form.

use std::borrow::Cow;
use std::fmt;

use http::uri::PathAndQuery;
use http::Uri;
use thiserror::Error;

/// Why a request target is refused (answered `400 invalid_path`).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin-form (`/...`) nor absolute-form (`http://host/...`).
    #[error("the request target must be an absolute path such as /v1/chat/completions")]
    NotAPath,
    /// `%2F` in the path.
    #[error("the path holds an encoded slash (%2F)")]
    EncodedSlash,
    /// `\` or `%5C` in the path.
    #[error("the path holds a backslash, raw or encoded (%5C)")]
    Backslash,
    /// `%25`: an encoded percent sign, which a second decoding turns into another escape.
    #[error("the path holds an encoded percent sign (%25)")]
    EncodedPercent,
    /// A NUL or another control character, raw or encoded.
    #[error("the path holds a NUL or another control character")]
    ControlCharacter,
    /// A `.` or `..` segment, raw or encoded.
    #[error("the path holds a dot segment (. or ..)")]
    DotSegment,
    /// `%` not followed by two hex digits.
    #[error("the path holds a malformed percent escape")]
    BadEscape,
    /// A byte a path may not hold unencoded (space, quote, non-ASCII, `#`, ...).
    #[error("the request target holds a character that must be percent-encoded")]
    IllegalCharacter,
}

/// A normalised origin-form request target, held as the `PathAndQuery`
/// forwarded upstream (shared memory: cloning it copies nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTarget(PathAndQuery);

impl RequestTarget {
    /// Normalises a raw request target as received (origin- or absolute-form).
    pub fn parse(raw: &[u8]) -> Result<Self, TargetError> {
        Self::parse_sharing(raw, None)
    }

    /// As [`Self::parse`]; `received` is the path and query the request
    /// already holds (Pingora's parsed URI). When the target is normal as
    /// sent and `received` is the same bytes, the target shares its memory
    /// rather than copying it: the common case allocates nothing.
    pub fn parse_sharing(raw: &[u8], received: Option<&PathAndQuery>) -> Result<Self, TargetError> {
        let origin = origin_part(raw)?;
        let origin = origin.as_ref();
        let (raw_path, raw_query) = match origin.iter().position(|&b| b == b'?') {
            Some(i) => (&origin[..i], Some(&origin[i + 1..])),
            None => (origin, None),
        };
        let path = normalise_path(raw_path)?;
        let query = match raw_query {
            None => None,
            Some(q) if q.iter().all(|&b| b.is_ascii_graphic() && b != b'#') => Some(q),
            Some(q) if q.iter().any(|&b| b == 0 || b.is_ascii_control()) => {
                return Err(TargetError::ControlCharacter)
            }
            Some(_) => return Err(TargetError::IllegalCharacter),
        };
        // A borrowed path is the path as sent, and the query is never
        // changed: the normalised target is then `origin`, byte for byte.
        if let (Cow::Borrowed(_), Some(received)) = (&path, received) {
            if received.as_str().as_bytes() == origin {
                return Ok(RequestTarget(received.clone()));
            }
        }
        let mut text = path.into_owned();
        if let Some(query) = query {
            text.push('?');
            // Visible ASCII only, so this is valid UTF-8.
            text.push_str(&String::from_utf8_lossy(query));
        }
        // Everything left is a character a path and query may hold.
        PathAndQuery::try_from(text)
            .map(RequestTarget)
            .map_err(|_| TargetError::IllegalCharacter)
    }

    /// The normalised path: what routes match and what is forwarded.
    pub fn path(&self) -> &str {
        self.0.path()
    }

    /// The query, as received, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.0.query()
    }

    /// The origin-form target forwarded upstream.
    pub fn uri(&self) -> Uri {
        Uri::from(self.0.clone())
    }
}

impl fmt::Display for RequestTarget {
    /// The origin-form target forwarded upstream: path, then `?query`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// The origin-form part of `raw`: itself, or the path and query of an
/// absolute-form target (path `/` when it has none).
fn origin_part(raw: &[u8]) -> Result<Cow<'_, [u8]>, TargetError> {
    if raw.first() == Some(&b'/') {
        return Ok(Cow::Borrowed(raw));
    }
    let lower = |n: usize| raw.get(..n).map(|p| p.to_ascii_lowercase());
    let rest = if lower(7).as_deref() == Some(b"http://") {
        &raw[7..]
    } else if lower(8).as_deref() == Some(b"https://") {
        &raw[8..]
    } else {
        return Err(TargetError::NotAPath);
    };
    match rest.iter().position(|&b| matches!(b, b'/' | b'?' | b'#')) {
        Some(i) if rest[i] == b'/' => Ok(Cow::Borrowed(&rest[i..])),
        Some(i) if rest[i] == b'?' => Ok(Cow::Owned([b"/", &rest[i..]].concat())),
        Some(_) => Err(TargetError::IllegalCharacter),
        None => Ok(Cow::Borrowed(b"/")),
    }
}

/// RFC 3986 `unreserved`: decoded wherever it appears escaped.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 `pchar` minus `%` (escapes are handled apart), plus `/`.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path in its one spelling: borrowed from `raw` when it already is,
/// copied only once an escape must be rewritten.
fn normalise_path(raw: &[u8]) -> Result<Cow<'_, str>, TargetError> {
    // `raw[..i]` copied on the first change; afterwards every byte goes in.
    let mut changed: Option<String> = None;
    let copy_from = |changed: &mut Option<String>, i: usize| {
        if changed.is_none() {
            let mut out = String::with_capacity(raw.len());
            // Only ASCII path characters came before `i`.
            out.push_str(&String::from_utf8_lossy(&raw[..i]));
            *changed = Some(out);
        }
    };
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == b'%' {
            let (hi, lo) = match (raw.get(i + 1), raw.get(i + 2)) {
                (Some(&h), Some(&l)) => (hex_value(h), hex_value(l)),
                _ => (None, None),
            };
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(TargetError::BadEscape);
            };
            let decoded = hi << 4 | lo;
            match decoded {
                b'/' => return Err(TargetError::EncodedSlash),
                b'\\' => return Err(TargetError::Backslash),
                b'%' => return Err(TargetError::EncodedPercent),
                d if d.is_ascii_control() => return Err(TargetError::ControlCharacter),
                d if is_unreserved(d) => {
                    copy_from(&mut changed, i);
                    if let Some(out) = &mut changed {
                        out.push(char::from(d));
                    }
                }
                _ => {
                    let upper = [
                        raw[i + 1].to_ascii_uppercase(),
                        raw[i + 2].to_ascii_uppercase(),
                    ];
                    if upper != raw[i + 1..i + 3] {
                        copy_from(&mut changed, i);
                    }
                    if let Some(out) = &mut changed {
                        out.push('%');
                        out.extend(upper.map(char::from));
                    }
                }
            }
            i += 3;
            continue;
        }
        match b {
            b'\\' => return Err(TargetError::Backslash),
            b if b.is_ascii_control() => return Err(TargetError::ControlCharacter),
            b if is_path_char(b) => {
                if let Some(out) = &mut changed {
                    out.push(char::from(b));
                }
            }
            _ => return Err(TargetError::IllegalCharacter),
        }
        i += 1;
    }
    let path = match changed {
        Some(out) => Cow::Owned(out),
        // Every byte was checked to be an ASCII path character.
        None => Cow::Borrowed(std::str::from_utf8(raw).map_err(|_| TargetError::IllegalCharacter)?),
    };
    if !path.starts_with('/') {
        return Err(TargetError::NotAPath);
    }
    if path.split('/').any(is_dot_segment) {
        return Err(TargetError::DotSegment);
    }
    Ok(path)
}

/// `.` or `..`, also with `;` parameters (`..;x`), which some servers strip.
fn is_dot_segment(segment: &str) -> bool {
    let name = segment.split(';').next().unwrap_or(segment);
    name == "." || name == ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<String, TargetError> {
        RequestTarget::parse(raw.as_bytes()).map(|t| t.to_string())
    }

    #[test]
    fn plain_paths_and_queries_pass_unchanged() {
        assert_eq!(
            parse("/v1/chat/completions").as_deref(),
            Ok("/v1/chat/completions")
        );
        assert_eq!(
            parse("/v1/models?limit=5&x=%2F%00").as_deref(),
            Ok("/v1/models?limit=5&x=%2F%00")
        );
        let t = RequestTarget::parse(b"/v1/embeddings?a=1").unwrap();
        assert_eq!((t.path(), t.query()), ("/v1/embeddings", Some("a=1")));
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_upper_cased() {
        assert_eq!(
            parse("/v1/ch%61t/completions").as_deref(),
            Ok("/v1/chat/completions")
        );
        assert_eq!(parse("/v1/a%3ab").as_deref(), Ok("/v1/a%3Ab"));
        assert_eq!(parse("/v1/a%2Eb").as_deref(), Ok("/v1/a.b"));
    }

    #[test]
    fn the_issue_s_connector_escape_is_refused() {
        assert_eq!(
            parse("/v1/connectors/..%2F..%2Fv1%2Ffine_tuning%2Fjobs/content"),
            Err(TargetError::EncodedSlash)
        );
    }

    #[test]
    fn every_trick_is_refused() {
        for (raw, want) in [
            ("/v1/a%2fb", TargetError::EncodedSlash),
            ("/v1/a%5Cb", TargetError::Backslash),
            ("/v1/a\\b", TargetError::Backslash),
            ("/v1/a%252Fb", TargetError::EncodedPercent),
            ("/v1/a%00b", TargetError::ControlCharacter),
            ("/v1/a\0b", TargetError::ControlCharacter),
            ("/v1/a%0d%0ab", TargetError::ControlCharacter),
            ("/v1/../x", TargetError::DotSegment),
            ("/v1/./x", TargetError::DotSegment),
            ("/v1/%2e%2E/x", TargetError::DotSegment),
            ("/v1/..;x/y", TargetError::DotSegment),
            ("/v1/x/..", TargetError::DotSegment),
            ("/v1/%zz", TargetError::BadEscape),
            ("/v1/%2", TargetError::BadEscape),
            ("/v1/a b", TargetError::IllegalCharacter),
            ("/v1/a#frag", TargetError::IllegalCharacter),
            ("/v1/\u{e9}", TargetError::IllegalCharacter),
            ("*", TargetError::NotAPath),
            ("v1/chat", TargetError::NotAPath),
            ("", TargetError::NotAPath),
            ("/v1?a\0", TargetError::ControlCharacter),
            ("/v1?a\u{e9}", TargetError::IllegalCharacter),
        ] {
            assert_eq!(parse(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn absolute_form_is_reduced_to_origin_form() {
        assert_eq!(
            parse("http://finetune.internal/v1/chat/completions?x=1").as_deref(),
            Ok("/v1/chat/completions?x=1")
        );
        assert_eq!(parse("HTTPS://h").as_deref(), Ok("/"));
        assert_eq!(parse("http://h?q").as_deref(), Ok("/?q"));
        assert_eq!(parse("ftp://h/x"), Err(TargetError::NotAPath));
    }

    #[test]
    fn a_normal_target_shares_the_request_s_bytes_and_others_are_rewritten() {
        let shares = |raw: &str, received: &str| {
            let received = PathAndQuery::try_from(received).unwrap();
            let t = RequestTarget::parse_sharing(raw.as_bytes(), Some(&received)).unwrap();
            (
                t.to_string(),
                t.0.as_str().as_ptr() == received.as_str().as_ptr(),
            )
        };
        let normal = "/v1/chat/completions?a=%2f";
        assert_eq!(shares(normal, normal), (normal.into(), true));
        assert_eq!(shares("/v1/a%3Ab", "/v1/a%3Ab"), ("/v1/a%3Ab".into(), true));
        // As Pingora holds an absolute-form target: its path and query.
        let absolute = "http://finetune.internal/v1/models?x";
        assert_eq!(
            shares(absolute, "/v1/models?x"),
            ("/v1/models?x".into(), true)
        );
        // A rewritten escape, or bytes that are not the received ones: a copy.
        assert_eq!(
            shares("/v1/ch%61t", "/v1/ch%61t"),
            ("/v1/chat".into(), false)
        );
        assert_eq!(
            shares("/v1/a%3ab", "/v1/a%3ab"),
            ("/v1/a%3Ab".into(), false)
        );
        assert_eq!(
            shares("/v1/models", "/v1/other"),
            ("/v1/models".into(), false)
        );
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in ["/v1/ch%61t/a%3ab?q=%41", "/v1/%7E~/x"] {
            let once = parse(raw).unwrap();
            assert_eq!(parse(&once).unwrap(), once);
        }
    }
}
