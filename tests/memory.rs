//! The memory-aware model manager with the real daemon: the variant that
//! fits the budget is chosen, and a model is downgraded (and upgraded again)
//! under memory pressure while jobs stream, with every job answered.

mod util;

use inferd::manager::{Manager, Shield};
use inferd::memory::{FakeProbe, MemoryProbe};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use util::*;

fn mlp_body() -> Vec<u8> {
    std::fs::read(repo("tests/fixtures/mlp-input.json")).unwrap()
}

/// Starts `inferd serve` (the real binary) with `env`, runs one mlp job
/// through its socket and returns the variant that answered.
fn variant_chosen_by_the_binary(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("inferd.sock");
    let state = dir.path().join("state");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
        .arg("serve")
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env("INFERD_SOCKET__PATH", &socket)
        .env("INFERD_MEMORY__STATE_DIR", &state)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    inferd::intake::unix::wait_for(&socket, Duration::from_secs(20)).unwrap();
    let client = inferd::client::Client::new(&socket).with_timeout(Duration::from_secs(30));
    let r = client.post("/v1/models/mlp/infer", "application/json", &mlp_body()).unwrap();
    let v: Value = r.json().unwrap();
    let info: Value = client.get("/v1/models/mlp").unwrap().json().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    assert_eq!(r.status, 200, "{v}");
    assert_eq!(info["variant"], v["variant"], "{info}");
    v["variant"].as_str().unwrap().to_string()
}

#[test]
fn the_budget_decides_the_variant() {
    // mlp: 'large' is estimated at 48 MiB, 'small' at 12 MiB (models.json).
    let small = [("INFERD_MEMORY__BUDGET_MB", "40"), ("INFERD_MEMORY__HEADROOM_MB", "8")];
    assert_eq!(variant_chosen_by_the_binary(&small), "small");
    let large = [("INFERD_MEMORY__BUDGET_MB", "400"), ("INFERD_MEMORY__HEADROOM_MB", "8")];
    assert_eq!(variant_chosen_by_the_binary(&large), "large");
}

#[test]
fn a_model_that_fits_nowhere_is_refused_with_the_numbers() {
    let daemon = Daemon::start(|c| {
        c.memory.budget_mb = Some(4);
        c.memory.headroom_mb = 0;
    });
    let r = daemon.client().post("/v1/models/mlp/infer", "application/json", &mlp_body()).unwrap();
    assert_eq!(r.status, 503);
    let msg = r.json().unwrap()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("no variant fits in 4 MiB") && msg.contains("'small' needs 12 MiB (estimated)"), "{msg}");
}

#[test]
fn memory_pressure_downgrades_and_upgrades_without_losing_a_job() {
    let probe = Arc::new(FakeProbe::new_mib(4096));
    let p = probe.clone();
    let daemon = Daemon::start_with_probe(p, |c| {
        c.memory.probe_interval_ms = 100;
        c.memory.low_watermark_mb = 128;
        c.memory.high_watermark_mb = 512;
        c.memory.min_residency_s = 0;
    });
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let c = daemon.client();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut variants = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let r = c.post("/v1/models/mlp/infer", "application/json", &mlp_body()).unwrap();
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    variants.push(r.json().unwrap()["variant"].as_str().unwrap().to_string());
                }
                variants
            })
        })
        .collect();
    let c = daemon.client();
    let wait_for_variant = |want: &str| {
        let start = Instant::now();
        loop {
            let info: Value = c.get("/v1/models/mlp").unwrap().json().unwrap();
            if info["state"] == "loaded" && info["variant"] == want {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "never became {want}: {info}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_variant("large");
    probe.set_mib(64); // memory shrinks under load
    wait_for_variant("small");
    std::thread::sleep(Duration::from_millis(300));
    probe.set_mib(4096); // and comes back
    wait_for_variant("large");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for s in streams {
        all.extend(s.join().unwrap()); // every job answered 200, asserted in the streams
    }
    assert!(all.iter().any(|v| v == "small") && all.iter().any(|v| v == "large"), "jobs ran on both variants");
    let text = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(text.contains("inferd_model_events_total{model=\"mlp\",event=\"downgrade\"}"), "{text}");
    assert!(text.contains("inferd_model_events_total{model=\"mlp\",event=\"upgrade\"}"), "{text}");
}

#[test]
fn a_load_that_does_not_fit_evicts_the_least_recently_used_unpinned_model() {
    let mut registry = shipped_registry();
    for m in registry["models"].as_array_mut().unwrap() {
        let mb = match m["name"].as_str().unwrap() {
            "color" => 20,
            "tinycnn" => 15,
            "mixed" => 20,
            _ => 500,
        };
        for v in m["variants"].as_array_mut().unwrap() {
            v["memory_mb"] = json!(mb);
        }
    }
    registry["models"][1]["pin"] = json!(true); // tinycnn
    let reg = TempRegistry::new(&registry);
    let registry = Arc::new(inferd::registry::Registry::load(&reg.path()).unwrap());
    let cfg = inferd::config::MemoryConfig {
        budget_mb: Some(40),
        headroom_mb: 0,
        state_dir: Some(reg.file("state")),
        ..Default::default()
    };
    let manager = Manager::new(cfg, Arc::new(FakeProbe::new_mib(1 << 20)), registry.clone()).with_shield(Shield::NONE);
    let spec = |n: &str| registry.get(n).unwrap().clone();
    let load = |n: &str, mib: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (plan, charge) = manager.reserve_load(&spec(n), None, deadline, &mut |v| panic!("{v} evicted")).unwrap();
        let _ = manager.record_load(&charge, &spec(n), &plan.variant, Some(mib << 20), Duration::from_millis(5));
        charge
    };
    let plan = manager.plan_load(&spec("color"), None).unwrap();
    assert!(plan.evict.is_empty());
    let _color = load("color", 20);
    std::thread::sleep(Duration::from_millis(20));
    let _tinycnn = load("tinycnn", 15);
    assert_eq!(manager.room().unwrap(), 5 << 20);
    let plan = manager.plan_load(&spec("mixed"), None).unwrap();
    assert_eq!(plan.evict, vec!["color".to_string()], "the LRU unpinned model makes room; tinycnn is pinned");
    manager.touch("color");
    let plan = manager.plan_load(&spec("mixed"), None).unwrap();
    assert_eq!(plan.evict, vec!["color".to_string()], "pinned models are never evicted, however idle");
    let err = manager.plan_load(&spec("mlp"), None).unwrap_err();
    assert!(err.message.contains("no variant fits"), "{err}");
    assert!(FakeProbe::new_mib(3).describe().contains("3 MiB"));
}

#[test]
fn preloaded_models_load_at_start_and_idle_ones_unload_after_their_keep_alive() {
    let daemon = Daemon::start(|c| {
        c.memory.preload = vec!["tinycnn".into()];
        c.memory.keep_alive_s = Some(1);
        c.memory.probe_interval_ms = 100;
    });
    let c = daemon.client();
    let state = |model: &str| -> Value { c.get(&format!("/v1/models/{model}")).unwrap().json().unwrap() };
    let wait = |model: &str, want: &str| {
        let start = Instant::now();
        while state(model)["state"] != want {
            assert!(start.elapsed() < Duration::from_secs(10), "{model} never became {want}: {}", state(model));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("tinycnn", "loaded"); // preloaded, no job needed
    let r = c.post("/v1/models/mlp/infer", "application/json", &mlp_body()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(state("mlp")["state"], "loaded");
    wait("mlp", "unloaded"); // idle for longer than keep_alive_s
    wait("tinycnn", "unloaded");
    let text = String::from_utf8(c.get("/metrics").unwrap().body).unwrap();
    assert!(text.contains("inferd_model_events_total{model=\"mlp\",event=\"unload_idle\"} 1"), "{text}");
    let r = c.post("/v1/models/mlp/infer", "application/json", &mlp_body()).unwrap();
    assert_eq!(r.status, 200, "an unloaded model loads again on its next job");
}
