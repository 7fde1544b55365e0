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
//! - **Cap**: at `socket.max_connections`, a new connection first closes the
//!   connection idle the longest (no request running); if every connection is
//!   running a request, the new one gets `503` and is closed at once. Either
//!   way file descriptors stay bounded and a flood of idle clients cannot lock
//!   out a real one.
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
    pub max_connections: usize,
    pub idle: Duration,
    pub header: Duration,
    /// Reading a request body, and writing a response the client does not read.
    pub body: Duration,
}

impl ConnLimits {
    /// The limits configured in `[socket]`.
    pub fn from_config(cfg: &crate::config::SocketConfig) -> ConnLimits {
        ConnLimits {
            max_connections: cfg.max_connections.max(1),
            idle: Duration::from_secs(cfg.idle_timeout_s.max(1)),
            header: Duration::from_secs(cfg.header_timeout_s.max(1)),
            body: Duration::from_secs(cfg.body_timeout_s.max(1)),
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
    /// Asked to close (the cap needs its room).
    close: tokio::sync::Notify,
    closing: std::sync::atomic::AtomicBool,
    /// The reader waiting on the socket, woken when the connection goes idle
    /// (so the idle timer starts even though no byte arrives).
    reader: futures_util::task::AtomicWaker,
}

/// The open connections.
struct Conns {
    epoch: Instant,
    open: Mutex<Vec<Arc<Conn>>>,
}

impl Conns {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Admits a new connection: under the cap, or by closing the one idle the longest.
    fn admit(&self, cap: usize) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|c| Arc::strong_count(c) > 1); // closed ones (their task is gone)
        let live = open.iter().filter(|c| !c.closing.load(Ordering::SeqCst)).count();
        if live >= cap {
            let victim = open
                .iter()
                .filter(|c| c.active.load(Ordering::SeqCst) == 0 && !c.closing.load(Ordering::SeqCst))
                .min_by_key(|c| c.idle_since_ms.load(Ordering::SeqCst))?;
            victim.closing.store(true, Ordering::SeqCst);
            victim.close.notify_one();
        }
        let conn = Arc::new(Conn {
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            close: tokio::sync::Notify::new(),
            closing: std::sync::atomic::AtomicBool::new(false),
            reader: futures_util::task::AtomicWaker::new(),
        });
        open.push(conn.clone());
        Some(conn)
    }
}

/// Marks a request running on its connection until dropped (with the response body).
struct Running {
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl Running {
    fn new(conn: &Arc<Conn>, conns: &Arc<Conns>) -> Running {
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

/// The connection's I/O with the idle, header and write timeouts.
struct Guarded<S> {
    inner: S,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
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

/// Serves `app` on `listener` under `limits` until `stop` turns true; then
/// stops accepting and lets the open connections finish their requests.
pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    limits: ConnLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> io::Result<()> {
    let conns = Arc::new(Conns { epoch: Instant::now(), open: Mutex::new(Vec::new()) });
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_warning: Option<Instant> = None;
    let mut warn = |what: String| {
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!("{what}");
            last_warning = Some(Instant::now());
        }
    };
    loop {
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
        let Some(conn) = conns.admit(limits.max_connections) else {
            warn(format!(
                "{} connections are open and all running requests (socket.max_connections); refusing new ones",
                limits.max_connections
            ));
            tasks.spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                // Take the request's first bytes (so the client's write does not fail
                // on a closed socket before it can read the answer), answer, close.
                let mut head = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_millis(500), io.read(&mut head)).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(&busy_response())).await;
                let _ = io.shutdown().await;
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
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
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
