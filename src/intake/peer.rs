//! Who is asking, and may they: the socket peer's uid, gid and pid
//! (`SO_PEERCRED`), logged with each request; the TCP listener's bearer
//! token; and `socket.admin_uids` for the endpoints that load and unload.
//! Refusals are logged at most once per 10 s each, with the count left out.

use super::http::{AppState, error_response};
use crate::error::{ErrorKind, InferError};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;

/// The other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A local process on the Unix socket, as the kernel vouches for it.
    Local { uid: u32, gid: u32, pid: Option<i32> },
    /// A TCP client.
    Tcp(std::net::SocketAddr),
    /// A socket whose credentials could not be read.
    Unknown,
}

impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Peer::Local { uid: c.uid(), gid: c.gid(), pid: c.pid() },
            Err(_) => Peer::Unknown,
        }
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer::Tcp(*stream.remote_addr())
    }
}

/// Whether `method path` loads or unloads a model (the admin endpoints).
pub fn is_admin(method: &Method, path: &str) -> bool {
    method == Method::POST
        && path.starts_with("/v1/models/")
        && (path.ends_with("/load") || path.ends_with("/unload") || path == "/v1/models/pull")
}

/// Whether `peer` may call an admin endpoint under `admin_uids`.
pub fn may_administer(peer: &Peer, admin_uids: &[u32]) -> bool {
    admin_uids.is_empty() || matches!(peer, Peer::Local { uid, .. } if admin_uids.contains(uid))
}

/// Refused TCP requests are logged at most once per this (a flood of them
/// would otherwise write a line each).
const REFUSAL_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

static REFUSALS: LogGate = LogGate::new(REFUSAL_LOG_EVERY);
static ADMIN_REFUSALS: LogGate = LogGate::new(REFUSAL_LOG_EVERY);

/// One log line per interval for an event that repeats, with how many of
/// them were not logged since the last line.
pub(crate) struct LogGate {
    every: std::time::Duration,
    /// When the last line was written, and the events not logged since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogGate {
    pub(crate) const fn new(every: std::time::Duration) -> LogGate {
        LogGate { every, state: std::sync::Mutex::new((None, 0)) }
    }

    /// For an event at `now`: `Some(events not logged since the last line)`
    /// when this one is to be logged, else `None` (it is counted).
    pub(crate) fn may_log(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, unlogged) = &mut *state;
        if last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            *unlogged += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(unlogged))
    }
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: checks the TCP token and the admin list, and logs the request with its peer.
pub async fn guard(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let peer = request.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0.clone()).unwrap_or(Peer::Unknown);
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let (uid, gid, pid) = match &peer {
        Peer::Local { uid, gid, pid } => (Some(*uid), Some(*gid), *pid),
        _ => (None, None, None),
    };
    let remote = match &peer {
        Peer::Tcp(addr) => Some(addr.to_string()),
        _ => None,
    };
    if let (Peer::Tcp(_), Some(token)) = (&peer, &app.tcp_token) {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_secret(given.as_bytes(), token.as_bytes()) {
            if let Some(unlogged) = REFUSALS.may_log(std::time::Instant::now()) {
                tracing::info!(remote, %method, path = %path, unlogged, "refused: no valid bearer token");
            }
            return error_response(&InferError::new(
                ErrorKind::Unauthorized,
                "this listener needs `Authorization: Bearer <token>` (socket.tcp_token_file)",
            ));
        }
    }
    let admin = is_admin(&method, &path);
    if admin && !may_administer(&peer, &app.admin_uids) {
        if let Some(unlogged) = ADMIN_REFUSALS.may_log(std::time::Instant::now()) {
            tracing::info!(uid, gid, pid, remote, %method, path = %path, unlogged, "refused: not in socket.admin_uids");
        }
        return error_response(&InferError::new(
            ErrorKind::Forbidden,
            "loading and unloading models is limited to the users in socket.admin_uids",
        ));
    }
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let (status, ms) = (response.status().as_u16(), started.elapsed().as_secs_f64() * 1000.0);
    if admin {
        tracing::info!(uid, gid, pid, remote, %method, path = %path, status, "admin request");
    } else {
        tracing::debug!(uid, gid, pid, remote, %method, path = %path, status, ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loads_and_unloads_are_admin() {
        assert!(is_admin(&Method::POST, "/v1/models/color/load"));
        assert!(is_admin(&Method::POST, "/v1/models/color/unload"));
        assert!(!is_admin(&Method::POST, "/v1/models/color/infer"));
        assert!(is_admin(&Method::POST, "/v1/models/pull"));
        assert!(!is_admin(&Method::GET, "/v1/models/color"));
    }

    #[test]
    fn admin_uids_admit_listed_local_users_only() {
        let local = |uid| Peer::Local { uid, gid: 0, pid: None };
        assert!(may_administer(&local(1000), &[]), "no list: anyone who can reach the socket");
        assert!(may_administer(&local(0), &[0, 1000]));
        assert!(!may_administer(&local(1001), &[0, 1000]));
        assert!(!may_administer(&Peer::Tcp("127.0.0.1:9".parse().unwrap()), &[0]), "a token is not a user");
        assert!(!may_administer(&Peer::Unknown, &[0]));
    }

    #[test]
    fn a_repeated_event_is_logged_once_per_interval_with_the_count_left_out() {
        let gate = LogGate::new(std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + std::time::Duration::from_millis(ms);
        assert_eq!(gate.may_log(at(0)), Some(0), "the first is logged");
        let quiet: Vec<_> = (1..2000).map(|i| gate.may_log(at(i))).collect();
        assert!(quiet.iter().all(Option::is_none), "the rest of the burst is counted, not logged");
        assert_eq!(gate.may_log(at(10_000)), Some(1999), "the next line says how many were left out");
        assert_eq!(gate.may_log(at(10_001)), None);
        assert_eq!(gate.may_log(at(25_000)), Some(1));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abcdefgh", b"abcdefgh"));
        assert!(!same_secret(b"abcdefgh", b"abcdefgX"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
