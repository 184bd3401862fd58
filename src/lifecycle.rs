//! The process around the proxy: listening sockets bound before anything is
//! served (a busy port fails the start after a bounded retry), and the
//! graceful end of an upgrade (`SIGQUIT`) or a stop (`SIGTERM`) that loses
//! no request on a keep-alive connection.
//!
//! Pingora alone loses keep-alive requests: on `SIGQUIT` it keeps answering
//! `keep-alive` for its fixed 5 s hand-over window, then closes its
//! listeners and at once drops every connection parked between two
//! requests, so a client that just got a `keep-alive` answer writes its next
//! request into a closed socket; closing a listening socket nobody else
//! holds resets the connections still queued on it; and requests still in
//! flight are cut when its grace period ends, however long they have left.
//!
//! Here: after `SIGQUIT` every answer says `Connection: close` at once (the
//! listening sockets are shared with the new process, so the client's next
//! connection is always accepted). After `SIGTERM` the process serves as
//! before (not ready) for the grace period, and answers `Connection: close`
//! only once its listener is closed, so nobody reconnects to a socket about
//! to close. Idle connections are closed [`IDLE_LINGER`] after the
//! listeners, so a request already on its way is answered, and the process
//! exits as soon as the last request in flight is answered.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::ServerSession;
use pingora::server::{ListenFds, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::BackgroundService;
use pingora::services::Service;
use tokio::signal::unix::{signal, SignalKind};

/// How often a busy address is tried before the start fails.
pub const BIND_ATTEMPTS: u32 = 5;
/// The pause between two tries.
const BIND_RETRY: Duration = Duration::from_secs(1);
/// Once the listeners are closed, how long a keep-alive connection may stay
/// idle before it is closed: a request already on its way is still answered.
pub const IDLE_LINGER: Duration = Duration::from_secs(1);

/// What the whole process shares about its own life. One per process,
/// leaked so that requests count themselves without reference counting.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// An upgrade has begun: answer with `Connection: close`.
    draining: AtomicBool,
    /// A stop (not an upgrade) has begun: not ready for new traffic.
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    listeners_expected: AtomicUsize,
    listeners_started: AtomicUsize,
}

impl Lifecycle {
    /// A lifecycle for the life of the process.
    pub fn leak() -> &'static Lifecycle {
        Box::leak(Box::default())
    }

    /// Whether every answer should close its connection now (an upgrade:
    /// after a stop, the proxy learns it when its listener is closed).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether a stop has begun (readiness says no).
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Whether every listener has its socket and accepts.
    pub fn is_listening(&self) -> bool {
        self.listeners_started.load(Ordering::Relaxed)
            >= self.listeners_expected.load(Ordering::Relaxed)
    }

    /// Requests begun and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request until the guard is dropped.
    pub fn begin_request(&'static self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }
}

/// One request in flight; dropped when the request is over.
#[derive(Debug)]
pub struct InFlight(&'static Lifecycle);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes `SIGHUP` (reload) and `SIGUSR1` (reopen the audit log) harmless
/// until the services that handle them start: their default action ends
/// the process, and the listeners accept before those services run.
pub fn ignore_signals_until_handled() {
    for signal in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: installing SIG_IGN has no preconditions; Tokio's handler
        // replaces it when the service registers one.
        unsafe {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
}

/// Binds `address` (with `SO_REUSEADDR`, as Pingora does), trying again
/// for a while when it is in use (the previous process may still be
/// leaving), never forever.
pub fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let mut attempt = 1;
    loop {
        // Non-blocking, as the Tokio listener Pingora makes of it requires.
        let bound = TcpListener::bind(address)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket));
        match bound {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < BIND_ATTEMPTS => {
                tracing::warn!(%address, attempt, of = BIND_ATTEMPTS, "address in use; trying again in 1 s");
                std::thread::sleep(BIND_RETRY);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A Pingora listening service whose socket is bound before it starts:
/// by this process (before daemonizing, so that a busy port fails the
/// command itself) or, in an upgrade, handed over by the old process.
pub struct Listening<S> {
    inner: S,
    address: SocketAddr,
    what: String,
    socket: Option<OwnedFd>,
    lifecycle: &'static Lifecycle,
}

impl<S> Listening<S> {
    /// `inner` listening on `address` (`what` names it in the log), on
    /// `socket` when this process bound it, else on the socket handed over.
    pub fn new(
        inner: S,
        address: SocketAddr,
        what: String,
        socket: Option<TcpListener>,
        lifecycle: &'static Lifecycle,
    ) -> Self {
        lifecycle.listeners_expected.fetch_add(1, Ordering::Relaxed);
        Listening {
            inner,
            address,
            what,
            socket: socket.map(OwnedFd::from),
            lifecycle,
        }
    }
}

#[async_trait]
impl<S: Service> Service for Listening<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        // Pingora's own bind retries for 30 s and then panics inside this
        // task, leaving the process up without the listener: put the socket
        // in its table first, so that it only ever adopts one.
        let key = self.address.to_string();
        let inherited = fds
            .as_ref()
            .is_some_and(|table| table.lock().get(&key).is_some());
        if !inherited {
            let socket = match self.socket.take() {
                Some(socket) => socket,
                // A listener the old process did not have.
                None => match bind(self.address) {
                    Ok(socket) => socket.into(),
                    Err(e) => {
                        tracing::error!(address = %self.address, "cannot listen: {e}; exiting");
                        std::process::exit(1);
                    }
                },
            };
            if let Some(table) = &fds {
                table.lock().add(key, socket.into_raw_fd());
            }
        }
        tracing::info!(
            "listening on {} ({}){}",
            self.address,
            self.what,
            if inherited {
                ", taken over from the running process"
            } else {
                ""
            }
        );
        self.lifecycle
            .listeners_started
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// An HTTP application whose keep-alive connections are told to close only
/// once its listener is closed, and whose idle ones are closed only
/// [`IDLE_LINGER`] after that, not at once.
///
/// Pingora answers `Connection: close` as soon as the shutdown is announced,
/// a moment before the listeners are closed: a client that reconnects in
/// that moment is queued on a socket about to close, and reset. Here the
/// proxy is told of the shutdown only when this listener is closed, so
/// every reconnection goes where someone listens or is refused before a
/// byte is sent; a request already sent on an idle connection is answered.
pub struct Lingering<A> {
    inner: Arc<A>,
    listener_closed: tokio::sync::watch::Sender<bool>,
    /// What the proxy sees as its shutdown watch.
    closed: ShutdownWatch,
}

impl<A> Lingering<A> {
    /// Wraps `inner`.
    pub fn new(inner: A) -> Self {
        let (listener_closed, closed) = tokio::sync::watch::channel(false);
        Lingering {
            inner: Arc::new(inner),
            listener_closed,
            closed,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> HttpServerApp for Lingering<A> {
    async fn process_new_http(
        self: &Arc<Self>,
        session: ServerSession,
        _shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        self.inner.process_new_http(session, &self.closed).await
    }

    fn h2_options(&self) -> Option<pingora::protocols::http::v2::server::H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    /// Called once this service's listeners are closed.
    async fn http_cleanup(&self) {
        self.listener_closed.send_replace(true);
        tokio::time::sleep(IDLE_LINGER).await;
        self.inner.http_cleanup().await
    }
}

/// The signals that end the process, as Pingora's own watcher reads them
/// (`SIGQUIT` upgrade, `SIGTERM` graceful stop, `SIGINT` fast stop), with
/// what must happen before Pingora acts on them: draining for an upgrade,
/// the not-ready serving window for a stop.
pub struct Signals {
    lifecycle: &'static Lifecycle,
    /// After `SIGTERM`, how long to keep accepting before closing the listeners.
    stop_accepting_after: Duration,
    upgrade_sock: String,
}

impl Signals {
    /// Signals for `lifecycle`.
    pub fn new(
        lifecycle: &'static Lifecycle,
        stop_accepting_after: Duration,
        upgrade_sock: String,
    ) -> Self {
        Signals {
            lifecycle,
            stop_accepting_after,
            upgrade_sock,
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for signals; stopping");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = quit.recv() => {
                self.lifecycle.draining.store(true, Ordering::Relaxed);
                tracing::info!(
                    upgrade_sock = %self.upgrade_sock,
                    "graceful upgrade: SIGQUIT received; handing the listening sockets to the new process, \
                     accepting beside it for 5 s; every answer now says Connection: close"
                );
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                // Nobody takes over these sockets: closing them resets the
                // connections still waiting to be accepted. So no client is
                // sent to a new connection before they are closed; until
                // then the process serves as before, only not ready, so
                // that load balancers move away.
                self.lifecycle.stopping.store(true, Ordering::Relaxed);
                tracing::info!(
                    "graceful stop: SIGTERM received; serving for {} s more (not ready), then closing the listeners",
                    self.stop_accepting_after.as_secs()
                );
                tokio::select! {
                    _ = tokio::time::sleep(self.stop_accepting_after) => ShutdownSignal::GracefulTerminate,
                    _ = int.recv() => ShutdownSignal::FastShutdown,
                }
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received; stopping now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// Ends the process once the listeners are closed and the last request in
/// flight is answered, rather than when Pingora's grace period runs out
/// (its bound on how long in-flight requests may take).
pub struct Drain {
    lifecycle: &'static Lifecycle,
    longest: Duration,
    before_exit: Box<dyn Fn() + Send + Sync>,
}

impl Drain {
    /// Drains `lifecycle`'s requests for at most `longest`; runs
    /// `before_exit` (flushing what is buffered) before the process exits.
    pub fn new(
        lifecycle: &'static Lifecycle,
        longest: Duration,
        before_exit: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Drain {
            lifecycle,
            longest,
            before_exit,
        }
    }
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.wait_for(|closing| *closing).await.is_err() {
            return;
        }
        tracing::info!(
            in_flight = self.lifecycle.in_flight(),
            "closing the listeners; answering the requests in flight (for at most {} s)",
            self.longest.as_secs()
        );
        // Idle keep-alive connections close after the linger; a request
        // that arrives on one before then is in flight by the end of it.
        tokio::time::sleep(IDLE_LINGER + Duration::from_millis(100)).await;
        while self.lifecycle.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (self.before_exit)();
        tracing::info!("every request answered; exiting");
        std::process::exit(0);
    }
}
