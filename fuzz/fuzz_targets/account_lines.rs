//! The accounts-line parser, through the loader: any `accounts.jsonl`
//! beside the shipped rules and pools. It loads or reports errors; it never
//! panics, and never keeps more accounts than it has lines.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use privacy_gateway::config::{load, LoadOptions};
use privacy_gateway_fuzz::ConfigDir;

static DIR: OnceLock<ConfigDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(ConfigDir::new);
    dir.write("accounts.jsonl", data);
    if let Ok((_, snapshot)) = load(&dir.gateway(), &LoadOptions::default()) {
        let lines = data.split(|&b| b == b'\n').count();
        assert!(snapshot.accounts.len() <= lines);
    }
});
