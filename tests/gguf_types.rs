//! scripts/gguf_to_onnx.py on every GGUF matrix type it reads: small llama
//! GGUFs of Q4_0, Q4_1, Q8_0 and F16 matrices (scripts/gguf_types_fixture.py,
//! in the converter's environment that scripts/setup.sh makes) converted to
//! the three graphs, run by ONNX Runtime (and fp32 by tract) through a prompt
//! and two cached decoding steps, against the numpy reference
//! (scripts/gguf_reference.py) on the same GGUF.

mod util;

use inferd::backend::{self, BackendKind, InferenceBackend};
use inferd::config::RuntimeConfig;
use inferd::tensor::{Tensor, TensorData};
use serde_json::Value;
use std::path::Path;
use util::*;

/// Runs `engine` through the reference's prompt and its fed tokens with the
/// cache it returns; the last position's logits of each run.
fn logits(engine: &mut dyn InferenceBackend, reference: &Value) -> Vec<Vec<f32>> {
    let n = |k: &str| reference[k].as_u64().unwrap() as usize;
    let (layers, kv_heads, head_dim) = (n("layers"), n("kv_heads"), n("head_dim"));
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect::<Vec<i64>>();
    let mut feed = ids(&reference["prompt"]);
    let fed = ids(&reference["fed"]);
    let takes_positions = engine.inputs().iter().any(|i| i.name == "position_ids");
    let mut past: Vec<Tensor> = (0..2 * layers)
        .map(|_| Tensor { shape: vec![1, kv_heads, 0, head_dim], data: TensorData::F32(Vec::new()) })
        .collect();
    let mut total = feed.len();
    let mut out = Vec::new();
    for step in 0..=fed.len() {
        let i64s = |v: Vec<i64>| Tensor { shape: vec![1, v.len()], data: TensorData::I64(v) };
        let mut inputs =
            vec![("input_ids".to_string(), i64s(feed.clone())), ("attention_mask".to_string(), i64s(vec![1; total]))];
        if takes_positions {
            inputs.push(("position_ids".to_string(), i64s(((total - feed.len()) as i64..total as i64).collect())));
        }
        for (i, t) in past.drain(..).enumerate() {
            let kv = if i % 2 == 0 { "key" } else { "value" };
            inputs.push((format!("past_key_values.{}.{kv}", i / 2), t));
        }
        let mut outputs = engine.run(inputs).unwrap();
        let take = |outputs: &mut Vec<(String, Tensor)>, name: &str| {
            let at = outputs.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("no output {name}"));
            outputs.swap_remove(at).1
        };
        let TensorData::F32(all) = take(&mut outputs, "logits").data else { panic!("logits not f32") };
        let vocab = reference["logits"][0].as_array().unwrap().len();
        out.push(all[all.len() - vocab..].to_vec());
        for i in 0..layers {
            for kv in ["key", "value"] {
                past.push(take(&mut outputs, &format!("present.{i}.{kv}")));
            }
        }
        if let Some(&token) = fed.get(step) {
            feed = vec![token];
            total += 1;
        }
    }
    out
}

#[test]
fn every_gguf_matrix_type_converts_to_the_references_logits() {
    let python = repo(".cache/convert-venv/bin/python");
    assert!(python.exists(), "{} is made by scripts/setup.sh", python.display());
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(&python)
        .arg(repo("scripts/gguf_types_fixture.py"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "gguf_types_fixture.py failed");
    let runtime = RuntimeConfig::default();
    let load = |kind, file: &Path| backend::load(kind, file, &backend::LoadRequest::cpu(&runtime)).unwrap();
    for kind in ["q4_0", "q4_1", "q8_0", "f16"] {
        let folder = dir.path().join(kind);
        let reference: Value = serde_json::from_slice(&std::fs::read(folder.join("reference.json")).unwrap()).unwrap();
        let want: Vec<Vec<f64>> = reference["logits"].as_array().unwrap().iter().map(numbers).collect();
        let spread =
            want[0].iter().cloned().fold(f64::MIN, f64::max) - want[0].iter().cloned().fold(f64::MAX, f64::min);
        // fp32 and int4 compute in f32 with the GGUF's own values: the reference's logits to
        // rounding. int4-fast quantises activations to 8 bits: close, not equal.
        for (graph, engine, tolerance) in [
            ("fp32", BackendKind::Ort, 1e-4),
            ("fp32", BackendKind::Tract, 1e-4),
            ("int4", BackendKind::Ort, 1e-4),
            ("int4-fast", BackendKind::Ort, 0.05 * spread),
        ] {
            let mut engine_of = load(engine, &folder.join(format!("{graph}.onnx")));
            let got = logits(engine_of.as_mut(), &reference);
            assert_eq!(got.len(), want.len());
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                let g: Vec<f64> = g.iter().map(|&v| v as f64).collect();
                let d = max_abs_diff(&g, w);
                assert!(
                    d <= tolerance,
                    "{kind} {graph} on {engine:?}, run {step}: logits differ by {d} (> {tolerance})"
                );
            }
        }
    }
}
