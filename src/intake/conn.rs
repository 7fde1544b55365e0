//! Serving HTTP/1.1 connections on a listener with the limits a daemon on a
//! shared box needs: a cap on open connections, and timeouts for clients that
//! idle, send their headers slowly or stop reading.
//!
//! - **Idle**: a connection with no request running closes after
//!   `socket.idle_timeout_s` without bytes (a keep-alive connection between
//!   requests, or one that never sends anything).
//! - **Headers**: once the first byte of a request arrived, its headers must be
//!   complete within `socket.header_timeout_s`.
//! - **Body**: the handlers read bodies within `socket.body_timeout_s`
//!   ([`super::http::read_body`]); a response the client does not read for as
//!   long closes the connection (write timeout).
//! - **Cap**: one cap over every listener (Unix socket and TCP together):
//!   `socket.max_connections`, lowered at start to fit `RLIMIT_NOFILE` less
//!   the descriptors kept for model files, the broker, image fetches, logs and
//!   refusals ([`ConnTable::sized`]). At the cap a new connection first closes
//!   the connection idle the longest (no request running, or its headers
//!   still coming), else the request whose body comes slowest below
//!   `socket.min_body_rate_kib_s`; if every connection is running a request
//!   otherwise, the new one gets `503` and is closed at once. Either way file
//!   descriptors stay bounded, a model load never meets "Too many open files",
//!   and a flood of idle or trickling clients cannot lock out a real one.
//!
//! While a request runs (from its headers until its response is written) no
//! read timeout applies: a long generation is not cut off.

use super::peer::Peer;
use axum::Router;
use axum::extract::connect_info::ConnectInfo;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connection limits, from `[socket]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// As configured; [`ConnTable::sized`] fits it to the open-file limit.
    pub max_connections: usize,
    pub idle: Duration,
    pub header: Duration,
    /// Reading a request body, and writing a response the client does not read.
    pub body: Duration,
    /// `socket.min_body_rate_kib_s` in bytes per second (0: none).
    pub min_body_rate: u64,
}

impl ConnLimits {
    /// The limits configured in `[socket]`.
    pub fn from_config(cfg: &crate::config::SocketConfig) -> ConnLimits {
        ConnLimits {
            max_connections: cfg.max_connections.max(1),
            idle: Duration::from_secs(cfg.idle_timeout_s.max(1)),
            header: Duration::from_secs(cfg.header_timeout_s.max(1)),
            body: Duration::from_secs(cfg.body_timeout_s.max(1)),
            min_body_rate: cfg.min_body_rate_kib_s.saturating_mul(1024),
        }
    }
}

/// A listener whose connections carry a [`Peer`].
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, Peer)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = match stream.peer_cred() {
            Ok(c) => Peer::Local { uid: c.uid(), gid: c.gid(), pid: c.pid() },
            Err(_) => Peer::Unknown,
        };
        Ok((stream, peer))
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, Peer)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer::Tcp(addr)))
    }
}

/// One open connection, as the cap and the timeouts see it.
struct Conn {
    /// Requests running on it (headers read, response not yet written).
    active: AtomicUsize,
    /// When it last went idle (no request running), as milliseconds since `epoch`.
    idle_since_ms: AtomicU64,
    /// While a request body is coming: when it started, ms since `epoch` + 1 (0: none).
    body_since_ms: AtomicU64,
    /// Bytes of that body so far.
    body_bytes: AtomicU64,
    /// Asked to close (the cap needs its room).
    close: tokio::sync::Notify,
    closing: std::sync::atomic::AtomicBool,
    /// The reader waiting on the socket, woken when the connection goes idle
    /// (so the idle timer starts even though no byte arrives).
    reader: futures_util::task::AtomicWaker,
}

/// Descriptors kept out of the connection cap: model files and their
/// loaders (64), the broker (4), image fetches (their own bound, 32), logs and
/// the journal (8), and the `503` answers in flight ([`MAX_REFUSING`]).
pub const KEPT_FILES: u64 = 64 + 4 + super::fetch::MAX_FETCHES as u64 + 8 + MAX_REFUSING as u64 + MAX_CLOSING as u64;

/// `503` answers being written at once; past this a refused connection is closed without one.
const MAX_REFUSING: usize = 16;

/// Connections told to close for room whose descriptors may not be given
/// back yet: past this the listeners stop accepting (new clients wait in the
/// kernel's backlog, holding none of inferd's descriptors) until they are.
const MAX_CLOSING: usize = 8;

/// The smallest cap, however low the open-file limit (a warning says why).
const MIN_CONNECTIONS: usize = 8;

/// The connection cap for `configured` under an open-file limit of `nofile`
/// with `open` descriptors already in use: what is left after those and
/// [`KEPT_FILES`] (at least [`MIN_CONNECTIONS`]), at most `configured`.
pub fn connection_cap(configured: usize, nofile: u64, open: u64) -> usize {
    let room = nofile.saturating_sub(open).saturating_sub(KEPT_FILES);
    configured.min(usize::try_from(room).unwrap_or(usize::MAX).max(MIN_CONNECTIONS))
}

/// Raises the soft open-file limit to the hard one and returns it (the soft
/// one if it cannot be read or raised).
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads `raised`; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Descriptors this process has open now.
fn open_files() -> u64 {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(32)
}

/// The open connections of every listener, and the one cap they share.
pub struct ConnTable {
    epoch: Instant,
    open: Mutex<Vec<Arc<Conn>>>,
    cap: usize,
    min_body_rate: u64,
    /// `503` answers being written.
    refusing: AtomicUsize,
}

impl ConnTable {
    /// A table with the cap `limits.max_connections` fitted to the open-file
    /// limit (raised to its hard limit first), logged.
    pub fn sized(limits: &ConnLimits) -> Arc<ConnTable> {
        let nofile = raise_open_file_limit();
        let open = open_files();
        let cap = connection_cap(limits.max_connections, nofile, open);
        if cap < limits.max_connections {
            tracing::warn!(
                "at most {cap} connections (socket.max_connections is {}): the open-file limit is {nofile}, \
                 {open} are open and {KEPT_FILES} are kept for models, the broker, fetches and logs; \
                 raise LimitNOFILE to allow more",
                limits.max_connections
            );
        } else {
            tracing::info!("at most {cap} connections over every listener (open-file limit {nofile})");
        }
        Arc::new(ConnTable::new(cap, limits.min_body_rate))
    }

    fn new(cap: usize, min_body_rate: u64) -> ConnTable {
        ConnTable {
            epoch: Instant::now(),
            open: Mutex::new(Vec::new()),
            cap,
            min_body_rate,
            refusing: AtomicUsize::new(0),
        }
    }

    /// The cap in force.
    pub fn cap(&self) -> usize {
        self.cap
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a connection may be accepted now: the connections still
    /// holding a descriptor (live, or told to close and not yet gone) leave
    /// room under the cap plus [`MAX_CLOSING`].
    fn may_accept(&self) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|c| Arc::strong_count(c) > 1);
        open.len() < self.cap + MAX_CLOSING
    }

    /// Admits a new connection: under the cap, or by closing another (see [`victim`]).
    fn admit(&self) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|c| Arc::strong_count(c) > 1); // closed ones (their task is gone)
        let live = open.iter().filter(|c| !c.closing.load(Ordering::SeqCst)).count();
        if live >= self.cap {
            let now = self.now_ms();
            let states: Vec<Option<ConnState>> = open.iter().map(|c| c.state(now)).collect();
            let victim = &open[victim(&states, self.min_body_rate)?];
            victim.closing.store(true, Ordering::SeqCst);
            victim.close.notify_one();
        }
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            body_since_ms: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            reader: futures_util::task::AtomicWaker::new(),
        });
        open.push(conn.clone());
        Some(conn)
    }
}

/// What a connection is doing, as the cap weighs it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ConnState {
    /// No request running (idle, or its headers still coming), since this many ms.
    Idle { since_ms: u64 },
    /// A request whose body is still coming: `bytes` in `ms`.
    Body { bytes: u64, ms: u64 },
    /// A request running (its body read): never closed for room.
    Running,
}

impl Conn {
    /// Its state at `now_ms`; none once it is closing.
    fn state(&self, now_ms: u64) -> Option<ConnState> {
        if self.closing.load(Ordering::SeqCst) {
            return None;
        }
        if self.active.load(Ordering::SeqCst) == 0 {
            return Some(ConnState::Idle { since_ms: self.idle_since_ms.load(Ordering::SeqCst) });
        }
        match self.body_since_ms.load(Ordering::SeqCst) {
            0 => Some(ConnState::Running),
            since => Some(ConnState::Body {
                bytes: self.body_bytes.load(Ordering::SeqCst),
                ms: now_ms.saturating_sub(since - 1),
            }),
        }
    }
}

/// The connection to close for a new one at the cap: the one idle the
/// longest (a connection whose headers trickle in counts as idle from its
/// last request); else, of the requests whose body has come for a second or
/// more at under `min_rate` bytes/s on average, the slowest; else none (the
/// new connection gets 503).
fn victim(states: &[Option<ConnState>], min_rate: u64) -> Option<usize> {
    let idle = states
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Some(ConnState::Idle { since_ms }) => Some((i, *since_ms)),
            _ => None,
        })
        .min_by_key(|(_, since)| *since);
    if let Some((i, _)) = idle {
        return Some(i);
    }
    states
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            Some(ConnState::Body { bytes, ms }) if *ms >= 1000 && bytes * 1000 < min_rate * ms => {
                Some((i, bytes * 1000 / ms))
            }
            _ => None,
        })
        .min_by_key(|(_, rate)| *rate)
        .map(|(i, _)| i)
}

/// Marks a request running on its connection until dropped (with the response body).
struct Running {
    conn: Arc<Conn>,
    conns: Arc<ConnTable>,
}

impl Running {
    fn new(conn: &Arc<Conn>, conns: &Arc<ConnTable>) -> Running {
        conn.active.fetch_add(1, Ordering::SeqCst);
        Running { conn: conn.clone(), conns: conns.clone() }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.conn.idle_since_ms.store(self.conns.now_ms(), Ordering::SeqCst);
        self.conn.active.fetch_sub(1, Ordering::SeqCst);
        self.conn.reader.wake();
    }
}

/// A response body that keeps its request counted as running until it is written.
struct HeldBody {
    inner: axum::body::Body,
    _running: Running,
}

impl http_body::Body for HeldBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that tells its connection how much of it came, and when
/// it ended (for the cap's choice of a connection to close).
struct ProgressBody {
    inner: hyper::body::Incoming,
    conn: Arc<Conn>,
}

impl ProgressBody {
    fn new(inner: hyper::body::Incoming, conn: Arc<Conn>, now_ms: u64) -> ProgressBody {
        conn.body_bytes.store(0, Ordering::SeqCst);
        let since = if http_body::Body::is_end_stream(&inner) { 0 } else { now_ms + 1 };
        conn.body_since_ms.store(since, Ordering::SeqCst);
        ProgressBody { inner, conn }
    }
}

impl Drop for ProgressBody {
    fn drop(&mut self) {
        self.conn.body_since_ms.store(0, Ordering::SeqCst);
    }
}

impl http_body::Body for ProgressBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.conn.body_bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
                }
                if http_body::Body::is_end_stream(&self.inner) {
                    self.conn.body_since_ms.store(0, Ordering::SeqCst);
                }
            }
            Poll::Ready(_) => self.conn.body_since_ms.store(0, Ordering::SeqCst),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

/// The connection's I/O with the idle, header and write timeouts.
struct Guarded<S> {
    inner: S,
    conn: Arc<Conn>,
    conns: Arc<ConnTable>,
    limits: ConnLimits,
    /// When the first byte of the request being read arrived (none while idle or running).
    header_started: Option<Instant>,
    read_timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let running = this.conn.active.load(Ordering::SeqCst) > 0;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.read_timer = None;
                if running {
                    this.header_started = None;
                } else if buf.filled().len() > before && this.header_started.is_none() {
                    this.header_started = Some(Instant::now());
                }
                Poll::Ready(r)
            }
            Poll::Pending if running => {
                this.header_started = None;
                this.read_timer = None;
                this.conn.reader.register(cx.waker());
                Poll::Pending
            }
            Poll::Pending => {
                let deadline = match this.header_started {
                    Some(t) => t + this.limits.header,
                    None => {
                        let idle_ms = this.conn.idle_since_ms.load(Ordering::SeqCst);
                        this.conns.epoch + Duration::from_millis(idle_ms) + this.limits.idle
                    }
                };
                if this.read_timer.as_ref().is_none_or(|(d, _)| *d != deadline) {
                    this.read_timer = Some((deadline, Box::pin(tokio::time::sleep_until(deadline.into()))));
                }
                let (_, timer) = this.read_timer.as_mut().expect("set above");
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) if this.header_started.is_some() => {
                        Poll::Ready(Err(timed_out("request headers not complete in time")))
                    }
                    Poll::Ready(()) => Poll::Ready(Err(timed_out("connection idle"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                this.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = this.limits.body;
                let timer = this.write_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(timed_out("the client does not read its response"))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The answer to a connection over the cap while every open one is running a request.
fn busy_response() -> Vec<u8> {
    let body = r#"{"error":{"kind":"overloaded","message":"too many connections are running requests (socket.max_connections); try again"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Serves `app` on `listener` under `limits`, its connections counted in
/// `conns` (shared by every listener), until `stop` turns true; then stops
/// accepting and lets the open connections finish their requests.
pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: ConnLimits,
    conns: Arc<ConnTable>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: String| {
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!("{what}");
            last_warning = Some(Instant::now());
        }
    };
    loop {
        if !conns.may_accept() {
            // Connections closed for room are still giving their descriptors back.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            continue;
        }
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (mut io, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: the connections that
                // time out give them back; keep going.
                warn(format!("cannot accept a connection: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(conn) = conns.admit() else {
            warn(format!(
                "{} connections are open and all running requests (socket.max_connections); refusing new ones",
                conns.cap()
            ));
            if conns.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING {
                // Enough answers in flight: close this one at once (its descriptor is the cost).
                conns.refusing.fetch_sub(1, Ordering::SeqCst);
                drop(io);
                continue;
            }
            let refusing = conns.clone();
            tasks.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                // Take the request's first bytes (so the client's write does not fail
                // on a closed socket before it can read the answer), answer, close.
                let mut head = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut head)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&busy_response())).await;
                let _ = tokio::time::timeout(Duration::from_millis(100), io.shutdown()).await;
                drop(io);
                refusing.refusing.fetch_sub(1, Ordering::SeqCst);
            });
            continue;
        };
        let guarded = Guarded {
            inner: io,
            conn: conn.clone(),
            conns: conns.clone(),
            limits,
            header_started: None,
            read_timer: None,
            write_timer: None,
        };
        let (app, conns, mut stop) = (app.clone(), conns.clone(), stop.clone());
        tasks.spawn(async move {
            let held = conn.clone();
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let now = conns.now_ms();
                let mut request = request.map(|body| ProgressBody::new(body, held.clone(), now));
                request.extensions_mut().insert(ConnectInfo(peer.clone()));
                let running = Running::new(&held, &conns);
                let mut app = app.clone();
                async move {
                    let response = tower_service::Service::call(&mut app, request).await?;
                    Ok::<_, std::convert::Infallible>(
                        response.map(|inner| axum::body::Body::new(HeldBody { inner, _running: running })),
                    )
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(guarded), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                r = connection.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection closed: {e}");
                    }
                }
                _ = conn.close.notified() => {
                    tracing::debug!("an idle connection closed to make room (socket.max_connections)");
                }
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_for_what_the_daemon_opens_itself() {
        // Plenty of descriptors: the configured cap.
        assert_eq!(connection_cap(512, 65_536, 20), 512);
        // 1,024 descriptors, 20 open: what is left after the kept ones.
        assert_eq!(connection_cap(2048, 1024, 20) as u64, 1024 - 20 - KEPT_FILES);
        assert_eq!(connection_cap(512, 1024, 20), 512);
        assert_eq!(connection_cap(512, 512, 20) as u64, 512 - 20 - KEPT_FILES);
        // A tiny limit still serves a few; a small cap configured stays.
        assert_eq!(connection_cap(512, 64, 20), MIN_CONNECTIONS);
        assert_eq!(connection_cap(2, 65_536, 20), 2);
    }

    #[test]
    fn at_the_cap_the_idle_then_the_slowest_body_make_room() {
        use ConnState::*;
        let rate = 4096;
        // The one idle the longest (headers trickling count as idle).
        let states = [Some(Running), Some(Idle { since_ms: 500 }), Some(Idle { since_ms: 100 }), None];
        assert_eq!(victim(&states, rate), Some(2));
        // No idle one: the body furthest below the minimum rate.
        let states = [
            Some(Running),
            Some(Body { bytes: 2000, ms: 2000 }),
            Some(Body { bytes: 10, ms: 2000 }),
            Some(Body { bytes: 100_000, ms: 2000 }),
        ];
        assert_eq!(victim(&states, rate), Some(2));
        // A body under a second old, or at the rate, is left alone.
        let states = [Some(Running), Some(Body { bytes: 0, ms: 900 }), Some(Body { bytes: 9000, ms: 2000 })];
        assert_eq!(victim(&states, rate), None);
        // No minimum rate: bodies are never closed for room.
        assert_eq!(victim(&[Some(Body { bytes: 0, ms: 9000 })], 0), None);
        assert_eq!(victim(&[Some(Running), None], rate), None);
    }
}
