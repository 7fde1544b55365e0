//! Fleet rollouts with the real parts: mosquitto, Debian's `docker-registry`
//! (artifacts pushed with the `oras` SDK) and several `inferd serve`
//! processes with their own node ids, on one box. Documents are signed with
//! `inferd fleet keygen` / `inferd fleet sign`, as an operator would.

mod util;

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use util::broker::{Broker, TestClient};
use util::oci::{OciRegistry, color_artifact};
use util::*;

const WAIT: Duration = Duration::from_secs(120);

/// An operator's signing key (`inferd fleet keygen`), and the line boxes trust.
struct Keys {
    dir: tempfile::TempDir,
    public: String,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let out = inferd(&["fleet", "keygen", name, "--dir", dir.path().to_str().unwrap()]);
        assert!(out.status.success(), "{:?}", text(&out));
        let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Keys { dir, public }
    }

    /// `doc` signed with `inferd fleet sign`.
    fn sign(&self, name: &str, doc: &Value) -> Vec<u8> {
        let file = self.dir.path().join("doc.json");
        std::fs::write(&file, serde_json::to_vec(doc).unwrap()).unwrap();
        let key = self.dir.path().join(format!("{name}.key"));
        let out = inferd(&["fleet", "sign", "--key", key.to_str().unwrap(), file.to_str().unwrap()]);
        assert!(out.status.success(), "{:?}", text(&out));
        out.stdout
    }
}

/// A daemon with node id `node` in `groups`, taking desired state from `broker`.
fn node(broker: &Broker, node: &str, groups: &[&str], keys: &Keys, extra: &str) -> Process {
    let registry = TempRegistry::new(&json!({"models": []}));
    Process::start_with(
        registry,
        "",
        "",
        &format!(
            "[mqtt]\nurl = \"{}\"\nnode_id = \"{node}\"\n[fleet]\nenabled = true\ngroups = {}\ntrusted_keys = [\"{}\"]\n{extra}",
            broker.url(),
            serde_json::to_string(groups).unwrap(),
            keys.public
        ),
    )
}

/// Reports seen, by node, and waiting for one that satisfies a check.
struct Watch {
    client: TestClient,
    seen: HashMap<String, Value>,
}

impl Watch {
    async fn new(broker: &Broker) -> Watch {
        let client = TestClient::connect(broker, "fleet-watch").await;
        client.subscribe("inferd/+/reported").await;
        Watch { client, seen: HashMap::new() }
    }

    async fn until(&mut self, node: &str, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(v) = self.seen.get(node).filter(|v| ok(v)) {
                return v.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{node}: not {what}; last report: {:#}",
                self.seen.get(node).unwrap_or(&Value::Null)
            );
            if let Ok(Some(m)) = tokio::time::timeout(left, self.client.rx.recv()).await
                && let Some(n) = m.topic.strip_prefix("inferd/").and_then(|t| t.strip_suffix("/reported"))
            {
                self.seen.insert(n.to_string(), m.json());
            }
        }
    }

    async fn applied(&mut self, node: &str, generation: u64) -> Value {
        self.until(node, &format!("applied generation {generation}"), |r| {
            r["state"] == "applied" && r["generation"] == generation
        })
        .await
    }

    async fn rolled_back(&mut self, node: &str, generation: u64, stage: &str) -> Value {
        let r = self
            .until(node, &format!("rolled back from generation {generation}"), |r| {
                r["state"] == "rolled_back" && r["error"]["generation"] == generation
            })
            .await;
        assert_eq!(r["error"]["stage"], stage, "{r:#}");
        r
    }
}

/// Publishes `payload` retained on `topic`.
async fn publish(client: &TestClient, topic: &str, payload: Vec<u8>) {
    client.client.publish(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, true, payload).await.unwrap();
}

fn model(source: String, digest: &str, smoke: bool) -> Value {
    let mut m = json!({"source": source, "digest": digest});
    if smoke {
        m["smoke"] = json!({"file": "red.jpg", "expect": {"result": {"classes": [{"label": "red"}, {}, {}]}}, "tolerance": 0.01});
    }
    m
}

/// What `model` answers for the red picture on `p`'s socket: the top label, or the error's kind.
fn answer(p: &Process, model: &str) -> String {
    let r = p.client().post(&format!("/v1/models/{model}/infer"), "image/jpeg", &red()).unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    match r.status {
        200 => v["result"]["classes"][0]["label"].as_str().unwrap_or("?").to_string(),
        _ => v["error"]["kind"].as_str().unwrap_or("?").to_string(),
    }
}

fn red() -> Vec<u8> {
    std::fs::read(repo("examples/red.jpg")).unwrap()
}

/// The colour classifier with a golden picture, and a broken build of it (its labels in the wrong order).
fn artifacts() -> (tempfile::TempDir, tempfile::TempDir) {
    let good = color_artifact(&[("red.jpg", &red())], |_| {});
    let broken = color_artifact(&[("red.jpg", &red())], |_| {});
    std::fs::write(broken.path().join("labels.txt"), "blue\ngreen\nred\n").unwrap();
    (good, broken)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_reaches_the_canary_group_then_the_fleet_and_bad_generations_roll_back_on_every_box() {
    let reg = OciRegistry::start(None);
    let broker = Broker::start();
    let keys = Keys::new("ops");
    let (good, broken) = artifacts();
    let good_digest = reg.push("models/color:1", good.path(), None);
    let broken_digest = reg.push("models/color:2", broken.path(), None);
    let host = reg.host();
    let boxes = [
        node(&broker, "n1", &["canary"], &keys, ""),
        node(&broker, "n2", &[], &keys, ""),
        node(&broker, "n3", &[], &keys, ""),
    ];
    let names = ["n1", "n2", "n3"];
    let mut watch = Watch::new(&broker).await;
    let operator = TestClient::connect(&broker, "operator").await;
    for n in names {
        watch.until(n, "idle", |r| r["state"] == "idle" && r["generation"] == 0).await;
    }

    // 1. The canary group first: only n1 takes it, and serves the model once it passed its smoke test.
    let v1 = model(format!("oci://{host}/models/color:1"), &good_digest, true);
    let canary = json!({"generation": 1, "target": "group/canary", "models": {"color": v1}});
    publish(&operator, "inferd/groups/canary/desired", keys.sign("ops", &canary)).await;
    let r = watch.applied("n1", 1).await;
    assert_eq!(r["models"]["color"]["digest"], good_digest.as_str(), "{r:#}");
    assert_eq!(answer(&boxes[0], "color"), "red");
    for (p, n) in boxes.iter().zip(names).skip(1) {
        assert_eq!(watch.seen[n]["generation"], 0);
        assert_eq!(answer(p, "color"), "unknown_model", "{n} is not in the canary group");
    }

    // 2. Then the fleet: every box; the canary layer is emptied, so the fleet's set is every box's again.
    let fleet = json!({"generation": 2, "target": "fleet", "models": {"color": v1}});
    publish(&operator, "inferd/fleet/desired", keys.sign("ops", &fleet)).await;
    let done = json!({"generation": 2, "target": "group/canary", "models": {}});
    publish(&operator, "inferd/groups/canary/desired", keys.sign("ops", &done)).await;
    for (p, n) in boxes.iter().zip(names) {
        watch.applied(n, 2).await;
        assert_eq!(answer(p, "color"), "red", "{n}");
    }
    let status = inferd_env(&["fleet", "status", "--json", "--wait", "1.5"], &[("INFERD_MQTT__URL", &broker.url())]);
    let table: Value = serde_json::from_slice(&status.stdout).unwrap_or(Value::Null);
    assert_eq!(table.as_object().map(|t| t.len()), Some(3), "{:?}", text(&status));

    // 3. A tag whose artifact is not the digest the document names: refused before anything changes.
    let wrong = json!({"generation": 3, "target": "fleet",
        "models": {"color": model(format!("oci://{host}/models/color:2"), &good_digest, true)}});
    publish(&operator, "inferd/fleet/desired", keys.sign("ops", &wrong)).await;
    for (p, n) in boxes.iter().zip(names) {
        let r = watch.rolled_back(n, 3, "digest").await;
        assert!(r["error"]["message"].as_str().unwrap().contains(&broken_digest), "{r:#}");
        assert_eq!(r["generation"], 2);
        assert_eq!(answer(p, "color"), "red", "{n} still serves generation 2");
    }

    // 4. A build that answers wrong fails its smoke test on every box; generation 2 keeps serving.
    let bad = json!({"generation": 4, "target": "fleet",
        "models": {"color": model(format!("oci://{host}/models/color@{broken_digest}"), &broken_digest, true)}});
    publish(&operator, "inferd/fleet/desired", keys.sign("ops", &bad)).await;
    for (p, n) in boxes.iter().zip(names) {
        let r = watch.rolled_back(n, 4, "smoke_test").await;
        assert!(r["error"]["message"].as_str().unwrap().contains("label"), "{r:#}");
        assert_eq!((r["generation"].clone(), r["desired_generation"].clone()), (json!(2), json!(4)));
        assert_eq!(answer(p, "color"), "red", "{n}");
    }
    let status = inferd_env(&["fleet", "status", "--wait", "1.5"], &[("INFERD_MQTT__URL", &broker.url())]);
    let (table, _) = text(&status);
    assert!(table.starts_with("NODE") && table.lines().count() == 4, "{table}");
    assert!(table.lines().skip(1).all(|l| l.contains("rolled_back") && l.contains("smoke_test")), "{table}");
    assert!(table.lines().skip(1).all(|l| l.split_whitespace().nth(1) == Some("yes")), "every box online: {table}");

    // 5. A forged document (another key under the trusted name) is refused and reported; nothing changes.
    let forger = Keys::new("ops");
    let forged = json!({"generation": 9, "target": "fleet", "models": {}});
    publish(&operator, "inferd/fleet/desired", forger.sign("ops", &forged)).await;
    for (p, n) in boxes.iter().zip(names) {
        let r = watch.until(n, "refusing the forged document", |r| r["refused"]["kind"] == "bad_signature").await;
        assert_eq!((r["generation"].clone(), r["desired_generation"].clone()), (json!(2), json!(4)), "{r:#}");
        assert_eq!(answer(p, "color"), "red");
    }

    // 6. Bad input on a node's own topic: each gets its typed reason; nothing changes.
    let cases: [(Vec<u8>, &str, &str); 5] = [
        (b"{not json".to_vec(), "malformed", "not JSON"),
        (
            keys.sign("ops", &json!({"generation": 5, "target": "node/n1", "models": {}, "rollout": "now"})),
            "malformed",
            "rollout",
        ),
        (
            serde_json::to_vec(&json!({"generation": 5, "target": "node/n1", "models": {}})).unwrap(),
            "unsigned",
            "not signed",
        ),
        (keys.sign("ops", &json!({"generation": 5, "target": "node/n2", "models": {}})), "wrong_target", "arrived on"),
        (vec![b' '; 300 << 10], "too_large", "allowed"),
    ];
    for (payload, kind, says) in cases {
        publish(&operator, "inferd/n1/desired", payload).await;
        let r = watch
            .until("n1", kind, |r| {
                r["refused"]["kind"] == kind && r["refused"]["message"].as_str().is_some_and(|m| m.contains(says))
            })
            .await;
        assert_eq!(r["refused"]["topic"], "inferd/n1/desired", "{r:#}");
        assert_eq!(r["generation"], 2);
    }
    // An artifact whose file would leave the model's folder.
    let evil = tempfile::tempdir().unwrap();
    std::fs::write(evil.path().join("x"), b"x").unwrap();
    let evil_digest = reg.push_raw(
        "models/evil:1",
        &[("model.json", &good.path().join("model.json")), ("../x", &evil.path().join("x"))],
    );
    let escape = json!({"generation": 5, "target": "node/n2",
        "models": {"color": model(format!("oci://{host}/models/evil@{evil_digest}"), &evil_digest, false)}});
    publish(&operator, "inferd/n2/desired", keys.sign("ops", &escape)).await;
    let r = watch.rolled_back("n2", 5, "pull").await;
    assert!(r["error"]["message"].as_str().unwrap().contains("plain file name"), "{r:#}");
    assert!(!boxes[1].registry.path().parent().unwrap().join("x").exists());
    assert_eq!(answer(&boxes[1], "color"), "red");

    // 7. A node's own document takes the model away on that box only (null over the fleet's entry).
    let off = json!({"generation": 6, "target": "node/n3", "models": {"color": null}});
    publish(&operator, "inferd/n3/desired", keys.sign("ops", &off)).await;
    let r = watch.applied("n3", 6).await;
    assert!(r["models"].as_object().unwrap().is_empty(), "{r:#}");
    assert_eq!(answer(&boxes[2], "color"), "unknown_model");
    assert_eq!(answer(&boxes[0], "color"), "red");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_killed_mid_download_serves_its_last_good_set_and_resumes_through_a_broker_restart() {
    let reg = OciRegistry::start(None);
    let mut broker = Broker::start();
    let keys = Keys::new("ops");
    let (good, _) = artifacts();
    let good_digest = reg.push("models/color:1", good.path(), None);
    let blob = noise(4 << 20);
    let big = color_artifact(&[("red.jpg", &red()), ("weights.bin", &blob)], |_| {});
    let big_digest = reg.push("models/big:1", big.path(), None);
    let host = reg.host();
    // At 1 MiB/s the 4 MiB file takes 4 s on each box.
    let slow = "[pull]\nmax_kib_s = 1024\n";
    let mut boxes = [node(&broker, "n1", &[], &keys, slow), node(&broker, "n2", &[], &keys, slow)];
    let mut watch = Watch::new(&broker).await;
    let operator = TestClient::connect(&broker, "operator").await;
    let v1 = model(format!("oci://{host}/models/color:1"), &good_digest, true);
    publish(
        &operator,
        "inferd/fleet/desired",
        keys.sign("ops", &json!({"generation": 1, "target": "fleet", "models": {"color": v1}})),
    )
    .await;
    for n in ["n1", "n2"] {
        watch.applied(n, 1).await;
    }

    // Generation 2 adds a big model; n1 is killed mid-download and the broker restarts mid-rollout.
    let two = json!({"generation": 2, "target": "fleet",
        "models": {"color": v1, "big": model(format!("oci://{host}/models/big@{big_digest}"), &big_digest, true)}});
    publish(&operator, "inferd/fleet/desired", keys.sign("ops", &two)).await;
    let part = boxes[0].registry.path().parent().unwrap().join("models.d/.pull/big/weights.bin.part");
    let end = Instant::now() + WAIT;
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(Instant::now() < end, "n1 should be downloading: {}", boxes[0].log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    boxes[0].kill();
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept < blob.len() as u64);
    broker.restart();
    boxes[0].launch();
    // Back up on its last good set at once, while generation 2 resumes.
    assert_eq!(answer(&boxes[0], "color"), "red");
    assert_eq!(answer(&boxes[0], "big"), "unknown_model");
    for n in ["n1", "n2"] {
        let r = watch.applied(n, 2).await;
        assert_eq!(r["models"]["big"]["digest"], big_digest.as_str(), "{r:#}");
    }
    for p in &boxes {
        assert_eq!(answer(p, "big"), "red");
    }
    // n1 fetched only what the killed download had not.
    let log = boxes[0].log();
    let fetched: u64 = log
        .lines()
        .rev()
        .filter(|l| l.contains("staged") && l.contains("big"))
        .find_map(|l| l.split("fetched=").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no staged line: {log}"));
    assert!(fetched <= blob.len() as u64 - kept + (64 << 10), "{fetched} bytes fetched after {kept} were kept");
    assert!(
        std::fs::read(boxes[0].registry.path().parent().unwrap().join("models.d/big/weights.bin")).unwrap() == blob
    );

    // Generation 3 changes the colour model while n2 is answering jobs for it: none is dropped.
    let rebuilt = color_artifact(&[("red.jpg", &red()), ("NOTES", b"rebuilt")], |_| {});
    let rebuilt_digest = reg.push("models/color:3", rebuilt.path(), None);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = boxes[1].client();
    let jobs = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = client.post("/v1/models/color/infer", "image/jpeg", &red()).unwrap();
                let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                answers.push((r.status, v["result"]["classes"][0]["label"].as_str().unwrap_or("").to_string()));
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let three = json!({"generation": 3, "target": "fleet", "models": {
        "color": model(format!("oci://{host}/models/color:3"), &rebuilt_digest, true),
        "big": model(format!("oci://{host}/models/big@{big_digest}"), &big_digest, true)}});
    publish(&operator, "inferd/fleet/desired", keys.sign("ops", &three)).await;
    let r = watch.applied("n2", 3).await;
    assert_eq!(r["models"]["color"]["digest"], rebuilt_digest.as_str(), "{r:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let answers = jobs.join().unwrap();
    assert!(answers.len() > 5, "{} jobs", answers.len());
    assert!(answers.iter().all(|(status, label)| *status == 200 && label == "red"), "{answers:?}");

    // A newer document takes over a pull under way: n2 is told to add a model
    // that takes 8 s to download, then, a second in, not to.
    let slow = noise(8 << 20);
    let huge = color_artifact(&[("red.jpg", &red()), ("weights.bin", &slow)], |_| {});
    let huge_digest = reg.push("models/huge:1", huge.path(), None);
    let add = json!({"generation": 4, "target": "node/n2",
        "models": {"huge": model(format!("oci://{host}/models/huge@{huge_digest}"), &huge_digest, false)}});
    publish(&operator, "inferd/n2/desired", keys.sign("ops", &add)).await;
    watch.until("n2", "pulling huge", |r| r["models"]["huge"]["state"] == "pulling").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    let drop_it = json!({"generation": 5, "target": "node/n2", "models": {}});
    publish(&operator, "inferd/n2/desired", keys.sign("ops", &drop_it)).await;
    let r = watch.applied("n2", 5).await;
    assert!(t.elapsed() < Duration::from_secs(5), "the newer document waited for the pull: {:?}", t.elapsed());
    assert!(r["models"].get("huge").is_none(), "{r:#}");
    assert_eq!(answer(&boxes[1], "huge"), "unknown_model");
    assert!(boxes[1].log().contains("left before its swap"), "{}", boxes[1].log());
}

#[test]
fn the_documented_schema_takes_what_the_box_takes_and_refuses_what_it_refuses() {
    let schema: Value =
        serde_json::from_slice(&std::fs::read(repo("docs/fleet-desired.schema.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let keys = Keys::new("ops");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let good = [
        json!({"generation": 1, "target": "group/canary", "models": {"color": model("oci://r.example:5000/models/color:1".into(), &digest, true)}}),
        json!({"generation": 2, "target": "fleet", "models": {"color": {"source": format!("oci://r.example/m@{digest}"), "preload": true, "pin": true}}}),
        json!({"generation": 3, "target": "node/cam-1", "models": {"color": null, "embed": {"source": format!("oci://r.example/e@{digest}"),
            "smoke": {"input": {"text": "hello"}, "expect": {"result": {}}}}}}),
    ];
    for doc in &good {
        let signed: Value = serde_json::from_slice(&keys.sign("ops", doc)).unwrap();
        assert!(validator.is_valid(&signed), "{signed:#}");
    }
    let bad = [
        json!({"generation": 1, "target": "everyone"}),
        json!({"generation": 1, "target": "fleet", "models": {"color": {"source": "oci://r.example/m:1"}}}),
        json!({"generation": 1, "target": "fleet", "extra": true}),
        json!({"generation": 1, "target": "fleet", "models": {"../x": null}}),
        json!({"generation": 1, "target": "fleet", "models": {"c": {"source": format!("oci://r.example/m@{digest}"),
            "smoke": {"file": "../etc/passwd", "expect": {}}}}}),
    ];
    for doc in &bad {
        assert!(!validator.is_valid(doc), "the schema takes {doc:#}");
    }
}
