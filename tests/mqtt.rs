//! Jobs over MQTT against a real mosquitto broker, with a real MQTT client
//! on the other side and real models on ONNX Runtime.

mod util;

use base64::Engine as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;
use util::broker::{Broker, TestClient};
use util::*;

const WAIT: Duration = Duration::from_secs(30);

fn image(name: &str) -> Vec<u8> {
    std::fs::read(repo(&format!("examples/{name}.jpg"))).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_jobs_are_answered_on_every_reply_route() {
    let broker = Broker::start();
    let _daemon = mqtt_daemon(&broker, "box1", |_| {});
    let mut c = TestClient::connect(&broker, "routes-client").await;
    wait_online(&mut c, "box1").await;
    c.subscribe("inferd/box1/results/+").await;
    c.subscribe("replies/#").await;

    c.publish("inferd/jobs/color", image("red")).await;
    let r = c.recv_on("inferd/box1/results/color", WAIT).await;
    let v = r.json();
    assert_eq!(v["result"]["classes"][0]["label"], "red", "{v}");
    assert_eq!(
        (v["model"].clone(), v["variant"].clone(), v["node"].clone()),
        (json!("color"), json!("fp32"), json!("box1"))
    );
    assert_eq!((v["backend"].clone(), v["provider"].clone()), (json!("ort"), json!("CPUExecutionProvider")));
    assert!(v["timings"]["infer_ms"].as_f64().is_some(), "{v}");

    let envelope = json!({"id": "env-1", "image_base64": b64(&image("green")), "reply_to": "replies/envelope", "params": {"top_k": 1}});
    c.publish("inferd/box1/jobs/color", envelope.to_string()).await;
    let v = c.recv_on("replies/envelope", WAIT).await.json();
    assert_eq!((v["id"].clone(), v["result"]["classes"][0]["label"].clone()), (json!("env-1"), json!("green")));
    assert_eq!(v["result"]["classes"].as_array().unwrap().len(), 1);

    c.publish_v5("inferd/jobs/color", image("blue"), "replies/v5", b"corr-42").await;
    let r = c.recv_on("replies/v5", WAIT).await;
    assert_eq!(r.correlation.as_deref(), Some(&b"corr-42"[..]), "correlation data is echoed");
    assert!(r.user_properties.contains(&("camera".to_string(), "7".to_string())), "user properties are echoed");
    assert_eq!(r.json()["result"]["classes"][0]["label"], "blue");

    c.publish("inferd/jobs/minilm", json!({"id": "t1", "text": ["edge", "cloud"]}).to_string()).await;
    let v = c.recv_on("inferd/box1/results/minilm", WAIT).await.json();
    assert_eq!((v["id"].clone(), v["result"]["embeddings"].as_array().unwrap().len()), (json!("t1"), 2));

    // OCR: a camera publishes the raw PNG; the lines come back as over the socket.
    c.publish("inferd/box1/jobs/ocr", std::fs::read(repo("tests/fixtures/ocr/receipt.png")).unwrap()).await;
    let v = c.recv_on("inferd/box1/results/ocr", WAIT).await.json();
    let lines = v["result"]["lines"].as_array().unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!((texts.len(), texts[0], texts[13]), (16, "FRESH MARKET", "15.83"), "{v}");

    let tensors = std::fs::read_to_string(repo("tests/fixtures/mlp-input.json")).unwrap();
    let mut envelope: Value = serde_json::from_str(&tensors).unwrap();
    envelope["id"] = json!(17);
    c.publish("inferd/jobs/mlp", envelope.to_string()).await;
    let v = c.recv_on("inferd/box1/results/mlp", WAIT).await.json();
    assert_eq!((v["id"].clone(), v["result"]["outputs"]["y"]["shape"].clone()), (json!("17"), json!([1, 4])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_get_error_results_and_the_loop_keeps_serving() {
    let broker = Broker::start();
    let _daemon = mqtt_daemon(&broker, "box2", |c| c.mqtt.max_payload_mb = 1);
    let mut c = TestClient::connect(&broker, "bad-client").await;
    wait_online(&mut c, "box2").await;
    c.subscribe("inferd/box2/results/+").await;
    c.subscribe("replies/#").await;

    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        ("inferd/jobs/color", b"definitely not an image".to_vec(), "inferd/box2/results/color", "bad_input"),
        (
            "inferd/jobs/color",
            std::fs::read(repo("tests/fixtures/truncated.jpg")).unwrap(),
            "inferd/box2/results/color",
            "bad_input",
        ),
        (
            "inferd/jobs/color",
            br#"{"id": "x1", "reply_to": "replies/bad", "colour": "red"}"#.to_vec(),
            "replies/bad",
            "bad_input",
        ),
        ("inferd/jobs/nosuch", image("red"), "inferd/box2/results/nosuch", "unknown_model"),
        ("inferd/jobs/color", vec![0xFF; 1_200_000], "inferd/box2/results/color", "payload_too_large"),
        (
            "inferd/jobs/mlp",
            br#"{"id": "t1", "inputs": {"x": {"shape": [1, 3], "dtype": "f32", "data": [1, 2, 3]}}}"#.to_vec(),
            "inferd/box2/results/mlp",
            "bad_input",
        ),
    ];
    for (topic, payload, reply, kind) in cases {
        c.publish(topic, payload).await;
        let v = c.recv_on(reply, WAIT).await.json();
        assert_eq!(v["error"]["kind"], kind, "{topic}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
    }
    c.publish("inferd/jobs/color", image("red")).await;
    let v = c.recv_on("inferd/box2/results/color", WAIT).await.json();
    assert_eq!(v["result"]["classes"][0]["label"], "red", "still serving: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_online_then_offline() {
    let broker = Broker::start();
    let daemon = mqtt_daemon(&broker, "box3", |_| {});
    let mut c = TestClient::connect(&broker, "status-client").await;
    wait_online(&mut c, "box3").await;
    // A client that subscribes after the daemon published gets the retained status.
    let mut fresh = TestClient::connect(&broker, "status-late-subscriber").await;
    fresh.subscribe("inferd/box3/status").await;
    let r = fresh.recv_on("inferd/box3/status", WAIT).await;
    let v = r.json();
    assert!(r.retain, "status is retained");
    assert_eq!((v["online"].clone(), v["node"].clone()), (json!(true), json!("box3")));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let shipped = shipped_registry()["models"].as_array().unwrap().len();
    assert_eq!(v["models"].as_array().unwrap().len(), shipped + 3, "shipped + busy, reshape, broken");
    daemon.finish().unwrap();
    loop {
        let v = c.recv_on("inferd/box3/status", WAIT).await.json();
        if v["online"] == false {
            break;
        }
    }
    let mut late = TestClient::connect(&broker, "late-client").await;
    late.subscribe("inferd/box3/status").await;
    let r = late.recv_on("inferd/box3/status", WAIT).await;
    assert!(r.retain && r.json()["online"] == false, "a late subscriber sees offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_in_one_group_split_the_jobs_and_answer_each_once() {
    let broker = Broker::start();
    let _a = mqtt_daemon(&broker, "node-a", |_| {});
    let _b = mqtt_daemon(&broker, "node-b", |_| {});
    let mut c = TestClient::connect(&broker, "group-client").await;
    wait_online(&mut c, "node-a").await;
    wait_online(&mut c, "node-b").await;
    c.subscribe("replies/group").await;
    let n = 40;
    for i in 0..n {
        let env = json!({"id": format!("job-{i}"), "image_base64": b64(&image("red")), "reply_to": "replies/group"});
        c.publish("inferd/jobs/color", env.to_string()).await;
    }
    let mut answers: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..n {
        let v = c.recv_on("replies/group", WAIT).await.json();
        assert_eq!(v["result"]["classes"][0]["label"], "red");
        answers.entry(v["id"].as_str().unwrap().to_string()).or_default().push(v["node"].as_str().unwrap().to_string());
    }
    assert_eq!(answers.len(), n, "every job answered");
    assert!(answers.values().all(|nodes| nodes.len() == 1), "none answered twice: {answers:?}");
    let by_a = answers.values().filter(|nodes| nodes[0] == "node-a").count();
    assert!(by_a > 0 && by_a < n, "both daemons took jobs (node-a took {by_a} of {n})");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.recv_on("replies/group", WAIT)).await.is_err(),
        "no extra answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_no_job() {
    let mut broker = Broker::start();
    let _daemon = mqtt_daemon(&broker, "box5", |c| c.mqtt.reconnect_max_s = 1);
    let mut c = TestClient::connect(&broker, "restart-client").await;
    wait_online(&mut c, "box5").await;
    c.subscribe("replies/restart").await;
    let total = 30;
    for i in 0..total {
        if i == 10 || i == 20 {
            broker.restart();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Addressed to the node: the broker queues these in the daemon's
        // session even while the daemon is reconnecting. (Fleet-wide jobs go
        // through a shared subscription, which mosquitto does not queue while
        // no member of the group is connected: the publisher gets PUBACK
        // reason 0x10, "no matching subscribers", and must retry.)
        let env = json!({"id": format!("r-{i}"), "image_base64": b64(&image("blue")), "reply_to": "replies/restart"});
        c.publish("inferd/box5/jobs/color", env.to_string()).await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < total {
        let Ok(r) = tokio::time::timeout(Duration::from_secs(40), c.recv_on("replies/restart", WAIT * 4)).await else {
            let missing: Vec<String> = (0..total).map(|i| format!("r-{i}")).filter(|id| !seen.contains(id)).collect();
            if std::env::var_os("TEST_BROKER_LOG").is_some() {
                std::fs::write("/tmp/broker-restart.log", broker.log()).unwrap();
            }
            panic!("jobs never answered: {missing:?}");
        };
        let v = r.json();
        assert_eq!(v["result"]["classes"][0]["label"], "blue", "{v}");
        seen.insert(v["id"].as_str().unwrap().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_still_works() {
    let broker = Broker::start();
    let _daemon = mqtt_daemon(&broker, "box6", |c| c.mqtt.protocol = "3.1.1".into());
    let mut c = TestClient::connect(&broker, "v311-client").await;
    wait_online(&mut c, "box6").await;
    c.subscribe("inferd/box6/results/+").await;
    c.subscribe("replies/v311").await;
    c.publish("inferd/jobs/color", image("green")).await;
    assert_eq!(c.recv_on("inferd/box6/results/color", WAIT).await.json()["result"]["classes"][0]["label"], "green");
    let env = json!({"id": "v3", "image_base64": b64(&image("red")), "reply_to": "replies/v311"});
    c.publish("inferd/box6/jobs/color", env.to_string()).await;
    assert_eq!(c.recv_on("replies/v311", WAIT).await.json()["id"], "v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_serves_while_the_broker_is_down_and_mqtt_joins_when_it_comes() {
    let mut broker = Broker::start();
    broker.stop();
    let daemon = mqtt_daemon(&broker, "box7", |c| c.mqtt.reconnect_max_s = 1);
    let r = daemon.client().post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap();
    assert_eq!(r.status, 200, "the socket works without a broker");
    broker.restart();
    let mut c = TestClient::connect(&broker, "late-broker-client").await;
    wait_online(&mut c, "box7").await;
    c.subscribe("inferd/box7/results/+").await;
    c.publish("inferd/jobs/color", image("red")).await;
    assert_eq!(c.recv_on("inferd/box7/results/color", WAIT).await.json()["result"]["classes"][0]["label"], "red");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_with_jobs_in_flight_answers_them_all_after_restart() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let registry = test_registry();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "models = \"{}\"\nmodels_outside = true\n[socket]\npath = \"{}\"\n[memory]\nstate_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\nnode_id = \"killed\"\nmax_in_flight = 4\nreconnect_max_s = 1\n",
            registry.path().display(),
            dir.path().join("inferd.sock").display(),
            dir.path().join("state").display(),
            broker.url()
        ),
    )
    .unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_inferd"))
            .args(["--config", config.to_str().unwrap(), "serve"])
            .env_remove("ORT_DYLIB_PATH")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut daemon = spawn();
    let mut c = TestClient::connect(&broker, "kill-client").await;
    wait_online(&mut c, "killed").await;
    c.subscribe("replies/kill").await;
    let busy = |id: &str| {
        json!({"id": id, "reply_to": "replies/kill", "inputs": {
            "iterations": {"shape": [], "dtype": "i64", "data": [60000]},
            "x": {"shape": [1, 128], "dtype": "f32", "data": vec![0.5; 128]},
        }})
        .to_string()
    };
    let total = 12;
    for i in 0..total {
        c.publish("inferd/jobs/busy", busy(&format!("k-{i}"))).await;
    }
    let mut seen = std::collections::HashSet::new();
    let note = |r: &util::broker::Received, seen: &mut std::collections::HashSet<String>| {
        if r.topic == "replies/kill" {
            let v = r.json();
            assert!(v["result"].is_object(), "{v}");
            seen.insert(v["id"].as_str().unwrap().to_string());
        }
    };
    let first = c.recv_on("replies/kill", WAIT).await;
    note(&first, &mut seen);
    daemon.kill().unwrap(); // SIGKILL: no goodbye, jobs in flight and queued
    daemon.wait().unwrap();
    loop {
        let r = c.recv(WAIT).await;
        note(&r, &mut seen);
        if r.topic == "inferd/killed/status" && r.json()["online"] == false {
            break; // the broker published the Last Will
        }
    }
    assert!(seen.len() < total, "the kill came before every job was answered");
    let mut restarted = spawn();
    while seen.len() < total {
        let r = c.recv(Duration::from_secs(60)).await;
        note(&r, &mut seen);
    }
    restarted.kill().unwrap();
    restarted.wait().unwrap();
}

/// A daemon that reaches `broker` over its mutual-TLS listener as `node`, with the password in `password_file`.
fn tls_daemon(
    broker: &Broker,
    node: &str,
    password_file: std::path::PathBuf,
    edit: impl FnOnce(&mut inferd::config::Config),
) -> Daemon {
    let tls = broker.tls.as_ref().unwrap();
    let (url, node) = (format!("mqtts://localhost:{}", tls.port), node.to_string());
    let (ca, cert, key, user) = (tls.ca.clone(), tls.client_cert.clone(), tls.client_key.clone(), tls.username.clone());
    Daemon::start(move |c| {
        c.mqtt.url = Some(url);
        c.mqtt.node_id = Some(node);
        c.mqtt.ca_file = Some(ca);
        c.mqtt.client_cert = Some(cert);
        c.mqtt.client_key = Some(key);
        c.mqtt.username = Some(user);
        c.mqtt.password_file = Some(password_file);
        edit(c);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_password_from_a_file() {
    let broker = Broker::start_tls();
    let password = broker.tls.as_ref().unwrap().password_file.clone();
    let _daemon = tls_daemon(&broker, "secure", password, |_| {});
    let mut c = TestClient::connect(&broker, "tls-test-client").await;
    wait_online(&mut c, "secure").await;
    c.subscribe("inferd/secure/results/+").await;
    c.publish("inferd/jobs/color", image("green")).await;
    assert_eq!(c.recv_on("inferd/secure/results/color", WAIT).await.json()["result"]["classes"][0]["label"], "green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_the_socket_serving_and_never_connects() {
    let broker = Broker::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let daemon = tls_daemon(&broker, "refused", wrong, |c| c.mqtt.reconnect_max_s = 1);
    let mut c = TestClient::connect(&broker, "refused-watcher").await;
    c.subscribe("inferd/refused/status").await;
    assert!(tokio::time::timeout(Duration::from_secs(2), c.recv_on("inferd/refused/status", WAIT)).await.is_err());
    assert_eq!(daemon.client().post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_signed_by_another_ca_is_refused() {
    let broker = Broker::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=another CA"])
        .args(["-keyout", "other.key", "-out", "other.pem"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let password = broker.tls.as_ref().unwrap().password_file.clone();
    let other = dir.path().join("other.pem");
    let daemon = tls_daemon(&broker, "wrong-ca", password, move |c| {
        c.mqtt.ca_file = Some(other);
        c.mqtt.reconnect_max_s = 1;
    });
    let mut c = TestClient::connect(&broker, "wrong-ca-watcher").await;
    c.subscribe("inferd/wrong-ca/status").await;
    assert!(
        tokio::time::timeout(Duration::from_secs(3), c.recv_on("inferd/wrong-ca/status", WAIT)).await.is_err(),
        "inferd connected to a broker its CA did not sign"
    );
    assert_eq!(daemon.client().post("/v1/models/color/infer", "image/jpeg", &image("red")).unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_model_queue_answers_mqtt_jobs_with_overloaded() {
    let broker = Broker::start();
    let _daemon = mqtt_daemon(&broker, "tight", |c| {
        c.jobs.queue_capacity = 1;
        c.mqtt.max_in_flight = 8;
    });
    let mut c = TestClient::connect(&broker, "overload-client").await;
    wait_online(&mut c, "tight").await;
    c.subscribe("replies/tight").await;
    let n = 8;
    for i in 0..n {
        let env = json!({"id": format!("o-{i}"), "reply_to": "replies/tight", "inputs": {
            "iterations": {"shape": [], "dtype": "i64", "data": [100000]},
            "x": {"shape": [1, 128], "dtype": "f32", "data": vec![0.5; 128]},
        }});
        c.publish("inferd/jobs/busy", env.to_string()).await;
    }
    let (mut ok, mut overloaded) = (0, 0);
    for _ in 0..n {
        let v = c.recv_on("replies/tight", Duration::from_secs(60)).await.json();
        if v["result"].is_object() {
            ok += 1;
        } else {
            assert_eq!(v["error"]["kind"], "overloaded", "{v}");
            overloaded += 1;
        }
    }
    assert!(ok >= 1 && overloaded >= 1, "{ok} answered, {overloaded} overloaded");
}
