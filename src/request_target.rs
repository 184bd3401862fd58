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

/// A normalised origin-form request target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestTarget {
    path: Box<str>,
    query: Option<Box<str>>,
}

impl RequestTarget {
    /// Normalises a raw request target as received (origin- or absolute-form).
    pub fn parse(raw: &[u8]) -> Result<Self, TargetError> {
        let origin = origin_part(raw)?;
        let origin = origin.as_ref();
        let (raw_path, raw_query) = match origin.iter().position(|&b| b == b'?') {
            Some(i) => (&origin[..i], Some(&origin[i + 1..])),
            None => (origin, None),
        };
        let path = normalise_path(raw_path)?;
        let query = match raw_query {
            None => None,
            Some(q) if q.iter().all(|&b| b.is_ascii_graphic() && b != b'#') => {
                // Visible ASCII only, so this is valid UTF-8.
                Some(String::from_utf8_lossy(q).into())
            }
            Some(q) if q.iter().any(|&b| b == 0 || b.is_ascii_control()) => {
                return Err(TargetError::ControlCharacter)
            }
            Some(_) => return Err(TargetError::IllegalCharacter),
        };
        Ok(RequestTarget {
            path: path.into(),
            query,
        })
    }

    /// The normalised path: what routes match and what is forwarded.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query, as received, without the `?`.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

impl fmt::Display for RequestTarget {
    /// The origin-form target forwarded upstream: path, then `?query`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(query) = &self.query {
            write!(f, "?{query}")?;
        }
        Ok(())
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

fn normalise_path(raw: &[u8]) -> Result<String, TargetError> {
    let mut out = String::with_capacity(raw.len());
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
                d if is_unreserved(d) => out.push(char::from(d)),
                d => {
                    out.push('%');
                    out.push_str(&format!("{d:02X}"));
                }
            }
            i += 3;
            continue;
        }
        match b {
            b'\\' => return Err(TargetError::Backslash),
            b if b.is_ascii_control() => return Err(TargetError::ControlCharacter),
            b if is_path_char(b) => out.push(char::from(b)),
            _ => return Err(TargetError::IllegalCharacter),
        }
        i += 1;
    }
    if !out.starts_with('/') {
        return Err(TargetError::NotAPath);
    }
    if out.split('/').any(is_dot_segment) {
        return Err(TargetError::DotSegment);
    }
    Ok(out)
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
    fn normalising_twice_changes_nothing() {
        for raw in ["/v1/ch%61t/a%3ab?q=%41", "/v1/%7E~/x"] {
            let once = parse(raw).unwrap();
            assert_eq!(parse(&once).unwrap(), once);
        }
    }
}
