//! The `raw` task: named tensors in, every output tensor back, for any model.
//! Names, types and shapes are checked against the model by the backend.

use super::{Context, SingleGraph};
use crate::backend::NamedTensors;
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobResult};

/// Passes tensors through untouched.
pub struct RawPipeline;

impl SingleGraph for RawPipeline {
    fn prepare(&self, input: JobInput, limits: &Limits) -> Result<(NamedTensors, Context), InferError> {
        match input {
            JobInput::Tensors(t) if t.is_empty() => Err(InferError::bad_input("no input tensors given")),
            JobInput::Tensors(t) => {
                for (name, tensor) in &t {
                    if tensor.data.len() > limits.max_tensor_elements {
                        return Err(InferError::bad_input(format!(
                            "input '{name}' has {} elements, over the limit of {}",
                            tensor.data.len(),
                            limits.max_tensor_elements
                        )));
                    }
                }
                Ok((t, Context::default()))
            }
            _ => Err(InferError::bad_input("the raw task takes named tensors: {\"inputs\": {...}}")),
        }
    }

    fn finish(&self, outputs: NamedTensors, _ctx: &Context, _options: &JobOptions) -> Result<JobResult, InferError> {
        Ok(JobResult::Tensors { outputs: outputs.into_iter().map(|(n, t)| (n, t.to_json())).collect() })
    }
}
