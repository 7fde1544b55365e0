//! The seam between inferd and inference engines: the synchronous
//! [`InferenceBackend`] trait (only ever called from a worker thread), the
//! engines behind it (ONNX Runtime, tract), and the choice between them.

pub mod onnx_file;
pub mod ort;
pub mod providers;
pub mod tract;
pub mod trt_cache;

use crate::config::RuntimeConfig;
use crate::tensor::{Tensor, TensorInfo};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// Named tensors in graph order.
pub type NamedTensors = Vec<(String, Tensor)>;

/// An inference engine holding one loaded model. Synchronous: it runs on a
/// worker thread that owns it, never on the async runtime.
pub trait InferenceBackend: Send {
    /// Which engine this is.
    fn kind(&self) -> BackendKind;
    /// The execution provider that runs the graph (`CPUExecutionProvider`, `tract`...).
    fn provider(&self) -> &str;
    /// The model's declared inputs, in graph order.
    fn inputs(&self) -> &[TensorInfo];
    /// The model's declared outputs, in graph order.
    fn outputs(&self) -> &[TensorInfo];
    /// Runs the graph on `inputs` (every declared input, by name) and returns every output.
    fn run(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError>;
    /// Runs the graph like [`InferenceBackend::run`], then gives the run's
    /// working memory back to the system where the engine keeps it pooled
    /// (ONNX Runtime's CPU arena holds on to its peak): for the rare large
    /// run, such as a long prompt's chunk, whose peak should not stay.
    fn run_releasing(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
        self.run(inputs)
    }
    /// Which providers registered and how many graph nodes each took, where the engine says.
    fn placement(&self) -> Option<&Placement> {
        None
    }
    /// Inputs the graph gives a default for (initializers that are also
    /// inputs, such as a decoder's `logits_to_keep`): a run may feed them.
    fn optional_inputs(&self) -> &[TensorInfo] {
        &[]
    }
    /// `count` f32 buffers of `shape` that the engine keeps and runs read
    /// and write in place ([`InferenceBackend::run_in_place`]), zeroed;
    /// `None` where the engine keeps none (callers pass tensors instead).
    fn new_state(&mut self, _count: usize, _shape: &[usize]) -> Option<Result<Box<dyn State>, BackendError>> {
        None
    }
    /// Runs the graph with `inputs` and, for each pair of `bind`, buffer `i`
    /// of `state` as both the input `bind[i].0` and the output `bind[i].1`
    /// (a decoder's KV cache whose past and present share one buffer: no copy
    /// into or out of the engine); returns the outputs named in `outputs`.
    /// `release`: as [`InferenceBackend::run_releasing`].
    fn run_in_place(
        &mut self,
        _inputs: NamedTensors,
        _state: &mut dyn State,
        _bind: &[(String, String)],
        _outputs: &[String],
        _release: bool,
    ) -> Result<NamedTensors, BackendError> {
        Err(BackendError::Run("this engine keeps no state between runs".into()))
    }
}

/// Buffers an engine keeps between runs ([`InferenceBackend::new_state`]):
/// equally shaped f32 tensors in host memory, readable and writable between runs.
pub trait State: Send {
    /// The shape of every buffer.
    fn shape(&self) -> &[usize];
    /// How many buffers there are.
    fn count(&self) -> usize;
    /// Buffer `i`, row-major.
    fn buffer(&mut self, i: usize) -> &mut [f32];
    /// For the engine that made it.
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// What ONNX Runtime did with a session's graph.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Providers that registered, in order of preference (CPU last).
    pub registered: Vec<String>,
    /// Graph nodes each provider took, by ONNX Runtime's provider name.
    pub nodes: std::collections::BTreeMap<String, usize>,
    /// A provider's engine is being built in the background (TensorRT); the model serves meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub building: Option<String>,
}

impl Placement {
    /// One line for logs and tables: `TensorrtExecutionProvider 120 nodes, CPUExecutionProvider 3 nodes`.
    pub fn summary(&self) -> String {
        let mut nodes: Vec<(&String, &usize)> = self.nodes.iter().collect();
        nodes.sort_by(|a, b| b.1.cmp(a.1));
        let mut s = nodes.iter().map(|(p, n)| format!("{p} {n} nodes")).collect::<Vec<_>>().join(", ");
        if let Some(b) = &self.building {
            s.push_str(&format!(" (building {b} engine)"));
        }
        s
    }
}

/// What a load needs besides the file: providers, settings, and where caches go.
#[derive(Debug, Clone)]
pub struct LoadRequest<'a> {
    pub providers: &'a [providers::ProviderSpec],
    pub runtime: &'a RuntimeConfig,
    /// Refuse to fall back from the first listed provider.
    pub strict: bool,
    /// Where engine caches (TensorRT, CoreML) are kept.
    pub state_dir: &'a Path,
    /// The model's name and the file's sha256, for cache keys and messages.
    pub model: &'a str,
    pub sha256: &'a str,
    /// Sessions of the model running side by side: the default thread count is shared among them.
    pub instances: usize,
    /// Let the engine's threads spin between operators during a run.
    pub spinning: bool,
}

impl<'a> LoadRequest<'a> {
    /// CPU only, no caches: for tools and tests that load a file directly.
    pub fn cpu(runtime: &'a RuntimeConfig) -> LoadRequest<'a> {
        LoadRequest {
            providers: &[],
            runtime,
            strict: false,
            state_dir: Path::new("/nonexistent"),
            model: "",
            sha256: "",
            instances: 1,
            spinning: runtime.spinning.unwrap_or(false),
        }
    }
}

/// The engine that runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ONNX Runtime, loaded dynamically.
    Ort,
    /// tract, pure Rust, CPU only.
    Tract,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Ort => "ort",
            BackendKind::Tract => "tract",
        })
    }
}

/// What a model (or a CLI flag) asks for: `auto` prefers ONNX Runtime and falls back to tract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Ort,
    Tract,
}

/// An ONNX Runtime execution provider inferd knows how to configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Tensorrt,
    Cuda,
    Coreml,
    Cpu,
}

impl Provider {
    /// Parses a config name (`tensorrt`, `cuda`, `coreml`, `cpu`).
    pub fn parse(name: &str) -> Option<Provider> {
        Some(match name.to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Provider::Tensorrt,
            "cuda" => Provider::Cuda,
            "coreml" => Provider::Coreml,
            "cpu" => Provider::Cpu,
            _ => return None,
        })
    }

    /// ONNX Runtime's name for it.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Tensorrt => "TensorrtExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::Coreml => "CoreMLExecutionProvider",
            Provider::Cpu => "CPUExecutionProvider",
        }
    }
}

/// Why a backend could not load or run a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The engine is not available on this machine (e.g. no ONNX Runtime library).
    #[error("{0}")]
    Unavailable(String),
    /// The engine refused the model file.
    #[error("cannot load {path}: {message}")]
    Load { path: String, message: String },
    /// The inputs do not fit the model (names, types, shapes).
    #[error("{0}")]
    Input(String),
    /// The engine failed while running.
    #[error("{0}")]
    Run(String),
}

impl From<BackendError> for crate::error::InferError {
    fn from(e: BackendError) -> Self {
        use crate::error::InferError;
        match e {
            BackendError::Input(m) => InferError::bad_input(m),
            BackendError::Run(m) => InferError::backend(m),
            e @ (BackendError::Unavailable(_) | BackendError::Load { .. }) => InferError::unavailable(e.to_string()),
        }
    }
}

/// The engine a model will run on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendDecision {
    pub backend: BackendKind,
    pub reason: String,
}

/// Decides the engine for `choice`, given whether ONNX Runtime loaded.
/// A pure function: `ort` is `Ok(description)` or `Err(why not)`.
pub fn decide(choice: BackendChoice, ort: Result<&str, &str>) -> Result<BackendDecision, BackendError> {
    let decision = |backend, reason: String| Ok(BackendDecision { backend, reason });
    match (choice, ort) {
        (BackendChoice::Tract, _) => decision(BackendKind::Tract, "tract requested".into()),
        (BackendChoice::Ort, Ok(desc)) => decision(BackendKind::Ort, format!("ONNX Runtime requested; {desc}")),
        (BackendChoice::Ort, Err(why)) => {
            Err(BackendError::Unavailable(format!("ONNX Runtime was requested but is not available: {why}")))
        }
        (BackendChoice::Auto, Ok(desc)) => decision(BackendKind::Ort, format!("auto prefers ONNX Runtime; {desc}")),
        (BackendChoice::Auto, Err(why)) => {
            decision(BackendKind::Tract, format!("auto fell back to tract: ONNX Runtime is not available ({why})"))
        }
    }
}

/// Loads `file` on `kind` (providers apply to ONNX Runtime only; in order, CPU last).
pub fn load(
    kind: BackendKind,
    file: &Path,
    request: &LoadRequest<'_>,
) -> Result<Box<dyn InferenceBackend>, BackendError> {
    match kind {
        BackendKind::Ort => Ok(Box::new(ort::OrtBackend::load(file, request)?)),
        BackendKind::Tract => Ok(Box::new(tract::TractBackend::load(file)?)),
    }
}

/// Checks `inputs` against `declared`: every declared input given once, no
/// others, dtypes equal, ranks equal and fixed dims equal. Returns the
/// inputs reordered to the declared order.
pub fn check_inputs(declared: &[TensorInfo], inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
    check_inputs_with(declared, &[], inputs)
}

/// [`check_inputs`], also taking the `optional` inputs (put after the declared ones).
pub fn check_inputs_with(
    declared: &[TensorInfo],
    optional: &[TensorInfo],
    mut inputs: NamedTensors,
) -> Result<NamedTensors, BackendError> {
    let mut extra = Vec::new();
    for info in optional {
        if let Some(pos) = inputs.iter().position(|(n, _)| n == &info.name) {
            let (name, tensor) = inputs.swap_remove(pos);
            if let Some(dtype) = info.dtype
                && dtype != tensor.dtype()
            {
                return Err(BackendError::Input(format!("input '{name}' must be {dtype}, got {}", tensor.dtype())));
            }
            extra.push((name, tensor));
        }
    }
    for (name, _) in &inputs {
        if !declared.iter().any(|d| &d.name == name) {
            let known: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
            return Err(BackendError::Input(format!("the model has no input '{name}' (inputs: {})", known.join(", "))));
        }
    }
    let mut ordered = Vec::with_capacity(declared.len());
    for info in declared {
        let pos = inputs
            .iter()
            .position(|(n, _)| n == &info.name)
            .ok_or_else(|| BackendError::Input(format!("input '{}' {} is missing", info.name, info.shape_text())))?;
        let (name, tensor) = inputs.swap_remove(pos);
        if let Some(dtype) = info.dtype
            && dtype != tensor.dtype()
        {
            return Err(BackendError::Input(format!("input '{name}' must be {dtype}, got {}", tensor.dtype())));
        }
        let fits = info.shape.len() == tensor.shape.len()
            && info.shape.iter().zip(&tensor.shape).all(|(want, got)| want.is_none_or(|w| w == *got));
        if !fits {
            return Err(BackendError::Input(format!(
                "input '{name}' must have shape {}, got {:?}",
                info.shape_text(),
                tensor.shape
            )));
        }
        ordered.push((name, tensor));
    }
    if let Some((name, _)) = inputs.first() {
        return Err(BackendError::Input(format!("input '{name}' is given twice")));
    }
    ordered.extend(extra);
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DType, TensorData};

    #[test]
    fn auto_prefers_ort_and_falls_back_to_tract_with_the_reason() {
        let d = decide(BackendChoice::Auto, Ok("ONNX Runtime 1.31.1")).unwrap();
        assert_eq!(d.backend, BackendKind::Ort);
        let d = decide(BackendChoice::Auto, Err("libonnxruntime.so not found")).unwrap();
        assert_eq!(d.backend, BackendKind::Tract);
        assert!(d.reason.contains("libonnxruntime.so not found"), "{}", d.reason);
    }

    #[test]
    fn explicit_choices_are_honoured_or_refused() {
        assert_eq!(decide(BackendChoice::Tract, Ok("x")).unwrap().backend, BackendKind::Tract);
        assert_eq!(decide(BackendChoice::Ort, Ok("x")).unwrap().backend, BackendKind::Ort);
        assert!(matches!(decide(BackendChoice::Ort, Err("gone")), Err(BackendError::Unavailable(_))));
    }

    fn info(name: &str, dtype: DType, shape: &[Option<usize>]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype: Some(dtype), shape: shape.to_vec() }
    }

    fn f32s(shape: &[usize]) -> Tensor {
        Tensor::new(shape.to_vec(), TensorData::F32(vec![0.0; shape.iter().product()])).unwrap()
    }

    #[test]
    fn inputs_are_checked_by_name_dtype_and_shape_and_put_in_order() {
        let declared = [info("a", DType::F32, &[None, Some(4)]), info("b", DType::F32, &[Some(1)])];
        let ok = check_inputs(&declared, vec![("b".into(), f32s(&[1])), ("a".into(), f32s(&[3, 4]))]).unwrap();
        assert_eq!(ok[0].0, "a");
        let err = |inputs| check_inputs(&declared, inputs).unwrap_err().to_string();
        assert!(err(vec![("a".into(), f32s(&[3, 4]))]).contains("'b' [1] is missing"));
        assert!(err(vec![("a".into(), f32s(&[3, 5])), ("b".into(), f32s(&[1]))]).contains("shape [?, 4]"));
        assert!(err(vec![("c".into(), f32s(&[1]))]).contains("no input 'c'"));
        let ints = Tensor::new(vec![1], TensorData::I64(vec![1])).unwrap();
        assert!(err(vec![("a".into(), f32s(&[3, 4])), ("b".into(), ints)]).contains("must be f32, got i64"));
        assert!(
            err(vec![("a".into(), f32s(&[3, 4])), ("b".into(), f32s(&[1])), ("b".into(), f32s(&[1]))])
                .contains("given twice")
        );
    }
}
