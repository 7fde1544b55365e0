//! Running under systemd: readiness, status, reload and stop notices and
//! watchdog pings over `NOTIFY_SOCKET` (the pure-Rust `sd-notify` crate),
//! the listening socket passed by socket activation (`LISTEN_FDS`), and
//! whether stderr is the journal. Outside systemd every call is a no-op.

use sd_notify::NotifyState;
use std::os::fd::RawFd;
use std::time::Duration;

/// Sends `states`; a failure is logged, never fatal (the daemon serves regardless).
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// `READY=1` with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=…`.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects (and plain `notify` accepts).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading")]),
    }
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping: finishing jobs in flight")]);
}

/// `WATCHDOG=1`.
pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half its timeout, when systemd set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2).filter(|d| !d.is_zero())
}

/// The first socket systemd passed for this process (socket activation), if any.
pub fn listen_fd() -> std::io::Result<Option<RawFd>> {
    Ok(sd_notify::listen_fds()?.next())
}

/// Whether stderr is connected to the journal (`JOURNAL_STREAM` names its device and inode).
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    // SAFETY: fstat on fd 2 only writes into the zeroed struct it is given.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::fstat(2, &mut st) };
    rc == 0 && st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// The one-line `STATUS=` summary: what is loaded, the job rate, MQTT.
pub fn status_line(loaded: &[String], jobs_per_s: f64, mqtt: Option<bool>) -> String {
    let models = match loaded.len() {
        0 => "no models loaded".to_string(),
        1 => format!("1 model loaded ({})", loaded[0]),
        n => format!("{n} models loaded ({})", loaded.join(", ")),
    };
    let mqtt = match mqtt {
        None => String::new(),
        Some(true) => "; MQTT connected".into(),
        Some(false) => "; MQTT disconnected".into(),
    };
    format!("{models}; {jobs_per_s:.1} jobs/s{mqtt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_says_models_rate_and_mqtt() {
        assert_eq!(status_line(&[], 0.0, None), "no models loaded; 0.0 jobs/s");
        assert_eq!(
            status_line(&["color".into(), "ocr".into()], 2.54, Some(true)),
            "2 models loaded (color, ocr); 2.5 jobs/s; MQTT connected"
        );
        assert_eq!(
            status_line(&["ocr".into()], 0.0, Some(false)),
            "1 model loaded (ocr); 0.0 jobs/s; MQTT disconnected"
        );
    }
}
