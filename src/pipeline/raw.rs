//! The `raw` task: named tensors in, every output tensor back, for any model.
//! Names, types and shapes are checked against the model by the backend.

use super::{Context, Graph, GraphInput, Pipeline, Prepare, Prepared, Section, SingleGraph, SpecProblem, TaskSpec};
use crate::backend::NamedTensors;
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{InputKind, JobInput, JobOptions, JobResult};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The models.json section of a `raw` model: nothing beyond the model's own fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {}

impl Section for RawSpec {
    const TASK: &'static str = "raw";
}

impl TaskSpec for RawSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        (&[InputKind::Tensors], "named tensors: {\"inputs\": {...}}")
    }

    fn batches(&self) -> bool {
        true
    }

    fn validate(&self) -> Vec<SpecProblem> {
        Vec::new()
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        Ok(Box::new(RawPipeline(Arc::new(CheckTensors { limits: graph.limits.clone() }))))
    }
}

/// Passes tensors through untouched.
struct RawPipeline(Arc<CheckTensors>);

/// Checks a job's tensors against the limits.
struct CheckTensors {
    limits: Limits,
}

impl Prepare for CheckTensors {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        match input {
            JobInput::Tensors(t) if t.is_empty() => Err(InferError::bad_input("no input tensors given")),
            JobInput::Tensors(t) => {
                for (name, tensor) in &t {
                    if tensor.data.len() > self.limits.max_tensor_elements {
                        return Err(InferError::bad_input(format!(
                            "input '{name}' has {} elements, over the limit of {}",
                            tensor.data.len(),
                            self.limits.max_tensor_elements
                        )));
                    }
                }
                Ok(Prepared::new(GraphInput { tensors: t, ctx: Context::default() }))
            }
            _ => Err(InferError::bad_input("the raw task takes named tensors: {\"inputs\": {...}}")),
        }
    }
}

impl SingleGraph for RawPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.0.clone()
    }

    fn finish(&self, outputs: NamedTensors, _ctx: &Context, _options: &JobOptions) -> Result<JobResult, InferError> {
        Ok(JobResult::Tensors { outputs: outputs.into_iter().map(|(n, t)| (n, t.to_json())).collect() })
    }
}
