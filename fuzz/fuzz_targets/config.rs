//! The configuration loader: any gateway.toml, rules.toml and pools.toml
//! (separated by `#----` lines) beside the shipped accounts. It loads or
//! reports errors with file and line; it never panics. Inputs that would
//! make it open files outside its folder or resolve host names are skipped.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use privacy_gateway::config::{load, LoadOptions};
use privacy_gateway_fuzz::{stays_local, ConfigDir, SEPARATOR};

static DIR: OnceLock<ConfigDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, SEPARATOR);
    let (Some(gateway), Some(rules), Some(pools)) = (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let table = |t: &str| t.parse::<toml::Table>().unwrap_or_default();
    if !stays_local(&table(gateway), &table(pools)) {
        return;
    }
    let dir = DIR.get_or_init(ConfigDir::new);
    dir.write("gateway.toml", gateway.as_bytes());
    dir.write("rules.toml", rules.as_bytes());
    dir.write("pools.toml", pools.as_bytes());
    match load(&dir.gateway(), &LoadOptions::default()) {
        Ok(_) => {}
        Err(errors) => {
            assert!(!errors.0.is_empty());
            for e in &errors.0 {
                assert!(e.file.starts_with(dir.path()), "{e}");
            }
        }
    }
});
