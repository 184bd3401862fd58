//! The audit log: one JSON line per request, written by its own thread so
//! the request path never waits on a disk. A request appends its line to a
//! shared buffer (no allocation, no wake-up, no system call); the writer
//! takes the whole buffer every [`FLUSH_INTERVAL`], or as soon as it holds
//! [`FLUSH_SIZE`] bytes, and writes it with one `write`. When the writer
//! falls behind, lines are dropped and counted, never queued without bound.
//! After a log rotation moved the file away, `SIGUSR1` makes the writer
//! reopen its path.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

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

/// The longest a line waits in the buffer before the writer takes it.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// A buffer this full wakes the writer before the interval is over.
pub const FLUSH_SIZE: usize = 64 * 1024;

/// Lines written by requests and not yet taken by the writer.
#[derive(Default)]
struct Pending {
    /// JSON lines, each with its newline.
    bytes: Vec<u8>,
    /// How many lines `bytes` holds.
    lines: usize,
    /// The writer sleeps and wants a wake-up once `bytes` is full.
    writer_asleep: bool,
    /// Flushes waiting for what is in `bytes` now to be written.
    syncs: Vec<mpsc::Sender<()>>,
    /// The log is gone: the writer writes what is left and ends.
    closed: bool,
}

/// What the request path and the writer thread share.
struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer early (a full buffer, a flush, a reopen, the end).
    wake: Condvar,
    /// Pending lines beyond which new ones are dropped.
    capacity: usize,
    reopen: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves plain bytes behind: still usable.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A handle to the audit writer.
pub struct AuditLog {
    shared: Arc<Shared>,
    dropped: IntCounter,
    /// The writer until its thread starts: after Pingora daemonizes, since
    /// a thread started before the fork does not survive it.
    idle: Mutex<Option<Writer>>,
}

impl AuditLog {
    /// Opens `target` (so that a bad path fails the start) with room for
    /// `capacity` pending lines; the writer starts with [`Self::start`].
    pub fn open(target: &AuditTarget, capacity: usize, dropped: IntCounter) -> io::Result<Self> {
        let out = target.open()?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                bytes: Vec::with_capacity(FLUSH_SIZE * 2),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            capacity: capacity.max(1),
            reopen: AtomicBool::new(false),
        });
        let writer = Writer {
            shared: shared.clone(),
            target: target.clone(),
            out,
        };
        Ok(AuditLog {
            shared,
            dropped,
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

    /// Appends `record` as one JSON line; drops (and counts) it if the
    /// writer is behind. Serialised straight into the shared buffer: no
    /// allocation once the buffers have grown, no wake-up but for a full one.
    pub fn record(&self, record: &impl serde::Serialize) {
        let mut pending = self.shared.lock();
        if pending.lines >= self.shared.capacity {
            drop(pending);
            self.dropped.inc();
            return;
        }
        let start = pending.bytes.len();
        if serde_json::to_writer(&mut pending.bytes, record).is_err() {
            // Nothing half-written stays behind.
            pending.bytes.truncate(start);
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.bytes.push(b'\n');
        pending.lines += 1;
        if pending.bytes.len() >= FLUSH_SIZE && pending.writer_asleep {
            pending.writer_asleep = false;
            self.shared.wake.notify_one();
        }
    }

    /// Makes the writer close the file and open its path anew (after the
    /// file was moved away by a log rotation), before its next write.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
    }

    /// Waits, at most `limit`, until the lines appended so far are written;
    /// returns whether they were.
    pub fn flush(&self, limit: Duration) -> bool {
        let (done, written) = mpsc::channel();
        self.shared.lock().syncs.push(done);
        self.shared.wake.notify_one();
        written.recv_timeout(limit).is_ok()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

/// The writer thread's side.
struct Writer {
    shared: Arc<Shared>,
    target: AuditTarget,
    out: Box<dyn Write + Send>,
}

impl Writer {
    fn run(mut self) {
        // Two buffers: requests fill one while this thread writes the other.
        let mut batch = Vec::with_capacity(FLUSH_SIZE * 2);
        loop {
            let (syncs, closed) = {
                let mut pending = self.shared.lock();
                let urgent =
                    |p: &Pending| p.bytes.len() >= FLUSH_SIZE || !p.syncs.is_empty() || p.closed;
                if !urgent(&pending) && !self.shared.reopen.load(Ordering::Relaxed) {
                    pending.writer_asleep = true;
                    pending = match self.shared.wake.wait_timeout(pending, FLUSH_INTERVAL) {
                        Ok((p, _)) => p,
                        Err(poisoned) => poisoned.into_inner().0,
                    };
                    pending.writer_asleep = false;
                }
                std::mem::swap(&mut pending.bytes, &mut batch);
                pending.lines = 0;
                (std::mem::take(&mut pending.syncs), pending.closed)
            };
            if self.shared.reopen.swap(false, Ordering::Relaxed) {
                self.reopen_target();
            }
            if !batch.is_empty() {
                if self
                    .out
                    .write_all(&batch)
                    .and_then(|()| self.out.flush())
                    .is_err()
                {
                    tracing::error!("cannot write the audit log");
                }
                batch.clear();
            }
            for done in syncs {
                let _ = done.send(());
            }
            if closed {
                return;
            }
        }
    }

    /// Opens the target's path again; keeps the old file if that fails.
    fn reopen_target(&mut self) {
        if self.target == AuditTarget::Stdout {
            return;
        }
        match self.target.open() {
            Ok(out) => {
                self.out = out;
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
    pub ts: Timestamp,
    /// What was decided and where it went.
    #[serde(flatten)]
    pub view: &'a DecisionView<'a>,
    /// Milliseconds from the first upstream attempt to the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// Milliseconds in all.
    pub total_ms: f64,
}

/// A moment, written as RFC 3339 UTC with milliseconds
/// (`2026-11-27T01:14:09.725Z`), formatted straight into the line.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp(std::time::SystemTime);

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        Timestamp(std::time::SystemTime::now())
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_in(dir: &std::path::Path, capacity: usize) -> (AuditLog, IntCounter, PathBuf) {
        let path = dir.join("audit.jsonl");
        let dropped = IntCounter::new("dropped", "dropped").expect("counter");
        let log = AuditLog::open(&AuditTarget::File(path.clone()), capacity, dropped.clone())
            .expect("open");
        (log, dropped, path)
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, dropped, path) = log_in(dir.path(), 100_000);
        log.start().expect("start");
        std::thread::scope(|s| {
            for thread in 0..4 {
                let log = &log;
                s.spawn(move || {
                    for n in 0..5_000 {
                        log.record(&serde_json::json!({ "thread": thread, "n": n }));
                    }
                });
            }
        });
        assert!(log.flush(Duration::from_secs(10)));
        assert_eq!(dropped.get(), 0);
        let text = std::fs::read_to_string(&path).expect("read");
        let mut next = [0u64; 4];
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole JSON line");
            let thread = v["thread"].as_u64().expect("thread") as usize;
            assert_eq!(v["n"].as_u64(), Some(next[thread]), "out of order: {line}");
            next[thread] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_writer_that_does_not_keep_up_drops_and_counts_beyond_capacity() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Not started: nothing is taken from the buffer.
        let (log, dropped, path) = log_in(dir.path(), 10);
        for n in 0..25 {
            log.record(&serde_json::json!({ "n": n }));
        }
        assert_eq!(dropped.get(), 15);
        log.start().expect("start");
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 10);
        assert!(text.starts_with("{\"n\":0}\n"), "{text}");
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval_without_asking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (log, _, path) = log_in(dir.path(), 10);
        log.start().expect("start");
        log.record(&serde_json::json!({ "n": 1 }));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(FLUSH_INTERVAL / 4);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_milliseconds() {
        let ts = Timestamp(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        assert_eq!(
            serde_json::to_string(&ts).expect("json"),
            "\"2023-11-14T22:13:20.123Z\""
        );
    }
}
