//! Text generation on the tiny decoder fixture (scripts/make_tiny_decoder.py):
//! the KV-cache loop against the reference tokens computed without a cache,
//! the OpenAI-style endpoints (whole and streamed), sampling, stop strings,
//! concurrency, limits, and the same over MQTT.

mod util;

use inferd::engine::{Engine, LoadOptions};
use inferd::job::{GenerateRequest, GenerationParams, JobInput, JobOptions, JobResult, Prompt};
use serde_json::{Value, json};
use std::time::Duration;
use util::broker::{Broker, TestClient};
use util::*;

fn fixtures() -> std::path::PathBuf {
    repo("tests/fixtures/generate")
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap()
}

fn cases() -> Vec<(String, Vec<u64>, String)> {
    expected()["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let tokens = c["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
            (c["prompt"].as_str().unwrap().to_string(), tokens, c["text"].as_str().unwrap().to_string())
        })
        .collect()
}

fn daemon() -> Daemon {
    Daemon::start(|c| c.models = Some(fixtures().join("models.json")))
}

fn post(d: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let r = d.client().post(path, "application/json", body.to_string().as_bytes()).unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
    (r.status, v)
}

/// The `data:` events of a server-sent-event body, `[DONE]` last.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {e:?}")).to_string())
        .collect()
}

/// `prompt` continued greedily for `n` tokens on a model loaded in this process.
fn greedy(model: &mut inferd::engine::LoadedModel, prompt: &str, n: usize) -> inferd::job::JobOutput {
    let request = GenerateRequest {
        prompt: Prompt::Text(prompt.to_string()),
        params: GenerationParams { max_tokens: Some(n), temperature: Some(0.0), ..Default::default() },
        ..Default::default()
    };
    model.infer(JobInput::Generate(request), &JobOptions::default()).unwrap()
}

#[test]
fn the_kv_cache_loop_gives_exactly_the_reference_tokens() {
    let registry = inferd::registry::Registry::load(&fixtures().join("models.json")).unwrap();
    let engine = Engine::new(inferd::config::Config::default(), registry);
    let mut model = engine.load("tiny-gpt", &LoadOptions::default()).unwrap();
    let all = cases();
    assert!(all.len() >= 5, "the fixture has its prompts");
    for (prompt, tokens, text) in all {
        let out = greedy(&mut model, &prompt, tokens.len());
        let JobResult::Generation { tokens: got, text: got_text, usage, .. } = out.result else { panic!("{out:?}") };
        let got: Vec<u64> = got.into_iter().map(u64::from).collect();
        assert_eq!(got, tokens, "{prompt:?}");
        assert_eq!(got_text, text, "{prompt:?}");
        assert_eq!(usage.completion_tokens, tokens.len());
    }
}

#[test]
fn tract_runs_the_same_cache_loop_to_the_same_tokens() {
    let registry = inferd::registry::Registry::load(&fixtures().join("models.json")).unwrap();
    let engine = Engine::new(inferd::config::Config::default(), registry);
    let options = LoadOptions { backend: Some(inferd::backend::BackendChoice::Tract), ..Default::default() };
    let mut model = engine.load("tiny-gpt", &options).unwrap();
    for (prompt, tokens, _) in cases().into_iter().take(2) {
        let out = greedy(&mut model, &prompt, tokens.len());
        assert_eq!(out.backend, inferd::backend::BackendKind::Tract);
        let JobResult::Generation { tokens: got, .. } = out.result else { panic!("{out:?}") };
        assert_eq!(got.into_iter().map(u64::from).collect::<Vec<_>>(), tokens, "{prompt:?} on tract");
    }
}

#[test]
fn completions_answer_as_openai_does_whole_and_streamed_with_the_same_text() {
    let d = daemon();
    let (prompt, tokens, text) = cases().remove(0);
    let body = json!({"model": "tiny-gpt", "prompt": prompt, "max_tokens": tokens.len(), "temperature": 0});
    let (status, v) = post(&d, "/v1/completions", body.clone());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], "tiny-gpt");
    assert_eq!(v["choices"][0]["text"], text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], tokens.len());
    let prompt_tokens = expected()["greedy"][0]["prompt_tokens"].as_array().unwrap().len();
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(v["usage"]["total_tokens"], prompt_tokens + tokens.len());

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = d.client().post("/v1/completions", "application/json", streamed.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.content_type.as_deref().is_some_and(|t| t.starts_with("text/event-stream")), "{:?}", r.content_type);
    let events = events(&r.body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() > 3, "the text comes in pieces: {chunks:?}");
    let joined: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(joined, text, "streaming gives the same text as a whole answer");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], tokens.len());
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
}

#[test]
fn chat_completions_render_the_template_and_stream_deltas() {
    let d = daemon();
    let body = json!({"model": "tiny-gpt", "temperature": 0, "max_tokens": 12,
                      "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]});
    let (status, whole) = post(&d, "/v1/chat/completions", body.clone());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    // The same prompt, rendered by hand through the template, as a plain completion.
    let (_, plain) = post(
        &d,
        "/v1/completions",
        json!({"model": "tiny-gpt", "temperature": 0, "max_tokens": 12, "stop": ["\nUser:"],
               "prompt": "Be brief.\nUser: Hello\nAssistant:"}),
    );
    assert_eq!(plain["choices"][0]["text"].as_str().unwrap(), text);

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let r = d.client().post("/v1/chat/completions", "application/json", streamed.to_string().as_bytes()).unwrap();
    let events = events(&r.body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
}

#[test]
fn a_fixed_seed_samples_the_same_text_and_another_seed_differs() {
    let d = daemon();
    let ask = |seed: u64| {
        let (status, v) = post(
            &d,
            "/v1/completions",
            json!({"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 24, "temperature": 1.0, "top_p": 0.9, "seed": seed}),
        );
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(ask(11), ask(11));
    assert_ne!(ask(11), ask(12));
}

#[test]
fn a_stop_string_ends_the_text_before_it() {
    let d = daemon();
    let (prompt, tokens, text) = cases().remove(1);
    // A stop string from the middle of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let want = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({"model": "tiny-gpt", "prompt": prompt, "max_tokens": tokens.len(), "temperature": 0,
                          "stop": stop, "stream": stream});
        let r = d.client().post("/v1/completions", "application/json", body.to_string().as_bytes()).unwrap();
        let (got, reason) = if stream {
            let events = events(&r.body);
            let chunks: Vec<Value> =
                events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
            let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
            (text, chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(got, want, "stream: {stream}, stop {stop:?}");
        assert_eq!(reason, "stop");
    }
}

#[test]
fn concurrent_requests_keep_their_own_caches() {
    let d = daemon();
    let all = cases();
    let answers: Vec<(String, String)> = std::thread::scope(|s| {
        let jobs: Vec<_> = all
            .iter()
            .map(|(prompt, tokens, _)| {
                let d = &d;
                s.spawn(move || {
                    let (status, v) = post(
                        d,
                        "/v1/completions",
                        json!({"model": "tiny-gpt", "prompt": prompt, "max_tokens": tokens.len(), "temperature": 0}),
                    );
                    assert_eq!(status, 200, "{v}");
                    (prompt.clone(), v["choices"][0]["text"].as_str().unwrap().to_string())
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for ((prompt, got), (_, _, want)) in answers.iter().zip(&all) {
        assert_eq!(got, want, "{prompt:?} run beside {} others", all.len() - 1);
    }
}

#[test]
fn over_long_prompts_and_bad_settings_are_refused_before_the_model_loads_and_it_then_serves() {
    let d = daemon();
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": long}));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("context holds 128"), "{v}");
    for (body, words) in [
        (json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 1000}), "max_tokens must be 1..=64"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "temperature": 7}), "temperature"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "n": 3}), "n must be 1"),
        (json!({"model": "tiny-gpt", "prompt": ""}), "empty"),
        (json!({"model": "nope", "prompt": "Hi"}), "nope"),
        (json!({"model": "tiny-gpt"}), "prompt"),
        (json!({"model": "tiny-gpt", "messages": [{"role": "robot", "content": "x"}]}), "unknown chat role"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 0}), "max_tokens must be 1..=64"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}), "at most 4 stop strings"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "response_format": {"type": "xml"}}), "unknown response_format"),
        (json!({"model": "tiny-gpt", "prompt": "Hi", "response_format": {}}), "response_format needs a \"type\""),
        (
            json!({"model": "tiny-gpt", "prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}}),
            "properties.n: 'minimum' is not supported",
        ),
        (
            json!({"model": "tiny-gpt", "prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "needs {\"json_schema\"",
        ),
        (
            json!({"model": "tiny-gpt", "prompt": "Hi", "stop": "}", "response_format": {"type": "json_object"}}),
            "stop strings do not go with a JSON response_format",
        ),
    ] {
        let path = if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, v) = post(&d, path, body.clone());
        assert!(status == 400 || status == 404, "{body} -> {status} {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{body} -> {v}");
    }
    // NaN is not JSON: the body is refused as such, with the place it broke.
    let r = d
        .client()
        .post("/v1/completions", "application/json", br#"{"model": "tiny-gpt", "prompt": "Hi", "temperature": NaN}"#)
        .unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(r.status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("invalid request"), "{v}");
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 3}));
    assert_eq!((status, v["usage"]["completion_tokens"].clone()), (200, json!(3)), "{v}");
}

/// What a receipt extractor asks for (nesting, arrays, enums, integers, optional fields).
fn receipt_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "merchant": {"type": "string", "maxLength": 30},
            "total": {"type": "number"},
            "currency": {"enum": ["EUR", "USD"]},
            "paid": {"type": "boolean"},
            "items": {"type": "array", "maxItems": 4, "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}, "note": {"type": ["string", "null"]}},
                "required": ["name", "qty"]
            }}
        },
        "required": ["merchant", "total", "items"]
    })
}

/// A random-weight model writes noise; kept to a schema, its answer still
/// parses and validates (checked with an independent JSON Schema validator),
/// whether it closes the value itself or its token budget cuts it short.
#[test]
fn json_answers_always_parse_and_keep_to_the_schema_whole_and_streamed() {
    let d = daemon();
    let schema = receipt_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let formats = [
        json!({"type": "json_schema", "json_schema": {"name": "receipt", "schema": schema, "strict": true}}),
        json!({"type": "json_object"}),
    ];
    let (mut closed, mut cut) = (0, 0);
    for seed in 0..8 {
        for (i, format) in formats.iter().enumerate() {
            let max_tokens = [64, 6][seed as usize % 2];
            let body = json!({"model": "tiny-gpt", "messages": [{"role": "user", "content": "Read the receipt."}],
                "temperature": 1.0, "seed": seed, "max_tokens": max_tokens, "response_format": format});
            let (status, v) = post(&d, "/v1/chat/completions", body);
            assert_eq!(status, 200, "{v}");
            let content = v["choices"][0]["message"]["content"].as_str().unwrap();
            let answer: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
            if i == 0 {
                let errors: Vec<String> = validator.iter_errors(&answer).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{content} does not validate: {errors:?}");
            } else {
                assert!(answer.is_object(), "{content}");
            }
            match v["choices"][0]["finish_reason"].as_str().unwrap() {
                "stop" => closed += 1,
                "length" => cut += 1,
                other => panic!("finish_reason {other}"),
            }
            assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= max_tokens, "{v}");
        }
    }
    assert!(closed > 0 && cut > 0, "both ends were seen: {closed} closed, {cut} cut short");

    // Streamed: the pieces add up to the same valid answer.
    let body = json!({"model": "tiny-gpt", "prompt": "Receipt:", "temperature": 0, "max_tokens": 40, "stream": true,
        "response_format": formats[0]});
    let r = d.client().post("/v1/completions", "application/json", body.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    let events = events(&r.body);
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    let (_, v) = post(&d, "/v1/completions", whole);
    assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());
    assert!(validator.is_valid(&serde_json::from_str::<Value>(&joined).unwrap()), "{joined}");
}

/// OpenAI `image_url` content parts are read (data: URLs, file:// paths under
/// limits.image_dirs), checked, and refused with the reason; a text-generation
/// model says it reads no images; the daemon keeps serving.
#[test]
fn image_parts_are_read_checked_and_refused_with_the_reason() {
    let pictures = repo("tests/fixtures/vlm/images");
    let allowed = pictures.clone();
    let d = Daemon::start(move |c| {
        c.models = Some(fixtures().join("models.json"));
        c.limits.image_dirs = vec![allowed];
    });
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD.encode(std::fs::read(pictures.join("tiny.png")).unwrap());
    let chat = |parts: Value| json!({"model": "tiny-gpt", "messages": [{"role": "user", "content": parts}]});
    let image = |url: String| json!({"type": "image_url", "image_url": {"url": url}});
    let text = json!({"type": "text", "text": "What is in the picture?"});
    let outside = repo("tests/fixtures/one-pixel.png");
    let traversal = format!("file://{}/../../one-pixel.png", pictures.display());
    for (parts, words) in [
        (json!([text, image(format!("data:image/png;base64,{png}"))]), "reads no images"),
        (json!([image(format!("file://{}", pictures.join("odd.png").display())), text]), "reads no images"),
        (json!([image("data:image/png;base64,@@@".into())]), "image 1: the data URL is not valid base64"),
        (
            json!([image("data:text/plain;base64,aGk=".into())]),
            "image 1: the data URL holds 'text/plain', not an image",
        ),
        // The model's task is checked before any fetch (tests/hostile_intake.rs has the fetch rules).
        (json!([text, image("https://example.com/cat.jpg".into())]), "reads no images"),
        (json!([image(format!("file://{}", outside.display()))]), "is not under a directory of limits.image_dirs"),
        (json!([image(traversal)]), "is not under a directory of limits.image_dirs"),
        (json!([image("ftp://x/y.png".into())]), "is not a data:, file:// or http(s) URL"),
        (json!([{"type": "input_audio", "input_audio": {}}]), "input_audio is not supported (text, image_url)"),
        (
            json!((0..9).map(|_| image(format!("data:image/png;base64,{png}"))).collect::<Vec<_>>()),
            "more than 8 images",
        ),
    ] {
        let (status, v) = post(&d, "/v1/chat/completions", chat(parts.clone()));
        assert_eq!(status, 400, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{words:?} not in {message:?}");
    }
    let (status, v) = post(&d, "/v1/chat/completions", chat(json!([text])));
    assert_eq!(status, 200, "text parts alone still answer: {v}");
}

#[test]
fn a_stream_the_client_leaves_stops_generating() {
    use std::io::{Read, Write};
    let d = daemon();
    let body =
        json!({"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 64, "temperature": 0, "stream": true}).to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    // The model is free again: a new request is answered.
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
    assert_eq!(d.client().get("/v1/health").unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_generation_publishes_partials_then_the_whole_text() {
    let broker = Broker::start();
    let url = broker.url();
    let _daemon = Daemon::start(move |c| {
        c.models = Some(fixtures().join("models.json"));
        c.mqtt.url = Some(url);
        c.mqtt.node_id = Some("gen".into());
    });
    let (prompt, tokens, text) = cases().remove(2);
    let mut client = TestClient::connect(&broker, "gen-test").await;
    client.subscribe("inferd/gen/results/#").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job = json!({"id": "g1", "prompt": prompt, "max_tokens": tokens.len(), "temperature": 0, "stream": true});
    client.publish("inferd/gen/jobs/tiny-gpt", job.to_string()).await;
    let (partial, result) = client.recv_generation("g1", Duration::from_secs(30)).await;
    assert_eq!(result["result"]["text"], text.as_str(), "{result}");
    assert_eq!(result["result"]["finish_reason"], "length");
    assert_eq!(partial, text, "the partial messages add up to the text");

    // A JSON answer over MQTT: the same response_format as the OpenAI API.
    let schema = receipt_schema();
    let job = json!({"id": "g2", "prompt": prompt, "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "receipt", "schema": schema}}});
    client.publish("inferd/gen/jobs/tiny-gpt", job.to_string()).await;
    let m = client.recv(Duration::from_secs(30)).await.json();
    assert_eq!(m["id"], "g2", "{m}");
    let text = m["result"]["text"].as_str().unwrap_or_else(|| panic!("{m}"));
    let answer: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    assert!(jsonschema::is_valid(&schema, &answer), "{text}");
    let bad = json!({"id": "g3", "prompt": prompt, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}}}});
    client.publish("inferd/gen/jobs/tiny-gpt", bad.to_string()).await;
    let m = client.recv(Duration::from_secs(30)).await.json();
    assert!(m["error"]["message"].as_str().is_some_and(|e| e.contains("'pattern' is not supported")), "{m}");
}

#[test]
fn a_request_whose_cache_memory_cannot_hold_gets_a_clear_error() {
    let probe = std::sync::Arc::new(inferd::memory::FakeProbe::new_mib(4096));
    let d = Daemon::start_with_probe(probe.clone(), |c| c.models = Some(fixtures().join("models.json")));
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
    probe.set_mib(0); // the box ran out of memory since the model loaded
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 64}));
    assert_eq!(status, 503, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("KV cache needs up to 1 MiB and 0 MiB are free"), "{message}");
    probe.set_mib(4096);
    let (status, v) = post(&d, "/v1/completions", json!({"model": "tiny-gpt", "prompt": "Hello", "max_tokens": 4}));
    assert_eq!(status, 200, "{v}");
}

#[test]
fn openai_clients_can_list_the_models() {
    let d = daemon();
    let v = d.client().get("/v1/models").unwrap().json().unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-gpt");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["models"][0]["task"], "text-generation", "inferd's own list is still there");
}
