//! Vision-language on the tiny SmolVLM fixture (scripts/make_vlm_fixture_model.py:
//! transformers' own classes, random weights, the three graphs with the
//! onnx-community names): greedy tokens equal transformers' `generate` for
//! every recorded image, in process, over the socket (whole, streamed, side
//! by side) and over MQTT (an envelope with image_base64, and a raw image
//! with its question in MQTT 5 user properties); bad images and prompts get
//! typed errors while the model keeps serving.

mod util;

use base64::Engine as _;
use inferd::engine::{Engine, LoadOptions};
use inferd::job::{ChatMessage, GenerateRequest, GenerationParams, JobInput, JobOptions, JobResult, Prompt};
use serde_json::{Value, json};
use std::time::Duration;
use util::broker::{Broker, TestClient};
use util::*;

fn fixtures() -> std::path::PathBuf {
    repo("tests/fixtures/vlm")
}

fn models() -> std::path::PathBuf {
    fixtures().join("model/models.json")
}

/// A recorded case: its images' names and bytes, the question and transformers' tokens.
type Case = (Vec<String>, Vec<Vec<u8>>, String, Vec<u32>);

fn cases() -> Vec<Case> {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("model/reference.json")).unwrap()).unwrap();
    reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let names: Vec<String> =
                c["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().into()).collect();
            let bytes = names.iter().map(|n| std::fs::read(fixtures().join(n)).unwrap()).collect();
            let tokens = c["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            (names, bytes, c["question"].as_str().unwrap().to_string(), tokens)
        })
        .collect()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// An OpenAI chat body: the images as data: URLs, then the question.
fn chat(images: &[Vec<u8>], question: &str, max_tokens: usize) -> Value {
    let mut parts: Vec<Value> = images
        .iter()
        .map(|b| json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", b64(b))}}))
        .collect();
    parts.push(json!({"type": "text", "text": question}));
    json!({"model": "tiny-vlm", "messages": [{"role": "user", "content": parts}], "max_tokens": max_tokens, "temperature": 0})
}

fn post(d: &Daemon, body: &Value) -> (u16, Value) {
    let r = d.client().post("/v1/chat/completions", "application/json", body.to_string().as_bytes()).unwrap();
    let v = serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)));
    (r.status, v)
}

/// The tokens of each case, greedy, on a model loaded in this process.
fn in_process() -> Vec<(Vec<u32>, String, usize)> {
    in_process_from(&models())
}

/// [`in_process`] on the model of the registry at `models`.
fn in_process_from(models: &std::path::Path) -> Vec<(Vec<u32>, String, usize)> {
    let registry = inferd::registry::Registry::load(models).unwrap();
    let engine = Engine::new(inferd::config::Config::default(), registry);
    let mut model = engine.load("tiny-vlm", &LoadOptions::default()).unwrap();
    cases()
        .into_iter()
        .map(|(_, images, question, tokens)| {
            let message = ChatMessage {
                role: "user".into(),
                content: question,
                images: images.into_iter().map(|b| (0, b)).collect(),
            };
            let request = GenerateRequest {
                prompt: Prompt::Chat(vec![message]),
                params: GenerationParams {
                    max_tokens: Some(tokens.len()),
                    temperature: Some(0.0),
                    ..Default::default()
                },
                ..Default::default()
            };
            let out = model.infer(JobInput::Generate(request), &JobOptions::default()).unwrap();
            let JobResult::Generation { tokens, text, usage, .. } = out.result else { panic!("{out:?}") };
            (tokens, text, usage.prompt_tokens)
        })
        .collect()
}

#[test]
fn greedy_tokens_equal_transformers_for_every_recorded_image() {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("model/reference.json")).unwrap()).unwrap();
    let all = cases();
    assert!(all.len() >= 7, "six single images and a pair");
    for (((names, _, _, want), (got, _, prompt_tokens)), case) in
        all.iter().zip(in_process()).zip(reference["cases"].as_array().unwrap())
    {
        assert_eq!(&got, want, "{names:?}");
        assert_eq!(prompt_tokens, case["input_ids"].as_array().unwrap().len(), "{names:?}: image tokens count");
    }
}

/// A prompt read in chunks of 5 tokens (image tokens split across chunks):
/// the embeddings are made once and fed a chunk at a time, and the tokens
/// are still transformers'.
#[test]
fn a_prompt_with_images_read_in_chunks_gives_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join("model")).unwrap() {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to).unwrap();
        } else {
            std::os::unix::fs::symlink(entry.path(), to).unwrap();
        }
    }
    let path = dir.path().join("models.json");
    let mut registry: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    registry["models"][0]["generation"]["prefill_chunk"] = json!(5);
    std::fs::write(&path, registry.to_string()).unwrap();
    for ((names, _, _, want), (got, _, prompt_tokens)) in cases().iter().zip(in_process_from(&path)) {
        assert!(prompt_tokens > 10, "{names:?}: read in several chunks");
        assert_eq!(&got, want, "{names:?}");
    }
}

/// Over the socket: the same answers whole, streamed and four at a time
/// (their decoding steps batched together), and a follow-up turn about the
/// same image (its features from the cache) answers as the first time.
#[test]
fn chat_completions_with_images_answer_whole_streamed_and_side_by_side() {
    let expected = in_process();
    let d = Daemon::start(|c| c.models = Some(models()));
    let all = cases();
    for ((names, images, question, tokens), (_, text, _)) in all.iter().zip(&expected) {
        let (status, v) = post(&d, &chat(images, question, tokens.len()));
        assert_eq!(status, 200, "{names:?}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], text.as_str(), "{names:?}");
        assert_eq!(v["usage"]["completion_tokens"], tokens.len());
        assert!(v["timings"]["pre_ms"].as_f64().is_some_and(|ms| ms > 0.0), "the image was prepared: {v}");
    }
    // Streamed: the deltas add up to the same text.
    let (_, images, question, tokens) = &all[3];
    let mut body = chat(images, question, tokens.len());
    body["stream"] = json!(true);
    let r = d.client().post("/v1/chat/completions", "application/json", body.to_string().as_bytes()).unwrap();
    assert_eq!(r.status, 200);
    let joined: String = String::from_utf8_lossy(&r.body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).ok()?["choices"][0]["delta"]["content"].as_str().map(String::from)
        })
        .collect();
    assert_eq!(joined, expected[3].1);
    // Four at once.
    let answers: Vec<String> = std::thread::scope(|s| {
        let jobs: Vec<_> = all[..4]
            .iter()
            .map(|(_, images, question, tokens)| {
                let d = &d;
                s.spawn(move || {
                    let (status, v) = post(d, &chat(images, question, tokens.len()));
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
                })
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (i, got) in answers.iter().enumerate() {
        assert_eq!(got, &expected[i].1, "case {i} beside three others");
    }
    // A follow-up turn about the same image (its features come from the cache).
    let (_, images, question, tokens) = &all[0];
    let mut body = chat(images, question, tokens.len());
    body["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": expected[0].1}),
        json!({"role": "user", "content": "And now?"}),
    ]);
    let (status, v) = post(&d, &body);
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > all[0].3.len() as u64, "{v}");
    // A JSON answer about an image.
    let mut body = chat(images, question, 20);
    body["response_format"] = json!({"type": "json_object"});
    let (status, v) = post(&d, &body);
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).is_ok_and(|j| j.is_object()), "{text}");
}

#[test]
fn a_photo_stored_sideways_with_its_orientation_tag_gets_the_upright_photos_answer() {
    // portrait.png stored turned with EXIF orientation 6, as a phone held sideways writes it
    // (scripts/make_orientation_fixtures.py): read upright, it is cut into the same grid and answered
    // with the same tokens; with limits.exif_orientation off, it is read as stored (another grid).
    let upright = std::fs::read(fixtures().join("images/portrait.png")).unwrap();
    let sideways = std::fs::read(repo("tests/fixtures/orientation/portrait-tag-6.png")).unwrap();
    let ask = |d: &Daemon, image: &[u8]| {
        let (status, v) = post(d, &chat(&[image.to_vec()], "What is in the picture?", 8));
        assert_eq!(status, 200, "{v}");
        (v["choices"][0]["message"]["content"].clone(), v["usage"]["prompt_tokens"].clone())
    };
    let d = Daemon::start(|c| c.models = Some(models()));
    let want = ask(&d, &upright);
    assert_eq!(ask(&d, &sideways), want, "the tagged photo is read upright");
    drop(d);
    let off = Daemon::start(|c| {
        c.models = Some(models());
        c.limits.exif_orientation = false;
    });
    let (_, prompt_tokens) = ask(&off, &sideways);
    assert_ne!(prompt_tokens, want.1, "read as stored, its tiles are another grid");
}

#[test]
fn a_phone_jpeg_stored_sideways_gets_the_tokens_of_what_transformers_reads_from_it() {
    // phone-tag-6.jpg: the sensor's landscape pixels, 4:2:0, EXIF orientation 6; phone-upright.png:
    // Pillow's decode of it turned upright, what transformers' load_image hands the processor
    // (scripts/make_orientation_fixtures.py). The fixture model's tokens flip for a one-level
    // change of any pixel, so equal answers mean libjpeg-turbo's pixels, turned as Pillow turns them.
    let tagged = std::fs::read(repo("tests/fixtures/orientation/phone-tag-6.jpg")).unwrap();
    let upright = std::fs::read(repo("tests/fixtures/orientation/phone-upright.png")).unwrap();
    let d = Daemon::start(|c| c.models = Some(models()));
    let ask = |image: &[u8]| {
        let (status, v) = post(&d, &chat(&[image.to_vec()], "What is in the picture?", 8));
        assert_eq!(status, 200, "{v}");
        (v["choices"][0]["message"]["content"].clone(), v["usage"]["prompt_tokens"].clone())
    };
    assert_eq!(ask(&tagged), ask(&upright));
}

#[test]
fn bad_images_and_prompts_get_typed_errors_and_the_model_keeps_serving() {
    let d = Daemon::start(|c| {
        c.models = Some(models());
        c.limits.max_image_pixels = 100_000;
        // Below an expanded prompt's size (an image's tokens are not the client's text), above the text.
        c.limits.max_text_bytes = 200;
    });
    let (_, images, question, _) = cases().remove(0);
    let huge = {
        let img = image::RgbImage::new(400, 300);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        png
    };
    let cases: Vec<(Value, &str)> = vec![
        (chat(&[b"\x89PNG\r\n\x1a\nbroken".to_vec()], question.as_str(), 4), "image 1:"),
        (
            chat(&[huge], "What is it?", 4),
            "image 1: the PNG image is 400x300 = 120000 pixels, over the limit of 100000",
        ),
        (
            json!({"model": "tiny-vlm", "messages": [{"role": "user", "content": "What is <image> here?"}]}),
            "stands for an image",
        ),
        (json!({"model": "tiny-vlm", "prompt": "a <image> b"}), "stands for an image"),
        (chat(&images, question.as_str(), 100_000), "max_tokens"),
        (chat(&images, &"Is the gate open? ".repeat(12), 4), "bytes, over the limit of 200"),
    ];
    for (body, words) in cases {
        let path = if body.get("prompt").is_some() { "/v1/completions" } else { "/v1/chat/completions" };
        let r = d.client().post(path, "application/json", body.to_string().as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(r.status, 400, "{v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{words:?} not in {message:?}");
    }
    let (status, v) = post(&d, &chat(&images, &question, 3));
    assert_eq!(status, 200, "still serving: {v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 40, "the image's tokens are in the prompt: {v}");
    // Text alone is a chat too.
    let (status, v) =
        post(&d, &json!({"model": "tiny-vlm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}));
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_answers_an_image_envelope_and_a_raw_image_with_its_question_in_user_properties() {
    let expected = in_process();
    let broker = Broker::start();
    let url = broker.url();
    let _daemon = Daemon::start(move |c| {
        c.models = Some(models());
        c.mqtt.url = Some(url);
        c.mqtt.node_id = Some("cam".into());
    });
    let all = cases();
    let mut client = TestClient::connect(&broker, "vlm-test").await;
    client.subscribe("inferd/cam/results/#").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, images, question, tokens) = &all[1];
    let job = json!({"id": "v1", "prompt": question, "image_base64": b64(&images[0]), "max_tokens": tokens.len(),
        "temperature": 0, "stream": true});
    client.publish("inferd/cam/jobs/tiny-vlm", job.to_string()).await;
    let (partial, result) = client.recv_generation("v1", Duration::from_secs(60)).await;
    assert_eq!(result["result"]["text"], expected[1].1.as_str(), "{result}");
    assert_eq!(partial, expected[1].1, "the partial messages add up to the text");

    // A camera publishes its picture as it is; the question rides in user properties.
    let (_, images, question, tokens) = &all[2];
    let max = tokens.len().to_string();
    client
        .publish_with_user_properties(
            "inferd/cam/jobs/tiny-vlm",
            images[0].clone(),
            &[("id", "v2"), ("prompt", question), ("max_tokens", &max), ("temperature", "0")],
        )
        .await;
    let m = client.recv(Duration::from_secs(60)).await.json();
    assert_eq!((m["id"].clone(), m["result"]["text"].clone()), (json!("v2"), json!(expected[2].1)), "{m}");
}

/// A small HTTP server on a loopback port: `/tiny.png` (with its length),
/// `/big.png` (more than the cap, no length announced), `/slow.png` (answers
/// after 3 s), `/moved` (a redirect), anything else 404.
fn image_server(png: Vec<u8>) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let png = png.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                let _ = match path.as_str() {
                    "/tiny.png" => stream
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", png.len())
                                .as_bytes(),
                        )
                        .and_then(|_| stream.write_all(&png)),
                    "/big.png" => stream
                        .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                        .and_then(|_| stream.write_all(&vec![7u8; 300_000])),
                    "/slow.png" => {
                        std::thread::sleep(Duration::from_secs(3));
                        stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    }
                    "/moved" => stream.write_all(
                        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/x.png\r\nContent-Length: 0\r\n\r\n",
                    ),
                    _ => stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                };
            });
        }
    });
    port
}

/// http(s) image URLs: fetched from the listed hosts only (plain HTTP from a
/// loopback server, HTTPS from `openssl s_server` with a test CA given as
/// limits.image_fetch.ca_file), within the byte cap and the timeout; the
/// answer equals the one for the same image sent as a data: URL.
#[test]
fn http_and_https_images_are_fetched_from_listed_hosts_within_the_limits() {
    let (_, images, question, tokens) = cases().remove(0);
    let port = image_server(images[0].clone());
    let certs = tempfile::tempdir().unwrap();
    util::broker::make_certs(certs.path());
    // s_server -HTTP sends a file as it is: the file is the whole response.
    let mut response =
        format!("HTTP/1.0 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n", images[0].len())
            .into_bytes();
    response.extend_from_slice(&images[0]);
    std::fs::write(certs.path().join("tiny.png"), response).unwrap();
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-HTTP", "-cert", "server.pem", "-key", "server.key", "-accept"])
        .arg(tls_port.to_string())
        .current_dir(certs.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl is installed");
    let ca = certs.path().join("ca.pem");
    let d = Daemon::start(move |c| {
        c.models = Some(models());
        c.limits.image_fetch.hosts = vec!["127.0.0.1".into(), "localhost".into()];
        c.limits.image_fetch.max_bytes = 100_000;
        c.limits.image_fetch.timeout_ms = 1000;
        c.limits.image_fetch.ca_file = Some(ca);
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, want) = post(&d, &chat(&images, &question, tokens.len()));
    let want = want["choices"][0]["message"]["content"].clone();
    let by_url = |url: String| {
        json!({"model": "tiny-vlm", "max_tokens": tokens.len(), "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]})
    };
    for url in [format!("http://127.0.0.1:{port}/tiny.png"), format!("https://localhost:{tls_port}/tiny.png")] {
        let (status, v) = post(&d, &by_url(url.clone()));
        assert_eq!(status, 200, "{url}: {v}");
        assert_eq!(v["choices"][0]["message"]["content"], want, "{url}");
    }
    for (url, words) in [
        ("http://example.com/cat.png".to_string(), "example.com is not in limits.image_fetch.hosts"),
        (format!("http://127.0.0.1:{port}/big.png"), "over limits.image_fetch.max_bytes (100000)"),
        (format!("http://127.0.0.1:{port}/slow.png"), "took over 1000 ms"),
        (format!("http://127.0.0.1:{port}/moved"), "redirects are not followed"),
        (format!("http://127.0.0.1:{port}/missing.png"), "answered 404"),
    ] {
        let (status, v) = post(&d, &by_url(url.clone()));
        assert_eq!(status, 400, "{url}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("image 1: ") && message.contains(words), "{words:?} not in {message:?}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// The variant follows the memory free, counting all three graphs (the
/// file-size rule over the decoder, the vision encoder and the embeddings),
/// the KV cache and the image feature cache: with 20 MiB the small variant
/// (the decoder alone would have fit), with 21 MiB the better one.
#[test]
fn the_variant_choice_counts_the_three_graphs_and_the_caches() {
    let dir = tempfile::tempdir().unwrap();
    let mut registry: Value = serde_json::from_slice(&std::fs::read(models()).unwrap()).unwrap();
    let model = &mut registry["models"][0];
    let base = fixtures().join("model");
    model["generation"]["tokenizer"] = json!(base.join("tokenizer.json"));
    model["generation"]["chat_template"] = json!(base.join("chat_template.json"));
    model["vision"]["feature_cache_mb"] = json!(1);
    let mut better = model["variants"][0].clone();
    better["file"] = json!(base.join(better["file"].as_str().unwrap()));
    for part in ["vision", "embed"] {
        let f = better["parts"][part]["file"].as_str().unwrap().to_string();
        better["parts"][part]["file"] = json!(base.join(f));
    }
    better.as_object_mut().unwrap().remove("memory_mb"); // the file-size rule: 2 × the files + 16 MiB
    better["quality"] = json!(2);
    let mut small = better.clone();
    (small["name"], small["quality"], small["memory_mb"]) = (json!("small"), json!(1), json!(1));
    model["variants"] = json!([better, small]);
    let file = dir.path().join("models.json");
    std::fs::write(&file, registry.to_string()).unwrap();
    let sizes: u64 = ["decoder_model_merged", "vision_encoder", "embed_tokens"]
        .iter()
        .map(|g| std::fs::metadata(base.join(format!("onnx/{g}.onnx"))).unwrap().len())
        .sum();
    assert!((2 * sizes + (16 << 20)) + (3 << 20) > 20 << 20, "the fixture's graphs are as large as this test assumes");
    for (budget, want) in [(20, "small"), (21, "fp32")] {
        let file = file.clone();
        let d = Daemon::start(move |c| {
            c.models = Some(file);
            c.memory.budget_mb = Some(budget);
            c.memory.headroom_mb = 0;
        });
        // The plan, as `inferd models` shows it before the model loads.
        let info: Value = d.client().get("/v1/models/tiny-vlm").unwrap().json().unwrap();
        assert_eq!(info["variant"], want, "budget {budget} MiB: {info}");
        let reason = info["variant_reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("for the KV cache of 2048 tokens of context (2 MiB) and 1 MiB of cached image features"),
            "{reason}"
        );
    }
}

/// `inferd infer --prompt`: each file is an image asked about, in this
/// process (`--local`) or through the daemon; greedy by default, so the
/// tokens are transformers' again.
#[test]
fn the_cli_asks_a_question_about_each_image() {
    let (_, _, question, tokens) = cases().remove(1);
    let image = fixtures().join("images/portrait.png");
    let models = models();
    let max = tokens.len().to_string();
    let args = |extra: &[&str]| {
        let mut a = vec!["infer", "--model", "tiny-vlm", "--prompt", question.as_str(), "--max-tokens", max.as_str()];
        a.extend_from_slice(extra);
        a.push(image.to_str().unwrap());
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let local = args(&["--local", "--json", "--models", models.to_str().unwrap()]);
    let out = inferd(&local.iter().map(String::as_str).collect::<Vec<_>>());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let got: Vec<u32> = v["result"]["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
    assert_eq!(got, tokens, "{v}");
    let want_text = v["result"]["text"].as_str().unwrap().to_string();

    let d = Daemon::start(|c| c.models = Some(models.clone()));
    let socket = d.socket.to_str().unwrap().to_string();
    let remote = args(&["--socket", socket.as_str()]);
    let out = inferd(&remote.iter().map(String::as_str).collect::<Vec<_>>());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("{want_text:?} (Length, 62 prompt + {} generated tokens)", tokens.len())),
        "{stdout}"
    );
    // A file that is no image: a typed error, and the exit code says so.
    let mut bad = args(&["--socket", socket.as_str()]);
    *bad.last_mut().unwrap() = models.to_str().unwrap().to_string();
    let out = inferd(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success() && text(&out).1.contains("bad_input: image 1:"), "{:?}", text(&out));
}
