//! tract: a pure-Rust ONNX engine, CPU only. It needs no shared library, so
//! it is what `auto` falls back to where ONNX Runtime is absent.

use super::{BackendError, BackendKind, InferenceBackend, NamedTensors, check_inputs, onnx_file};
use crate::tensor::{Tensor, TensorData, TensorInfo};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceModelExt, IntoRunnable, IntoTValue, TValue, TVec, TypedSimplePlan,
};

/// A model optimised and made runnable by tract.
pub struct TractBackend {
    plan: Arc<TypedSimplePlan>,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl TractBackend {
    /// Parses, optimises and plans `file` once; afterwards only `run` is called.
    pub fn load(file: &Path) -> Result<TractBackend, BackendError> {
        let load_err = |message: String| BackendError::Load { path: file.display().to_string(), message };
        let io = onnx_file::declared_io(file).map_err(load_err)?;
        if !io.foreign_ops.is_empty() {
            return Err(load_err(format!(
                "tract runs standard ONNX operators only, and this graph uses {} (ONNX Runtime's own): run it on ONNX Runtime (backend ort), or pick a variant without them",
                io.foreign_ops.join(", ")
            )));
        }
        let plan = tract_onnx::onnx()
            .model_for_path(file)
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| load_err(format!("{e:#}")))?;
        Ok(TractBackend { plan, inputs: io.inputs, outputs: io.outputs })
    }
}

fn to_tvalue(t: &Tensor) -> tract_onnx::prelude::TractResult<TValue> {
    let s = &t.shape;
    let tensor = match &t.data {
        TensorData::F32(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::F64(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::I64(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::I32(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::I8(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::U8(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
        TensorData::Bool(v) => tract_onnx::prelude::Tensor::from_shape(s, v),
    }?;
    Ok(tensor.into_tvalue())
}

fn from_tvalue(name: &str, v: &TValue) -> Result<Tensor, BackendError> {
    fn grab<T: Datum + Copy>(v: &TValue, wrap: fn(Vec<T>) -> TensorData) -> tract_onnx::prelude::TractResult<Tensor> {
        let view = v.to_plain_array_view::<T>()?;
        Ok(Tensor { shape: view.shape().to_vec(), data: wrap(view.iter().copied().collect()) })
    }
    let tensor = match v.datum_type() {
        DatumType::F32 => grab::<f32>(v, TensorData::F32),
        DatumType::F64 => grab::<f64>(v, TensorData::F64),
        DatumType::I64 => grab::<i64>(v, TensorData::I64),
        DatumType::I32 => grab::<i32>(v, TensorData::I32),
        DatumType::I8 => grab::<i8>(v, TensorData::I8),
        DatumType::U8 => grab::<u8>(v, TensorData::U8),
        DatumType::Bool => grab::<bool>(v, TensorData::Bool),
        other => {
            return Err(BackendError::Run(format!("output '{name}' has a type inferd cannot carry: {other:?}")));
        }
    };
    tensor.map_err(|e| BackendError::Run(format!("reading output '{name}': {e}")))
}

impl InferenceBackend for TractBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Tract
    }

    fn provider(&self) -> &str {
        "tract-cpu"
    }

    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
        let inputs = check_inputs(&self.inputs, inputs)?;
        let values = inputs
            .iter()
            .map(|(name, t)| to_tvalue(t).map_err(|e| BackendError::Input(format!("input '{name}': {e}"))))
            .collect::<Result<TVec<_>, _>>()?;
        let outputs = self.plan.run(values).map_err(|e| BackendError::Run(format!("{e:#}")))?;
        if outputs.len() != self.outputs.len() {
            return Err(BackendError::Run(format!(
                "tract returned {} outputs, the model declares {}",
                outputs.len(),
                self.outputs.len()
            )));
        }
        self.outputs
            .iter()
            .zip(outputs.iter())
            .map(|(info, v)| Ok((info.name.clone(), from_tvalue(&info.name, v)?)))
            .collect()
    }
}
