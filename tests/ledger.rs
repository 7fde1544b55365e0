//! The memory ledger with the real binary and real models: clients cycling
//! models that do not all fit under `memory.budget_mb` (with loads that fail
//! among them), then an LLM on top. Every loaded model is charged, the
//! charges stay within the budget, /metrics' room is what they leave, and
//! once everything is unloaded the books are empty.

mod util;

use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use util::*;

const MIB: f64 = 1048576.0;

/// A length from the environment (measurement runs use longer ones), or `default`.
fn scale(var: &str, default: u64) -> u64 {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The loaded models and what each is charged, MiB.
fn charged(c: &inferd::client::Client) -> Vec<(String, f64)> {
    let models: Value = serde_json::from_slice(&c.get("/v1/models").unwrap().body).unwrap();
    models["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["charged_bytes"].as_f64().unwrap_or(0.0) / MIB))
        .collect()
}

/// The room the loaded models keep for their requests' work (the LLM's KV cache), MiB.
fn working_mib(c: &inferd::client::Client) -> f64 {
    let models: Value = serde_json::from_slice(&c.get("/v1/models").unwrap().body).unwrap();
    models["models"].as_array().unwrap().iter().map(|m| m["working_bytes"].as_f64().unwrap_or(0.0) / MIB).sum()
}

fn room_mib(c: &inferd::client::Client) -> f64 {
    let text = String::from_utf8_lossy(&c.get("/metrics").unwrap().body).into_owned();
    text.lines().find_map(|l| l.strip_prefix("inferd_memory_room_bytes ")).unwrap().trim().parse::<f64>().unwrap() / MIB
}

fn events(c: &inferd::client::Client, event: &str) -> f64 {
    let text = String::from_utf8_lossy(&c.get("/metrics").unwrap().body).into_owned();
    text.lines()
        .filter(|l| l.starts_with("inferd_model_events_total") && l.contains(&format!("event=\"{event}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn under_churn_every_loaded_model_is_charged_and_the_charges_stay_within_the_budget() {
    let budget = 700.0;
    let mut daemon = Process::start("", "budget_mb = 700\nheadroom_mb = 16\n", "");
    let c = daemon.client();
    let start = daemon.rss_mib();
    let receipt = std::fs::read(repo("tests/fixtures/ocr/receipt.png")).unwrap();
    let cafe = std::fs::read(repo("tests/fixtures/ocr/cafe.png")).unwrap();
    let red = std::fs::read(repo("examples/red.jpg")).unwrap();
    let text = br#"{"text": ["a camera on the gate", "a sensor in the hall"]}"#.to_vec();
    let jobs: Arc<Vec<(&str, &str, Vec<u8>)>> = Arc::new(vec![
        ("ocr", "image/png", receipt),
        ("minilm", "application/json", text),
        ("color", "image/jpeg", red.clone()),
        ("receipt", "image/png", cafe),
        ("broken", "image/jpeg", red), // its file does not match its sha256: every load fails
    ]);
    let until = Instant::now() + Duration::from_secs(scale("INFERD_LEDGER_CHURN_S", 20));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let (jobs, failures, c) = (jobs.clone(), failures.clone(), daemon.client());
            std::thread::spawn(move || {
                let mut n = i;
                while Instant::now() < until {
                    let (model, kind, body) = &jobs[n % jobs.len()];
                    let r = c.post(&format!("/v1/models/{model}/infer"), kind, body).unwrap();
                    if (r.status == 200) != (*model != "broken") {
                        failures.lock().unwrap().push(format!(
                            "{model}: {} {}",
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        ));
                    }
                    n += 1;
                }
            })
        })
        .collect();
    // Meanwhile: whatever is reported loaded is charged, and the process stays within the budget.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (done, c, pid) = (done.clone(), daemon.client(), daemon.pid());
        std::thread::spawn(move || {
            let (mut peak, mut uncharged) = (0.0f64, Vec::new());
            while !done.load(Ordering::SeqCst) {
                for (model, mib) in charged(&c) {
                    if mib <= 0.0 {
                        uncharged.push(model);
                    }
                }
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let kb: f64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0.0);
                peak = peak.max(kb / 1024.0);
                std::thread::sleep(Duration::from_millis(100));
            }
            (peak, uncharged)
        })
    };
    for t in clients {
        t.join().unwrap();
    }
    // The LLM on top: it needs room the others hold.
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let r = c.post("/v1/chat/completions", "application/json", chat.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    done.store(true, Ordering::SeqCst);
    let (peak, uncharged) = watcher.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    let (loads, evictions) = (events(&c, "load"), events(&c, "evict"));
    let now = charged(&c);
    let total: f64 = now.iter().map(|(_, mib)| mib).sum();
    let room = room_mib(&c);
    let working = working_mib(&c);
    eprintln!(
        "{loads} loads, {evictions} evictions; loaded {now:?} = {total:.0} MiB charged, {working:.0} MiB kept for \
         the LLM's work, room {room:.0} MiB; \
         RSS {start:.0} MiB at start, peak {peak:.0} MiB"
    );
    assert!(failures.is_empty(), "{} failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    assert!(uncharged.is_empty(), "loaded without a charge: {uncharged:?}");
    assert!(now.iter().any(|(m, _)| m == "smollm2"), "{now:?}");
    assert!(now.iter().all(|(_, mib)| *mib > 0.0), "every loaded model is charged: {now:?}");
    assert!(total <= budget, "{total:.0} MiB charged over a {budget} MiB budget: {now:?}");
    assert!(working > 0.0, "the LLM keeps room for its KV cache");
    assert!(total + working <= budget, "{total:.0} + {working:.0} MiB taken over a {budget} MiB budget: {now:?}");
    assert!(
        (room - (budget - total - working)).abs() < 1.0,
        "/metrics shows {room:.0} MiB of room, the charges and the LLM's working room leave {}",
        budget - total - working
    );
    assert!(evictions > 0.0, "models over the budget must evict");
    assert!(peak - start <= budget, "the process grew {:.0} MiB, over the {budget} MiB budget", peak - start);
    // Everything unloaded: the books are empty.
    for (model, _) in &now {
        assert_eq!(c.post(&format!("/v1/models/{model}/unload"), "application/json", b"").unwrap().status, 200);
    }
    assert_eq!((charged(&c), room_mib(&c)), (vec![], budget), "nothing loaded, nothing charged");
    daemon.stop();
}
