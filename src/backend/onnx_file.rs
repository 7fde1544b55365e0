//! What an ONNX file declares, read from its protobuf without any engine:
//! graph inputs (initializers excluded) and outputs with their types and
//! shapes. `inferd check` compares models.json against this, with or without
//! ONNX Runtime on the machine.

use crate::tensor::{DType, TensorInfo};
use std::path::Path;
use tract_onnx::pb::{self, tensor_shape_proto::dimension, type_proto};
use tract_onnx::prelude::Framework;

/// A model's declared interface.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredIo {
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    /// Operators outside the standard ONNX domains, as `domain.Op` (ONNX
    /// Runtime's contrib operators such as `com.microsoft.MatMulNBits`), once each.
    pub foreign_ops: Vec<String>,
}

/// Reads the declared inputs and outputs of the ONNX file at `path`.
pub fn declared_io(path: &Path) -> Result<DeclaredIo, String> {
    let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(|e| format!("not a readable ONNX model: {e}"))?;
    let graph = proto.graph.as_ref().ok_or("the ONNX file has no graph")?;
    let initializers: std::collections::HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph.input.iter().filter(|i| !initializers.contains(i.name.as_str())).map(info).collect();
    let outputs = graph.output.iter().map(info).collect();
    let mut foreign_ops: Vec<String> = graph
        .node
        .iter()
        .filter(|n| !matches!(n.domain.as_str(), "" | "ai.onnx"))
        .map(|n| format!("{}.{}", n.domain, n.op_type))
        .collect();
    foreign_ops.sort();
    foreign_ops.dedup();
    Ok(DeclaredIo { inputs, outputs, foreign_ops })
}

/// The model's metadata (`metadata_props`), e.g. PP-OCR's `character` dictionary.
pub fn metadata(path: &Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(|e| format!("not a readable ONNX model: {e}"))?;
    Ok(proto.metadata_props.into_iter().map(|kv| (kv.key, kv.value)).collect())
}

fn info(value: &pb::ValueInfoProto) -> TensorInfo {
    let tensor = match value.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(t)) => Some(t),
        _ => None,
    };
    let dtype = tensor.and_then(|t| DType::from_onnx(t.elem_type));
    let shape = tensor
        .and_then(|t| t.shape.as_ref())
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v >= 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    TensorInfo { name: value.name.clone(), dtype, shape }
}
