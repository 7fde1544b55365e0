//! The real `inferd serve` under a stand-in for systemd: a datagram socket
//! as `NOTIFY_SOCKET` records what it says (READY, STATUS, WATCHDOG,
//! RELOADING, STOPPING), signals drive reload and stop, and a listening
//! socket is passed as systemd's socket activation passes it.

mod util;

use serde_json::json;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use util::*;

const WAIT: Duration = Duration::from_secs(60);

/// Every datagram the daemon sends, one message (possibly several lines) each.
struct Notify {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: &std::path::Path) -> Notify {
        let sock = UnixDatagram::bind(path).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                    return;
                }
            }
        });
        Notify { rx, seen: Vec::new() }
    }

    /// Waits for a message with a line starting with `line`; returns the message.
    #[track_caller]
    fn expect(&mut self, line: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(msg) => {
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l.starts_with(line)) {
                        return msg;
                    }
                }
                Err(_) => panic!("no {line} within {WAIT:?}; seen: {:?}", self.seen),
            }
        }
    }

    /// Messages already queued and those that arrive within `span`.
    fn during(&mut self, span: Duration) -> Vec<String> {
        let deadline = Instant::now() + span;
        let mut got = Vec::new();
        while let Ok(msg) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            got.push(msg);
        }
        self.seen.extend(got.iter().cloned());
        got
    }
}

/// A temporary service: config file, registry, socket, state, notify socket.
struct Service {
    dir: TempRegistry,
    child: Option<Child>,
}

impl Service {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.file("inferd.sock")
    }

    fn client(&self) -> inferd::client::Client {
        inferd::client::Client::new(self.socket()).with_timeout(Duration::from_secs(60))
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill only sends a signal to our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits for the process to exit; returns its exit code and stderr.
    fn wait(&mut self) -> (Option<i32>, String) {
        let child = self.child.take().unwrap();
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The test registry (shipped models + `busy`) in a folder with a config file naming it.
fn service_dir(extra_config: &str) -> TempRegistry {
    let dir = test_registry();
    let config = format!(
        "models = \"{}\"\nmodels_outside = true\n[socket]\npath = \"{}\"\n[memory]\nstate_dir = \"{}\"\n{extra_config}",
        dir.path().display(),
        dir.file("inferd.sock").display(),
        dir.file("state").display()
    );
    std::fs::write(dir.file("config.toml"), config).unwrap();
    dir
}

fn command(dir: &TempRegistry, notify: &std::path::Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferd"));
    cmd.args(["serve", "--config"])
        .arg(dir.file("config.toml"))
        .env("NOTIFY_SOCKET", notify)
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env("INFERD_LOG__LEVEL", "info")
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn start(extra_config: &str, env: &[(&str, &str)]) -> (Service, Notify) {
    let dir = service_dir(extra_config);
    let notify = Notify::bind(&dir.file("notify.sock"));
    let child = command(&dir, &dir.file("notify.sock"), env).spawn().unwrap();
    (Service { dir, child: Some(child) }, notify)
}

fn color_job(s: &Service) -> u16 {
    let img = std::fs::read(repo("examples/red.jpg")).unwrap();
    s.client().post("/v1/models/color/infer", "image/jpeg", &img).unwrap().status
}

#[test]
fn ready_status_watchdog_reload_and_stop_are_notified() {
    let (mut svc, mut notify) = start("", &[("WATCHDOG_USEC", "400000")]);
    let ready = notify.expect("READY=1");
    // READY comes only when the socket answers.
    assert!(std::os::unix::net::UnixStream::connect(svc.socket()).is_ok(), "READY before the socket listens");
    assert!(ready.lines().any(|l| l == "STATUS=no models loaded; 0.0 jobs/s"), "{ready}");
    assert_eq!(color_job(&svc), 200);
    // The watchdog is pinged at half its 400 ms interval.
    notify.during(Duration::ZERO);
    let pings = notify.during(Duration::from_millis(1500)).iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!((3..=12).contains(&pings), "{pings} pings in 1.5 s; seen {:?}", notify.seen);
    // STATUS follows what is loaded and the job rate.
    let status = notify.expect("STATUS=1 model loaded (color)");
    assert!(status.contains("jobs/s"), "{status}");

    svc.signal(libc::SIGHUP);
    let reloading = notify.expect("RELOADING=1");
    let usec =
        reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC with RELOADING");
    assert!(usec.parse::<u64>().unwrap() > 0);
    notify.expect("READY=1");
    assert_eq!(color_job(&svc), 200, "serving after the reload");

    svc.signal(libc::SIGTERM);
    notify.expect("STOPPING=1");
    let socket = svc.socket();
    let (code, stderr) = svc.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!socket.exists(), "a socket it bound itself is removed");
    assert!(stderr.contains("pinging the systemd watchdog"), "{stderr}");
}

#[test]
fn a_wedged_worker_stops_the_watchdog_pings() {
    let (mut svc, mut notify) = start("[jobs]\nstuck_job_s = 1\n", &[("WATCHDOG_USEC", "300000")]);
    notify.expect("READY=1");
    // Aim long: calibration on a busy machine errs short, and the quiet window must end inside the job.
    let iterations = busy_iterations_for(&svc.client(), Duration::from_secs(8));
    notify.during(Duration::from_millis(100));
    let client = svc.client();
    let started = Instant::now();
    let job = std::thread::spawn(move || {
        let r = client.post("/v1/models/busy/infer", "application/json", &busy_body(iterations));
        (r, started.elapsed())
    });
    // While the one job runs past stuck_job_s, no pings: systemd would restart the daemon.
    std::thread::sleep(Duration::from_millis(1500));
    notify.during(Duration::ZERO); // what was sent before the window
    let quiet = notify.during(Duration::from_millis(1500));
    let (r, took) = job.join().unwrap();
    assert_eq!(r.unwrap().status, 200);
    assert!(took > Duration::from_secs(3), "the job took {took:?}, too short to test with");
    if quiet.iter().any(|m| m.trim() == "WATCHDOG=1") {
        svc.signal(libc::SIGTERM);
        panic!("pings while wedged: {quiet:?}\n{}", svc.wait().1);
    }
    notify.expect("WATCHDOG=1");
    svc.signal(libc::SIGTERM);
    let (code, stderr) = svc.wait();
    assert_eq!(code, Some(0));
    assert!(stderr.contains("is stuck in one job"), "{stderr}");
    assert!(stderr.contains("healthy again"), "{stderr}");
}

#[test]
fn a_broken_reload_keeps_serving_and_a_good_one_swaps_models_without_failing_jobs() {
    let (mut svc, mut notify) = start("", &[]);
    notify.expect("READY=1");
    assert_eq!(color_job(&svc), 200);
    let good = std::fs::read(svc.dir.path()).unwrap();

    // A broken models.json: refused, the running set keeps serving.
    std::fs::write(svc.dir.path(), b"{\"models\": [ oops").unwrap();
    svc.signal(libc::SIGHUP);
    notify.expect("RELOADING=1");
    notify.expect("READY=1");
    assert_eq!(color_job(&svc), 200);
    let r = svc.client().get("/v1/models/color2").unwrap();
    assert_eq!(r.status, 404);

    // A good one that changes `busy` and adds `color2`, while a busy job is in flight.
    let mut registry: serde_json::Value = serde_json::from_slice(&good).unwrap();
    let models = registry["models"].as_array_mut().unwrap();
    let mut color2 = models.iter().find(|m| m["name"] == "color").unwrap().clone();
    color2["name"] = json!("color2");
    models.push(color2);
    let busy = models.iter_mut().find(|m| m["name"] == "busy").unwrap();
    busy["description"] = json!("changed by the reload");
    std::fs::write(svc.dir.path(), serde_json::to_vec_pretty(&registry).unwrap()).unwrap();

    let iterations = busy_iterations_for(&svc.client(), Duration::from_millis(1500));
    let client = svc.client();
    let in_flight =
        std::thread::spawn(move || client.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)));
    std::thread::sleep(Duration::from_millis(200));
    svc.signal(libc::SIGHUP);
    notify.expect("RELOADING=1");
    notify.expect("READY=1");
    let r = in_flight.join().unwrap().unwrap();
    assert_eq!(r.status, 200, "the job in flight during the reload: {}", String::from_utf8_lossy(&r.body));
    let img = std::fs::read(repo("examples/blue.jpg")).unwrap();
    let r = svc.client().post("/v1/models/color2/infer", "image/jpeg", &img).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = svc.client().get("/v1/models/busy").unwrap().json().unwrap();
    assert_eq!(v["description"], "changed by the reload", "{v}");

    svc.signal(libc::SIGTERM);
    let (code, stderr) = svc.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("reload refused"), "the reason is logged: {stderr}");
    assert!(stderr.contains("color2"), "{stderr}");
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_left_in_place() {
    let dir = service_dir("");
    let path = dir.file("activated.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let notify_path = dir.file("notify.sock");
    let mut notify = Notify::bind(&notify_path);
    // systemd passes the socket as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to the service's pid.
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_inferd"),
        "serve",
        "--config",
    ])
    .arg(dir.file("config.toml"))
    .env("NOTIFY_SOCKET", &notify_path)
    .env("INFERD_LOG__LEVEL", "info")
    .env_remove("ORT_DYLIB_PATH")
    .current_dir(root())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    // SAFETY: dup2 and fcntl are async-signal-safe; they only make the listener fd 3 in the child,
    // open across exec (dup2 onto itself would keep close-on-exec, so that case clears it).
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(fd, 3) };
            if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
        });
    }
    let mut svc = Service { dir, child: Some(cmd.spawn().unwrap()) };
    notify.expect("READY=1");
    assert!(!svc.socket().exists(), "it did not bind its configured socket");
    let client = inferd::client::Client::new(&path).with_timeout(Duration::from_secs(60));
    let r = client.get("/v1/health").unwrap();
    assert_eq!(r.status, 200);
    let img = std::fs::read(repo("examples/green.jpg")).unwrap();
    let v: serde_json::Value = client.post("/v1/models/color/infer", "image/jpeg", &img).unwrap().json().unwrap();
    assert_eq!(v["result"]["classes"][0]["label"], "green");
    svc.signal(libc::SIGTERM);
    let (code, stderr) = svc.wait();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("socket activation"), "{stderr}");
    assert!(path.exists(), "the socket stays systemd's");
}

/// With stderr connected to the journal (`JOURNAL_STREAM` names it), inferd
/// logs to journald; where no journald listens it says so and keeps plain lines.
#[test]
fn journal_logging_is_chosen_when_stderr_is_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let dir = service_dir("");
    let notify_path = dir.file("notify.sock");
    let mut notify = Notify::bind(&notify_path);
    let log = std::fs::File::create(dir.file("stderr.log")).unwrap();
    let meta = log.metadata().unwrap();
    let mut cmd = command(&dir, &notify_path, &[("JOURNAL_STREAM", &format!("{}:{}", meta.dev(), meta.ino()))]);
    let child = cmd.stderr(log).spawn().unwrap();
    let mut svc = Service { dir, child: Some(child) };
    notify.expect("READY=1");
    svc.signal(libc::SIGTERM);
    let (code, _) = svc.wait();
    assert_eq!(code, Some(0));
    let stderr = std::fs::read_to_string(svc.dir.file("stderr.log")).unwrap();
    let journald = std::path::Path::new("/run/systemd/journal/socket").exists();
    if journald {
        assert!(!stderr.contains("inferd is ready"), "logged to stderr although it is the journal: {stderr}");
    } else {
        assert!(stderr.contains("cannot log to the journal"), "{stderr}");
        assert!(stderr.contains("inferd is ready"), "falls back to plain lines: {stderr}");
    }
}
