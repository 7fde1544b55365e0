//! Hard limits through the socket, as a hostile client would try them: each
//! kind of oversized input gets its typed error, the daemon keeps serving,
//! and its resident memory stays bounded while it refuses them.

mod util;

use base64::Engine as _;
use serde_json::{Value, json};
use std::time::Duration;
use util::*;

fn json_of(r: &inferd::client::Response) -> Value {
    r.json().unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

#[track_caller]
fn refused(r: &inferd::client::Response, status: u16, kind: &str, words: &str) {
    let v = json_of(r);
    assert_eq!((r.status, v["error"]["kind"].as_str().unwrap_or("")), (status, kind), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(words), "{message:?} lacks {words:?}");
}

/// A JPEG whose header claims `w`×`h` (the scan is a small image's).
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
        .encode_image(&image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10])))
        .unwrap();
    let sof = jpeg.windows(2).position(|m| m == [0xFF, 0xC0]).expect("a baseline JPEG has SOF0");
    jpeg[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    jpeg
}

fn tensor(shape: Value, data: Value) -> Vec<u8> {
    json!({"inputs": {"x": {"shape": shape, "dtype": "f32", "data": data}}}).to_string().into_bytes()
}

fn rss_mib() -> f64 {
    inferd::memory::process_rss_bytes().unwrap() as f64 / (1 << 20) as f64
}

#[test]
fn every_limit_answers_its_typed_error_and_memory_stays_bounded() {
    let daemon = Daemon::start(|c| {
        c.socket.max_body_mb = 4;
        c.limits.max_image_pixels = 4_000_000;
    });
    let c = daemon.client();
    let red = std::fs::read(repo("examples/red.jpg")).unwrap();
    assert_eq!(c.post("/v1/models/color/infer", "image/jpeg", &red).unwrap().status, 200);
    assert_eq!(c.post("/v1/models/minilm/infer", "text/plain", b"warm up").unwrap().status, 200);
    let baseline = rss_mib();

    let png_bomb = std::fs::read(repo("tests/fixtures/bomb.png")).unwrap();
    let jpeg_bomb = jpeg_claiming(60_000, 60_000);
    let too_big = vec![0u8; 5 << 20];
    let long_text = "word ".repeat(20_000);
    let many_texts = json!({"text": vec!["a"; 1000]}).to_string();
    let b64_bomb = json!({"image_base64": base64::engine::general_purpose::STANDARD.encode(&jpeg_bomb)}).to_string();
    for round in 0..20 {
        refused(&c.post("/v1/models/color/infer", "image/png", &png_bomb).unwrap(), 400, "bad_input", "limit");
        refused(&c.post("/v1/models/color/infer", "image/jpeg", &jpeg_bomb).unwrap(), 400, "bad_input", "pixels");
        refused(
            &c.post("/v1/models/color/infer", "application/json", b64_bomb.as_bytes()).unwrap(),
            400,
            "bad_input",
            "pixels",
        );
        refused(&c.post("/v1/models/color/infer", "image/jpeg", &too_big).unwrap(), 413, "payload_too_large", "4 MiB");
        // Tensors: over the element limit, a shape whose product overflows, negative and empty dims.
        refused(
            &c.post("/v1/models/mlp/infer", "application/json", &tensor(json!([100_000, 1000]), json!([1.0]))).unwrap(),
            400,
            "bad_input",
            "elements",
        );
        refused(
            &c.post(
                "/v1/models/mlp/infer",
                "application/json",
                &tensor(json!([4_611_686_018_427_387_904u64, 8]), json!([1.0])),
            )
            .unwrap(),
            400,
            "bad_input",
            "elements",
        );
        let negative =
            c.post("/v1/models/mlp/infer", "application/json", &tensor(json!([-1, 4]), json!([1.0]))).unwrap();
        assert_eq!(negative.status, 400, "{}", String::from_utf8_lossy(&negative.body));
        refused(
            &c.post("/v1/models/minilm/infer", "text/plain", long_text.as_bytes()).unwrap(),
            400,
            "bad_input",
            "limit",
        );
        refused(
            &c.post("/v1/models/minilm/infer", "application/json", many_texts.as_bytes()).unwrap(),
            400,
            "bad_input",
            "texts",
        );
        if round == 0 {
            assert_eq!(c.get("/v1/health").unwrap().status, 200);
        }
    }
    let after = rss_mib();
    eprintln!("resident memory: {baseline:.1} MiB before, {after:.1} MiB after 20 rounds of oversized inputs");
    assert!(after - baseline < 96.0, "RSS grew from {baseline:.1} to {after:.1} MiB while refusing input");
    // Still serving.
    let v = json_of(&c.post("/v1/models/color/infer", "image/jpeg", &red).unwrap());
    assert_eq!(v["result"]["classes"][0]["label"], "red");
}

#[test]
fn a_job_over_its_time_limit_times_out_and_the_next_one_runs() {
    let daemon = Daemon::start(|c| c.jobs.timeout_ms = 400);
    let c = daemon.client();
    let iterations = busy_iterations_for(&c, Duration::from_millis(1500));
    let r = c.post("/v1/models/busy/infer", "application/json", &busy_body(iterations)).unwrap();
    refused(&r, 504, "timeout", "within 400 ms");
    // The worker finishes the abandoned job (longer than planned when other
    // tests load the box), then the next one runs.
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    let r = loop {
        std::thread::sleep(Duration::from_millis(500));
        let r = c.post("/v1/models/busy/infer", "application/json", &busy_body(10)).unwrap();
        if r.status != 504 || std::time::Instant::now() > give_up {
            break r;
        }
    };
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// Names of this process's threads now (the daemon runs in the test process).
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect()
}

#[test]
fn large_jpegs_are_decoded_on_the_fixed_decode_threads_only() {
    let daemon = Daemon::start(|_| {});
    let mut big = Vec::new();
    // Large enough that the reduced decode's output is past the size where
    // the JPEG decoder goes parallel over the colour components.
    image::codecs::jpeg::JpegEncoder::new(&mut big)
        .encode_image(&image::RgbImage::from_pixel(2400, 1800, image::Rgb([220, 20, 20])))
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                seen.extend(thread_names());
                std::thread::sleep(Duration::from_micros(200));
            }
            seen
        });
        std::thread::scope(|clients| {
            for _ in 0..4 {
                clients.spawn(|| {
                    let c = daemon.client();
                    for _ in 0..8 {
                        let v = json_of(&c.post("/v1/models/color/infer", "image/jpeg", &big).unwrap());
                        assert_eq!(v["result"]["classes"][0]["label"], "red", "{v}");
                    }
                });
            }
        });
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap()
    });
    let cores = std::thread::available_parallelism().unwrap().get();
    let decoders = seen.iter().filter(|n| n.starts_with("inferd-decode")).count();
    assert!((1..=cores).contains(&decoders), "decode threads: {seen:?}");
    let strays: Vec<_> = seen.iter().filter(|n| n.starts_with("worker thread")).collect();
    assert!(strays.is_empty(), "the JPEG decoder started threads of its own: {strays:?}");
}
