//! Diagnostic logs: `tracing` to standard error, as text or JSON lines,
//! with Pingora's own `log` records routed through the same subscriber.
//!
//! A few Pingora records are normal steps logged as failures: the new
//! process of an upgrade waiting for the old one's sockets logs
//! `No incoming socket transfer` at ERROR each second, and the old one
//! waiting for the new one's socket logs `server not ready` at WARN. Those
//! are re-levelled to INFO here; everything else keeps its level.

use std::io::IsTerminal;

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

/// Forwards `log` records to `tracing`, re-levelled by [`level_of`].
struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = level_of(record);
        if level == record.level() {
            tracing_log::format_trace(record).ok();
        } else {
            let relevelled = log::Record::builder()
                .level(level)
                .target(record.target())
                .args(*record.args())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build();
            tracing_log::format_trace(&relevelled).ok();
        }
    }

    fn flush(&self) {}
}

/// Libraries whose debug and trace logs print request heads or wire bytes
/// (the client's key, a pool's credential, the client's address): never
/// below `info`, whatever `RUST_LOG` asks.
const HEAD_PRINTING_LIBRARIES: [&str; 4] = ["pingora_core", "pingora_proxy", "h2", "hyper"];

/// Sends every diagnostic line to standard error, as JSON lines when
/// `json`; `RUST_LOG` sets the levels (default [`DEFAULT_FILTER`]).
/// Standard output is left to the audit log when it is `-`.
pub fn init(json: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
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
