//! Regression tests for hostile clients at the front door, against the real
//! binary: request bodies that announce themselves and send nothing (or
//! trickle), connection floods over the Unix socket and TCP under a low
//! open-file limit, token-less TCP floods and the log, list settings from the
//! environment, `file://` errors that must not tell what exists, and http(s)
//! images that must not be fetched for a model that refuses them.

mod util;

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use util::*;

fn image(name: &str) -> Vec<u8> {
    std::fs::read(repo(&format!("examples/{name}.jpg"))).unwrap()
}

/// The real `inferd serve` on `models` with `[socket]` keys `socket_extra`,
/// further sections `extra`, environment `env`, and an open-file limit of
/// `nofile` (soft and hard) when given.
fn spawn(models: &Path, socket_extra: &str, extra: &str, env: &[(&str, &str)], nofile: Option<u64>) -> Process {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("inferd.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "models = \"{}\"\nmodels_outside = true\n[socket]\npath = \"{}\"\n{socket_extra}\n\
             [memory]\nstate_dir = \"{}\"\n{extra}\n",
            models.display(),
            socket.display(),
            dir.path().join("state").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("inferd.log")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"));
    cmd.args(["--config", config.to_str().unwrap(), "serve"])
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("RUST_LOG")
        .env_remove("INFERD_LOG__LEVEL")
        .stdout(std::process::Stdio::null())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit { rlim_cur: n as libc::rlim_t, rlim_max: n as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().unwrap();
    let registry = TempRegistry::new(&json!({"models": []}));
    let p = Process { dir, registry, socket: socket.clone(), config, child: Some(child) };
    if inferd::intake::unix::wait_for(&socket, Duration::from_secs(30)).is_err() {
        panic!("the daemon did not come up: {}", p.log());
    }
    p
}

/// The daemon over the test registry (shipped models and test ones).
fn spawn_shipped(socket_extra: &str, extra: &str, nofile: Option<u64>) -> (Process, TempRegistry) {
    let registry = test_registry();
    (spawn(&registry.path(), socket_extra, extra, &[], nofile), registry)
}

/// The median time of `n` color uploads, each checked for 200.
fn usual_upload(client: &inferd::client::Client, n: usize) -> Duration {
    let red = image("red");
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let r = client.post("/v1/models/color/infer", "image/jpeg", &red).unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            started.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

const CHUNKED_HEAD: &[u8] = b"POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n\
Transfer-Encoding: chunked\r\n\r\n";

#[test]
fn stalled_chunked_bodies_hold_no_room_and_a_good_upload_is_answered_in_its_usual_time() {
    let (daemon, _registry) = spawn_shipped("", "", None);
    let client = daemon.client();
    let usual = usual_upload(&client, 9);
    for stalled_count in [48, 500] {
        // Each announces a chunked body (room for 16 MiB, were it reserved up front) and sends nothing.
        let mut stalled: Vec<UnixStream> = (0..stalled_count)
            .map(|_| {
                let mut s = UnixStream::connect(&daemon.socket).unwrap();
                s.write_all(CHUNKED_HEAD).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let red = image("red");
        let mut worst = Duration::ZERO;
        for _ in 0..16 {
            let started = Instant::now();
            let r = client.post("/v1/models/color/infer", "image/jpeg", &red).unwrap();
            assert_eq!(r.status, 200, "with {stalled_count} stalled bodies: {}", String::from_utf8_lossy(&r.body));
            worst = worst.max(started.elapsed());
        }
        eprintln!("{stalled_count} stalled chunked bodies: 16 uploads, worst {worst:?} (usual {usual:?})");
        assert!(worst < usual + Duration::from_millis(500), "an upload took {worst:?} (usual {usual:?})");
        // The stalled bodies are cut at the minimum rate's grace (5 s), not held for body_timeout_s (30 s).
        let started = Instant::now();
        let mut answer = String::new();
        stalled[0].set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = stalled[0].read_to_string(&mut answer);
        let cut_after = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("min_body_rate_kib_s"), "{answer}");
        assert!(cut_after < Duration::from_secs(7), "a stalled body was held {cut_after:?}");
        eprintln!("{stalled_count} stalled bodies: the first cut {cut_after:?} after the uploads");
        stalled.clear();
    }
}

/// Keeps `count` connections open that trickle a byte every 2 s: of their
/// headers (`body` false) or of a 100 kB body; reconnects the ones closed.
fn trickle(socket: PathBuf, count: usize, body: bool, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let request: &[u8] = b"POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n\
Content-Length: 100000\r\n\r\n";
        let open = |conns: &mut usize| {
            let mut s = UnixStream::connect(&socket).ok()?;
            *conns += 1;
            s.write_all(if body { request } else { &request[..1] }).ok()?;
            Some((s, if body { 0 } else { 1 }))
        };
        let mut opened = 0;
        let mut streams: Vec<Option<(UnixStream, usize)>> = (0..count).map(|_| open(&mut opened)).collect();
        while !stop.load(Ordering::SeqCst) {
            for slot in streams.iter_mut() {
                let alive = match slot {
                    Some((s, sent)) => {
                        let byte = if body { b'x' } else { request[*sent % request.len()] };
                        *sent += 1;
                        s.write_all(&[byte]).is_ok()
                    }
                    None => false,
                };
                if !alive {
                    *slot = open(&mut opened);
                }
            }
            for _ in 0..20 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        opened
    })
}

/// New clients are answered at once over `count` trickling connections (over the cap of 512).
fn trickling_connections_do_not_lock_out_new_clients(body: bool) {
    let (daemon, _registry) = spawn_shipped("", "", None);
    let client = daemon.client();
    let usual = usual_upload(&client, 5);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = trickle(daemon.socket.clone(), 600, body, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let red = image("red");
    let (mut worst, mut refused) = (Duration::ZERO, Vec::new());
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let started = Instant::now();
        let r = client.post("/v1/models/color/infer", "image/jpeg", &red).unwrap();
        worst = worst.max(started.elapsed());
        if r.status != 200 {
            refused.push((r.status, String::from_utf8_lossy(&r.body).into_owned()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::SeqCst);
    let opened = flood.join().unwrap();
    let what = if body { "bodies" } else { "headers" };
    eprintln!("600 connections trickling {what} ({opened} opened in all): worst upload {worst:?} (usual {usual:?})");
    assert!(refused.is_empty(), "new clients refused: {refused:?}");
    assert!(worst < usual + Duration::from_secs(1), "an upload took {worst:?}");
}

#[test]
fn connections_trickling_their_headers_do_not_lock_out_new_clients() {
    trickling_connections_do_not_lock_out_new_clients(false);
}

#[test]
fn connections_trickling_their_bodies_do_not_lock_out_new_clients() {
    trickling_connections_do_not_lock_out_new_clients(true);
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A token file (mode 0600) in `dir`.
fn token_file(dir: &Path, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("tcp-token");
    std::fs::write(&file, token).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

#[test]
fn one_connection_cap_over_tcp_and_the_socket_keeps_files_for_a_model_load() {
    const NOFILE: u64 = 256;
    let secrets = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef0123456789abcdef";
    let port = free_port();
    let socket_extra =
        format!("tcp = \"127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\n", token_file(secrets.path(), token).display());
    let (daemon, _registry) = spawn_shipped(&socket_extra, "", Some(NOFILE));
    let log = daemon.log();
    let cap: usize = log
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the cap is logged: {log}"));
    assert!(cap < NOFILE as usize / 2, "cap {cap} under {NOFILE} files");
    let pid = daemon.pid();
    let fds = move || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(fds(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    // 520 idle TCP connections, 520 idle Unix ones, and 100 TCP requests whose chunked body stalls.
    let tcp: Vec<std::net::TcpStream> =
        (0..520).filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok()).collect();
    let unix: Vec<UnixStream> = (0..520).filter_map(|_| UnixStream::connect(&daemon.socket).ok()).collect();
    let head = format!(
        "POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let stalled: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.write_all(head.as_bytes()).ok()?;
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // A model load (several graph files) and real requests, over the flood.
    let client = daemon.client();
    let started = Instant::now();
    let r = client.post("/v1/models/ocr/load", "application/json", b"").unwrap();
    let load_took = started.elapsed();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = client.post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = client.post("/v1/models/minilm/infer", "application/json", br#"{"text": ["edge"]}"#).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let peak = peak.load(Ordering::SeqCst);
    let log = daemon.log();
    eprintln!(
        "open-file limit {NOFILE}, cap {cap}: {} TCP + {} Unix + {} stalled connections, daemon peak {peak} fds; \
         ocr loaded in {load_took:?}",
        tcp.len(),
        unix.len(),
        stalled.len()
    );
    assert!(!log.contains("Too many open files") && !log.contains("os error 24"), "{log}");
    assert!((peak as u64) < NOFILE - 32, "the daemon reached {peak} of {NOFILE} descriptors");
}

/// Reads one HTTP response (status line, headers, `Content-Length` body) from `s`; its status.
fn read_response(s: &mut impl Read) -> u16 {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            panic!("closed mid-response: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn token_less_tcp_requests_are_logged_once_per_interval_not_once_each() {
    let secrets = tempfile::tempdir().unwrap();
    let port = free_port();
    let socket_extra = format!(
        "tcp = \"127.0.0.1:{port}\"\ntcp_token_file = \"{}\"\n",
        token_file(secrets.path(), "0123456789abcdef0123456789abcdef").display()
    );
    let (daemon, _registry) = spawn_shipped(&socket_extra, "", None);
    let before = daemon.log().len();
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        for _ in 0..500 {
            s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            *statuses.entry(read_response(&mut s)).or_insert(0) += 1;
        }
    }
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let log = daemon.log();
    let lines = log[before..].lines().filter(|l| l.contains("no valid bearer token")).count();
    let grown = log.len() - before;
    eprintln!("2,000 token-less requests in {took:?}: {lines} log lines, {grown} bytes of log");
    assert_eq!(statuses.get(&401), Some(&2000), "{statuses:?}");
    assert!(lines <= 2, "{lines} lines: {}", &log[before..]);
    assert!(grown < 2000, "the log grew {grown} bytes");
}

#[test]
fn list_settings_read_comma_separated_from_the_environment() {
    let out = inferd_env(
        &["check"],
        &[
            ("INFERD_LIMITS__IMAGE_DIRS", "/srv/cam,/var/lib/frames"),
            ("INFERD_LIMITS__IMAGE_FETCH__HOSTS", "cams.example.com,.corp.lan"),
        ],
    );
    let (_, stderr) = text(&out);
    assert!(!stderr.contains("expected a sequence"), "{stderr}");
    assert_ne!(out.status.code(), Some(2), "{stderr}");
}

/// The text-generation fixture's registry.
fn tiny_gpt() -> PathBuf {
    repo("tests/fixtures/generate/models.json")
}

fn chat_with(url: &str) -> Vec<u8> {
    json!({"model": "tiny-gpt", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the picture?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]})
    .to_string()
    .into_bytes()
}

fn post_json(daemon: &Process, path: &str, body: &[u8]) -> (u16, Value) {
    let r = daemon.client().post(path, "application/json", body).unwrap();
    (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null))
}

#[test]
fn file_image_errors_are_the_same_whether_or_not_the_path_exists() {
    let dir = tempfile::tempdir().unwrap();
    let (pictures, more) = (dir.path().join("pictures"), dir.path().join("more"));
    std::fs::create_dir_all(&pictures).unwrap();
    std::fs::create_dir_all(&more).unwrap();
    std::fs::write(pictures.join("red.jpg"), image("red")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", pictures.join("escape.jpg")).unwrap();
    // Two directories, given as a comma-separated list in the environment.
    let dirs = format!("{},{}", pictures.display(), more.display());
    let daemon = spawn(&tiny_gpt(), "", "", &[("INFERD_LIMITS__IMAGE_DIRS", dirs.as_str())], None);
    let secret = dir.path().join("secret.jpg");
    std::fs::write(&secret, image("red")).unwrap();
    let mut messages = std::collections::BTreeSet::new();
    for path in [
        secret.display().to_string(),                        // exists, outside
        dir.path().join("absent.jpg").display().to_string(), // does not exist, outside
        "/etc/hostname".to_string(),                         // exists, outside
        "/no/such/dir/x.jpg".to_string(),                    // does not exist anywhere
        format!("{}/../secret.jpg", pictures.display()),     // traversal to one that exists
        pictures.join("escape.jpg").display().to_string(),   // a link inside to a file outside
        pictures.join("absent.jpg").display().to_string(),   // does not exist, inside
        more.display().to_string(),                          // a directory, not a file
    ] {
        let (status, v) = post_json(&daemon, "/v1/chat/completions", &chat_with(&format!("file://{path}")));
        assert_eq!(status, 400, "{path}: {v}");
        let message = v["error"]["message"].as_str().unwrap().replace(&path, "<path>");
        messages.insert(message);
    }
    assert_eq!(messages.len(), 1, "the answers tell paths apart: {messages:#?}");
    // A file inside is read: the text model then says it reads no images.
    let (status, v) = post_json(
        &daemon,
        "/v1/chat/completions",
        &chat_with(&format!("file://{}", pictures.join("red.jpg").display())),
    );
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("reads no images"), "{v}");
}

/// The vision-language fixture's model name.
fn vlm_name() -> String {
    let registry: Value =
        serde_json::from_slice(&std::fs::read(repo("tests/fixtures/vlm/model/models.json")).unwrap()).unwrap();
    registry["models"][0]["name"].as_str().unwrap().to_string()
}

/// A loopback HTTP server that answers every request with `body` and counts them.
fn counting_server(body: Vec<u8>) -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head);
            let _ = stream.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).as_bytes(),
            );
            let _ = stream.write_all(&body);
        }
    });
    (port, hits)
}

#[test]
fn a_text_model_refuses_an_http_image_without_fetching_it() {
    let (port, hits) = counting_server(image("red"));
    // The allow-list from the environment, as a list of one.
    let daemon = spawn(&tiny_gpt(), "", "", &[("INFERD_LIMITS__IMAGE_FETCH__HOSTS", "127.0.0.1")], None);
    let url = format!("http://127.0.0.1:{port}/red.jpg");
    let (status, v) = post_json(&daemon, "/v1/chat/completions", &chat_with(&url));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("reads no images"), "{v}");
    // A bad response_format is refused before a fetch too.
    let mut bad = serde_json::from_slice::<Value>(&chat_with(&url)).unwrap();
    bad["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}});
    let (status, v) = post_json(&daemon, "/v1/chat/completions", bad.to_string().as_bytes());
    assert_eq!(status, 400, "{v}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the image was fetched for a model that refuses it");
    let (status, v) = post_json(&daemon, "/v1/chat/completions", &chat_with("http://127.0.0.1:1/x.jpg"));
    assert_eq!(status, 400, "{v}");
    // For a model that reads images, the allow-list is what refuses (with no host configured here).
    let vlm = spawn(&repo("tests/fixtures/vlm/model/models.json"), "", "", &[], None);
    let name = vlm_name();
    let mut asked = serde_json::from_slice::<Value>(&chat_with("https://example.com/cat.jpg")).unwrap();
    asked["model"] = json!(name);
    let (status, v) = post_json(&vlm, "/v1/chat/completions", asked.to_string().as_bytes());
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("fetched only from the hosts in limits.image_fetch.hosts, and none is configured"), "{v}");
    // The model was never loaded for any of them.
    let r = daemon.client().get("/v1/models/tiny-gpt").unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["state"], "unloaded", "{v}");
}

#[test]
fn a_burst_of_bodies_larger_than_the_room_is_read_oldest_first_and_the_excess_refused_at_once() {
    let (daemon, _registry) = spawn_shipped("max_body_mb = 16\nmax_bodies_mb = 32\n", "", None);
    // 24 bodies of 8 MiB (not images: each is refused once read) into 32 MiB of room.
    let body = Arc::new(vec![0x55u8; 8 << 20]);
    let started = Instant::now();
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let (socket, body) = (daemon.socket.clone(), body.clone());
            std::thread::spawn(move || {
                let mut s = UnixStream::connect(&socket).unwrap();
                let head = format!(
                    "POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).unwrap();
                let _ = s.write_all(&body);
                let mut answer = String::new();
                let _ = s.read_to_string(&mut answer);
                answer.lines().next().unwrap_or("").to_string()
            })
        })
        .collect();
    let statuses: Vec<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let took = started.elapsed();
    let read = statuses.iter().filter(|s| s.starts_with("HTTP/1.1 400")).count();
    let refused = statuses.iter().filter(|s| s.starts_with("HTTP/1.1 429")).count();
    eprintln!("24 x 8 MiB into 32 MiB of room: {read} read whole, {refused} refused (429), all in {took:?}");
    assert_eq!(read + refused, 24, "every client is answered: {statuses:?}");
    assert!(read >= 3, "bodies that fit are read, not all refused: {statuses:?}");
    assert!(took < Duration::from_secs(10), "answered in {took:?}, not after waiting out their timeouts");
    // Room is all given back: a good upload goes through at once.
    let r = daemon.client().post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
