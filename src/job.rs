//! A job as the core sees it, transport-neutral: what comes in
//! ([`JobInput`] + [`JobOptions`]) and what goes back ([`JobOutput`] or an
//! [`InferError`](crate::error::InferError)). Front-ends translate to and from these.

use crate::backend::{BackendKind, NamedTensors};
use crate::tensor::TensorJson;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a client sends.
#[derive(Debug, Clone)]
pub enum JobInput {
    /// An encoded image (JPEG, PNG), for image tasks.
    Image(Vec<u8>),
    /// Named tensors, for the `raw` task.
    Tensors(NamedTensors),
}

/// Per-request options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobOptions {
    /// How many classes to return (classification); default from models.json.
    pub top_k: Option<usize>,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub pre_ms: f64,
    pub infer_ms: f64,
    pub post_ms: f64,
}

/// One scored class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub score: f32,
}

/// The task-specific answer.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum JobResult {
    /// `image-classification`: best classes first.
    Classification { classes: Vec<ClassScore> },
    /// `raw`: every output tensor by name.
    Tensors {
        outputs: BTreeMap<String, TensorJson>,
    },
}

/// A finished job: which model, variant and engine answered, how long it took, and the result.
#[derive(Debug, Clone, Serialize)]
pub struct JobOutput {
    pub model: String,
    pub variant: String,
    pub backend: BackendKind,
    pub provider: String,
    pub timings: Timings,
    pub result: JobResult,
}
