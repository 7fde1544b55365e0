//! Hostile generation requests against the real binary (and a real
//! mosquitto): schemas that would recurse the stack or demand gigabytes,
//! prompts read in chunks, and a job that kills the daemon quarantined after
//! its second death (docs/RELIABILITY.md, "Hostile generation requests").

mod util;

use base64::Engine as _;
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use util::broker::{Broker, TestClient};
use util::*;

const WAIT: Duration = Duration::from_secs(30);

/// The tiny random-weight decoder (tests/fixtures/generate), with `edit` applied to its `generation` section.
fn tiny_gpt(edit: impl FnOnce(&mut Value)) -> Value {
    let dir = repo("tests/fixtures/generate");
    let registry: Value = serde_json::from_slice(&std::fs::read(dir.join("models.json")).unwrap()).unwrap();
    let mut model = registry["models"][0].clone();
    model["generation"]["tokenizer"] = json!(dir.join("tokenizer.json"));
    model["variants"][0]["file"] = json!(dir.join(model["variants"][0]["file"].as_str().unwrap()));
    edit(&mut model["generation"]);
    model
}

fn registry(models: Vec<Value>) -> TempRegistry {
    TempRegistry::new(&json!({"version": 1, "models": models}))
}

fn post(client: &inferd::client::Client, path: &str, body: &Value) -> (u16, Value) {
    let r = client.post(path, "application/json", body.to_string().as_bytes()).unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
    (r.status, v)
}

/// A `$ref` chain of `hops` links, each a plain `$ref` or a one-branch `anyOf`.
fn chain(hops: usize, any_of: bool) -> Value {
    let mut defs = serde_json::Map::new();
    for i in 0..hops {
        let next = json!({"$ref": format!("#/$defs/d{}", i + 1)});
        defs.insert(format!("d{i}"), if any_of { json!({"anyOf": [next]}) } else { next });
    }
    defs.insert(format!("d{hops}"), json!({"type": "object"}));
    json!({"$defs": defs, "$ref": "#/$defs/d0"})
}

/// The schemas of the report, each with the words of its refusal.
fn hostile_schemas() -> Vec<(&'static str, Value, &'static str)> {
    let deep =
        (0..5).fold(json!({"type": "integer"}), |inner, _| json!({"type": "array", "minItems": 64, "items": inner}));
    vec![
        ("a $ref chain of 3,000 hops (106 KB)", chain(3000, false), "bytes; at most 65536"),
        ("1,000 nested one-branch anyOfs", chain(1000, true), "hop 17 of a chain; at most 16"),
        (
            "anyOfs nested 40 deep inline",
            (0..40).fold(json!({"type": "object"}), |inner, _| json!({"anyOf": [inner]})),
            "nested over 32 deep",
        ),
        (
            "arrays 5 deep of minItems 64 (461 bytes)",
            json!({"type": "object", "properties": {"a": deep}, "required": ["a"]}),
            "tokens of this model; max_tokens is 8",
        ),
        (
            "a 70 KB const",
            json!({"type": "object", "properties": {"c": {"const": "x".repeat(70_000)}}}),
            "bytes; at most 65536",
        ),
        (
            "a 5 KB property name",
            json!({"type": "object", "properties": {"n".repeat(5000): {"type": "string"}}}),
            "property name of 5002 bytes; at most 4096",
        ),
    ]
}

fn schema_request(schema: &Value) -> Value {
    json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_schemas_are_refused_with_their_limit_over_the_socket_and_mqtt_and_nothing_dies() {
    let broker = Broker::start();
    let mqtt = format!("[mqtt]\nurl = \"{}\"\nnode_id = \"schemas\"\n", broker.url());
    let mut daemon = Process::start_with(registry(vec![tiny_gpt(|_| {})]), "", "", &mqtt);
    let client = daemon.client();
    for (what, schema, words) in hostile_schemas() {
        let t = Instant::now();
        let (status, v) = post(&client, "/v1/completions", &schema_request(&schema));
        assert_eq!(status, 400, "{what}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{what}: {message}");
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: refused in {:?}", t.elapsed());
    }
    // A schema whose values fit: answered, and valid.
    let fits = json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 2, "items": {"type": "integer"}}}, "required": ["a"]});
    let (status, v) = post(&client, "/v1/completions", &schema_request(&fits));
    assert_eq!(status, 200, "{v}");
    let answer: Value = serde_json::from_str(v["choices"][0]["text"].as_str().unwrap()).unwrap();
    assert!(jsonschema::is_valid(&fits, &answer), "{answer}");

    // Over MQTT at QoS 1: each refused on the reply topic and acknowledged (never redelivered), the daemon alive.
    let mut c = TestClient::connect(&broker, "schemas-device").await;
    wait_online(&mut c, "schemas").await;
    c.subscribe("dev/schemas").await;
    for (i, (what, schema, words)) in hostile_schemas().into_iter().enumerate() {
        let mut job = schema_request(&schema);
        job.as_object_mut().unwrap().remove("model");
        job["id"] = json!(format!("s{i}"));
        job["reply_to"] = json!("dev/schemas");
        c.publish("inferd/schemas/jobs/tiny-gpt", job.to_string()).await;
        let m = c.recv_on("dev/schemas", WAIT).await.json();
        assert_eq!(m["id"], format!("s{i}"), "{what}: {m}");
        assert_eq!(m["error"]["kind"], "bad_input", "{what}: {m}");
        assert!(m["error"]["message"].as_str().unwrap().contains(words), "{what}: {m}");
    }
    assert!(daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the daemon is alive: {}", daemon.log());
    let (status, v) = post(&client, "/v1/completions", &json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 3}));
    assert_eq!((status, v["usage"]["completion_tokens"].clone()), (200, json!(3)), "{v}");
}

/// The daemon, run as systemd would (`Restart=always`) until the test says stop.
fn wait_for_exit(daemon: &mut Process, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
            daemon.child = None;
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_kills_the_daemon_twice_is_answered_as_poison_and_never_run_again() {
    // The test hook (debug builds): a job whose payload holds this word aborts the process when it runs.
    // SAFETY: set before any daemon starts, in a test binary whose other tests do not read it.
    unsafe { std::env::set_var("TESTHOOK_INFERD_CRASH_ON", "crash-me-now") };
    let broker = Broker::start();
    let mqtt = format!("[mqtt]\nurl = \"{}\"\nnode_id = \"poison\"\n", broker.url());
    let mut daemon = Process::start("", "", &mqtt);
    let mut c = TestClient::connect(&broker, "poison-device").await;
    wait_online(&mut c, "poison").await;
    c.subscribe("dev/poison").await;
    let image = base64::engine::general_purpose::STANDARD.encode(std::fs::read(repo("examples/red.jpg")).unwrap());
    let poison = json!({"id": "crash-me-now", "image_base64": image, "reply_to": "dev/poison"}).to_string();
    c.publish("inferd/poison/jobs/color", poison).await;
    // First death, and the second when the broker delivers the job again after the restart.
    for death in 1..=2 {
        let status =
            wait_for_exit(&mut daemon, WAIT).unwrap_or_else(|| panic!("death {death} did not come: {}", daemon.log()));
        assert!(!status.success(), "death {death}: {status:?}");
        daemon.launch();
    }
    // The third delivery: answered with a typed error on its reply route, acknowledged, not run.
    let m = c.recv_on("dev/poison", WAIT).await.json();
    assert_eq!(m["id"], "crash-me-now", "{m}");
    assert_eq!(m["error"]["kind"], "poison", "{m}");
    assert!(m["error"]["message"].as_str().unwrap().contains("2 times in a row"), "{m}");
    assert!(daemon.log().contains("it is poison"), "{}", daemon.log());
    // It keeps serving others, and the poison job does not come back after another restart.
    let good = json!({"id": "fine", "image_base64": image, "reply_to": "dev/poison"}).to_string();
    c.publish("inferd/poison/jobs/color", good).await;
    let m = c.recv_on("dev/poison", WAIT).await.json();
    assert_eq!((m["id"].clone(), m["result"]["classes"][0]["label"].clone()), (json!("fine"), json!("red")), "{m}");
    let metrics = String::from_utf8_lossy(&daemon.client().get("/metrics").unwrap().body).into_owned();
    assert!(metrics.contains("inferd_errors_total{kind=\"poison\"} 1"), "{metrics}");
    daemon.stop();
    daemon.launch();
    wait_online(&mut c, "poison").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline.into(), c.rx.recv()).await {
        assert_ne!(r.topic, "dev/poison", "nothing comes again: {}", String::from_utf8_lossy(&r.payload));
    }
    assert!(daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(), "alive: {}", daemon.log());
}

#[test]
fn a_socket_request_that_kills_the_daemon_twice_is_answered_as_poison() {
    // The same hook as over MQTT: a client that sends the killing request again after each
    // restart (as an app retrying would) kills the daemon twice, then gets 422 `poison`.
    // SAFETY: the same value the MQTT test sets; no test of this binary reads it otherwise.
    unsafe { std::env::set_var("TESTHOOK_INFERD_CRASH_ON", "crash-me-now") };
    let mut daemon = Process::start_with(registry(vec![tiny_gpt(|_| {})]), "", "", "");
    let killer =
        json!({"model": "tiny-gpt", "messages": [{"role": "user", "content": "crash-me-now"}], "max_tokens": 2});
    for death in 1..=2 {
        let r = daemon.client().post("/v1/chat/completions", "application/json", killer.to_string().as_bytes());
        assert!(r.is_err() || r.as_ref().unwrap().status >= 500, "death {death}: {:?}", r.map(|r| r.status));
        let status =
            wait_for_exit(&mut daemon, WAIT).unwrap_or_else(|| panic!("death {death} did not come: {}", daemon.log()));
        assert!(!status.success(), "death {death}: {status:?}");
        daemon.launch();
    }
    let (status, v) = post(&daemon.client(), "/v1/chat/completions", &killer);
    assert_eq!((status, v["error"]["kind"].clone()), (422, json!("poison")), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("2 times in a row"), "{v}");
    // Others are served, and the daemon stays up.
    let fine = json!({"model": "tiny-gpt", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let (status, v) = post(&daemon.client(), "/v1/chat/completions", &fine);
    assert_eq!(status, 200, "{v}");
    assert!(daemon.child.as_mut().unwrap().try_wait().unwrap().is_none(), "alive: {}", daemon.log());
}

/// The fixture's reference tokens (scripts/make_tiny_decoder.py).
fn cases() -> Vec<(String, Vec<u64>, String)> {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(repo("tests/fixtures/generate/expected.json")).unwrap()).unwrap();
    expected["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let tokens = c["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            (c["prompt"].as_str().unwrap().to_string(), tokens, c["text"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn a_prompt_read_in_chunks_gives_the_reference_tokens_and_others_step_between_its_chunks() {
    // Chunks of 3 tokens: every prompt of the fixture is read in several engine calls.
    let daemon = Process::start_with(registry(vec![tiny_gpt(|g| g["prefill_chunk"] = json!(3))]), "", "", "");
    let client = daemon.client();
    let all = cases();
    let threads: Vec<_> = all
        .iter()
        .cloned()
        .map(|(prompt, tokens, _)| {
            let client = daemon.client();
            std::thread::spawn(move || {
                let body = json!({"model": "tiny-gpt", "prompt": prompt, "max_tokens": tokens.len(), "temperature": 0});
                let (status, v) = post(&client, "/v1/completions", &body);
                assert_eq!(status, 200, "{v}");
                (v["choices"][0]["text"].as_str().unwrap().to_string(), tokens)
            })
        })
        .collect();
    for ((prompt, _, want), t) in all.iter().zip(threads) {
        let (text, tokens) = t.join().unwrap();
        assert_eq!(&text, want, "{prompt:?} ({} tokens): the reference's text, read in chunks", tokens.len());
    }
    // Others step between the chunks: a short request joins while long ones are read.
    let (status, v) = post(&client, "/v1/completions", &json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 2}));
    assert_eq!((status, v["usage"]["completion_tokens"].clone()), (200, json!(2)), "{v}");
}

#[test]
fn a_long_prompt_leaves_no_memory_behind_in_the_engine() {
    // SmolLM2 reads a ~1,600-token prompt in 4 chunks; before, ONNX
    // Runtime's arena kept the peak of the last chunks (the 512-token chunk's logits alone are
    // 96 MiB): 357 MiB kept after a 4,030-token prompt, 7.79 GB after 8,180 tokens.
    let daemon = Process::start("", "budget_mb = 1500", "");
    let client = daemon.client();
    let chat = |text: &str| {
        let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": text}],
                          "max_tokens": 1, "temperature": 0});
        post(&client, "/v1/chat/completions", &body)
    };
    let (status, v) = chat("Hello there.");
    assert_eq!(status, 200, "{v}");
    std::thread::sleep(Duration::from_secs(1));
    let before = daemon.rss_mib();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(175);
    let (status, v) = chat(&long);
    assert_eq!(status, 200, "{v}");
    let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(tokens > 3 * 512, "{tokens} prompt tokens: more than three chunks");
    // The heap is trimmed when the sequence ends and every 5 s.
    std::thread::sleep(Duration::from_secs(6));
    let after = daemon.rss_mib();
    eprintln!("RSS {before:.0} MiB before a {tokens}-token prompt, {after:.0} MiB after");
    assert!(after - before < 48.0, "{:.0} MiB kept after a {tokens}-token prompt: {}", after - before, daemon.log());
    let (status, v) = chat("Hello again.");
    assert_eq!(status, 200, "{v}");
}
