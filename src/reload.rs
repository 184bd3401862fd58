//! Hot reload: one path from a trigger (a changed file, `SIGHUP`) to a new
//! snapshot. The new snapshot is built and validated off the request path
//! and swapped in whole; a rejected one leaves the running snapshot serving.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::{self, ConfigErrors, GatewaySettings, LoadOptions, SnapshotHandle};
use crate::metrics::Metrics;

/// Identity of one source file's current content: where its path leads and
/// what is there. Rename-over, symlink swaps and in-place writes all change it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileIdentity {
    path: PathBuf,
    target: Option<PathBuf>,
    inode: u64,
    len: u64,
    modified_ns: i128,
}

fn identity(path: &Path) -> FileIdentity {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok();
    FileIdentity {
        path: path.to_path_buf(),
        target: std::fs::canonicalize(path).ok(),
        inode: meta.as_ref().map_or(0, |m| m.ino()),
        len: meta.as_ref().map_or(0, |m| m.len()),
        modified_ns: meta.as_ref().map_or(0, |m| {
            m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
        }),
    }
}

/// The identities of `sources`; a folder (the account change folder) is its
/// entries, hidden ones left out: a writer's temporary file changes nothing
/// until it is renamed into place.
fn fingerprint(sources: &[PathBuf]) -> BTreeSet<FileIdentity> {
    let mut out = BTreeSet::new();
    for path in sources {
        match std::fs::read_dir(path) {
            Ok(entries) => {
                out.insert(FileIdentity {
                    path: path.clone(),
                    target: std::fs::canonicalize(path).ok(),
                    inode: 0,
                    len: 0,
                    modified_ns: 0,
                });
                out.extend(
                    entries
                        .flatten()
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .map(|e| identity(&e.path())),
                );
            }
            Err(_) => {
                out.insert(identity(path));
            }
        }
    }
    out
}

/// Loads, validates and swaps configuration snapshots.
pub struct Reloader {
    gateway_path: PathBuf,
    options: LoadOptions,
    settings: GatewaySettings,
    snapshots: Arc<SnapshotHandle>,
    /// What the current snapshot was built from, as last seen.
    seen: Mutex<BTreeSet<FileIdentity>>,
    metrics: Arc<Metrics>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new snapshot serves.
    Swapped,
    /// No source file changed; nothing was loaded.
    Unchanged,
}

impl Reloader {
    /// Reloads `gateway_path` with `options` into `snapshots`; `settings`
    /// are the ones the process started with (they cannot change live);
    /// outcomes are counted in `metrics`.
    pub fn new(
        gateway_path: PathBuf,
        options: LoadOptions,
        settings: GatewaySettings,
        snapshots: Arc<SnapshotHandle>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let seen = fingerprint(&snapshots.current().sources);
        Reloader {
            gateway_path,
            options,
            settings,
            snapshots,
            seen: Mutex::new(seen),
            metrics,
        }
    }

    /// The files the current snapshot was built from (what to watch).
    pub fn sources(&self) -> Vec<PathBuf> {
        self.snapshots.current().sources.clone()
    }

    /// Loads and swaps in a new snapshot. Unless `force`, does nothing when
    /// no source file changed. On error the running snapshot stays.
    pub fn reload(&self, force: bool) -> Result<ReloadOutcome, ConfigErrors> {
        let current = fingerprint(&self.snapshots.current().sources);
        let mut seen = match self.seen.lock() {
            Ok(seen) => seen,
            Err(poisoned) => poisoned.into_inner(),
        };
        if !force && *seen == current {
            return Ok(ReloadOutcome::Unchanged);
        }
        // Remember what was seen even if it is rejected: the same broken
        // files are not reloaded again until they change.
        *seen = current;
        let started = Instant::now();
        match config::load(&self.gateway_path, &self.options) {
            Ok((settings, mut snapshot)) => {
                self.metrics.attach_counters(&mut snapshot.upstreams);
                if settings != self.settings {
                    tracing::warn!("listener and thread settings changed; they apply after a restart or upgrade");
                }
                *seen = fingerprint(&snapshot.sources);
                tracing::info!(
                    policy_version = %snapshot.policy_version,
                    consent_revision = %snapshot.consent_revision,
                    accounts = snapshot.accounts.len(),
                    load_ms = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                );
                announce(&snapshot, &self.metrics);
                self.snapshots.replace(snapshot);
                self.metrics.reloads.with_label_values(&["success"]).inc();
                Ok(ReloadOutcome::Swapped)
            }
            Err(errors) => {
                self.metrics.reloads.with_label_values(&["failure"]).inc();
                for e in &errors.0 {
                    tracing::error!("configuration reload rejected, keeping the running one: {e}");
                }
                Err(errors)
            }
        }
    }
}

/// Most quarantined lines logged one by one per load; `check` lists them all.
const QUARANTINE_LOG_LINES: usize = 20;

/// Reports a snapshot about to serve: its version and quarantine in the
/// metrics, and each quarantined account line in the log as `file:line`.
pub fn announce(snapshot: &config::Snapshot, metrics: &Metrics) {
    metrics.set_serving(snapshot);
    for q in snapshot.quarantine_report(QUARANTINE_LOG_LINES) {
        tracing::warn!("{q}");
    }
    let quarantined = snapshot.accounts.quarantined_count();
    if quarantined > QUARANTINE_LOG_LINES {
        tracing::warn!(
            quarantined,
            "more account lines are quarantined; `privacy-gateway check` lists them all"
        );
    }
    // A compiled snapshot's names are resolved when it is opened: one line
    // per name the rules or pools no longer define, not one per account.
    for note in snapshot.accounts.quarantined_by_names().1 {
        tracing::warn!(
            file = %snapshot.accounts_path.display(),
            "{note}; `privacy-gateway check` lists them"
        );
    }
}

/// How often source files are compared even without a change event.
const POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Why a reload was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// A watched folder changed.
    FileEvent,
    /// `SIGHUP`: reload even if nothing seems to have changed.
    Hangup,
}

/// The background service that turns triggers into reloads.
pub struct ReloadService {
    reloader: Arc<Reloader>,
    debounce: Duration,
}

impl ReloadService {
    /// Reloads with `reloader`, waiting for `debounce` of quiet after a file event.
    pub fn new(reloader: Arc<Reloader>, debounce: Duration) -> Self {
        ReloadService { reloader, debounce }
    }

    /// [`Self::watch`], then one comparison of the files' identities: a file
    /// changed before the watch began (after the start-up load, while the
    /// listeners already accept, or after a reload that named it) raised no
    /// event anyone listened for. A reload follows only if one changed.
    fn watch_and_recheck(
        &self,
        sources: &[PathBuf],
        tx: &mpsc::UnboundedSender<Trigger>,
    ) -> Option<notify::RecommendedWatcher> {
        let watcher = self.watch(sources, tx);
        let _ = tx.send(Trigger::FileEvent);
        watcher
    }

    /// Watches the folders of `sources` for changes to their files.
    fn watch(
        &self,
        sources: &[PathBuf],
        tx: &mpsc::UnboundedSender<Trigger>,
    ) -> Option<notify::RecommendedWatcher> {
        let events = tx.clone();
        let names: BTreeSet<OsString> = sources
            .iter()
            .filter_map(|p| p.file_name().map(OsString::from))
            .collect();
        // A source that is a folder (the account change folder) is watched
        // itself too: any file it gains, loses or has replaced.
        let folders: BTreeSet<PathBuf> = sources.iter().filter(|p| p.is_dir()).cloned().collect();
        let dirs: BTreeSet<PathBuf> = sources
            .iter()
            .filter_map(|p| p.parent())
            .map(|d| {
                if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                }
            })
            .map(Path::to_path_buf)
            .chain(folders.iter().cloned())
            .collect();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| is_relevant(&e, &names, &folders)) {
                    let _ = events.send(Trigger::FileEvent);
                }
            })
            .map_err(|e| tracing::error!("cannot watch configuration files: {e}"))
            .ok()?;
        for dir in dirs {
            // Folders, not files: editors and deploy tools replace files by
            // rename, and Kubernetes swaps a symlinked folder.
            if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
                tracing::error!(dir = %dir.display(), "cannot watch configuration folder: {e}");
            }
        }
        Some(watcher)
    }
}

/// Whether a file event may have changed a source file: a change (not a
/// read) to one of their names, or to a Kubernetes `..data`-style entry, or
/// to a file that is not hidden in one of the source `folders`.
fn is_relevant(
    event: &notify::Event,
    names: &BTreeSet<OsString>,
    folders: &BTreeSet<PathBuf>,
) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        let in_folder = p.parent().is_some_and(|d| folders.contains(d));
        p.file_name().is_some_and(|n| {
            let hidden = n.to_string_lossy().starts_with('.');
            names.contains(n) || n.to_string_lossy().starts_with("..") || (in_folder && !hidden)
        })
    })
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut sources = self.reloader.sources();
        let mut _watcher = self.watch_and_recheck(&sources, &tx);
        // Network volumes (NFS, EFS) deliver no change events for writes made
        // elsewhere: the files' identities are also compared on a schedule
        // (a reload happens only if one changed).
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let first = tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Hangup,
                Some(t) = rx.recv() => t,
                _ = poll.tick() => Trigger::FileEvent,
            };
            // Debounce: wait until the burst of events is over, but never
            // longer than a few quiet periods in all.
            let mut force = first == Trigger::Hangup;
            let latest = tokio::time::Instant::now() + self.debounce * 5;
            loop {
                let quiet = (tokio::time::Instant::now() + self.debounce).min(latest);
                match tokio::time::timeout_at(quiet, rx.recv()).await {
                    Ok(Some(t)) => force |= t == Trigger::Hangup,
                    _ => break,
                }
            }
            let reloader = self.reloader.clone();
            let outcome = tokio::task::spawn_blocking(move || reloader.reload(force)).await;
            // A new snapshot may name other files: watch those.
            if matches!(outcome, Ok(Ok(ReloadOutcome::Swapped)))
                && self.reloader.sources() != sources
            {
                sources = self.reloader.sources();
                _watcher = self.watch_and_recheck(&sources, &tx);
            }
        }
    }
}
