//! Chaos: MQTT jobs at QoS 1 while the broker is restarted twice and the
//! daemon is SIGKILLed twice and restarted, with socket clients asking all
//! along. Every job must be answered (none lost); duplicates (a job answered,
//! then redelivered because the kill came before its acknowledgement) are
//! counted and reported. Socket clients get answers or clean connection
//! errors, never a hang.
//!
//! `CHAOS_JOBS` sets the number of jobs (default 1000); `CHAOS_NO_ID=1` sends
//! raw images without an id (told apart by their MQTT 5 correlation data);
//! `scripts/chaos.sh` runs it larger and prints the report. A duplicate whose
//! payload differs from the first answer (its timings) was computed twice; one
//! that is the same bytes is a stored answer published again.

mod util;

use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use util::broker::{Broker, TestClient};
use util::*;

const NODE: &str = "chaos";

struct Inferd {
    config: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl Inferd {
    fn start(&mut self) {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["--config", self.config.to_str().unwrap(), "serve"])
            .env_remove("ORT_DYLIB_PATH")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL: no drain, no goodbye
            c.wait().unwrap();
        }
    }
}

impl Drop for Inferd {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_online(client: &mut TestClient) {
    let topic = format!("inferd/{NODE}/status");
    loop {
        let r = client.recv_on(&topic, Duration::from_secs(60)).await;
        if r.json()["online"] == true {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_mqtt_job_is_lost_through_broker_restarts_and_daemon_kills() {
    let jobs: usize = std::env::var("CHAOS_JOBS").ok().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let registry = test_registry();
    let socket = dir.path().join("inferd.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "models = \"{}\"\nmodels_outside = true\n[socket]\npath = \"{}\"\n[memory]\nstate_dir = \"{}\"\n\
             [mqtt]\nurl = \"{}\"\nnode_id = \"{NODE}\"\nreconnect_max_s = 1\n",
            registry.path().display(),
            socket.display(),
            dir.path().join("state").display(),
            broker.url()
        ),
    )
    .unwrap();
    let mut inferd = Inferd { config, child: None };
    inferd.start();

    // Socket clients all along: each request is answered or refused at once.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused, slowest_ms) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let socket_client = {
        let (stop, ok, refused, slowest_ms, socket) =
            (stop.clone(), ok.clone(), refused.clone(), slowest_ms.clone(), socket.clone());
        let red = std::fs::read(repo("examples/red.jpg")).unwrap();
        std::thread::spawn(move || {
            let client = inferd::client::Client::new(&socket).with_timeout(Duration::from_secs(20));
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                match client.post("/v1/models/color/infer", "image/jpeg", &red) {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => refused.fetch_add(1, Ordering::SeqCst),
                };
                slowest_ms.fetch_max(t.elapsed().as_millis() as usize, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut device = TestClient::connect(&broker, "chaos-device").await;
    device.subscribe(&format!("inferd/{NODE}/status")).await;
    device.subscribe("replies/chaos").await;
    wait_online(&mut device).await;

    let red = std::fs::read(repo("examples/red.jpg")).unwrap();
    use base64::Engine as _;
    let image = base64::engine::general_purpose::STANDARD.encode(red);
    let no_id = std::env::var_os("CHAOS_NO_ID").is_some();
    let mut answered: HashMap<String, usize> = HashMap::new();
    let mut payloads: HashMap<String, std::collections::HashSet<Vec<u8>>> = HashMap::new();
    let key = |r: &util::broker::Received| match &r.correlation {
        Some(c) => String::from_utf8_lossy(c).into_owned(),
        None => r.json()["id"].as_str().unwrap().to_string(),
    };
    let started = Instant::now();
    let rounds = 10;
    for round in 0..rounds {
        for i in (round * jobs / rounds)..((round + 1) * jobs / rounds) {
            if no_id {
                let raw = std::fs::read(repo("examples/red.jpg")).unwrap();
                device
                    .publish_v5(&format!("inferd/{NODE}/jobs/color"), raw, "replies/chaos", format!("c-{i}").as_bytes())
                    .await;
            } else {
                let job = json!({"id": format!("c-{i}"), "image_base64": image, "reply_to": "replies/chaos"});
                device.publish(&format!("inferd/{NODE}/jobs/color"), job.to_string()).await;
            }
        }
        // A job is sent once the broker has it (PUBACK): wait for that, not for answers,
        // then strike while this round's jobs are in flight: some taken, some answered, some queued.
        let sent = (round + 1) * jobs / rounds;
        let wait = Instant::now();
        while device.acked.load(Ordering::SeqCst) < sent {
            assert!(
                wait.elapsed() < Duration::from_secs(30),
                "the broker took {} of {sent} jobs",
                device.acked.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while let Ok(r) = device.rx.try_recv() {
            if r.topic == "replies/chaos" {
                payloads.entry(key(&r)).or_default().insert(r.payload.clone());
                *answered.entry(key(&r)).or_default() += 1;
            }
        }
        match round {
            2 | 6 => broker.restart(),
            4 | 8 => {
                inferd.kill();
                // Between kill and restart a socket client is refused at once.
                let t = Instant::now();
                let r = inferd::client::Client::new(&socket).with_timeout(Duration::from_secs(20)).get("/v1/health");
                assert!(r.is_err(), "a killed daemon answered: {r:?}");
                assert!(t.elapsed() < Duration::from_secs(1), "refusal took {:?}", t.elapsed());
                inferd.start();
            }
            _ => {}
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while answered.len() < jobs && Instant::now() < deadline {
        if let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(1), device.rx.recv()).await
            && r.topic == "replies/chaos"
        {
            let v = r.json();
            assert!(v["result"]["classes"].is_array(), "every answer is a result: {v}");
            payloads.entry(key(&r)).or_default().insert(r.payload.clone());
            *answered.entry(key(&r)).or_default() += 1;
        }
    }
    stop.store(true, Ordering::SeqCst);
    socket_client.join().unwrap();
    let duplicates: usize = answered.values().map(|n| n - 1).sum();
    let computed_twice: usize = payloads.values().map(|p| p.len() - 1).sum();
    let lost = jobs - answered.len();
    eprintln!(
        "chaos report ({}): {jobs} jobs sent, {} answered, {lost} lost, {duplicates} duplicates \
         ({computed_twice} computed twice), in {:.1} s; socket: {} answered, {} refused, slowest {} ms",
        if no_id { "raw images, no id" } else { "envelopes with ids" },
        answered.len(),
        started.elapsed().as_secs_f64(),
        ok.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
        slowest_ms.load(Ordering::SeqCst)
    );
    if lost > 0 {
        let dump = std::env::temp_dir().join("chaos-broker.log");
        std::fs::write(&dump, broker.log()).unwrap();
        eprintln!("broker log in {} (verbose with TEST_BROKER_LOG=1)", dump.display());
    }
    assert_eq!(
        lost,
        0,
        "lost jobs: {:?}",
        (0..jobs).map(|i| format!("c-{i}")).filter(|id| !answered.contains_key(id)).take(10).collect::<Vec<_>>()
    );
    assert!(ok.load(Ordering::SeqCst) > 0, "the socket answered between the strikes");
    assert!(slowest_ms.load(Ordering::SeqCst) < 10_000, "a socket request hung instead of failing fast");
    broker.stop();
}
