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

/// Reads only the declared inputs and outputs of the ONNX file at `path`,
/// walking the protobuf and seeking past everything else (the weights), so a
/// 500 MB decoder costs a few reads rather than a copy of its weights in
/// memory. Initializers listed as inputs (IR < 4) are left out, as in
/// [`declared_io`].
pub fn declared_interface(path: &Path) -> Result<(Vec<TensorInfo>, Vec<TensorInfo>), String> {
    use prost::Message;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let end = file.metadata().map_err(|e| e.to_string())?.len();
    let mut r = Wire { r: std::io::BufReader::new(file), at: 0 };
    let bad = |e: String| format!("not a readable ONNX model: {e}");
    let (mut inputs, mut outputs, mut initializers) = (Vec::new(), Vec::new(), std::collections::HashSet::new());
    // ModelProto.graph = 7; GraphProto.initializer = 5, input = 11, output = 12; TensorProto.name = 8.
    while r.at < end {
        let (field, wire) = r.tag().map_err(bad)?;
        if field != 7 || wire != 2 {
            r.skip(wire).map_err(bad)?;
            continue;
        }
        let graph_end = r.len().map_err(bad)? + r.at;
        while r.at < graph_end {
            let (field, wire) = r.tag().map_err(bad)?;
            match (field, wire) {
                (11 | 12, 2) => {
                    let bytes = r.bytes().map_err(bad)?;
                    let v = pb::ValueInfoProto::decode(bytes.as_slice()).map_err(|e| bad(e.to_string()))?;
                    if field == 11 { inputs.push(v) } else { outputs.push(info(&v)) }
                }
                (5, 2) => {
                    let tensor_end = r.len().map_err(bad)? + r.at;
                    while r.at < tensor_end {
                        match r.tag().map_err(bad)? {
                            (8, 2) => {
                                initializers.insert(String::from_utf8_lossy(&r.bytes().map_err(bad)?).into_owned());
                            }
                            (_, wire) => r.skip(wire).map_err(bad)?,
                        }
                    }
                }
                _ => r.skip(wire).map_err(bad)?,
            }
        }
    }
    let inputs = inputs.iter().filter(|i| !initializers.contains(&i.name)).map(info).collect();
    Ok((inputs, outputs))
}

/// A protobuf wire-format reader that seeks past what it does not read.
struct Wire<R> {
    r: R,
    at: u64,
}

impl<R: std::io::Read + std::io::Seek> Wire<R> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let mut b = [0u8];
            self.r.read_exact(&mut b).map_err(|e| e.to_string())?;
            self.at += 1;
            v |= u64::from(b[0] & 0x7F) << shift;
            if b[0] < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint over 10 bytes".into())
    }

    fn tag(&mut self) -> Result<(u64, u64), String> {
        let t = self.varint()?;
        Ok((t >> 3, t & 7))
    }

    fn len(&mut self) -> Result<u64, String> {
        self.varint()
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.len()?;
        if n > 64 << 20 {
            return Err(format!("a {n}-byte field where a small one was expected"));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| e.to_string())?;
        self.at += n;
        Ok(buf)
    }

    fn skip(&mut self, wire: u64) -> Result<(), String> {
        let n = match wire {
            0 => return self.varint().map(|_| ()),
            1 => 8,
            2 => self.len()?,
            5 => 4,
            other => return Err(format!("wire type {other}")),
        };
        self.r.seek_relative(n as i64).map_err(|e| e.to_string())?;
        self.at += n;
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_light_reader_sees_the_same_interface_as_the_whole_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        // (tests/llm.rs compares the real decoders, in a process of their own: a whole parse of 538 MB.)
        let files =
            [root.join("tests/fixtures/generate/tiny-decoder.onnx"), root.join("tests/fixtures/models/yolov8.onnx")];
        for file in files {
            let whole = declared_io(&file).unwrap();
            let (inputs, outputs) = declared_interface(&file).unwrap();
            assert_eq!((inputs, outputs), (whole.inputs, whole.outputs), "{}", file.display());
        }
        let not_onnx = root.join("tests/fixtures/not-an-image.jpg");
        assert!(declared_interface(&not_onnx).is_err());
    }
}
