//! Who is asking, and may they: the socket peer's uid, gid and pid
//! (`SO_PEERCRED`), logged with each request; the TCP listener's bearer
//! token; and `socket.admin_uids` for the endpoints that load and unload.

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
    method == Method::POST && path.starts_with("/v1/models/") && (path.ends_with("/load") || path.ends_with("/unload"))
}

/// Whether `peer` may call an admin endpoint under `admin_uids`.
pub fn may_administer(peer: &Peer, admin_uids: &[u32]) -> bool {
    admin_uids.is_empty() || matches!(peer, Peer::Local { uid, .. } if admin_uids.contains(uid))
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
            tracing::info!(remote, %method, path = %path, "refused: no valid bearer token");
            return error_response(&InferError::new(
                ErrorKind::Unauthorized,
                "this listener needs `Authorization: Bearer <token>` (socket.tcp_token_file)",
            ));
        }
    }
    let admin = is_admin(&method, &path);
    if admin && !may_administer(&peer, &app.admin_uids) {
        tracing::info!(uid, gid, pid, remote, %method, path = %path, "refused: not in socket.admin_uids");
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
    fn secrets_compare_whole() {
        assert!(same_secret(b"abcdefgh", b"abcdefgh"));
        assert!(!same_secret(b"abcdefgh", b"abcdefgX"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
