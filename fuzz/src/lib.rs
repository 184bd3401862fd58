//! Helpers shared by the fuzz targets: a configuration folder the loader
//! reads, holding the shipped example files unless a target replaces one.

use std::path::{Path, PathBuf};

/// The shipped example files, compiled in.
pub const GATEWAY: &str = include_str!("../../config/gateway.toml");
/// The shipped rules.
pub const RULES: &str = include_str!("../../config/rules.toml");
/// The shipped pools.
pub const POOLS: &str = include_str!("../../config/pools.toml");
/// The shipped accounts.
pub const ACCOUNTS: &str = include_str!("../../config/accounts.jsonl");

/// Separates gateway.toml, rules.toml and pools.toml in a `config` input.
pub const SEPARATOR: &str = "\n#----\n";

/// A folder of its own (per process) holding the four files.
pub struct ConfigDir(PathBuf);

impl ConfigDir {
    /// Creates the folder with the shipped files.
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("privacy-gateway-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz folder");
        let this = ConfigDir(dir);
        for (name, text) in [
            ("gateway.toml", GATEWAY),
            ("rules.toml", RULES),
            ("pools.toml", POOLS),
            ("accounts.jsonl", ACCOUNTS),
        ] {
            this.write(name, text.as_bytes());
        }
        this
    }

    /// Replaces file `name`.
    pub fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.0.join(name), bytes).expect("write fuzz file");
    }

    /// `gateway.toml`'s path, what `config::load` takes.
    pub fn gateway(&self) -> PathBuf {
        self.0.join("gateway.toml")
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for ConfigDir {
    fn default() -> Self {
        Self::new()
    }
}

/// A file name inside the folder: no separator, no `..`, nothing special.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\', '\0'])
}

/// Whether every file the loader would open stays inside the folder and
/// every pool address is an IP literal: the target must not read devices
/// or ask a DNS resolver.
pub fn stays_local(gateway: &toml::Table, pools: &toml::Table) -> bool {
    let files = gateway.get("files").and_then(|f| f.as_table());
    let signing = gateway.get("signing").and_then(|s| s.as_table());
    let named = files
        .into_iter()
        .flat_map(|f| f.values())
        .chain(signing.into_iter().flat_map(|s| s.get("key_file")));
    if !named
        .into_iter()
        .all(|v| v.as_str().is_some_and(plain_name))
    {
        return false;
    }
    let Some(pool_list) = pools.get("pool").and_then(|p| p.as_array()) else {
        return true;
    };
    pool_list.iter().all(|pool| {
        let ca_ok = pool
            .get("tls_ca_file")
            .is_none_or(|f| f.as_str().is_some_and(plain_name));
        let addresses = pool.get("addresses").and_then(|a| a.as_array());
        let addresses_ok = addresses.is_none_or(|list| {
            list.iter().all(|a| {
                let url = a.as_str().or_else(|| a.get("url").and_then(|u| u.as_str()));
                url.is_none_or(ip_literal_host)
            })
        });
        ca_ok && addresses_ok
    })
}

/// `http(s)://<IP literal>[:port][/]`, or anything the loader refuses before resolving.
fn ip_literal_host(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
    else {
        return true;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.parse::<std::net::IpAddr>().is_ok()
}
