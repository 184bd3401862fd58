//! The operator's own credentials for a pool (`Authorization: Bearer ...`,
//! Azure's `api-key`): read from a secret file, added to every request sent
//! to that pool, and nowhere else. A client can neither set the header (it
//! is removed from what the client sent, whatever pool is chosen) nor see it
//! (it is removed from every answer), and its value never reaches a log
//! line, `explain` output or an error message.

use std::path::Path;

use http::{HeaderName, HeaderValue};
use thiserror::Error;

/// What `explain` prints instead of a credential's value.
pub const REDACTED: &str = "<redacted>";

/// Why a credential could not be configured. Messages name the file and
/// header, never the secret.
#[derive(Debug, Error)]
pub enum CredentialError {
    /// The header is not a header name.
    #[error("credential header `{0}` is not a header name")]
    HeaderName(String),
    /// The header is one the gateway sets, strips or frames the message with.
    #[error("credential header `{0}` is reserved: the gateway sets, removes or frames with it")]
    Reserved(String),
    /// The secret file cannot be read.
    #[error("cannot read credential file {0}: {1}")]
    Read(String, std::io::Error),
    /// The secret file is empty (after surrounding whitespace).
    #[error("credential file {0} is empty")]
    Empty(String),
    /// Prefix and secret do not form a header value (a control character).
    #[error("credential file {0}: prefix and contents are not a valid header value")]
    Value(String),
}

/// Headers a credential may not use: what the gateway stamps or strips
/// (the contract, client addresses, the client's key) and what frames the
/// message or the connection.
fn is_forbidden(name: &HeaderName) -> bool {
    const FRAMING: [&str; 8] = [
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ];
    let name = name.as_str();
    crate::stamp::is_reserved(name)
        || crate::stamp::ADDRESS_HEADERS.contains(&name)
        || FRAMING.contains(&name)
}

/// One pool's credential: a header and its value. `Debug` never shows the value.
#[derive(Clone)]
pub struct UpstreamCredential {
    header: HeaderName,
    value: HeaderValue,
}

impl std::fmt::Debug for UpstreamCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamCredential")
            .field("header", &self.header)
            .field("value", &REDACTED)
            .finish()
    }
}

impl UpstreamCredential {
    /// `header: <prefix><contents of secret_file>`, the contents stripped of
    /// surrounding whitespace (the newline `echo` or an editor leaves).
    pub fn load(header: &str, prefix: &str, secret_file: &Path) -> Result<Self, CredentialError> {
        let header_name = HeaderName::try_from(header)
            .map_err(|_| CredentialError::HeaderName(header.to_string()))?;
        if is_forbidden(&header_name) {
            return Err(CredentialError::Reserved(header.to_string()));
        }
        let file = secret_file.display().to_string();
        let secret =
            std::fs::read(secret_file).map_err(|e| CredentialError::Read(file.clone(), e))?;
        let secret = secret.trim_ascii();
        if secret.is_empty() {
            return Err(CredentialError::Empty(file));
        }
        let mut bytes = Vec::with_capacity(prefix.len() + secret.len());
        bytes.extend_from_slice(prefix.as_bytes());
        bytes.extend_from_slice(secret);
        let mut value =
            HeaderValue::from_bytes(&bytes).map_err(|_| CredentialError::Value(file))?;
        // Pingora's debug logs print request heads; a sensitive value prints as `Sensitive`.
        value.set_sensitive(true);
        Ok(UpstreamCredential {
            header: header_name,
            value,
        })
    }

    /// The header it is sent in.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// The value to send (marked sensitive).
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(contents: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), contents).unwrap();
        file
    }

    #[test]
    fn the_value_is_prefix_and_trimmed_contents_and_debug_hides_it() {
        let file = secret(b"sk-operator-0123\n");
        let c = UpstreamCredential::load("Authorization", "Bearer ", file.path()).unwrap();
        assert_eq!(c.header(), "authorization");
        assert_eq!(c.value(), "Bearer sk-operator-0123");
        assert!(c.value().is_sensitive());
        let debug = format!("{c:?}");
        assert!(!debug.contains("sk-operator"), "{debug}");
    }

    #[test]
    fn reserved_headers_empty_files_and_control_characters_are_refused_without_the_secret() {
        let file = secret(b"sk-operator-0123");
        for header in [
            "x-privacy-account",
            "x-forwarded-for",
            "host",
            "content-length",
        ] {
            let e = UpstreamCredential::load(header, "", file.path()).unwrap_err();
            assert!(matches!(e, CredentialError::Reserved(_)), "{header}: {e}");
        }
        assert!(matches!(
            UpstreamCredential::load("bad header", "", file.path()),
            Err(CredentialError::HeaderName(_))
        ));
        let empty = secret(b" \n");
        assert!(matches!(
            UpstreamCredential::load("api-key", "", empty.path()),
            Err(CredentialError::Empty(_))
        ));
        let broken = secret(b"sk-operator\r\nx-injected: 1");
        let e = UpstreamCredential::load("api-key", "", broken.path()).unwrap_err();
        assert!(matches!(e, CredentialError::Value(_)));
        assert!(!e.to_string().contains("sk-operator"), "{e}");
    }
}
