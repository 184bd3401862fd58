//! Configuration problems, each with its file and line, and the helpers
//! every file's compiler uses to report them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use thiserror::Error;

/// One problem in one file, with its line when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Every problem found; a configuration with any is not used.
#[derive(Debug, Clone, Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Stops collecting after this many errors in one file.
const MAX_ERRORS_PER_FILE: usize = 20;

/// Collects the errors of one file.
pub(super) struct FileErrors<'a> {
    file: PathBuf,
    text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl<'a> FileErrors<'a> {
    pub(super) fn new(file: &Path, text: &'a str) -> Self {
        FileErrors {
            file: file.to_path_buf(),
            text,
            errors: Vec::new(),
        }
    }

    pub(super) fn at_line(&mut self, line: Option<usize>, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS_PER_FILE {
            self.errors.push(ConfigError {
                file: self.file.clone(),
                line,
                message: message.into(),
            });
        }
    }

    pub(super) fn at_span(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let line = line_of(self.text, span.start);
        self.at_line(Some(line), message);
    }
}

pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

pub(super) fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| one_error(path, None, format!("cannot read: {e}")))
}

pub(super) fn one_error(file: &Path, line: Option<usize>, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    }])
}

pub(super) fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigErrors> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        one_error(path, line, e.message().to_string())
    })
}

/// The first 7 hex digits of a finished SHA-256: a revision label.
pub(super) fn short_hash(hash: sha2::Sha256) -> String {
    use sha2::Digest;
    hex::encode(hash.finalize())[..7].to_string()
}

/// Printable ASCII without spaces: safe in a header value and a log line.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_count_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
