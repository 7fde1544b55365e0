//! The Unix socket the local API listens on: default path, stale-file
//! removal (but never from under a live daemon), permissions and group.

use crate::config::SocketConfig;
use std::io;
use std::path::{Path, PathBuf};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another inferd is already listening on {0}")]
    InUse(PathBuf),
    #[error("socket {path}: {message}")]
    Setup { path: PathBuf, message: String },
}

/// Binds the configured socket: removes a stale socket file, refuses when a
/// live daemon answers on it, creates the folder, applies mode and group.
pub fn bind(cfg: &SocketConfig) -> Result<(tokio::net::UnixListener, PathBuf), SocketError> {
    let path = cfg.resolved_path();
    let setup = |message: String| SocketError::Setup { path: path.clone(), message };
    if path.exists() || path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(SocketError::InUse(path));
        }
        tracing::info!(path = %path.display(), "removing stale socket file");
        std::fs::remove_file(&path).map_err(|e| setup(format!("cannot remove the stale socket file: {e}")))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
    }
    let listener = tokio::net::UnixListener::bind(&path).map_err(|e| setup(format!("cannot listen: {e}")))?;
    let mode = cfg.mode_bits().map_err(|e| setup(e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| setup(format!("cannot set mode {mode:o}: {e}")))?;
    if let Some(group) = &cfg.group {
        let gid = group_id(group).ok_or_else(|| setup(format!("unknown group '{group}'")))?;
        std::os::unix::fs::chown(&path, None, Some(gid))
            .map_err(|e| setup(format!("cannot give it to group {group}: {e}")))?;
    }
    Ok((listener, path))
}

/// The socket systemd passed (socket activation, `LISTEN_FDS`), else the
/// configured one bound by [`bind`]; the flag says whether it was passed.
pub fn bind_or_inherit(cfg: &SocketConfig) -> Result<(tokio::net::UnixListener, PathBuf, bool), SocketError> {
    let inherited = crate::systemd::listen_fd()
        .map_err(|e| SocketError::Setup { path: cfg.resolved_path(), message: format!("LISTEN_FDS: {e}") })?;
    let Some(fd) = inherited else {
        let (listener, path) = bind(cfg)?;
        return Ok((listener, path, false));
    };
    let fail = |message: String| SocketError::Setup { path: PathBuf::from(format!("fd {fd}")), message };
    use std::os::fd::FromRawFd;
    // SAFETY: systemd hands this fd to this process alone (LISTEN_PID); it is owned from here on.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let path = std_listener
        .local_addr()
        .map_err(|e| fail(format!("the socket systemd passed is not a Unix stream socket: {e}")))?
        .as_pathname()
        .map(Path::to_path_buf)
        .ok_or_else(|| fail("the socket systemd passed has no path".into()))?;
    std_listener.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
    let listener = tokio::net::UnixListener::from_std(std_listener).map_err(|e| fail(e.to_string()))?;
    tracing::info!(path = %path.display(), "listening on the socket systemd passed (socket activation)");
    Ok((listener, path, true))
}

/// Removes the socket file at `path` if it is still a socket.
pub fn remove(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if path.symlink_metadata().is_ok_and(|m| m.file_type().is_socket())
        && let Err(e) = std::fs::remove_file(path)
    {
        tracing::warn!(path = %path.display(), "cannot remove the socket file: {e}");
    }
}

/// A group's id from its name or number.
pub fn group_id(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let name = std::ffi::CString::new(group).ok()?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getgrnam_r writes only into grp and buf.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// Waits until something accepts connections on `path` (for clients and tests).
pub fn wait_for(path: &Path, timeout: std::time::Duration) -> io::Result<()> {
    let start = std::time::Instant::now();
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_resolve_by_number_and_name() {
        assert_eq!(group_id("1234"), Some(1234));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-here"), None);
    }
}
