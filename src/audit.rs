//! The audit log: one JSON line per request, written by its own thread so
//! the request path never waits on a disk. When the writer falls behind,
//! lines are dropped and counted, never queued without bound. After a log
//! rotation moved the file away, `SIGUSR1` makes the writer reopen its path.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntCounter;

use crate::view::DecisionView;

/// Where audit lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

impl AuditTarget {
    fn open(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        })
    }
}

/// What the writer thread is handed.
enum Entry {
    /// One line.
    Line(String),
    /// Answer once everything queued before is written and flushed.
    Sync(mpsc::Sender<()>),
}

/// A handle to the audit writer.
pub struct AuditLog {
    lines: SyncSender<Entry>,
    dropped: IntCounter,
    reopen: Arc<AtomicBool>,
    /// The writer until its thread starts: after Pingora daemonizes, since
    /// a thread started before the fork does not survive it.
    idle: Mutex<Option<Writer>>,
}

impl AuditLog {
    /// Opens `target` (so that a bad path fails the start) with room for
    /// `capacity` pending lines; the writer starts with [`Self::start`].
    pub fn open(target: &AuditTarget, capacity: usize, dropped: IntCounter) -> io::Result<Self> {
        let out = BufWriter::new(target.open()?);
        let (lines, rx) = mpsc::sync_channel::<Entry>(capacity.max(1));
        let reopen = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            target: target.clone(),
            out,
            reopen: reopen.clone(),
        };
        Ok(AuditLog {
            lines,
            dropped,
            reopen,
            idle: Mutex::new(Some(writer)),
        })
    }

    /// Starts the writer thread (once; later calls do nothing).
    pub fn start(&self) -> io::Result<()> {
        let writer = match self.idle.lock() {
            Ok(mut idle) => idle.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(writer) = writer {
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || writer.run())?;
        }
        Ok(())
    }

    /// Queues one line; drops (and counts) it if the writer is behind.
    pub fn record(&self, line: String) {
        match self.lines.try_send(Entry::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Makes the writer close the file and open its path anew (after the
    /// file was moved away by a log rotation), before its next line.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Waits, at most `limit`, until the lines queued so far are written and
    /// flushed; returns whether they were.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (done, written) = mpsc::channel();
        let mut entry = Entry::Sync(done);
        loop {
            match self.lines.try_send(entry) {
                Ok(()) => break,
                Err(TrySendError::Full(e)) if Instant::now() < deadline => {
                    entry = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

/// The writer thread's side.
struct Writer {
    rx: Receiver<Entry>,
    target: AuditTarget,
    out: BufWriter<Box<dyn Write + Send>>,
    reopen: Arc<AtomicBool>,
}

/// How long the idle writer waits before looking for a reopen request.
const IDLE_CHECK: Duration = Duration::from_millis(100);

impl Writer {
    fn run(mut self) {
        loop {
            let first = match self.rx.recv_timeout(IDLE_CHECK) {
                Ok(entry) => Some(entry),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_target();
            }
            // Write what is queued, then flush once.
            let mut next = first;
            let mut synced = Vec::new();
            while let Some(entry) = next.take() {
                match entry {
                    Entry::Line(line) => {
                        if self
                            .out
                            .write_all(line.as_bytes())
                            .and_then(|_| self.out.write_all(b"\n"))
                            .is_err()
                        {
                            tracing::error!("cannot write the audit log");
                        }
                    }
                    Entry::Sync(done) => synced.push(done),
                }
                next = self.rx.try_recv().ok();
            }
            if self.out.flush().is_err() {
                tracing::error!("cannot flush the audit log");
            }
            for done in synced {
                let _ = done.send(());
            }
        }
    }

    /// Opens the target's path again; keeps the old file if that fails.
    fn reopen_target(&mut self) {
        if self.target == AuditTarget::Stdout {
            return;
        }
        let _ = self.out.flush();
        match self.target.open() {
            Ok(out) => {
                self.out = BufWriter::new(out);
                tracing::info!("audit log reopened");
            }
            Err(e) => {
                tracing::error!("cannot reopen the audit log, still writing to the old file: {e}")
            }
        }
    }
}

/// Runs the audit writer once the process is what it will stay (after
/// daemonizing), and turns `SIGUSR1` into a reopen (nginx's signal for
/// reopening logs). Installed even without an audit log, so that a log
/// rotation's `kill -USR1` never ends the process.
pub struct AuditService {
    observers: Arc<crate::observe::Observers>,
}

impl AuditService {
    /// Serves the audit log of `observers`, if any.
    pub fn new(observers: Arc<crate::observe::Observers>) -> Self {
        AuditService { observers }
    }
}

#[async_trait]
impl BackgroundService for AuditService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        // The handler first: once a line is written, a rotation's signal
        // can no longer end the process (SIGUSR1's default action).
        let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
        let audit = self.observers.audit.as_ref();
        if let Some(Err(e)) = audit.map(AuditLog::start) {
            tracing::error!("cannot start the audit writer: {e}");
        }
        let mut usr1 = match signal {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGUSR1: {e}");
                return;
            }
        };
        // Also while draining: a rotation may come during a long drain.
        while usr1.recv().await.is_some() {
            match audit {
                Some(audit) => audit.reopen(),
                None => tracing::info!("SIGUSR1: no audit log to reopen"),
            }
        }
    }
}

/// One audit line: the request's [`DecisionView`] (the fields `explain`
/// prints, by construction) between its time and its durations. Holds the
/// client prefix, never the address, and never a request or response body.
#[derive(Debug, serde::Serialize)]
pub struct AuditRecord<'a> {
    /// When the request ended, RFC 3339 UTC.
    pub ts: String,
    /// What was decided and where it went.
    #[serde(flatten)]
    pub view: &'a DecisionView<'a>,
    /// Milliseconds from the first upstream attempt to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Milliseconds in all.
    pub total_ms: f64,
}

/// The current time as RFC 3339 UTC with milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}
