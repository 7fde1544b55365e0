//! The `image-classification` task: an image in, the top-k classes out,
//! after softmax or sigmoid as the model needs.

use super::image::ImageInputSpec;
use super::{Context, Graph, ImagePreparer, Pipeline, Prepare, Section, SingleGraph, SpecProblem, TaskSpec};
use crate::backend::NamedTensors;
use crate::error::InferError;
use crate::job::{ClassScore, InputKind, JobOptions, JobResult};
use crate::tensor::{DType, TensorData, TensorInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The models.json section of an `image-classification` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassificationSpec {
    /// How images become the input tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ImageInputSpec>,
    /// How the output tensor is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputSpec>,
    /// A text file with one label per line, relative to models.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
}

impl Section for ClassificationSpec {
    const TASK: &'static str = "image-classification";
}

impl TaskSpec for ClassificationSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        super::AN_IMAGE
    }

    fn files(&self) -> Vec<(String, &Path)> {
        super::label_file(&self.labels)
    }

    fn batches(&self) -> bool {
        true
    }

    fn validate(&self) -> Vec<SpecProblem> {
        let mut problems = match &self.input {
            Some(input) => input.validate(),
            None => vec![SpecProblem::new(".input", "image-classification needs an 'input' spec")],
        };
        problems.extend(self.output.iter().flat_map(OutputSpec::validate));
        problems
    }

    fn check_io(&self, dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let Some(input) = &self.input else { return Vec::new() };
        let labels = self.labels.as_ref().and_then(|l| super::read_labels(&dir.join(l)).ok());
        let mut problems = input.check_against(inputs);
        problems.extend(check_outputs(self.output.as_ref(), outputs, labels.as_deref()));
        problems
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let input =
            self.input.clone().ok_or_else(|| InferError::unavailable("image-classification needs an 'input' spec"))?;
        Ok(Box::new(ClassifyPipeline {
            prepare: Arc::new(ImagePreparer { spec: input, limits: graph.limits.clone() }),
            output: self.output.clone().unwrap_or_default(),
            labels: super::labels_at(graph.dir, self.labels.as_ref())?,
        }))
    }
}

/// What turns the output tensor into scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// The output is logits: softmax over classes.
    #[default]
    Softmax,
    /// Independent classes: sigmoid per class.
    Sigmoid,
    /// The output is already scores.
    None,
}

/// models.json `output` for classification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The output tensor to read; default the model's first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    #[serde(default)]
    pub activation: Activation,
    /// Classes returned when a request does not say.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    5
}

impl Default for OutputSpec {
    fn default() -> Self {
        OutputSpec { tensor: None, activation: Activation::Softmax, top_k: default_top_k() }
    }
}

impl OutputSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Vec<SpecProblem> {
        if self.top_k == 0 { vec![SpecProblem::new(".output.top_k", "must be at least 1")] } else { Vec::new() }
    }
}

/// Compares the output spec (and label count) with the model's declared outputs.
pub fn check_outputs(spec: Option<&OutputSpec>, outputs: &[TensorInfo], labels: Option<&[String]>) -> Vec<SpecProblem> {
    let info = match spec.and_then(|s| s.tensor.as_ref()) {
        Some(name) => match outputs.iter().find(|o| &o.name == name) {
            Some(info) => info,
            None => {
                let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
                return vec![SpecProblem::new(
                    ".output.tensor",
                    format!("the model has no output '{name}' (outputs: {})", names.join(", ")),
                )];
            }
        },
        None => match outputs.first() {
            Some(info) => info,
            None => return vec![SpecProblem::new(".output", "the model declares no outputs")],
        },
    };
    let mut p = Vec::new();
    if info.dtype != Some(DType::F32) {
        p.push(SpecProblem::new(".output.tensor", format!("output '{}' must be f32 scores", info.name)));
    }
    let classes = info.shape.last().copied().flatten();
    if let (Some(classes), Some(labels)) = (classes, labels)
        && labels.len() != classes
    {
        p.push(SpecProblem::new(
            ".labels",
            format!("{} labels, but output '{}' {} has {classes} classes", labels.len(), info.name, info.shape_text()),
        ));
    }
    p
}

/// Image → top-k labelled scores.
struct ClassifyPipeline {
    prepare: Arc<ImagePreparer>,
    output: OutputSpec,
    labels: Vec<String>,
}

impl SingleGraph for ClassifyPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.prepare.clone()
    }

    fn finish(&self, outputs: NamedTensors, _ctx: &Context, options: &JobOptions) -> Result<JobResult, InferError> {
        let (name, tensor) = super::take_output(outputs, self.output.tensor.as_deref(), "scores")?;
        let TensorData::F32(raw) = tensor.data else {
            return Err(InferError::backend(format!("output '{name}' is not f32")));
        };
        let scores = activate(&raw, self.output.activation);
        let k = options.top_k.unwrap_or(self.output.top_k);
        if k == 0 {
            return Err(InferError::bad_input("top_k must be at least 1"));
        }
        let classes = top_k(&scores, k)
            .into_iter()
            .map(|(index, score)| ClassScore { index, label: self.labels.get(index).cloned(), score })
            .collect();
        Ok(JobResult::Classification { classes })
    }
}

/// Applies `activation` to one row of scores.
pub fn activate(raw: &[f32], activation: Activation) -> Vec<f32> {
    match activation {
        Activation::None => raw.to_vec(),
        Activation::Sigmoid => raw.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
        Activation::Softmax => {
            let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = raw.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            exp.into_iter().map(|e| e / sum).collect()
        }
    }
}

/// The `k` best (index, score), best first; ties keep the lower index first; NaN sorts last.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = scores.iter().copied().enumerate().collect();
    idx.sort_by(|a, b| match (a.1.is_nan(), b.1.is_nan()) {
        (false, false) => b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)),
        (x, y) => x.cmp(&y),
    });
    idx.truncate(k);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let s = activate(&[1.0, 3.0, 2.0], Activation::Softmax);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(s[1] > s[2] && s[2] > s[0]);
        let big = activate(&[1000.0, 0.0], Activation::Softmax);
        assert!((big[0] - 1.0).abs() < 1e-6, "no overflow on large logits");
    }

    #[test]
    fn top_k_is_best_first_with_stable_ties_and_nan_last() {
        assert_eq!(top_k(&[0.1, 0.5, 0.5, f32::NAN, 0.2], 4), vec![(1, 0.5), (2, 0.5), (4, 0.2), (0, 0.1)]);
        assert_eq!(top_k(&[0.3, 0.7], 10).len(), 2);
    }

    #[test]
    fn label_count_must_match_the_class_dim() {
        let out = [TensorInfo { name: "y".into(), dtype: Some(DType::F32), shape: vec![None, Some(3)] }];
        let labels = vec!["a".to_string(), "b".to_string()];
        let p = check_outputs(None, &out, Some(&labels));
        assert_eq!(p[0].path, ".labels");
        assert!(check_outputs(None, &out, Some(&[labels.clone(), vec!["c".into()]].concat())).is_empty());
    }
}
