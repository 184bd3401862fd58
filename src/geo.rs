//! Country of a client address, from a MaxMind-format (`.mmdb`) database.
//!
//! Both record layouts in the wild are read: GeoIP2/GeoLite2
//! (`country.iso_code`) and the flat `country_code` layout of many free
//! databases.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

/// An ISO 3166-1 alpha-2 country code, upper case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Accepts two ASCII letters, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(CountryCode([
                a.to_ascii_uppercase(),
                b.to_ascii_uppercase(),
            ])),
            _ => None,
        }
    }

    /// The code as text, e.g. `FR`.
    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a geo database could not be used.
#[derive(Debug, Error)]
pub enum GeoError {
    /// The file is missing, unreadable or not a MaxMind database.
    #[error("cannot open geo database: {0}")]
    Open(#[from] maxminddb::MaxMindDbError),
}

/// An opened geo database, held in memory.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoDb")
            .field("database_type", &self.reader.metadata().database_type)
            .finish()
    }
}

/// Both layouts at once: serde ignores the fields a record does not have.
#[derive(Deserialize)]
struct CountryRecord<'a> {
    #[serde(borrow)]
    country: Option<NestedCountry<'a>>,
    #[serde(borrow)]
    country_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct NestedCountry<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

impl GeoDb {
    /// Opens and checks a `.mmdb` file.
    pub fn open(path: &Path) -> Result<Self, GeoError> {
        let reader = maxminddb::Reader::open_readfile(path)?;
        Ok(GeoDb { reader })
    }

    /// When the database was built (seconds since the Unix epoch, from its
    /// metadata): its revision in audit lines and `explain` (spec §8).
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// The country of `ip`, if the database knows it. Lookup errors count as
    /// "unknown": a country is a convenience, never a reason to fail a request.
    pub fn country(&self, ip: IpAddr) -> Option<CountryCode> {
        let found = self.reader.lookup(ip.to_canonical()).ok()?;
        let record: CountryRecord<'_> = found.decode().ok()??;
        let code = record
            .country
            .and_then(|c| c.iso_code)
            .or(record.country_code)?;
        CountryCode::parse(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn country_codes_are_two_letters() {
        assert_eq!(
            CountryCode::parse("fr").map(|c| c.to_string()),
            Some("FR".into())
        );
        assert_eq!(CountryCode::parse("FRA"), None);
        assert_eq!(CountryCode::parse("1A"), None);
    }
}
