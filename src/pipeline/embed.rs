//! The `embedding` task: text in (one or a batch), tokenised with the
//! model's `tokenizer.json`, run, mean-pooled over the attention mask and
//! L2-normalised: one vector per text.

use super::{Context, Graph, GraphInput, Pipeline, Prepare, Prepared, Section, SingleGraph, SpecProblem, TaskSpec};
use crate::backend::NamedTensors;
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{InputKind, JobInput, JobOptions, JobResult};
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The models.json section of an `embedding` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSpec {
    /// How text becomes tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextSpec>,
}

impl Section for EmbeddingSpec {
    const TASK: &'static str = "embedding";
}

impl TaskSpec for EmbeddingSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        (&[InputKind::Text], "text: {\"text\": \"...\"} or {\"text\": [\"...\", ...]}")
    }

    fn files(&self) -> Vec<(String, &Path)> {
        self.text.iter().map(|t| (".text.tokenizer".to_string(), t.tokenizer.as_path())).collect()
    }

    fn validate(&self) -> Vec<SpecProblem> {
        match &self.text {
            Some(t) => t.validate(),
            None => vec![SpecProblem::new(".text", "embedding needs a 'text' spec with its tokenizer")],
        }
    }

    fn check_io(&self, _dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        self.text.as_ref().map(|t| t.check_against(inputs, outputs)).unwrap_or_default()
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let spec = self.text.clone().ok_or_else(|| InferError::unavailable("embedding needs a 'text' spec"))?;
        let path = graph.dir.join(&spec.tokenizer);
        let names = graph.inputs.iter().map(|i| i.name.clone()).collect();
        Ok(Box::new(EmbedPipeline::new(spec, &path, names, graph.limits.clone())?))
    }
}

/// models.json `text`: how text becomes token tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// A Hugging Face `tokenizer.json`, relative to models.json.
    pub tokenizer: PathBuf,
    /// Longest sequence in tokens; longer texts are truncated.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Most texts in one request.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// The output holding the token states `[batch, tokens, dims]`; default the first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// L2-normalise the pooled vectors (cosine similarity becomes a dot product).
    #[serde(default = "yes")]
    pub normalize: bool,
}

fn default_max_length() -> usize {
    256
}
fn default_max_batch() -> usize {
    64
}
fn yes() -> bool {
    true
}

/// The token inputs an encoder may declare.
const TOKEN_INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

impl TextSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        if self.max_length == 0 || self.max_length > 8192 {
            p.push(SpecProblem::new(".text.max_length", "must be 1..=8192"));
        }
        if self.max_batch == 0 {
            p.push(SpecProblem::new(".text.max_batch", "must be at least 1"));
        }
        p
    }

    /// Compares the spec with the model: token inputs (i64, 2 dims) and a 3-dim f32 output.
    pub fn check_against(&self, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        if !inputs.iter().any(|i| i.name == "input_ids") {
            p.push(SpecProblem::new(".task", "an embedding model needs an 'input_ids' input"));
        }
        for i in inputs {
            if !TOKEN_INPUTS.contains(&i.name.as_str()) {
                p.push(SpecProblem::new(".task", format!("input '{}' is not one of {TOKEN_INPUTS:?}", i.name)));
            } else if i.dtype != Some(DType::I64) || i.shape.len() != 2 {
                p.push(SpecProblem::new(
                    ".task",
                    format!("input '{}' {} must be i64 [batch, tokens]", i.name, i.shape_text()),
                ));
            }
        }
        let out = match &self.output {
            Some(name) => outputs.iter().find(|o| &o.name == name),
            None => outputs.first(),
        };
        match out {
            Some(o) if o.dtype == Some(DType::F32) && o.shape.len() == 3 => {}
            Some(o) => p.push(SpecProblem::new(
                ".text.output",
                format!("output '{}' {} must be f32 [batch, tokens, dims]", o.name, o.shape_text()),
            )),
            None => p.push(SpecProblem::new(".text.output", "the model has no such output")),
        }
        p
    }
}

/// Texts → vectors.
struct EmbedPipeline {
    prepare: Arc<Tokenise>,
}

/// Tokenises a job's texts into the token inputs the model declares.
struct Tokenise {
    spec: TextSpec,
    tokenizer: tokenizers::Tokenizer,
    /// The token inputs the model declares, in its order.
    inputs: Vec<String>,
    limits: Limits,
}

impl EmbedPipeline {
    /// Loads the tokenizer at `path` with truncation to `spec.max_length` and batch padding.
    fn new(spec: TextSpec, path: &Path, inputs: Vec<String>, limits: Limits) -> Result<EmbedPipeline, InferError> {
        let mut tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| InferError::unavailable(format!("cannot read tokenizer {}: {e}", path.display())))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams { max_length: spec.max_length, ..Default::default() }))
            .map_err(|e| InferError::unavailable(format!("tokenizer truncation: {e}")))?;
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        Ok(EmbedPipeline { prepare: Arc::new(Tokenise { spec, tokenizer, inputs, limits }) })
    }
}

impl Prepare for Tokenise {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        let limits = &self.limits;
        let JobInput::Text(texts) = input else {
            return Err(InferError::bad_input(
                "the embedding task takes text: {\"text\": \"...\"} or {\"text\": [\"...\", ...]}",
            ));
        };
        if texts.is_empty() {
            return Err(InferError::bad_input("no text given"));
        }
        if texts.len() > self.spec.max_batch {
            return Err(InferError::bad_input(format!(
                "{} texts, over the model's max_batch of {}",
                texts.len(),
                self.spec.max_batch
            )));
        }
        for (i, t) in texts.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(InferError::bad_input(format!("text {i} is empty")));
            }
            if t.len() > limits.max_text_bytes {
                return Err(InferError::bad_input(format!(
                    "text {i} is {} bytes, over the limit of {}",
                    t.len(),
                    limits.max_text_bytes
                )));
            }
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| InferError::bad_input(format!("cannot tokenise: {e}")))?;
        let (batch, len) = (encodings.len(), encodings.first().map_or(0, |e| e.len()));
        let column = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Tensor {
            let data: Vec<i64> = encodings.iter().flat_map(|e| f(e).iter().map(|&v| i64::from(v))).collect();
            Tensor { shape: vec![batch, len], data: TensorData::I64(data) }
        };
        let tensors = self
            .inputs
            .iter()
            .map(|name| {
                let t = match name.as_str() {
                    "input_ids" => column(&|e| e.get_ids()),
                    "attention_mask" => column(&|e| e.get_attention_mask()),
                    _ => column(&|e| e.get_type_ids()),
                };
                (name.clone(), t)
            })
            .collect();
        let mask: Vec<u32> = encodings.iter().flat_map(|e| e.get_attention_mask().to_vec()).collect();
        Ok(Prepared::new(GraphInput { tensors, ctx: Context { image_size: None, attention_mask: Some(mask) } }))
    }
}

impl SingleGraph for EmbedPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.prepare.clone()
    }

    fn finish(&self, outputs: NamedTensors, ctx: &Context, _options: &JobOptions) -> Result<JobResult, InferError> {
        let (name, t) = super::take_output(outputs, self.prepare.spec.output.as_deref(), "token-state")?;
        let (TensorData::F32(states), &[batch, tokens, dims]) = (&t.data, &t.shape[..]) else {
            return Err(InferError::backend(format!(
                "output '{name}' is not f32 [batch, tokens, dims]: {:?}",
                t.shape
            )));
        };
        let mask = ctx.attention_mask.as_deref().ok_or_else(|| InferError::internal("no attention mask recorded"))?;
        if mask.len() != batch * tokens {
            return Err(InferError::backend(format!("output '{name}' {:?} does not match the tokens", t.shape)));
        }
        let embeddings = (0..batch)
            .map(|b| {
                let mut v = mean_pool(
                    &states[b * tokens * dims..(b + 1) * tokens * dims],
                    &mask[b * tokens..(b + 1) * tokens],
                    dims,
                );
                if self.prepare.spec.normalize {
                    l2_normalize(&mut v);
                }
                v
            })
            .collect();
        Ok(JobResult::Embeddings { embeddings, dimensions: dims })
    }
}

/// Mean of the token vectors whose mask is 1 (`states` is `[tokens, dims]`).
pub fn mean_pool(states: &[f32], mask: &[u32], dims: usize) -> Vec<f32> {
    let mut sum = vec![0f32; dims];
    let mut count = 0f32;
    for (row, &m) in states.chunks_exact(dims).zip(mask) {
        if m != 0 {
            count += 1.0;
            for (s, &x) in sum.iter_mut().zip(row) {
                *s += x;
            }
        }
    }
    let count = count.max(1e-9);
    sum.iter_mut().for_each(|s| *s /= count);
    sum
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_ignores_padding_and_normalising_gives_unit_length() {
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        let mut v = mean_pool(&states, &[1, 1, 0], 2);
        assert_eq!(v, vec![2.0, 3.0]);
        l2_normalize(&mut v);
        assert!((v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-6);
        let mut zero = vec![0.0; 3];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}
