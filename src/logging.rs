//! Diagnostic logs: `tracing` to standard error, as text or JSON lines,
//! with Pingora's own `log` records routed through the same subscriber.
//!
//! A few Pingora records are normal steps logged as failures: the new
//! process of an upgrade waiting for the old one's sockets logs
//! `No incoming socket transfer` at ERROR each second, and the old one
//! waiting for the new one's socket logs `server not ready` at WARN. Those
//! are re-levelled to INFO here; everything else keeps its level.
//!
//! Pingora's accept loop also writes the full client address of every
//! failed TLS or PROXY handshake at ERROR ("Downstream handshake error from
//! 203.0.113.77:51234"): in lines from its downstream modules every address
//! is replaced before the line is written. Upstream-side lines (which pool
//! address failed) keep theirs. And since Pingora, h2 and hyper print request
//! heads (keys, credentials, addresses) at debug and trace, they never log
//! below info, whatever `RUST_LOG` asks.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};

use tracing::level_filters::LevelFilter;

/// The filter when `RUST_LOG` is not set: warnings, plus this crate's
/// start-up, reload and lifecycle lines.
pub const DEFAULT_FILTER: &str = "warn,privacy_gateway=info";

/// Pingora records that are steps of a normal upgrade: (target, message start).
const NORMAL_STEPS: [(&str, &str); 2] = [
    (
        "pingora_core::server::transfer_fd",
        "No incoming socket transfer",
    ),
    ("pingora_core::server::transfer_fd", "server not ready"),
];

/// The level a Pingora record deserves.
fn level_of(record: &log::Record<'_>) -> log::Level {
    let normal_step = record.level() <= log::Level::Warn
        && NORMAL_STEPS.iter().any(|(target, start)| {
            record.target() == *target && record.args().to_string().starts_with(start)
        });
    if normal_step {
        log::Level::Info
    } else {
        record.level()
    }
}

/// Library modules that handle client connections: their lines lose addresses.
const DOWNSTREAM_TARGETS: [&str; 6] = [
    "pingora_core::services",
    "pingora_core::listeners",
    "pingora_core::apps",
    "pingora_core::protocols::tls",
    "pingora_core::protocols::http::v1::server",
    "pingora_core::protocols::http::v2::server",
];

/// What an address becomes.
const REDACTED: &str = "<address>";

/// Whether `word` is an IP address or socket address (`[v6]:port` included).
fn is_address(word: &str) -> bool {
    word.parse::<IpAddr>().is_ok()
        || word.parse::<SocketAddr>().is_ok()
        || word
            .strip_prefix('[')
            .and_then(|w| w.strip_suffix(']'))
            .is_some_and(|w| w.parse::<IpAddr>().is_ok())
}

/// `text` with every IP address (and its port) replaced.
pub fn redact_addresses(text: &str) -> Cow<'_, str> {
    let is_part = |c: char| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']');
    let mut out = String::new();
    let mut copied = 0;
    let mut rest = text.char_indices().peekable();
    while let Some((start, c)) = rest.next() {
        if !is_part(c) {
            continue;
        }
        let mut end = start + c.len_utf8();
        while let Some(&(i, c)) = rest.peek() {
            if !is_part(c) {
                break;
            }
            end = i + c.len_utf8();
            rest.next();
        }
        // "203.0.113.77:51234:" or "…77." end a sentence: try without the tail.
        let run = &text[start..end];
        let word = run.trim_end_matches([':', '.']);
        if word.contains(['.', ':']) && is_address(word) {
            out.push_str(&text[copied..start]);
            out.push_str(REDACTED);
            copied = start + word.len();
        }
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Forwards `log` records to `tracing`, re-levelled by [`level_of`], the
/// downstream ones without addresses.
struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = level_of(record);
        let downstream = DOWNSTREAM_TARGETS
            .iter()
            .any(|t| record.target().starts_with(t));
        if level == record.level() && !downstream {
            tracing_log::format_trace(record).ok();
            return;
        }
        let text = record.args().to_string();
        let text = if downstream {
            redact_addresses(&text)
        } else {
            Cow::Borrowed(text.as_str())
        };
        tracing_log::format_trace(
            &log::Record::builder()
                .level(level)
                .target(record.target())
                .args(format_args!("{text}"))
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        )
        .ok();
    }

    fn flush(&self) {}
}

/// Libraries whose debug and trace logs print request heads or wire bytes
/// (the client's key, a pool's credential, the client's address): never
/// below `info`, whatever `RUST_LOG` asks.
const HEAD_PRINTING_LIBRARIES: [&str; 4] = ["pingora_core", "pingora_proxy", "h2", "hyper"];

/// The filter directives: `RUST_LOG` (default [`DEFAULT_FILTER`]), plus a
/// line per request on the `access` target when `access` is on and
/// `RUST_LOG` does not name that target itself.
fn directives(rust_log: Option<&str>, access: bool) -> String {
    let mut directives = rust_log.unwrap_or(DEFAULT_FILTER).to_string();
    if access && !rust_log.is_some_and(|f| f.contains("access")) {
        directives.push_str(",access=info");
    }
    directives
}

/// Sends every diagnostic line to standard error, as JSON lines when
/// `json`, with an access line per request when `access` (`[log] access`);
/// `RUST_LOG` sets the levels (see [`directives`]).
/// Standard output is left to the audit log when it is `-`.
pub fn init(json: bool, access: bool) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut filter =
        tracing_subscriber::EnvFilter::try_new(directives(rust_log.as_deref(), access))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    for library in HEAD_PRINTING_LIBRARIES {
        if let Ok(cap) = format!("{library}=info").parse() {
            filter = filter.add_directive(cap);
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!json && std::io::stderr().is_terminal());
    let installed = if json {
        tracing::subscriber::set_global_default(builder.json().finish())
    } else {
        tracing::subscriber::set_global_default(builder.finish())
    };
    if installed.is_ok() && log::set_boxed_logger(Box::new(LogBridge)).is_ok() {
        // Pingora's `log` macros skip what the filter would drop anyway.
        log::set_max_level(match LevelFilter::current().into_level() {
            None => log::LevelFilter::Off,
            Some(tracing::Level::ERROR) => log::LevelFilter::Error,
            Some(tracing::Level::WARN) => log::LevelFilter::Warn,
            Some(tracing::Level::INFO) => log::LevelFilter::Info,
            Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
            Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_level(target: &str, level: log::Level, message: &str) -> log::Level {
        level_of(
            &log::Record::builder()
                .target(target)
                .level(level)
                .args(format_args!("{message}"))
                .build(),
        )
    }

    #[test]
    fn addresses_and_ports_are_replaced_and_other_words_kept() {
        assert_eq!(
            redact_addresses("Downstream handshake error from 203.0.113.77:51234: TLS failed"),
            "Downstream handshake error from <address>: TLS failed"
        );
        assert_eq!(
            redact_addresses("peer [2001:db8:1234:5678::abcd]:443 and 2001:db8::1."),
            "peer <address> and <address>."
        );
        let plain = "fd: 12, cafe 1.5 seconds, ::ffff ok";
        assert_eq!(
            redact_addresses("fd: 12, cafe 1.5 seconds"),
            "fd: 12, cafe 1.5 seconds"
        );
        assert!(matches!(
            redact_addresses("no address here"),
            Cow::Borrowed(_)
        ));
        assert!(!redact_addresses(plain).contains("::ffff"));
    }

    #[test]
    fn access_lines_are_on_unless_rust_log_or_the_setting_says_otherwise() {
        assert_eq!(
            directives(None, true),
            "warn,privacy_gateway=info,access=info"
        );
        assert_eq!(directives(None, false), DEFAULT_FILTER);
        assert_eq!(directives(Some("debug"), true), "debug,access=info");
        assert_eq!(directives(Some("warn,access=off"), true), "warn,access=off");
    }

    #[test]
    fn upgrade_waits_are_info_and_real_failures_keep_their_level() {
        let target = "pingora_core::server::transfer_fd";
        assert_eq!(
            record_level(
                target,
                log::Level::Error,
                "No incoming socket transfer, sleep 1s and try again"
            ),
            log::Level::Info
        );
        assert_eq!(
            record_level(
                target,
                log::Level::Error,
                "Giving up reading socket from: x"
            ),
            log::Level::Error
        );
        assert_eq!(
            record_level(
                "elsewhere",
                log::Level::Error,
                "No incoming socket transfer"
            ),
            log::Level::Error
        );
    }
}
