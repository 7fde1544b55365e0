//! Plain tensors that cross the backend seam: a shape and typed data, with
//! the JSON form clients use (`{"shape": [..], "dtype": "f32", "data": [..]}`)
//! and its validation (shape × dtype overflow, element limits, data length).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Element type of a tensor, named as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    I64,
    I32,
    I8,
    U8,
    Bool,
}

impl DType {
    /// The wire name (`f32`, `i64`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
        }
    }

    /// Parses a wire name; also accepts ONNX-style names (`float32`, `int64`...).
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name {
            "f32" | "float32" | "float" => DType::F32,
            "f64" | "float64" | "double" => DType::F64,
            "i64" | "int64" => DType::I64,
            "i32" | "int32" => DType::I32,
            "i8" | "int8" => DType::I8,
            "u8" | "uint8" => DType::U8,
            "bool" => DType::Bool,
            _ => return None,
        })
    }

    /// Maps an ONNX `TensorProto.DataType` number; `None` for types inferd does not carry.
    pub fn from_onnx(code: i32) -> Option<DType> {
        Some(match code {
            1 => DType::F32,
            2 => DType::U8,
            3 => DType::I8,
            6 => DType::I32,
            7 => DType::I64,
            9 => DType::Bool,
            11 => DType::F64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Typed, row-major tensor data.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

impl TensorData {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::I32(v) => v.len(),
            TensorData::I8(v) => v.len(),
            TensorData::U8(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            TensorData::F32(_) => DType::F32,
            TensorData::F64(_) => DType::F64,
            TensorData::I64(_) => DType::I64,
            TensorData::I32(_) => DType::I32,
            TensorData::I8(_) => DType::I8,
            TensorData::U8(_) => DType::U8,
            TensorData::Bool(_) => DType::Bool,
        }
    }
}

/// A named-less tensor: shape plus data; `data.len()` always equals the shape's product.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// A tensor's declared type as a model states it: `None` dims are dynamic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// `None` when the element type is one inferd does not carry.
    pub dtype: Option<DType>,
    pub shape: Vec<Option<usize>>,
}

impl TensorInfo {
    /// The shape as text, `?` for dynamic dims: `[?, 3, 224, 224]`.
    pub fn shape_text(&self) -> String {
        let dims: Vec<String> =
            self.shape.iter().map(|d| d.map_or_else(|| "?".to_string(), |d| d.to_string())).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// Why a tensor could not be built from client data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("unknown dtype '{0}' (known: f32, f64, i64, i32, i8, u8, bool)")]
    UnknownDType(String),
    #[error("shape {0:?} has a negative dimension")]
    NegativeDim(Vec<i64>),
    #[error("shape {shape:?} has more elements than the limit of {limit}")]
    TooManyElements { shape: Vec<i64>, limit: usize },
    #[error("shape {shape:?} needs {expected} elements but data has {actual}")]
    LengthMismatch { shape: Vec<i64>, expected: usize, actual: usize },
    #[error("data[{index}] is not a valid {dtype}: {value}")]
    BadElement { index: usize, dtype: DType, value: String },
    #[error("'data' must be an array")]
    DataNotArray,
}

/// The JSON form of a tensor as clients send and receive it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorJson {
    pub shape: Vec<i64>,
    pub dtype: String,
    pub data: Value,
}

impl Tensor {
    /// A tensor from parts; `None` if `data` does not fill `shape` exactly.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Option<Tensor> {
        let n = element_count(&shape)?;
        (n == data.len()).then_some(Tensor { shape, data })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Builds a tensor from its JSON form, refusing more than `max_elements` elements
    /// before anything of that size is allocated.
    pub fn from_json(json: &TensorJson, max_elements: usize) -> Result<Tensor, TensorError> {
        let dtype = DType::parse(&json.dtype).ok_or_else(|| TensorError::UnknownDType(json.dtype.clone()))?;
        if json.shape.iter().any(|&d| d < 0) {
            return Err(TensorError::NegativeDim(json.shape.clone()));
        }
        let shape: Vec<usize> = json.shape.iter().map(|&d| d as usize).collect();
        let expected = element_count(&shape)
            .filter(|&n| n <= max_elements)
            .ok_or_else(|| TensorError::TooManyElements { shape: json.shape.clone(), limit: max_elements })?;
        let items = json.data.as_array().ok_or(TensorError::DataNotArray)?;
        let items = flatten(items);
        if items.len() != expected {
            return Err(TensorError::LengthMismatch { shape: json.shape.clone(), expected, actual: items.len() });
        }
        let bad = |index: usize, v: &Value| TensorError::BadElement { index, dtype, value: v.to_string() };
        let data = match dtype {
            DType::F32 => TensorData::F32(collect(&items, |v| v.as_f64().map(|x| x as f32), bad)?),
            DType::F64 => TensorData::F64(collect(&items, Value::as_f64, bad)?),
            DType::I64 => TensorData::I64(collect(&items, Value::as_i64, bad)?),
            DType::I32 => TensorData::I32(collect(&items, |v| v.as_i64().and_then(|x| i32::try_from(x).ok()), bad)?),
            DType::I8 => TensorData::I8(collect(&items, |v| v.as_i64().and_then(|x| i8::try_from(x).ok()), bad)?),
            DType::U8 => TensorData::U8(collect(&items, |v| v.as_u64().and_then(|x| u8::try_from(x).ok()), bad)?),
            DType::Bool => TensorData::Bool(collect(
                &items,
                |v| v.as_bool().or_else(|| v.as_u64().filter(|&x| x <= 1).map(|x| x == 1)),
                bad,
            )?),
        };
        Ok(Tensor { shape, data })
    }

    /// The JSON form: flat row-major data.
    pub fn to_json(&self) -> TensorJson {
        let data = match &self.data {
            TensorData::F32(v) => serde_json::to_value(v),
            TensorData::F64(v) => serde_json::to_value(v),
            TensorData::I64(v) => serde_json::to_value(v),
            TensorData::I32(v) => serde_json::to_value(v),
            TensorData::I8(v) => serde_json::to_value(v),
            TensorData::U8(v) => serde_json::to_value(v),
            TensorData::Bool(v) => serde_json::to_value(v),
        }
        .unwrap_or(Value::Null);
        TensorJson { shape: self.shape.iter().map(|&d| d as i64).collect(), dtype: self.dtype().to_string(), data }
    }
}

/// Stacks tensors along their first (batch) dimension; all must share dtype
/// and the other dimensions. Returns the stacked tensor and each one's batch size.
pub fn concat_batch(tensors: Vec<Tensor>) -> Result<(Tensor, Vec<usize>), String> {
    let first = tensors.first().ok_or("no tensors to stack")?;
    let (dtype, rest) = (first.dtype(), first.shape.get(1..).ok_or("a scalar has no batch dimension")?.to_vec());
    let mut sizes = Vec::with_capacity(tensors.len());
    for t in &tensors {
        if t.dtype() != dtype || t.shape.is_empty() || t.shape[1..] != rest[..] {
            return Err(format!("cannot stack {} {:?} with {dtype} {:?}", t.dtype(), t.shape, first.shape));
        }
        sizes.push(t.shape[0]);
    }
    let total: usize = sizes.iter().sum();
    macro_rules! stack {
        ($variant:ident) => {{
            let mut out = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum());
            for t in tensors {
                if let TensorData::$variant(v) = t.data {
                    out.extend(v);
                }
            }
            TensorData::$variant(out)
        }};
    }
    let data = match dtype {
        DType::F32 => stack!(F32),
        DType::F64 => stack!(F64),
        DType::I64 => stack!(I64),
        DType::I32 => stack!(I32),
        DType::I8 => stack!(I8),
        DType::U8 => stack!(U8),
        DType::Bool => stack!(Bool),
    };
    let mut shape = vec![total];
    shape.extend(rest);
    Ok((Tensor { shape, data }, sizes))
}

/// Splits `t` along its first dimension into pieces of `sizes` (which must sum to it).
pub fn split_batch(t: Tensor, sizes: &[usize]) -> Result<Vec<Tensor>, String> {
    let total: usize = sizes.iter().sum();
    if t.shape.first() != Some(&total) {
        return Err(format!("output {:?} does not have the batch of {total} it was given", t.shape));
    }
    let per: usize = t.shape[1..].iter().product();
    macro_rules! cut {
        ($variant:ident, $v:expr) => {{
            let mut v = $v;
            let mut out = Vec::with_capacity(sizes.len());
            for &n in sizes.iter().rev() {
                let piece = v.split_off(v.len() - n * per);
                out.push(TensorData::$variant(piece));
            }
            out.reverse();
            out
        }};
    }
    let pieces = match t.data {
        TensorData::F32(v) => cut!(F32, v),
        TensorData::F64(v) => cut!(F64, v),
        TensorData::I64(v) => cut!(I64, v),
        TensorData::I32(v) => cut!(I32, v),
        TensorData::I8(v) => cut!(I8, v),
        TensorData::U8(v) => cut!(U8, v),
        TensorData::Bool(v) => cut!(Bool, v),
    };
    Ok(pieces
        .into_iter()
        .zip(sizes)
        .map(|(data, &n)| {
            let mut shape = t.shape.clone();
            shape[0] = n;
            Tensor { shape, data }
        })
        .collect())
}

/// The product of `shape`, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Accepts both flat data and nested arrays (`[[1, 2], [3, 4]]`), row-major.
fn flatten(items: &[Value]) -> Vec<&Value> {
    let mut out = Vec::with_capacity(items.len());
    let mut stack: Vec<std::slice::Iter<'_, Value>> = vec![items.iter()];
    while let Some(top) = stack.last_mut() {
        match top.next() {
            Some(Value::Array(inner)) => stack.push(inner.iter()),
            Some(v) => out.push(v),
            None => {
                stack.pop();
            }
        }
    }
    out
}

fn collect<T>(
    items: &[&Value],
    convert: impl Fn(&Value) -> Option<T>,
    bad: impl Fn(usize, &Value) -> TensorError,
) -> Result<Vec<T>, TensorError> {
    items.iter().enumerate().map(|(i, v)| convert(v).ok_or_else(|| bad(i, v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stack_and_split_back() {
        let a = Tensor { shape: vec![1, 2], data: TensorData::F32(vec![1.0, 2.0]) };
        let b = Tensor { shape: vec![2, 2], data: TensorData::F32(vec![3.0, 4.0, 5.0, 6.0]) };
        let (t, sizes) = concat_batch(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!((t.shape.clone(), sizes.clone()), (vec![3, 2], vec![1, 2]));
        assert_eq!(split_batch(t, &sizes).unwrap(), vec![a.clone(), b]);
        let c = Tensor { shape: vec![1, 3], data: TensorData::F32(vec![0.0; 3]) };
        assert!(concat_batch(vec![a.clone(), c]).is_err(), "other dims differ");
        let d = Tensor { shape: vec![1, 2], data: TensorData::I64(vec![0, 0]) };
        assert!(concat_batch(vec![a.clone(), d]).is_err(), "dtypes differ");
        assert!(split_batch(a, &[2]).is_err(), "wrong batch");
    }
    use serde_json::json;

    fn parse(v: Value) -> Result<Tensor, TensorError> {
        let json: TensorJson = serde_json::from_value(v).unwrap();
        Tensor::from_json(&json, 1000)
    }

    #[test]
    fn flat_and_nested_data_give_the_same_tensor() {
        let a = parse(json!({"shape": [2, 2], "dtype": "f32", "data": [1, 2, 3, 4]})).unwrap();
        let b = parse(json!({"shape": [2, 2], "dtype": "float32", "data": [[1, 2], [3, 4]]})).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.data, TensorData::F32(vec![1.0, 2.0, 3.0, 4.0]));
    }

    #[test]
    fn shape_overflow_is_refused_before_allocation() {
        let err = parse(json!({"shape": [4294967296i64, 4294967296i64, 16], "dtype": "f32", "data": []})).unwrap_err();
        assert!(matches!(err, TensorError::TooManyElements { .. }), "{err}");
        let err = parse(json!({"shape": [1001], "dtype": "u8", "data": []})).unwrap_err();
        assert!(matches!(err, TensorError::TooManyElements { .. }), "{err}");
    }

    #[test]
    fn negative_dims_wrong_lengths_and_bad_elements_are_named() {
        assert!(matches!(
            parse(json!({"shape": [-1, 2], "dtype": "f32", "data": [1, 2]})),
            Err(TensorError::NegativeDim(_))
        ));
        assert!(matches!(
            parse(json!({"shape": [3], "dtype": "f32", "data": [1, 2]})),
            Err(TensorError::LengthMismatch { expected: 3, actual: 2, .. })
        ));
        assert!(matches!(
            parse(json!({"shape": [2], "dtype": "i64", "data": [1, 2.5]})),
            Err(TensorError::BadElement { index: 1, .. })
        ));
        assert!(matches!(
            parse(json!({"shape": [1], "dtype": "u8", "data": [300]})),
            Err(TensorError::BadElement { index: 0, .. })
        ));
        assert!(matches!(
            parse(json!({"shape": [1], "dtype": "complex", "data": [1]})),
            Err(TensorError::UnknownDType(_))
        ));
    }

    #[test]
    fn json_round_trip_keeps_shape_dtype_and_data() {
        let t = Tensor::new(vec![1, 3], TensorData::I64(vec![7, -8, 9])).unwrap();
        let back = Tensor::from_json(&t.to_json(), 10).unwrap();
        assert_eq!(t, back);
    }
}
