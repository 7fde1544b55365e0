//! The Unix socket the local API listens on: default path, stale-file
//! removal (but never from under a live daemon), permissions and group.
//!
//! Two daemons started at once on one path cannot both come up: each takes an
//! exclusive lock on `<socket>.lock` before it looks at the socket file. A
//! user's default socket outside `$XDG_RUNTIME_DIR` lives in a private folder
//! (`/tmp/inferd-<uid>/`, mode 0700) that must be owned by that user, so no
//! other user can put a socket of their own in its place.

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

/// The exclusive lock on a socket path, held while the daemon listens there.
#[derive(Debug)]
pub struct SocketLock(#[allow(dead_code)] Option<std::fs::File>);

/// Takes the exclusive lock on `<path>.lock`, or says another daemon holds it.
fn lock(path: &Path) -> Result<SocketLock, SocketError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    use std::os::unix::fs::OpenOptionsExt;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(&lock_path).map_err(
            |e| SocketError::Setup {
                path: path.to_path_buf(),
                message: format!("cannot open the lock file {}: {e}", lock_path.display()),
            },
        )?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SocketError::InUse(path.to_path_buf()));
    }
    Ok(SocketLock(Some(file)))
}

/// Makes (or checks) the user's private folder for the default socket.
fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    crate::config::check_private_dir(dir)
}

/// Binds the configured socket: takes the path's lock, removes a stale socket
/// file, refuses when a live daemon answers on it, creates the folder, applies
/// mode and group. The lock is held while the returned [`SocketLock`] lives.
pub fn bind(cfg: &SocketConfig) -> Result<(tokio::net::UnixListener, PathBuf, SocketLock), SocketError> {
    let path = cfg.resolved_path();
    let setup = |message: String| SocketError::Setup { path: path.clone(), message };
    if let Some(dir) = cfg.private_default_dir() {
        private_dir(&dir).map_err(&setup)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| setup(format!("cannot create {}: {e}", dir.display())))?;
    }
    let lock = lock(&path)?;
    if path.exists() || path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(SocketError::InUse(path));
        }
        tracing::info!(path = %path.display(), "removing stale socket file");
        std::fs::remove_file(&path).map_err(|e| setup(format!("cannot remove the stale socket file: {e}")))?;
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
    Ok((listener, path, lock))
}

/// The socket systemd passed (socket activation, `LISTEN_FDS`), else the
/// configured one bound by [`bind`]; the flag says whether it was passed.
pub fn bind_or_inherit(
    cfg: &SocketConfig,
) -> Result<(tokio::net::UnixListener, PathBuf, Option<SocketLock>), SocketError> {
    let inherited = crate::systemd::listen_fd()
        .map_err(|e| SocketError::Setup { path: cfg.resolved_path(), message: format!("LISTEN_FDS: {e}") })?;
    let Some(fd) = inherited else {
        let (listener, path, lock) = bind(cfg)?;
        return Ok((listener, path, Some(lock)));
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
    Ok((listener, path, None))
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
