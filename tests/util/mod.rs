//! Helpers shared by the integration tests: paths into the repository, the
//! real `inferd` binary, and temporary registries built from shipped models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A path below the repository root.
pub fn repo(rel: &str) -> PathBuf {
    root().join(rel)
}

/// The fixtures' expected values, written by scripts/make_fixtures.py.
pub fn expected() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo("tests/fixtures/expected.json")).unwrap()).unwrap()
}

/// Runs the real `inferd` binary with `args` in the repository root.
pub fn inferd(args: &[&str]) -> Output {
    inferd_env(args, &[])
}

/// Runs `inferd` with extra environment variables.
pub fn inferd_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferd"));
    cmd.args(args).current_dir(root()).env_remove("ORT_DYLIB_PATH").env_remove("RUST_LOG");
    // Measured footprints of this machine's own daemon must not change what the tests see.
    cmd.env("INFERD_MEMORY__STATE_DIR", std::env::temp_dir().join("inferd-tests-no-footprints"));
    // Test registries name fixture files by absolute path.
    cmd.env("INFERD_MODELS_OUTSIDE", "true");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("inferd runs")
}

/// stdout and stderr of a finished command, as text.
pub fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A temporary folder holding `models.json` written from `json`, with the
/// shipped `models/` folder linked beside it so relative paths resolve.
pub struct TempRegistry {
    pub dir: tempfile::TempDir,
}

impl TempRegistry {
    pub fn new(json: &serde_json::Value) -> TempRegistry {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(repo("models"), dir.path().join("models")).unwrap();
        std::fs::write(dir.path().join("models.json"), serde_json::to_vec_pretty(json).unwrap()).unwrap();
        TempRegistry { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("models.json")
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// The shipped models.json as JSON, to edit into broken variants.
pub fn shipped_registry() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo("models.json")).unwrap()).unwrap()
}

/// The shipped entry for model `name`.
pub fn shipped_model(name: &str) -> serde_json::Value {
    shipped_registry()["models"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap().clone()
}

/// The largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// A JSON array of numbers as f64s.
pub fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Whether `path` exists (for messages).
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// sha256 of a file, hex.
pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// A registry with the shipped models plus test-only ones: `busy` (runs as
/// long as asked), `reshape` (fails at run time for inputs of other than 4
/// elements) and `broken` (a sha256 that does not match, so it cannot load).
pub fn test_registry() -> TempRegistry {
    let mut models = shipped_registry()["models"].as_array().unwrap().clone();
    let fixture = |name: &str| repo(&format!("tests/fixtures/models/{name}.onnx"));
    models.push(serde_json::json!({
        "name": "busy", "task": "raw",
        "variants": [{"name": "default", "file": fixture("busy"), "sha256": sha256_of(&fixture("busy"))}]
    }));
    models.push(serde_json::json!({
        "name": "reshape", "task": "raw",
        "variants": [{"name": "default", "file": fixture("reshape"), "sha256": sha256_of(&fixture("reshape"))}]
    }));
    let mut broken = shipped_model("color");
    broken["name"] = serde_json::json!("broken");
    broken["variants"][0]["sha256"] = serde_json::json!("0".repeat(64));
    models.push(broken);
    TempRegistry::new(&serde_json::json!({"version": 1, "models": models}))
}

/// The daemon, started in-process by `inferd::run` on a temporary socket, on
/// its own runtime thread; stopped (and checked) by `stop` or on drop.
pub struct Daemon {
    pub socket: PathBuf,
    pub registry: TempRegistry,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Daemon {
    /// Starts a daemon over [`test_registry`] after `edit` adjusts its configuration.
    pub fn start(edit: impl FnOnce(&mut inferd::config::Config)) -> Daemon {
        Self::start_with_probe(std::sync::Arc::new(inferd::memory::SystemProbe::default()), edit)
    }

    /// [`Daemon::start`] with the memory probe given.
    pub fn start_with_probe(
        probe: std::sync::Arc<dyn inferd::memory::MemoryProbe>,
        edit: impl FnOnce(&mut inferd::config::Config),
    ) -> Daemon {
        if let Ok(filter) = std::env::var("INFERD_TEST_LOG") {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        }
        let registry = test_registry();
        let socket = registry.file("inferd.sock");
        // Test registries name fixture files by absolute path.
        let mut config =
            inferd::config::Config { models: Some(registry.path()), models_outside: true, ..Default::default() };
        config.socket.path = Some(socket.clone());
        config.memory.state_dir = Some(registry.file("state"));
        edit(&mut config);
        let socket = config.socket.resolved_path();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(inferd::run_with_probe(
                config,
                async {
                    let _ = stopped.await;
                },
                probe,
            ))
            .map_err(|e| e.to_string())
        });
        let daemon = Daemon { socket, registry, stop: Some(stop), thread: Some(thread) };
        if inferd::intake::unix::wait_for(&daemon.socket, std::time::Duration::from_secs(20)).is_err() {
            panic!("the daemon did not come up: {:?}", daemon.finish());
        }
        daemon
    }

    /// A client for this daemon.
    pub fn client(&self) -> inferd::client::Client {
        inferd::client::Client::new(&self.socket).with_timeout(std::time::Duration::from_secs(60))
    }

    /// Asks the daemon to stop without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the daemon and returns what `run` returned.
    pub fn finish(mut self) -> Result<(), String> {
        self.signal_stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
pub fn busy_body(iterations: i64) -> Vec<u8> {
    serde_json::json!({"inputs": {
        "iterations": {"shape": [], "dtype": "i64", "data": [iterations]},
        "x": {"shape": [1, 128], "dtype": "f32", "data": vec![0.5; 128]},
    }})
    .to_string()
    .into_bytes()
}

/// Iterations of the busy model that take about `target` on this machine.
pub fn busy_iterations_for(client: &inferd::client::Client, target: std::time::Duration) -> i64 {
    let r = client.post("/v1/models/busy/load", "application/json", b"").unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // The fastest of three runs of a size: a busy machine makes a run slow, never fast.
    let fastest = |iterations: i64| {
        (0..3)
            .map(|_| {
                let start = std::time::Instant::now();
                let r = client.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap();
                assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    // Two sizes, so the fixed cost of a request drops out of the per-iteration time.
    let (small, large) = (5_000, 20_000); // both well inside a 300 ms job timeout, even on a loaded box
    let (t_small, t_large) = (fastest(small), fastest(large));
    let per_iteration = ((t_large - t_small) / (large - small) as f64).max(t_large / large as f64 / 4.0);
    ((target.as_secs_f64() / per_iteration) as i64).max(small)
}

pub mod broker;
pub mod oci;

/// Waits (up to 20 s) until something listens on loopback `port`; panics naming `what` if nothing does.
pub fn wait_for_port(port: u16, what: &str) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < end, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `len` bytes that do not compress and are not all alike (a model's weights, for a download).
pub fn noise(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

/// A registry with the two test detectors (YOLOv5 and YOLOv8 layouts, outputs
/// constructed by scripts/make_fixtures.py), 64×64 letterboxed input.
pub fn detector_registry() -> TempRegistry {
    let models: Vec<serde_json::Value> = ["yolov5", "yolov8"]
        .iter()
        .map(|layout| {
            let file = repo(&format!("tests/fixtures/models/{layout}.onnx"));
            serde_json::json!({
                "name": format!("detector-{layout}"),
                "task": "object-detection",
                "variants": [{"name": "default", "file": file, "sha256": sha256_of(&file)}],
                "input": {"tensor": "images", "width": 64, "height": 64, "resize": "letterbox"},
                "detection": {"layout": layout, "confidence": 0.25, "iou": 0.45},
                "labels": repo("tests/fixtures/models/detector-labels.txt"),
            })
        })
        .collect();
    TempRegistry::new(&serde_json::json!({"models": models}))
}

/// The real `inferd serve` binary as a child process, over [`test_registry`]
/// (or a registry given), with a config file made of the defaults for tests plus `extra` TOML.
pub struct Process {
    pub dir: tempfile::TempDir,
    pub registry: TempRegistry,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub child: Option<std::process::Child>,
}

impl Process {
    /// Starts the daemon with `extra` appended to its config file (sections
    /// `[socket]`, `[memory]` are written first; give other sections in `extra`,
    /// or keys of those two through `socket_extra` and `memory_extra`).
    pub fn start(socket_extra: &str, memory_extra: &str, extra: &str) -> Process {
        Self::start_with(test_registry(), socket_extra, memory_extra, extra)
    }

    /// [`Process::start`] over `registry`.
    pub fn start_with(registry: TempRegistry, socket_extra: &str, memory_extra: &str, extra: &str) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("inferd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "models = \"{}\"\nmodels_outside = true\n[socket]\npath = \"{}\"\n{socket_extra}\n\
                 [memory]\nstate_dir = \"{}\"\n{memory_extra}\n{extra}\n",
                registry.path().display(),
                socket.display(),
                dir.path().join("state").display(),
            ),
        )
        .unwrap();
        let mut p = Process { dir, registry, socket, config, child: None };
        p.launch();
        p
    }

    /// Starts the binary on the existing config (again, after `kill`).
    pub fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("inferd.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["--config", self.config.to_str().unwrap(), "serve"])
            .env_remove("ORT_DYLIB_PATH")
            .env_remove("RUST_LOG")
            .env_remove("INFERD_LOG__LEVEL")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        if inferd::intake::unix::wait_for(&self.socket, std::time::Duration::from_secs(30)).is_err() {
            panic!("the daemon did not come up: {}", self.log());
        }
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("inferd.log")).unwrap_or_default()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The daemon's resident set size, MiB.
    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }

    /// Open file descriptors of the daemon.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// A client for the daemon's socket.
    pub fn client(&self) -> inferd::client::Client {
        inferd::client::Client::new(&self.socket).with_timeout(std::time::Duration::from_secs(60))
    }

    /// SIGKILLs the daemon.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill with the pid of our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A daemon over [`test_registry`] with MQTT on `broker` as node `node`, after `edit`.
pub fn mqtt_daemon(broker: &broker::Broker, node: &str, edit: impl FnOnce(&mut inferd::config::Config)) -> Daemon {
    let url = broker.url();
    let node = node.to_string();
    Daemon::start(move |c| {
        c.mqtt.url = Some(url);
        c.mqtt.node_id = Some(node);
        edit(c);
    })
}

/// Waits until `node`'s retained status says online (the daemon is subscribed by then).
pub async fn wait_online(client: &mut broker::TestClient, node: &str) {
    let topic = format!("inferd/{node}/status");
    client.subscribe(&topic).await;
    loop {
        let r = client.recv_on(&topic, std::time::Duration::from_secs(30)).await;
        if r.json()["online"] == true {
            return;
        }
    }
}
