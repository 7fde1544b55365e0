//! The HTTP/JSON API on a real Unix socket, with the daemon started
//! in-process by `inferd::run` and real models on ONNX Runtime.

mod util;

use base64::Engine as _;
use inferd::client::Response;
use serde_json::{Value, json};
use std::io::Write;
use std::time::{Duration, Instant};
use util::*;

fn image(name: &str) -> Vec<u8> {
    std::fs::read(repo(&format!("examples/{name}.jpg"))).unwrap()
}

fn json_of(r: &Response) -> Value {
    r.json().unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

#[track_caller]
fn assert_error(r: &Response, status: u16, kind: &str, message: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(r);
    assert_eq!(v["error"]["kind"], kind, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains(message), "{v}");
}

#[test]
fn health_ready_models_and_metrics_answer() {
    let daemon = Daemon::start(|_| {});
    let c = daemon.client();
    let r = c.get("/v1/health").unwrap();
    assert_eq!((r.status, json_of(&r)["status"].clone()), (200, json!("ok")));
    let r = c.get("/v1/ready").unwrap();
    assert_eq!((r.status, json_of(&r)["ready"].clone()), (200, json!(true)));

    let models = json_of(&c.get("/v1/models").unwrap());
    let names: Vec<&str> = models["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["color", "tinycnn", "mlp", "mixed", "minilm", "ocr", "receipt", "smollm2", "busy", "reshape", "broken"]
    );
    let mlp = json_of(&c.get("/v1/models/mlp").unwrap());
    assert_eq!(mlp["state"], "unloaded");
    assert_eq!(mlp["loaded"], false);
    assert_eq!(mlp["variant"], "large");
    assert_eq!(mlp["backend"], "ort");
    assert_eq!(mlp["variants"].as_array().unwrap().len(), 2);

    assert_error(&c.get("/v1/models/nope").unwrap(), 404, "unknown_model", "no model named 'nope'");
    assert_error(&c.get("/v2/whatever").unwrap(), 404, "not_found", "no such endpoint");
    assert_error(&c.request("DELETE", "/v1/models", None, &[]).unwrap(), 405, "not_found", "method not allowed");

    let r = c.get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.content_type.as_deref().unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("# TYPE inferd_jobs_total counter"), "{text}");
    assert!(text.contains("inferd_model_loaded{model=\"color\"} 0"), "{text}");
    daemon.finish().unwrap();
}

#[test]
fn infer_takes_images_base64_and_tensors_and_reports_where_it_ran() {
    let daemon = Daemon::start(|_| {});
    let c = daemon.client();
    let r = c.post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = json_of(&r);
    assert_eq!(v["result"]["classes"][0]["label"], "red");
    assert_eq!((v["model"].clone(), v["variant"].clone()), (json!("color"), json!("fp32")));
    assert_eq!((v["backend"].clone(), v["provider"].clone()), (json!("ort"), json!("CPUExecutionProvider")));
    for t in ["queue_ms", "pre_ms", "infer_ms", "post_ms"] {
        assert!(v["timings"][t].as_f64().unwrap() >= 0.0, "{t} in {v}");
    }

    let b64 = base64::engine::general_purpose::STANDARD.encode(image("green"));
    let body = json!({"image_base64": b64, "top_k": 2}).to_string();
    let v = json_of(&c.post("/v1/models/color/infer", "application/json", body.as_bytes()).unwrap());
    assert_eq!(v["result"]["classes"][0]["label"], "green");
    assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 2);

    let v = json_of(&c.post("/v1/models/color/infer?top_k=1", "image/jpeg", &image("blue")).unwrap());
    assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 1);
    assert_eq!(v["result"]["classes"][0]["label"], "blue");

    let body = std::fs::read(repo("tests/fixtures/mlp-input.json")).unwrap();
    let v = json_of(&c.post("/v1/models/mlp/infer", "application/json", &body).unwrap());
    assert_eq!(v["result"]["outputs"]["y"]["shape"], json!([1, 4]));
    assert_eq!(v["variant"], "large");

    let r = c.post("/v1/models/minilm/infer", "text/plain; charset=utf-8", "A man is eating food.".as_bytes()).unwrap();
    let v = json_of(&r);
    assert_eq!(
        (v["result"]["dimensions"].clone(), v["result"]["embeddings"].as_array().unwrap().len()),
        (json!(384), 1)
    );
    let body = json!({"text": ["one", "two"]}).to_string();
    let v = json_of(&c.post("/v1/models/minilm/infer", "application/json", body.as_bytes()).unwrap());
    assert_eq!(v["result"]["embeddings"].as_array().unwrap().len(), 2);
    assert_error(&c.post("/v1/models/minilm/infer", "text/plain", b"").unwrap(), 400, "bad_input", "empty");

    let color = json_of(&c.get("/v1/models/color").unwrap());
    assert_eq!(color["state"], "loaded");
    assert_eq!(color["provider"], "CPUExecutionProvider");
    assert!(color["memory_bytes"].is_u64(), "{color}");
    let text = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(text.contains("inferd_jobs_total{model=\"color\",outcome=\"ok\"} 3"), "{text}");
    assert!(text.contains("inferd_job_duration_seconds_count{model=\"color\"} 3"), "{text}");
    assert!(text.contains("inferd_model_loaded{model=\"color\"} 1"), "{text}");
    assert!(text.contains("inferd_model_memory_bytes{model=\"color\"}"), "{text}");
}

#[test]
fn load_and_unload_change_the_model_state() {
    let daemon = Daemon::start(|_| {});
    let c = daemon.client();
    let v = json_of(&c.post("/v1/models/tinycnn/load", "application/json", b"").unwrap());
    assert_eq!((v["state"].clone(), v["loaded"].clone()), (json!("loaded"), json!(true)));
    let v = json_of(&c.post("/v1/models/tinycnn/unload", "application/json", b"").unwrap());
    assert_eq!(v["state"], "unloaded");
    assert_error(
        &c.post("/v1/models/broken/load", "application/json", b"").unwrap(),
        503,
        "model_unavailable",
        "sha256 mismatch",
    );
    let v = json_of(&c.get("/v1/models/broken").unwrap());
    assert_eq!(v["state"], "failed");
    assert!(v["error"]["message"].as_str().unwrap().contains("sha256 mismatch"));
    assert_error(&c.post("/v1/models/nope/load", "application/json", b"").unwrap(), 404, "unknown_model", "nope");
}

#[test]
fn every_error_has_its_status_and_one_json_shape() {
    let daemon = Daemon::start(|c| {
        c.socket.max_body_mb = 1;
        c.jobs.timeout_ms = 300;
        c.jobs.drain_timeout_ms = 1000;
    });
    let c = daemon.client();
    let truncated = std::fs::read(repo("tests/fixtures/truncated.jpg")).unwrap();
    assert_error(
        &c.post("/v1/models/color/infer", "image/jpeg", &truncated).unwrap(),
        400,
        "bad_input",
        "truncated JPEG",
    );
    assert_error(
        &c.post("/v1/models/color/infer", "application/json", b"{nope").unwrap(),
        400,
        "bad_input",
        "invalid JSON",
    );
    assert_error(
        &c.post("/v1/models/mlp/infer", "image/png", b"").unwrap(),
        400,
        "bad_input",
        "raw task takes named tensors",
    );
    assert_error(
        &c.post("/v1/models/color/infer?top_k=x", "image/jpeg", &image("red")).unwrap(),
        400,
        "bad_input",
        "query",
    );
    assert_error(&c.post("/v1/models/nope/infer", "image/jpeg", &image("red")).unwrap(), 404, "unknown_model", "nope");
    let big = vec![0u8; 2 << 20];
    assert_error(&c.post("/v1/models/color/infer", "image/jpeg", &big).unwrap(), 413, "payload_too_large", "1 MiB");
    let chunked = chunked_request(&daemon.socket, "/v1/models/color/infer", &big);
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(chunked.contains("payload_too_large"), "{chunked}");
    assert_error(
        &c.post("/v1/models/broken/infer", "image/jpeg", &image("red")).unwrap(),
        503,
        "model_unavailable",
        "sha256",
    );
    let bad_shape = json!({"inputs": {"x": {"shape": [5], "dtype": "f32", "data": [1, 2, 3, 4, 5]}}}).to_string();
    assert_error(
        &c.post("/v1/models/reshape/infer", "application/json", bad_shape.as_bytes()).unwrap(),
        500,
        "backend",
        "",
    );
    let ok_shape = json!({"inputs": {"x": {"shape": [4], "dtype": "f32", "data": [1, 2, 3, 4]}}}).to_string();
    assert_eq!(c.post("/v1/models/reshape/infer", "application/json", ok_shape.as_bytes()).unwrap().status, 200);

    let iterations = busy_iterations_for(&c, Duration::from_millis(3000));
    let r = c.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap();
    assert_error(&r, 504, "timeout", "within 300 ms");

    let text = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    for kind in ["bad_input", "unknown_model", "payload_too_large", "model_unavailable", "backend", "timeout"] {
        assert!(!text.contains(&format!("inferd_errors_total{{kind=\"{kind}\"}} 0")), "{kind} not counted:\n{text}");
    }
}

/// Sends `body` with chunked transfer encoding (no Content-Length) and returns the raw answer.
fn chunked_request(socket: &std::path::Path, path: &str, body: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    for chunk in body.chunks(64 * 1024) {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).is_err() || s.write_all(chunk).is_err() {
            break; // the server may answer and close before the whole body is sent
        }
        let _ = s.write_all(b"\r\n");
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn sixty_four_concurrent_clients_are_all_answered_correctly() {
    let daemon = Daemon::start(|_| {});
    let colors = ["red", "green", "blue"];
    let threads: Vec<_> = (0..64)
        .map(|i| {
            let c = daemon.client();
            let color = colors[i % 3];
            std::thread::spawn(move || {
                let r = c.post("/v1/models/color/infer", "image/jpeg", &image(color)).unwrap();
                (color, r)
            })
        })
        .collect();
    for t in threads {
        let (color, r) = t.join().unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(json_of(&r)["result"]["classes"][0]["label"], color);
    }
}

#[test]
fn a_full_queue_answers_429_at_once_while_the_daemon_stays_healthy() {
    let daemon = Daemon::start(|c| c.jobs.queue_capacity = 2);
    let c = daemon.client();
    let iterations = busy_iterations_for(&c, Duration::from_millis(1500));
    let running: Vec<_> = (0..3)
        .map(|i| {
            let c = daemon.client();
            let t = std::thread::spawn(move || {
                c.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap()
            });
            if i == 0 {
                std::thread::sleep(Duration::from_millis(300)); // the first is now running, the next two wait
            }
            t
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let r = c.post("/v1/models/busy/infer", "application/json", &busy_body(10)).unwrap();
    assert_error(&r, 429, "overloaded", "queue of model 'busy' is full");
    assert!(start.elapsed() < Duration::from_millis(500), "429 took {:?}", start.elapsed());
    assert_eq!(json_of(&c.get("/v1/models/busy").unwrap())["queue_depth"], 2);
    assert_eq!(c.get("/v1/health").unwrap().status, 200);
    let other = c.post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap();
    assert_eq!(other.status, 200, "other models keep serving");
    for t in running {
        assert_eq!(t.join().unwrap().status, 200, "admitted jobs are not lost");
    }
    let text = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(text.contains("inferd_jobs_total{model=\"busy\",outcome=\"overloaded\"} 1"), "{text}");
}

#[test]
fn a_client_that_disconnects_mid_upload_does_not_disturb_others() {
    let daemon = Daemon::start(|_| {});
    for _ in 0..3 {
        let mut s = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        s.write_all(b"POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n")
            .unwrap();
        s.write_all(&image("red")[..500]).unwrap();
        drop(s);
    }
    let c = daemon.client();
    let r = c.post("/v1/models/color/infer", "image/jpeg", &image("green")).unwrap();
    assert_eq!(json_of(&r)["result"]["classes"][0]["label"], "green");
    assert_eq!(c.get("/v1/health").unwrap().status, 200);
}

#[test]
fn shutdown_drains_in_flight_jobs_and_removes_the_socket() {
    let mut daemon = Daemon::start(|_| {});
    let c = daemon.client();
    let iterations = busy_iterations_for(&c, Duration::from_millis(1500));
    let in_flight = std::thread::spawn(move || {
        c.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    daemon.signal_stop();
    std::thread::sleep(Duration::from_millis(200));
    assert!(!daemon.socket.exists(), "the socket file goes at once, so new clients fail fast");
    assert!(std::os::unix::net::UnixStream::connect(&daemon.socket).is_err());
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "the in-flight job finished: {}", String::from_utf8_lossy(&r.body));
    daemon.finish().unwrap();
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_daemon_is_not() {
    let registry = test_registry();
    let socket = registry.file("inferd.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap()); // leaves a stale socket file
    assert!(socket.exists());
    let daemon = Daemon::start(|c| {
        c.models = Some(registry.path());
        c.socket.path = Some(socket.clone());
    });
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    assert_eq!(daemon.client().get("/v1/health").unwrap().status, 200);

    let mut config =
        inferd::config::Config { models: Some(registry.path()), models_outside: true, ..Default::default() };
    config.socket.path = Some(socket.clone());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let err = rt.block_on(inferd::run(config, std::future::pending())).unwrap_err();
    assert!(err.to_string().contains("another inferd is already listening"), "{err}");
    assert_eq!(daemon.client().get("/v1/health").unwrap().status, 200, "the live daemon is untouched");
}

#[test]
fn the_cli_talks_to_the_daemon_over_its_socket() {
    let daemon = Daemon::start(|_| {});
    let socket = daemon.socket.to_str().unwrap().to_string();
    let out = inferd(&["infer", "--socket", &socket, "-m", "color", "examples/red.jpg", "examples/blue.jpg"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("examples/red.jpg: red") && stdout.contains("examples/blue.jpg: blue"), "{stdout}");
    assert!(stdout.contains("on ort/CPUExecutionProvider"), "{stdout}");

    let out = inferd(&["infer", "--socket", &socket, "-m", "mlp", "--json", "tests/fixtures/mlp-input.json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"]["outputs"]["y"]["shape"], json!([1, 4]));

    let out = inferd(&["infer", "--socket", &socket, "-m", "color", "tests/fixtures/bomb.png"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(text(&out).1.contains("over the decoder limits"));
    let out = inferd(&["infer", "--socket", &socket, "-m", "nope", "examples/red.jpg"]);
    assert_eq!(out.status.code(), Some(5));

    daemon.finish().unwrap();
    let out = inferd(&["infer", "--socket", &socket, "-m", "color", "examples/red.jpg"]);
    assert_eq!(out.status.code(), Some(8));
    assert!(text(&out).1.contains("is `inferd serve` running?"), "{}", text(&out).1);
}

#[test]
fn a_tcp_listener_serves_the_same_api_when_configured() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef\n").unwrap();
    let _daemon = Daemon::start(|c| {
        c.socket.tcp = Some(format!("127.0.0.1:{port}"));
        c.socket.tcp_token_file = Some(token);
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer 0123456789abcdef0123456789abcdef\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200") && out.contains("\"status\":\"ok\""), "{out}");
}

/// Jobs for a model with `batch` arrive together and run as one engine call;
/// each still gets its own answer, and a job the batch cannot take fails alone.
#[test]
fn concurrent_jobs_are_batched_and_answered_each_with_its_own_result() {
    let mut color = shipped_model("color");
    color["batch"] = json!({"max_batch": 8, "max_delay_us": 100000});
    let mut mlp = shipped_model("mlp");
    mlp["batch"] = json!({"max_batch": 4, "max_delay_us": 20000});
    let registry = TempRegistry::new(&json!({"models": [color, mlp]}));
    let daemon = Daemon::start(|c| c.models = Some(registry.path()));
    let names = ["red", "green", "blue", "red", "green", "blue", "red", "green"];
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .iter()
            .map(|&name| {
                let c = daemon.client();
                s.spawn(move || json_of(&c.post("/v1/models/color/infer", "image/jpeg", &image(name)).unwrap()))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (name, v) in names.iter().zip(&answers) {
        assert_eq!(v["result"]["classes"][0]["label"], *name, "each job gets its own answer: {v}");
    }
    let biggest = answers.iter().filter_map(|v| v["batch"].as_u64()).max().unwrap_or(1);
    assert!(biggest >= 2, "8 concurrent jobs with a 100 ms window ran one by one: {answers:?}");

    // A job whose tensor does not fit the others: it fails alone, the rest of its batch answers.
    let good = std::fs::read(repo("tests/fixtures/mlp-input.json")).unwrap();
    let bad =
        json!({"inputs": {"x": {"shape": [1, 17], "dtype": "f32", "data": vec![0.5; 17]}}}).to_string().into_bytes();
    let bodies = [good.clone(), bad, good.clone(), good];
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let c = daemon.client();
                s.spawn(move || c.post("/v1/models/mlp/infer", "application/json", b).unwrap().status)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200, 400, 200, 200]);
}

/// `inferd bench` drives the daemon and reports what it measured (no timing asserted).
#[test]
fn bench_drives_the_socket_and_runs_in_process() {
    let daemon = Daemon::start(|_| {});
    let socket = daemon.socket.to_str().unwrap().to_string();
    for args in [
        vec![
            "bench",
            "--model",
            "color",
            "--socket",
            &socket,
            "--clients",
            "3",
            "--duration",
            "0.5",
            "--json",
            "examples/red.jpg",
        ],
        vec!["bench", "--model", "color", "--via", "local", "--duration", "0.5", "--json", "examples/red.jpg"],
    ] {
        let out = inferd(&args);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let r: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(r["jobs"].as_u64().unwrap() > 0 && r["errors"] == 0, "{r}");
        assert!(r["p50_ms"].as_f64().unwrap() > 0.0 && r["p99_ms"].as_f64() >= r["p50_ms"].as_f64(), "{r}");
        assert!(r["engine_p50_ms"].as_f64().is_some(), "the engine's own time is reported: {r}");
    }
    let out = inferd(&["bench", "--model", "nope", "--socket", &socket, "--duration", "0.2", "examples/red.jpg"]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("no model named 'nope'"), "{}", text(&out).1);
}

#[test]
fn a_model_with_two_instances_runs_two_jobs_side_by_side() {
    let fixture = repo("tests/fixtures/models/busy.onnx");
    let pool = TempRegistry::new(&json!({"version": 1, "models": [{
        "name": "busy", "task": "raw", "instances": 2,
        "variants": [{"name": "default", "file": fixture, "sha256": sha256_of(&fixture)}]
    }]}));
    let daemon = Daemon::start(|c| c.models = Some(pool.path()));
    let c = daemon.client();
    let iterations = busy_iterations_for(&c, Duration::from_millis(1500));
    let info = json_of(&c.get("/v1/models/busy").unwrap());
    assert_eq!(info["instances"], 2, "{info}");
    let answers: Vec<Value> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..2)
            .map(|_| {
                let c = daemon.client();
                s.spawn(move || {
                    json_of(&c.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap())
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    // One instance would make the second job wait out the first's whole run.
    for a in &answers {
        let (queue, infer) = (a["timings"]["queue_ms"].as_f64().unwrap(), a["timings"]["infer_ms"].as_f64().unwrap());
        assert!(queue < infer / 2.0, "a job waited {queue} ms behind a {infer} ms run: {answers:?}");
    }
    assert_eq!(c.post("/v1/models/busy/unload", "application/json", b"").unwrap().status, 200);
    assert_eq!(json_of(&c.get("/v1/models/busy").unwrap())["state"], "unloaded");
    daemon.finish().unwrap();
}
