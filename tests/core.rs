//! The core against real components: ONNX Runtime (the PyPI wheel's
//! library, as scripts/setup.sh installs it), tract, the shipped models and
//! the real `inferd` binary.

mod util;

use inferd::backend::{self, BackendChoice, BackendKind};
use inferd::config::{Config, RuntimeConfig};
use inferd::engine::{Engine, LoadOptions};
use inferd::job::{JobInput, JobOptions, JobResult};
use inferd::registry::Registry;
use inferd::tensor::{Tensor, TensorData, TensorJson};
use serde_json::json;
use util::*;

const TOLERANCE: f64 = 1e-4;

fn engine() -> Engine {
    Engine::new(Config::default(), Registry::load(&repo("models.json")).unwrap())
}

fn as_f64(t: &Tensor) -> Vec<f64> {
    match &t.data {
        TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        other => panic!("unexpected output type {other:?}"),
    }
}

fn case_inputs(case: &serde_json::Value) -> Vec<(String, Tensor)> {
    case["inputs"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let json: TensorJson = serde_json::from_value(t.clone()).unwrap();
            (name.clone(), Tensor::from_json(&json, usize::MAX).unwrap())
        })
        .collect()
}

fn variant_file(model: &str, variant: &str) -> std::path::PathBuf {
    let m = shipped_model(model);
    let v = m["variants"].as_array().unwrap().iter().find(|v| v["name"] == variant).unwrap().clone();
    repo(v["file"].as_str().unwrap())
}

#[test]
fn onnx_runtime_is_found_where_setup_put_it() {
    let status = backend::ort::status(&RuntimeConfig::default());
    let desc = status.expect("ONNX Runtime must load after scripts/setup.sh");
    assert!(desc.contains("ONNX Runtime 1.31.1"), "{desc}");
    assert!(desc.contains("runtime/onnxruntime"), "{desc}");
}

#[test]
fn ort_and_tract_match_python_onnxruntime_and_each_other() {
    let expected = expected();
    let runtime = RuntimeConfig::default();
    for case in expected["tensor_cases"].as_array().unwrap() {
        let (model, variant) = (case["model"].as_str().unwrap(), case["variant"].as_str().unwrap());
        let file = variant_file(model, variant);
        let mut ort = backend::load(BackendKind::Ort, &file, &backend::LoadRequest::cpu(&runtime)).unwrap();
        let mut tract = backend::load(BackendKind::Tract, &file, &backend::LoadRequest::cpu(&runtime)).unwrap();
        let from_ort = ort.run(case_inputs(case)).unwrap();
        let from_tract = tract.run(case_inputs(case)).unwrap();
        for ((name_o, o), (name_t, t)) in from_ort.iter().zip(&from_tract) {
            assert_eq!(name_o, name_t);
            let want: TensorJson = serde_json::from_value(case["outputs"][name_o].clone()).unwrap();
            let want_shape: Vec<usize> = want.shape.iter().map(|&d| d as usize).collect();
            assert_eq!(o.shape, want_shape, "{model}/{variant} {name_o}: ort shape");
            assert_eq!(t.shape, want_shape, "{model}/{variant} {name_o}: tract shape");
            assert_eq!(o.dtype().as_str(), want.dtype, "{model}/{variant} {name_o}: dtype");
            let python = numbers(&want.data);
            let (d_ort, d_tract) = (max_abs_diff(&as_f64(o), &python), max_abs_diff(&as_f64(t), &python));
            let d_pair = max_abs_diff(&as_f64(o), &as_f64(t));
            assert!(d_ort <= TOLERANCE, "{model}/{variant} {name_o}: ort differs from Python by {d_ort}");
            assert!(d_tract <= TOLERANCE, "{model}/{variant} {name_o}: tract differs from Python by {d_tract}");
            assert!(d_pair <= TOLERANCE, "{model}/{variant} {name_o}: ort and tract differ by {d_pair}");
        }
    }
}

#[test]
fn the_image_pipeline_matches_python_on_a_lossless_image_on_both_backends() {
    let expected = expected();
    let case = &expected["image_cases"][0];
    let bytes = std::fs::read(repo("tests/fixtures").join(case["image"].as_str().unwrap())).unwrap();
    for backend in [BackendChoice::Ort, BackendChoice::Tract] {
        let options = LoadOptions { backend: Some(backend), variant: None };
        let mut model = engine().load(case["model"].as_str().unwrap(), &options).unwrap();
        let out =
            model.infer(JobInput::Image(bytes.clone()), &JobOptions { top_k: Some(3), ..Default::default() }).unwrap();
        let JobResult::Classification { classes } = out.result else { panic!("not a classification") };
        let want = case["top"].as_array().unwrap();
        assert_eq!(classes.len(), want.len());
        for (got, want) in classes.iter().zip(want) {
            assert_eq!(got.index as u64, want["index"].as_u64().unwrap(), "{backend:?}: class order");
            assert_eq!(got.label.as_deref(), want["label"].as_str());
            let d = (got.score as f64 - want["score"].as_f64().unwrap()).abs();
            assert!(d <= TOLERANCE, "{backend:?}: score of {} differs by {d}", want["label"]);
        }
    }
}

#[test]
fn the_color_classifier_names_red_green_and_blue_on_both_backends() {
    for backend in [BackendChoice::Ort, BackendChoice::Tract] {
        let options = LoadOptions { backend: Some(backend), variant: None };
        let mut model = engine().load("color", &options).unwrap();
        for color in ["red", "green", "blue"] {
            let bytes = std::fs::read(repo(&format!("examples/{color}.jpg"))).unwrap();
            let out = model.infer(JobInput::Image(bytes), &JobOptions::default()).unwrap();
            let JobResult::Classification { classes } = &out.result else { panic!("not a classification") };
            assert_eq!(classes[0].label.as_deref(), Some(color), "{backend:?} on {color}.jpg: {classes:?}");
            assert!(classes[0].score > 0.99, "{backend:?} on {color}.jpg: {classes:?}");
            let expected_backend = if backend == BackendChoice::Ort { BackendKind::Ort } else { BackendKind::Tract };
            assert_eq!(out.backend, expected_backend);
            assert_eq!(out.model, "color");
            assert_eq!(out.variant, "fp32");
        }
    }
}

#[test]
fn the_cli_classifies_the_shipped_examples() {
    let out = inferd(&[
        "infer",
        "--local",
        "--model",
        "color",
        "--json",
        "examples/red.jpg",
        "examples/green.jpg",
        "examples/blue.jpg",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for (line, color) in lines.iter().zip(["red", "green", "blue"]) {
        assert_eq!(line["result"]["classes"][0]["label"], color, "{line}");
        assert_eq!(line["backend"], "ort");
        assert_eq!(line["provider"], "CPUExecutionProvider");
        assert!(line["timings"]["infer_ms"].as_f64().unwrap() >= 0.0);
    }
}

#[test]
fn raw_tensors_run_through_the_cli_on_both_backends_and_variants() {
    let expected = expected();
    let case = expected["tensor_cases"].as_array().unwrap().iter().find(|c| c["model"] == "mixed").unwrap().clone();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(&input, json!({"inputs": case["inputs"]}).to_string()).unwrap();
    for backend in ["ort", "tract"] {
        let out = inferd(&["infer", "--local", "-m", "mixed", "--backend", backend, "--json", input.to_str().unwrap()]);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["result"]["outputs"]["best"]["data"], case["outputs"]["best"]["data"], "{backend}");
        assert_eq!(v["result"]["outputs"]["best"]["dtype"], "i64");
        let d =
            max_abs_diff(&numbers(&v["result"]["outputs"]["sum"]["data"]), &numbers(&case["outputs"]["sum"]["data"]));
        assert!(d <= TOLERANCE, "{backend}: sum differs by {d}");
    }
    let out = inferd(&[
        "infer",
        "--local",
        "-m",
        "mlp",
        "--variant",
        "small",
        "--json",
        repo("tests/fixtures/mlp-input.json").to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["variant"], "small");
    assert_eq!(v["result"]["outputs"]["y"]["shape"], json!([1, 4]));
}

#[test]
fn bad_images_get_a_clear_error_and_exit_code_4_on_both_backends() {
    let cases = [
        ("truncated.jpg", "truncated JPEG"),
        ("truncated.png", "truncated PNG"),
        ("empty.jpg", "empty"),
        ("bomb.png", "over the decoder limits"),
        ("not-an-image.jpg", "not a JPEG or PNG"),
    ];
    for backend in ["ort", "tract"] {
        for (file, message) in cases {
            let path = repo("tests/fixtures").join(file);
            let out = inferd(&["infer", "--local", "-m", "color", "--backend", backend, path.to_str().unwrap()]);
            let (_, stderr) = text(&out);
            assert_eq!(out.status.code(), Some(4), "{file} on {backend}: {stderr}");
            assert!(stderr.contains("bad_input") && stderr.contains(message), "{file} on {backend}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn one_bad_file_does_not_stop_the_others() {
    let out = inferd(&["infer", "--local", "-m", "color", "tests/fixtures/empty.jpg", "examples/green.jpg"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stdout.contains("examples/green.jpg: green"), "{stdout}");
}

#[test]
fn bad_tensors_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            json!({"inputs": {"x": {"shape": [1, 15], "dtype": "f32", "data": vec![0.0; 15]}}}),
            "must have shape [?, 16]",
        ),
        (json!({"inputs": {"x": {"shape": [1, 16], "dtype": "i64", "data": vec![0; 16]}}}), "must be f32, got i64"),
        (json!({"inputs": {"z": {"shape": [1], "dtype": "f32", "data": [0.0]}}}), "no input 'z'"),
        (
            json!({"inputs": {"x": {"shape": [1, 16], "dtype": "f32", "data": [1.0]}}}),
            "needs 16 elements but data has 1",
        ),
        (
            json!({"inputs": {"x": {"shape": [9223372036854775807i64, 4], "dtype": "f32", "data": []}}}),
            "more elements than the limit",
        ),
        (json!({"tensors": {}}), "invalid JSON request (unknown field `tensors`"),
    ];
    for (i, (body, message)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("{i}.json"));
        std::fs::write(&file, body.to_string()).unwrap();
        let out = inferd(&["infer", "--local", "-m", "mlp", file.to_str().unwrap()]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(4), "{body}: {stderr}");
        assert!(stderr.contains(message), "{body}: {stderr}");
    }
}

#[test]
fn an_unknown_model_exits_5_and_says_so() {
    let out = inferd(&["infer", "--local", "-m", "nosuch", "examples/red.jpg"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("no model named 'nosuch'"), "{stderr}");
}

#[test]
fn check_passes_on_the_shipped_registry() {
    let out = inferd(&["check"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let models = shipped_registry()["models"].as_array().unwrap().clone();
    let variants: usize = models.iter().map(|m| m["variants"].as_array().unwrap().len()).sum();
    assert!(stdout.contains(&format!("OK ({} models, {variants} variants checked)", models.len())), "{stdout}");
    assert!(models.len() >= 6 && variants >= 8, "{stdout}");
}

#[test]
fn a_sha256_mismatch_is_named_by_check_and_refused_at_load() {
    let mut registry = json!({"models": [shipped_model("color")]});
    registry["models"][0]["variants"][0]["sha256"] = json!("0".repeat(64));
    let reg = TempRegistry::new(&registry);
    let out = inferd(&["check", "--models", &reg.path_str()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("models[0].variants[0].sha256: sha256 mismatch"), "{stderr}");

    let out = inferd(&["infer", "--local", "--models", &reg.path_str(), "-m", "color", "examples/red.jpg"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("sha256 mismatch"), "{stderr}");
}

#[test]
fn a_spec_that_contradicts_the_model_is_named_by_check_and_refused_at_load() {
    let mut registry = json!({"models": [shipped_model("color"), shipped_model("tinycnn")]});
    registry["models"][0]["input"]["width"] = json!(32);
    registry["models"][1]["input"]["tensor"] = json!("pixels");
    registry["models"][1]["labels"] = json!("models/color/labels.txt");
    let reg = TempRegistry::new(&registry);
    let out = inferd(&["check", "--models", &reg.path_str(), "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let paths: Vec<&str> = report["problems"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert!(paths.contains(&"models[0].input.width"), "{report}");
    assert!(paths.contains(&"models[1].input.tensor"), "{report}");
    assert!(paths.contains(&"models[1].labels"), "{report}");

    for backend in ["ort", "tract"] {
        let out = inferd(&[
            "infer",
            "--local",
            "--models",
            &reg.path_str(),
            "-m",
            "color",
            "--backend",
            backend,
            "examples/red.jpg",
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(6), "{backend}: {stderr}");
        assert!(stderr.contains("color.input.width: spec says 32"), "{backend}: {stderr}");
    }
}

#[test]
fn structural_problems_are_all_reported_with_their_json_paths() {
    let mut second = shipped_model("mlp");
    second["name"] = json!("color");
    second["variants"][1]["file"] = json!("models/mlp/missing.onnx");
    let reg = TempRegistry::new(&json!({"models": [shipped_model("color"), second]}));
    let out = inferd(&["check", "--models", &reg.path_str()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("models[1].name: duplicate model name 'color'"), "{stderr}");
    assert!(stderr.contains("models[1].variants[1].file: file"), "{stderr}");

    let mut unknown = shipped_model("mlp");
    unknown["task"] = json!("telepathy");
    let reg = TempRegistry::new(&json!({"models": [unknown]}));
    let out = inferd(&["check", "--models", &reg.path_str()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("models[0].task: unknown variant `telepathy`"), "{stderr}");
}

#[test]
fn without_onnx_runtime_auto_runs_on_tract_and_says_so() {
    let env = [("INFERD_RUNTIME__ONNXRUNTIME", "/nonexistent/libonnxruntime.so.1.31.1")];
    let out = inferd_env(&["models", "--json"], &env);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["runtime"]["available"], false);
    assert!(v["runtime"]["reason"].as_str().unwrap().contains("/nonexistent/libonnxruntime.so.1.31.1"));
    for m in v["models"].as_array().unwrap() {
        assert_eq!(m["backend"], "tract", "{m}");
        assert!(m["backend_reason"].as_str().unwrap().contains("fell back to tract"), "{m}");
    }
    let out = inferd_env(&["models"], &env);
    assert!(text(&out).0.contains("ONNX Runtime is NOT available"));

    let out = inferd_env(&["infer", "--local", "-m", "color", "examples/blue.jpg"], &env);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("blue") && stdout.contains("on tract/tract-cpu"), "{stdout}");

    let out = inferd_env(&["infer", "--local", "-m", "color", "--backend", "ort", "examples/blue.jpg"], &env);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("ONNX Runtime was requested but is not available"), "{stderr}");
}

#[test]
fn the_library_is_taken_from_the_environment_and_the_config_file() {
    let lib = repo(&format!("runtime/onnxruntime/{}/libonnxruntime.so.1.31.1", std::env::consts::ARCH));
    let lib = lib.to_str().unwrap();
    let out = inferd_env(&["models", "--json"], &[("ORT_DYLIB_PATH", lib)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runtime"]["available"], true, "{v}");
    assert!(v["runtime"]["onnxruntime"].as_str().unwrap().contains(lib));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[runtime]\nonnxruntime = \"/elsewhere/libonnxruntime.so\"\n").unwrap();
    let out = inferd_env(&["--config", config.to_str().unwrap(), "models", "--json"], &[("ORT_DYLIB_PATH", lib)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runtime"]["available"], false, "config comes before ORT_DYLIB_PATH: {v}");

    let out = inferd(&["--config", "/nonexistent/inferd.toml", "models"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("/nonexistent/inferd.toml does not exist"));
}

#[test]
fn models_says_which_variant_and_backend_each_model_uses_and_why() {
    let out = inferd(&["models", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mlp = v["models"].as_array().unwrap().iter().find(|m| m["name"] == "mlp").unwrap();
    assert_eq!(mlp["variant"], "large");
    let reason = mlp["variant_reason"].as_str().unwrap();
    assert!(reason.starts_with("'large' needs 48 MiB (estimated), fits in"), "{reason}");
    assert_eq!(mlp["needs"][1]["need_mib"], 12);
    assert_eq!(mlp["needs"][1]["source"], "estimate");
    assert!(v["memory"]["room_bytes"].as_u64().unwrap() > 0);
    assert_eq!(mlp["backend"], "ort");
    assert!(mlp["backend_reason"].as_str().unwrap().contains("auto prefers ONNX Runtime"));
    assert_eq!(mlp["variants"], json!(["large", "small"]));
}

#[test]
fn an_unavailable_provider_falls_back_to_cpu_with_the_reason_logged() {
    let out = inferd_env(
        &["-v", "infer", "--local", "-m", "color", "examples/red.jpg"],
        &[("INFERD_RUNTIME__PROVIDERS", "cuda,cpu")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("ort/CPUExecutionProvider"), "{stdout}");
    assert!(stderr.contains("CUDAExecutionProvider") && stderr.contains("failed to register"), "{stderr}");
}

#[tokio::test]
async fn run_serves_until_shutdown_and_refuses_a_bad_registry() {
    let config = Config { models: Some(repo("models.json")), ..Config::default() };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(inferd::run(config, async {
        let _ = rx.await;
    }));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!daemon.is_finished(), "run returned before shutdown");
    tx.send(()).unwrap();
    daemon.await.unwrap().unwrap();

    let reg = TempRegistry::new(&json!({"models": [{"name": "x", "task": "raw", "variants": []}]}));
    let config = Config { models: Some(reg.path()), ..Config::default() };
    let err = inferd::run(config, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("models[0].variants: a model needs at least one variant"), "{err}");
}

#[test]
fn yolo_v5_and_v8_outputs_decode_like_the_reference_decoder_on_both_backends() {
    let expected = expected();
    let reg = detector_registry();
    let out = inferd(&["check", "--models", &reg.path_str()]);
    assert!(out.status.success(), "{}", text(&out).1);
    let engine = Engine::new(Config::default(), Registry::load(&reg.path()).unwrap());
    for case in expected["detection_cases"].as_array().unwrap() {
        let layout = case["layout"].as_str().unwrap();
        let bytes = std::fs::read(repo(case["image"].as_str().unwrap())).unwrap();
        for backend in [BackendChoice::Ort, BackendChoice::Tract] {
            let options = LoadOptions { backend: Some(backend), variant: None };
            let mut model = engine.load(&format!("detector-{layout}"), &options).unwrap();
            let out = model.infer(JobInput::Image(bytes.clone()), &JobOptions::default()).unwrap();
            let JobResult::Detections { detections } = out.result else { panic!("not detections") };
            let want = case["detections"].as_array().unwrap();
            assert_eq!(detections.len(), want.len(), "{layout} on {backend:?}: {detections:?}");
            for (got, want) in detections.iter().zip(want) {
                assert_eq!(got.index as u64, want["index"].as_u64().unwrap(), "{layout} {backend:?}");
                assert_eq!(got.label.as_deref(), want["label"].as_str());
                assert!((got.score as f64 - want["score"].as_f64().unwrap()).abs() < 1e-5, "{got:?} vs {want}");
                let d = max_abs_diff(&got.bbox.map(f64::from), &numbers(&want["box"]));
                assert!(d < 1e-3, "{layout} {backend:?}: box {:?} vs {} ({d})", got.bbox, want["box"]);
            }
        }
    }
    let out = inferd(&["infer", "--local", "--models", &reg.path_str(), "-m", "detector-yolov8", "examples/red.jpg"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("cat 0.855 at (18,18)-(42,36)"), "{stdout}");
}

#[test]
fn a_phone_photo_stored_sideways_gets_the_upright_photos_classes_and_boxes() {
    // phone-tag-6.jpg: a portrait photo as a phone writes it, the sensor's landscape pixels and EXIF
    // orientation 6; phone-upright.png: what Pillow reads from it, turned upright, as transformers'
    // load_image reads it (scripts/make_orientation_fixtures.py). The same pixels, so the same
    // classes and scores, and boxes in the upright image's coordinates; with the switch off the
    // stored pixels give other answers.
    let tagged = std::fs::read(repo("tests/fixtures/orientation/phone-tag-6.jpg")).unwrap();
    let upright = std::fs::read(repo("tests/fixtures/orientation/phone-upright.png")).unwrap();
    let detectors = detector_registry();
    let run = |exif: bool, registry: &std::path::Path, model: &str, image: &[u8]| {
        let mut config = Config::default();
        config.limits.exif_orientation = exif;
        let engine = Engine::new(config, Registry::load(registry).unwrap());
        let mut m = engine.load(model, &LoadOptions::default()).unwrap();
        let out = m.infer(JobInput::Image(image.to_vec()), &JobOptions::default()).unwrap();
        serde_json::to_value(out.result).unwrap()
    };
    for (registry, model) in [(repo("models.json"), "tinycnn"), (detectors.path(), "detector-yolov8")] {
        let want = run(true, &registry, model, &upright);
        assert_eq!(run(true, &registry, model, &tagged), want, "{model}: the tagged photo is read upright");
        assert_ne!(run(false, &registry, model, &tagged), want, "{model}: read as stored, another answer");
    }
    // Boxes are in the upright image's coordinates: 192 wide, 256 high.
    let found = run(true, &detectors.path(), "detector-yolov8", &tagged);
    let boxes: Vec<Vec<f64>> = found["detections"].as_array().unwrap().iter().map(|d| numbers(&d["box"])).collect();
    assert!(!boxes.is_empty(), "{found}");
    assert!(boxes.iter().all(|b| b[2] <= 192.0 && b[3] <= 256.0), "{found}");
    assert!(boxes.iter().any(|b| b[3] > 192.0), "some box reaches below the stored height: {found}");
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_embeddings_match_python_and_rank_paraphrases_first() {
    let expected = expected();
    let case = &expected["embedding_case"];
    let texts: Vec<String> =
        case["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let mut model = engine().load("minilm", &LoadOptions::default()).unwrap();
    let out = model.infer(JobInput::Text(texts.clone()), &JobOptions::default()).unwrap();
    let JobResult::Embeddings { embeddings, dimensions } = out.result else { panic!("not embeddings") };
    assert_eq!((embeddings.len(), dimensions), (texts.len(), 384));
    for (i, (got, want)) in embeddings.iter().zip(case["embeddings"].as_array().unwrap()).enumerate() {
        let c = cosine(got, &numbers(want));
        assert!(c >= 0.999, "text {i} ({:.40}): cosine {c} to Python", texts[i]);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
    }
    let sim = |a: usize, b: usize| cosine(&embeddings[a], &embeddings[b].iter().map(|x| *x as f64).collect::<Vec<_>>());
    assert!(sim(0, 1) > sim(0, 2) + 0.3 && sim(0, 1) > sim(0, 3) + 0.3, "paraphrase > unrelated");
    // One text at a time gives the same vectors as the batch (padding does not leak in).
    let single = model.infer(JobInput::Text(vec![texts[3].clone()]), &JobOptions::default()).unwrap();
    let JobResult::Embeddings { embeddings: one, .. } = single.result else { panic!() };
    assert!(cosine(&one[0], &embeddings[3].iter().map(|x| *x as f64).collect::<Vec<_>>()) > 0.9999);

    for (input, message) in [
        (JobInput::Text(vec![]), "no text given"),
        (JobInput::Text(vec!["   ".into()]), "text 0 is empty"),
        (JobInput::Text(vec!["x".repeat(70_000)]), "over the limit"),
        (JobInput::Image(vec![1, 2, 3]), "takes text"),
    ] {
        let err = model.infer(input, &JobOptions::default()).unwrap_err();
        assert_eq!(err.kind, inferd::error::ErrorKind::BadInput);
        assert!(err.message.contains(message), "{err}");
    }
}

#[test]
fn a_one_pixel_image_is_served_and_a_12000_square_one_is_refused_for_every_image_task() {
    let reg = detector_registry();
    let engine_det = Engine::new(Config::default(), Registry::load(&reg.path()).unwrap());
    let one = std::fs::read(repo("tests/fixtures/one-pixel.png")).unwrap();
    let huge = std::fs::read(repo("tests/fixtures/huge-12000.png")).unwrap();
    let mut color = engine().load("color", &LoadOptions::default()).unwrap();
    let out = color.infer(JobInput::Image(one.clone()), &JobOptions::default()).unwrap();
    let JobResult::Classification { classes } = out.result else { panic!() };
    assert_eq!(classes[0].label.as_deref(), Some("red"));
    let mut det = engine_det.load("detector-yolov8", &LoadOptions::default()).unwrap();
    let out = det.infer(JobInput::Image(one), &JobOptions::default()).unwrap();
    let JobResult::Detections { detections } = out.result else { panic!() };
    assert!(
        detections.iter().all(|d| d.bbox.iter().all(|&v| (0.0..=1.0).contains(&v))),
        "boxes stay inside a 1x1 image"
    );
    for model in [&mut color, &mut det] {
        let err = model.infer(JobInput::Image(huge.clone()), &JobOptions::default()).unwrap_err();
        assert!(err.message.contains("12000x12000 = 144000000 pixels, over the limit"), "{err}");
    }
}

#[test]
fn pp_ocr_recognisers_read_a_rendered_line_like_python_with_their_own_dictionary() {
    use inferd::backend::onnx_file;
    use inferd::pipeline::ctc;
    for (model, classes) in [("v4", 6625), ("v6-small", 18710)] {
        let file = repo(&format!("models/fetched/ocr/{model}/rec.onnx"));
        let meta = onnx_file::metadata(&file).unwrap();
        let list = ctc::paddle_classes(&meta["character"]);
        assert_eq!(list.len(), classes, "{model}: blank + dictionary + space");
        let io = onnx_file::declared_io(&file).unwrap();
        assert_eq!(io.outputs[0].shape.last().copied().flatten(), Some(classes), "{model}: matches the output");
    }
    let expected = expected();
    let case = &expected["text_line_case"];
    let bytes = std::fs::read(repo("tests/fixtures").join(case["image"].as_str().unwrap())).unwrap();
    let rgb = inferd::pipeline::image::decode(&bytes, &Default::default()).unwrap();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            // BGR, as PP-OCR was trained on OpenCV images
            data[c * w * h + i] = (px.0[2 - c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    let file = repo("models/fetched/ocr/v4/rec.onnx");
    let mut rec =
        backend::load(BackendKind::Ort, &file, &backend::LoadRequest::cpu(&RuntimeConfig::default())).unwrap();
    let input = Tensor::new(vec![1, 3, h, w], TensorData::F32(data)).unwrap();
    let out = rec.run(vec![("x".into(), input)]).unwrap();
    let TensorData::F32(probs) = &out[0].1.data else { panic!("not f32") };
    let classes = ctc::paddle_classes(&inferd::backend::onnx_file::metadata(&file).unwrap()["character"]);
    let (text, confidence) = ctc::greedy(probs, &classes).unwrap();
    assert_eq!(text, case["text"].as_str().unwrap(), "same text as Python");
    assert_eq!(text.trim(), case["rendered"].as_str().unwrap(), "and it is what was rendered");
    assert!(confidence > 0.8, "{confidence}");
}

fn color_with_providers(providers: serde_json::Value, strict: Option<bool>) -> TempRegistry {
    let mut color = shipped_model("color");
    color["providers"] = providers;
    if let Some(s) = strict {
        color["strict_providers"] = json!(s);
    }
    TempRegistry::new(&json!({"models": [color]}))
}

#[test]
fn a_provider_that_cannot_register_falls_back_saying_why_and_placement_is_reported() {
    // The PyPI CPU library has no CUDA provider: registration fails with ONNX Runtime's own words.
    let registry =
        color_with_providers(json!([{"name": "cuda", "device_id": 0, "gpu_mem_limit_mb": 512}, "cpu"]), None);
    let out = inferd(&["models", "--load", "--models", &registry.path_str()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("loaded on CPUExecutionProvider: CPUExecutionProvider 2 nodes"), "{stdout}");
    assert!(stderr.contains("CUDAExecutionProvider") && stderr.contains("failed to register"), "{stderr}");
    let out = inferd(&["models", "--load", "--json", "--models", &registry.path_str()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = &v["models"][0];
    assert_eq!(row["providers"][0]["name"], "cuda", "options are kept: {row}");
    assert_eq!(row["placement"]["registered"], json!(["CPUExecutionProvider"]));
    assert_eq!(row["placement"]["nodes"]["CPUExecutionProvider"], 2);
}

#[test]
fn strict_providers_refuse_the_silent_cpu_fallback() {
    let registry = color_with_providers(json!(["cuda", "cpu"]), Some(true));
    let out = inferd(&["models", "--load", "--models", &registry.path_str()]);
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains("cannot load") && stdout.contains("strict providers: CUDAExecutionProvider failed to register"),
        "{stdout}{stderr}"
    );
    // Through the daemon the same refusal is a 503 with the reason.
    let daemon = Daemon::start(|c| c.models = Some(registry.path()));
    let img = std::fs::read(repo("examples/red.jpg")).unwrap();
    let r = daemon.client().post("/v1/models/color/infer", "image/jpeg", &img).unwrap();
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("strict providers"), "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn tensorrt_first_serves_at_once_and_keys_its_engine_cache() {
    let state = tempfile::tempdir().unwrap();
    let registry = color_with_providers(json!([{"name": "tensorrt", "fp16": true}, "cpu"]), None);
    let mut config = Config::default();
    config.memory.state_dir = Some(state.path().to_path_buf());
    let engine = Engine::new(config, Registry::load(&registry.path()).unwrap());
    let mut model = engine.load("color", &LoadOptions::default()).unwrap();
    // No engine cached: it serves on the rest of the list while TensorRT builds on a thread of its own.
    let placement = model.placement().unwrap().clone();
    assert_eq!(placement.building.as_deref(), Some("TensorRT"), "{placement:?}");
    assert_eq!(model.provider(), "CPUExecutionProvider");
    let img = std::fs::read(repo("examples/red.jpg")).unwrap();
    let out = model.infer(JobInput::Image(img.clone()), &JobOptions::default()).unwrap();
    let JobResult::Classification { classes } = out.result else { panic!() };
    assert_eq!(classes[0].label.as_deref(), Some("red"));
    // The engine folder is keyed and described.
    let model_dir = state.path().join("tensorrt/color");
    let dirs: Vec<_> = std::fs::read_dir(&model_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs[0].join("manifest.json")).unwrap()).unwrap();
    assert_eq!((manifest["precision"].as_str(), manifest["onnxruntime"].as_str()), (Some("fp16"), Some("1.31.1")));
    assert_eq!(manifest["model_sha256"], shipped_model("color")["variants"][0]["sha256"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while model.placement().unwrap().building.is_some() {
        assert!(std::time::Instant::now() < deadline, "the background build never ended");
        std::thread::sleep(std::time::Duration::from_millis(50));
        model.infer(JobInput::Image(img.clone()), &JobOptions::default()).unwrap();
    }
    // Where this ONNX Runtime has no TensorRT the build fails and the model stays on
    // CPU; where it has (a Jetson), the built engine takes over.
    use ort::ep::ExecutionProvider as _;
    let expected = if ort::ep::TensorRT::is_available().unwrap_or(false) {
        "TensorrtExecutionProvider"
    } else {
        "CPUExecutionProvider"
    };
    assert_eq!(model.provider(), expected);
}

#[test]
fn provider_tables_come_from_the_config_file_and_names_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "[runtime]\nstrict_providers = true\nproviders = [{ name = \"tensorrt\", fp16 = false, max_workspace_mb = 1024, profile_min = { x = [1, 3, 32, 32] } }, \"cuda\", \"cpu\"]\n",
    )
    .unwrap();
    let c = Config::load_from(Some(&file), std::path::Path::new("/nonexistent"), Vec::new()).unwrap();
    assert!(c.runtime.strict_providers);
    let names: Vec<&str> = c.runtime.providers.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["tensorrt", "cuda", "cpu"]);
    let v = serde_json::to_value(&c.runtime.providers[0]).unwrap();
    assert_eq!((v["fp16"].clone(), v["max_workspace_mb"].clone()), (json!(false), json!(1024)));
    std::fs::write(&file, "[runtime]\nproviders = [{ name = \"cuda\", gpu_mem = 5 }]\n").unwrap();
    let err = Config::load_from(Some(&file), std::path::Path::new("/nonexistent"), Vec::new()).unwrap_err();
    assert!(err.to_string().contains("gpu_mem"), "{err}");
    let env = vec![("INFERD_RUNTIME__PROVIDERS".to_string(), "coreml,cpu".to_string())];
    let c = Config::load_from(None, std::path::Path::new("/nonexistent"), env).unwrap();
    assert_eq!(c.runtime.providers.iter().map(|p| p.name()).collect::<Vec<_>>(), ["coreml", "cpu"]);
}

#[test]
fn batching_needs_a_dynamic_batch_dimension_and_a_single_graph_task() {
    let fixture = repo("tests/fixtures/models/busy.onnx");
    let busy = json!({"name": "busy", "task": "raw", "batch": {"max_batch": 4},
        "variants": [{"name": "v", "file": fixture, "sha256": sha256_of(&fixture)}]});
    let mut ocr = shipped_model("ocr");
    ocr["batch"] = json!({"max_batch": 4});
    let registry = TempRegistry::new(&json!({"models": [busy]}));
    let out = inferd(&["check", "--models", &registry.path_str()]);
    let (_, stderr) = text(&out);
    assert!(stderr.contains("models[0].batch: 'x' [1, 128] has no dynamic batch dimension"), "{stderr}");
    let registry = TempRegistry::new(&json!({"models": [ocr]}));
    let out = inferd(&["check", "--models", &registry.path_str()]);
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains(
            "models[0].batch: batching is for image-classification, object-detection and raw models, not ocr"
        ),
        "{stderr}"
    );
}

#[test]
fn session_options_apply_and_the_optimised_graph_is_reused() {
    let state = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.memory.state_dir = Some(state.path().to_path_buf());
    config.runtime.optimized_model_cache = true;
    config.runtime.intra_threads = 1;
    config.runtime.inter_threads = 2;
    config.runtime.cpu_arena = false;
    config.runtime.memory_pattern = false;
    let engine = Engine::new(config, Registry::load(&repo("models.json")).unwrap());
    let img = std::fs::read(repo("examples/green.jpg")).unwrap();
    let label = |engine: &Engine| {
        let mut m = engine.load("tinycnn", &LoadOptions::default()).unwrap();
        let out = m.infer(JobInput::Image(img.clone()), &JobOptions::default()).unwrap();
        let JobResult::Classification { classes } = out.result else { panic!() };
        (classes[0].index, classes[0].score)
    };
    let first = label(&engine);
    let saved: Vec<_> = std::fs::read_dir(state.path().join("optimized")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let name = saved[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("tinycnn-") && name.ends_with("-ort1.31.1.onnx"), "{name}");
    let modified = std::fs::metadata(&saved[0]).unwrap().modified().unwrap();
    // Second load starts from the saved graph (not rewritten) and answers the same.
    let second = label(&engine);
    assert_eq!(first.0, second.0);
    assert!((first.1 - second.1).abs() < 1e-5);
    assert_eq!(std::fs::metadata(&saved[0]).unwrap().modified().unwrap(), modified);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, "[runtime]\ngraph_optimization = \"extended\"\nspinning = true\ninter_threads = 2\n")
        .unwrap();
    let c = Config::load_from(Some(&file), std::path::Path::new("/nonexistent"), Vec::new()).unwrap();
    assert_eq!(c.runtime.graph_optimization, inferd::config::GraphOptimization::Extended);
    assert!(c.runtime.spinning == Some(true) && c.runtime.inter_threads == 2);
    std::fs::write(&file, "[runtime]\ngraph_optimization = \"max\"\n").unwrap();
    assert!(Config::load_from(Some(&file), std::path::Path::new("/nonexistent"), Vec::new()).is_err());
}

#[test]
fn a_library_that_is_there_but_does_not_load_falls_back_to_tract_at_load() {
    // The plan only sees the file (the daemon loads ONNX Runtime with its first model);
    // when loading it fails, an `auto` model runs on tract and says why.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a shared library").unwrap();
    let out = inferd_env(
        &["infer", "--local", "--model", "color", "--json", "examples/red.jpg"],
        &[("INFERD_RUNTIME__ONNXRUNTIME", fake.to_str().unwrap())],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!((v["backend"].as_str(), v["result"]["classes"][0]["label"].as_str()), (Some("tract"), Some("red")));
}
