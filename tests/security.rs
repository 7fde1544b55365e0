//! Security, as an attacker or a careless operator would meet it: who may use
//! the socket and its admin endpoints (SO_PEERCRED, `socket.admin_uids`), the
//! TCP listener's bearer token, secrets kept out of logs and status, and
//! model paths confined to the folder of models.json.

mod util;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::broker::{Broker, TestClient};
use util::*;

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() }
}

fn gid() -> u32 {
    // SAFETY: getgid has no preconditions.
    unsafe { libc::getgid() }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The daemon as a process with its log in a file, configured by `extra` TOML.
struct Logged {
    child: std::process::Child,
    log: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Logged {
    fn start(extra: &str, env: &[(&str, &str)]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("inferd.sock");
        let config = dir.path().join("config.toml");
        // `socket.*` lines of `extra` go under the one [socket] table.
        std::fs::write(
            &config,
            format!(
                "models = \"{}\"\n{}\n[socket]\npath = \"{}\"\n{}\n[memory]\nstate_dir = \"{}\"\n",
                repo("models.json").display(),
                strip_socket_keys(extra),
                socket.display(),
                socket_extra(extra),
                dir.path().join("state").display()
            ),
        )
        .unwrap();
        let log = dir.path().join("inferd.log");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"));
        cmd.args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("ORT_DYLIB_PATH")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        inferd::intake::unix::wait_for(&socket, Duration::from_secs(20)).expect("the daemon came up");
        Logged { child, log, socket, _dir: dir }
    }

    fn client(&self) -> inferd::client::Client {
        inferd::client::Client::new(&self.socket).with_timeout(Duration::from_secs(30))
    }

    /// Stops the daemon (SIGTERM) and returns its log.
    fn stop(mut self) -> String {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// The `socket.*` lines of `extra`, without their prefix.
fn socket_extra(extra: &str) -> String {
    extra.lines().filter_map(|l| l.strip_prefix("socket.")).collect::<Vec<_>>().join("\n")
}

fn strip_socket_keys(text: &str) -> String {
    text.lines().filter(|l| !l.starts_with("socket.")).collect::<Vec<_>>().join("\n") + "\n"
}

/// One HTTP/1.1 request over TCP; the status code and body.
fn tcp_request(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

#[test]
fn the_socket_is_0660_with_its_group_and_logs_each_peer() {
    let d = Logged::start(&format!("[log]\nlevel = \"debug\"\nsocket.group = \"{}\"", gid()), &[]);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid());
    assert_eq!(d.client().get("/v1/models/color").unwrap().status, 200);
    let log = d.stop();
    let line = log.lines().find(|l| l.contains("path=/v1/models/color")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(&format!("uid={}", uid())) && line.contains(&format!("gid={}", gid())), "{line}");
    assert!(line.contains("pid="), "{line}");
}

#[test]
fn loading_and_unloading_are_limited_to_the_admin_uids() {
    let stranger = uid() + 4242;
    let d = Logged::start(&format!("[log]\nlevel = \"info\"\nsocket.admin_uids = [{stranger}]"), &[]);
    let c = d.client();
    let r = c.post("/v1/models/color/load", "application/json", b"").unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json().unwrap()["error"]["kind"], "forbidden");
    let red = std::fs::read(repo("examples/red.jpg")).unwrap();
    assert_eq!(c.post("/v1/models/color/infer", "image/jpeg", &red).unwrap().status, 200, "jobs are not admin");
    let log = d.stop();
    assert!(log.contains("refused: not in socket.admin_uids") && log.contains(&format!("uid={}", uid())), "{log}");

    let d = Logged::start(&format!("[log]\nlevel = \"info\"\nsocket.admin_uids = [{}, {stranger}]", uid()), &[]);
    assert_eq!(d.client().post("/v1/models/color/load", "application/json", b"").unwrap().status, 200);
    let log = d.stop();
    assert!(log.lines().any(|l| l.contains("admin request") && l.contains("path=/v1/models/color/load")), "{log}");
}

#[test]
fn tcp_needs_a_bearer_token_and_a_token_is_not_an_admin() {
    let out = inferd_env(&["check"], &[("INFERD_SOCKET__TCP", "127.0.0.1:18999")]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("socket.tcp needs a bearer token"), "{:?}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    let token = "f3b1c9a4d27e4e0b9c1d2e3f4a5b6c7d";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let port = free_port();
    let d = Logged::start(
        &format!(
            "socket.tcp = \"127.0.0.1:{port}\"\nsocket.tcp_token_file = \"{}\"\nsocket.admin_uids = [{}]",
            token_file.display(),
            uid()
        ),
        &[],
    );
    let (status, body) = tcp_request(port, "GET", "/v1/models/color", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
    assert_eq!(tcp_request(port, "GET", "/v1/models/color", Some("f3b1c9a4d27e4e0b9c1d2e3f4a5b6c7X")).0, 401);
    assert_eq!(tcp_request(port, "GET", "/v1/models/color", Some(token)).0, 200);
    assert_eq!(tcp_request(port, "POST", "/v1/models/color/load", Some(token)).0, 403, "admin stays local");
    assert_eq!(d.client().post("/v1/models/color/load", "application/json", b"").unwrap().status, 200);
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs_or_the_status() {
    let broker = Broker::start_tls();
    let tls = broker.tls.as_ref().unwrap();
    let password = std::fs::read_to_string(&tls.password_file).unwrap().trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let port = free_port();
    let extra = format!(
        "[log]\nlevel = \"trace\"\n[mqtt]\nurl = \"mqtts://localhost:{}\"\nnode_id = \"secretive\"\nca_file = \"{}\"\n\
         client_cert = \"{}\"\nclient_key = \"{}\"\nusername = \"{}\"\npassword_file = \"{}\"\n\
         socket.tcp = \"127.0.0.1:{port}\"\nsocket.tcp_token_file = \"{}\"",
        tls.port,
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display(),
        tls.username,
        tls.password_file.display(),
        token_file.display()
    );
    let d = Logged::start(&extra, &[]);
    let mut watcher = TestClient::connect(&broker, "secret-watcher").await;
    watcher.subscribe("inferd/secretive/status").await;
    let status = loop {
        let r = watcher.recv_on("inferd/secretive/status", Duration::from_secs(30)).await;
        if r.json()["online"] == true {
            break String::from_utf8(r.payload).unwrap();
        }
    };
    assert_eq!(tcp_request(port, "GET", "/v1/health", Some(token)).0, 200);
    let wrong = "wrong-token-that-must-not-be-echoed";
    let (status_code, refusal) = tcp_request(port, "GET", "/v1/health", Some(wrong));
    assert_eq!(status_code, 401);
    let models = inferd_env(&["models"], &[("INFERD_MQTT__PASSWORD_FILE", tls.password_file.to_str().unwrap())]);
    let log = d.stop();
    assert!(log.contains("TRACE") || log.contains("DEBUG"), "the log is verbose: {log}");
    for secret in [password.as_str(), token, wrong] {
        assert!(!log.contains(secret), "{secret:?} in the log");
        assert!(!status.contains(secret), "{secret:?} in the MQTT status");
        assert!(!refusal.contains(secret), "{secret:?} in a refusal");
        assert!(
            !text(&models).0.contains(secret) && !text(&models).1.contains(secret),
            "{secret:?} in `inferd models`"
        );
    }
}

/// A registry with the color model at the path `file` gives for the registry's folder.
fn registry_with_file(file: impl Fn(&Path) -> PathBuf) -> TempRegistry {
    let reg = TempRegistry::new(&serde_json::json!({"version": 1, "models": []}));
    let mut color = shipped_model("color");
    color["variants"] = serde_json::json!([{
        "name": "default", "file": file(reg.dir.path()), "sha256": sha256_of(&repo("models/color/color.onnx"))
    }]);
    color.as_object_mut().unwrap().remove("labels");
    std::fs::write(reg.path(), serde_json::json!({"version": 1, "models": [color]}).to_string()).unwrap();
    reg
}

#[test]
fn model_paths_stay_inside_the_folder_of_models_json_unless_allowed() {
    let absolute = |_: &Path| repo("models/color/color.onnx");
    // Up and out of the registry's folder, to the same file.
    let climbing = |dir: &Path| {
        let ups = dir.components().count() - 1;
        PathBuf::from("../".repeat(ups)).join(repo("models/color/color.onnx").strip_prefix("/").unwrap())
    };
    for reg in [registry_with_file(absolute), registry_with_file(climbing)] {
        let out = inferd_env(&["check", "--models", &reg.path_str()], &[("INFERD_MODELS_OUTSIDE", "false")]);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(3), "{err}");
        assert!(
            err.contains("models[0].variants[0].file") && err.contains("outside the folder of models.json"),
            "{err}"
        );
        assert!(err.contains("models_outside = true"), "{err}");
        let allowed = inferd_env(&["check", "--models", &reg.path_str()], &[("INFERD_MODELS_OUTSIDE", "true")]);
        assert!(allowed.status.success(), "allowed when configured: {:?}", text(&allowed));
    }
    let inside = registry_with_file(|_| PathBuf::from("models/color/color.onnx"));
    let out = inferd_env(&["check", "--models", &inside.path_str()], &[("INFERD_MODELS_OUTSIDE", "false")]);
    assert!(out.status.success(), "{:?}", text(&out));
}
