//! ONNX Runtime, loaded dynamically from a shared library found at run time
//! (so one binary serves boxes with and without it), and the execution
//! providers registered in order with an explicit, logged fallback.

use super::{BackendError, BackendKind, InferenceBackend, NamedTensors, Provider, check_inputs};
use crate::config::RuntimeConfig;
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, ValueType};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime version this build speaks (`ort` 2.0.0-rc.15, API 31).
pub const ORT_VERSION: &str = "1.31.1";
/// The library file `scripts/setup.sh` unpacks.
#[cfg(not(target_os = "macos"))]
pub const LIBRARY_FILE: &str = "libonnxruntime.so.1.31.1";
/// The library's file name in the macOS wheel (`onnxruntime/capi/`).
#[cfg(target_os = "macos")]
pub const LIBRARY_FILE: &str = "libonnxruntime.1.31.1.dylib";

/// A loaded ONNX Runtime: where it came from and its environment.
pub struct OrtRuntime {
    pub path: PathBuf,
    pub version: String,
    env: Environment,
}

impl OrtRuntime {
    /// One line for logs and `inferd models`: version and path.
    pub fn describe(&self) -> String {
        format!("ONNX Runtime {} from {}", self.version, self.path.display())
    }
}

static RUNTIME: OnceLock<Result<OrtRuntime, String>> = OnceLock::new();

/// The process-wide ONNX Runtime, loaded on first call from the first
/// candidate of [`candidates`] that loads. A process loads it at most once;
/// later calls return the first outcome. `Err` says every place tried and why.
pub fn runtime(cfg: &RuntimeConfig) -> Result<&'static OrtRuntime, &'static str> {
    RUNTIME.get_or_init(|| init(cfg)).as_ref().map_err(String::as_str)
}

/// Whether ONNX Runtime is usable, as `decide` wants it: a description or why not.
pub fn status(cfg: &RuntimeConfig) -> Result<String, String> {
    runtime(cfg).map(OrtRuntime::describe).map_err(str::to_string)
}

fn init(cfg: &RuntimeConfig) -> Result<OrtRuntime, String> {
    let mut tried = Vec::new();
    for (source, path) in candidates(cfg) {
        match ort::init_from(&path) {
            Ok(builder) => {
                let env =
                    builder.with_name("inferd").build().map_err(|e| format!("{} ({source}): {e}", path.display()))?;
                let version = library_version(&path).unwrap_or_else(|| "unknown".into());
                let rt = OrtRuntime { path, version, env };
                tracing::info!(source, "using {}", rt.describe());
                return Ok(rt);
            }
            Err(e) => {
                tracing::debug!(source, path = %path.display(), error = %e, "ONNX Runtime not loaded from here");
                tried.push(format!("{source}: {e}"));
            }
        }
    }
    let why = format!(
        "no loadable {LIBRARY_FILE} (run scripts/setup.sh or set runtime.onnxruntime); tried {}",
        tried.join("; ")
    );
    tracing::warn!("ONNX Runtime is not available: {why}");
    Err(why)
}

/// Where ONNX Runtime is looked for. An explicit setting is authoritative:
/// config `runtime.onnxruntime` if set, else `ORT_DYLIB_PATH` if set, is the
/// only place tried (a wrong explicit path never silently loads another
/// library). Without either: the folder `scripts/setup.sh` fills (next to the
/// working directory, the executable or the source tree), the packaged
/// location `/usr/lib/inferd/onnxruntime`, then the system's library path.
pub fn candidates(cfg: &RuntimeConfig) -> Vec<(&'static str, PathBuf)> {
    candidates_with(cfg, std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()).map(PathBuf::from))
}

fn candidates_with(cfg: &RuntimeConfig, ort_dylib_path: Option<PathBuf>) -> Vec<(&'static str, PathBuf)> {
    if let Some(p) = &cfg.onnxruntime {
        return vec![("config runtime.onnxruntime", p.clone())];
    }
    if let Some(p) = ort_dylib_path {
        return vec![("ORT_DYLIB_PATH", p)];
    }
    let mut out: Vec<(&'static str, PathBuf)> = Vec::new();
    let arch_dir = Path::new("runtime/onnxruntime").join(std::env::consts::ARCH);
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for root in roots {
        let file = root.join(&arch_dir).join(LIBRARY_FILE);
        if file.exists() && !out.iter().any(|(_, p)| p == &file) {
            out.push(("setup folder", file));
        }
    }
    for dir in ["/usr/lib/inferd/onnxruntime", "/usr/local/lib/inferd/onnxruntime"] {
        let file = Path::new(dir).join(LIBRARY_FILE);
        if file.exists() {
            out.push(("packaged", file));
        }
    }
    out.push(("system library path", PathBuf::from(LIBRARY_FILE)));
    out.push(("system library path", PathBuf::from("libonnxruntime.so")));
    out
}

/// The version the library reports (`OrtGetApiBase()->GetVersionString()`).
/// Called only after `ort::init_from` loaded `path`, so this only takes
/// another reference to an already loaded library.
fn library_version(path: &Path) -> Option<String> {
    #[repr(C)]
    struct OrtApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: the library at `path` is ONNX Runtime (ort just loaded it and
    // checked that it exports OrtGetApiBase); the symbol's signature and the
    // layout of OrtApiBase are ONNX Runtime's stable C ABI.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let get_base: libloading::Symbol<'_, unsafe extern "C" fn() -> *const OrtApiBase> =
            lib.get(b"OrtGetApiBase").ok()?;
        let base = get_base();
        if base.is_null() {
            return None;
        }
        let version = ((*base).get_version_string)();
        if version.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(version).to_string_lossy().into_owned())
    }
}

/// A model loaded in an ONNX Runtime session.
pub struct OrtBackend {
    session: Session,
    provider: String,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl OrtBackend {
    /// Creates a session for `file`, registering `providers` in order; a
    /// provider that fails is logged with ONNX Runtime's own error and the
    /// next one is tried; CPU is always the last resort.
    pub fn load(file: &Path, providers: &[Provider], cfg: &RuntimeConfig) -> Result<OrtBackend, BackendError> {
        let rt = runtime(cfg).map_err(|e| BackendError::Unavailable(format!("ONNX Runtime is not available: {e}")))?;
        let load_err = |message: String| BackendError::Load { path: file.display().to_string(), message };
        let mut builder = Session::builder(&rt.env).map_err(|e| load_err(e.to_string()))?;
        if cfg.intra_threads > 0 {
            builder = builder.with_intra_threads(cfg.intra_threads).map_err(|e| load_err(e.to_string()))?;
        }
        let mut provider = Provider::Cpu;
        for &p in providers {
            if p == Provider::Cpu {
                break;
            }
            let Some(dispatch) = dispatch(p) else {
                tracing::warn!(
                    provider = p.ort_name(),
                    "execution provider is not built into this binary for this platform; trying the next"
                );
                continue;
            };
            match builder.with_execution_providers([dispatch.error_on_failure()]) {
                Ok(b) => {
                    builder = b;
                    provider = p;
                    break;
                }
                Err(e) => {
                    tracing::warn!(provider = p.ort_name(), error = %e, "execution provider failed to register; trying the next");
                    builder = e.recover();
                }
            }
        }
        let session = builder.commit_from_file(file).map_err(|e| load_err(e.to_string()))?;
        let inputs = session.inputs().iter().map(|o| outlet_info(o.name(), o.dtype())).collect();
        let outputs = session.outputs().iter().map(|o| outlet_info(o.name(), o.dtype())).collect();
        Ok(OrtBackend { session, provider: provider.ort_name().to_string(), inputs, outputs })
    }
}

#[allow(unreachable_patterns)]
fn dispatch(p: Provider) -> Option<ExecutionProviderDispatch> {
    match p {
        #[cfg(target_os = "linux")]
        Provider::Cuda => Some(ort::ep::CUDA::default().build()),
        #[cfg(target_os = "linux")]
        Provider::Tensorrt => Some(ort::ep::TensorRT::default().build()),
        #[cfg(target_os = "macos")]
        Provider::Coreml => Some(ort::ep::CoreML::default().build()),
        Provider::Cpu => Some(ort::ep::CPU::default().build()),
        _ => None,
    }
}

fn outlet_info(name: &str, ty: &ValueType) -> TensorInfo {
    match ty {
        ValueType::Tensor { ty, shape, .. } => TensorInfo {
            name: name.to_string(),
            dtype: dtype_of(*ty),
            shape: shape.iter().map(|&d| usize::try_from(d).ok()).collect(),
        },
        _ => TensorInfo { name: name.to_string(), dtype: None, shape: vec![] },
    }
}

fn dtype_of(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float64 => DType::F64,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Int8 => DType::I8,
        TensorElementType::Uint8 => DType::U8,
        TensorElementType::Bool => DType::Bool,
        _ => return None,
    })
}

fn to_value(t: Tensor) -> ort::Result<DynValue> {
    let shape = t.shape;
    Ok(match t.data {
        TensorData::F32(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::F64(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::I64(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::I32(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::I8(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::U8(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
        TensorData::Bool(v) => ort::value::Tensor::from_array((shape, v))?.into_dyn(),
    })
}

fn from_value(name: &str, value: &DynValue) -> Result<Tensor, BackendError> {
    let unsupported =
        || BackendError::Run(format!("output '{name}' has a type inferd cannot carry: {:?}", value.dtype()));
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(unsupported());
    };
    fn grab<T: ort::value::PrimitiveTensorElementType + Copy>(
        value: &DynValue,
        wrap: fn(Vec<T>) -> TensorData,
    ) -> ort::Result<Tensor> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok(Tensor { shape: shape.iter().map(|&d| d.max(0) as usize).collect(), data: wrap(data.to_vec()) })
    }
    let tensor = match ty {
        TensorElementType::Float32 => grab::<f32>(value, TensorData::F32),
        TensorElementType::Float64 => grab::<f64>(value, TensorData::F64),
        TensorElementType::Int64 => grab::<i64>(value, TensorData::I64),
        TensorElementType::Int32 => grab::<i32>(value, TensorData::I32),
        TensorElementType::Int8 => grab::<i8>(value, TensorData::I8),
        TensorElementType::Uint8 => grab::<u8>(value, TensorData::U8),
        TensorElementType::Bool => grab::<bool>(value, TensorData::Bool),
        _ => return Err(unsupported()),
    };
    tensor.map_err(|e| BackendError::Run(format!("reading output '{name}': {e}")))
}

impl InferenceBackend for OrtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Ort
    }

    fn provider(&self) -> &str {
        &self.provider
    }

    fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    fn run(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
        let inputs = check_inputs(&self.inputs, inputs)?;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            let value = to_value(tensor).map_err(|e| BackendError::Input(format!("input '{name}': {e}")))?;
            values.push((Cow::Owned(name), value.into()));
        }
        let outputs = self.session.run(values).map_err(|e| BackendError::Run(e.to_string()))?;
        self.outputs
            .iter()
            .map(|info| {
                let value = outputs
                    .get(&info.name)
                    .ok_or_else(|| BackendError::Run(format!("ONNX Runtime returned no output '{}'", info.name)))?;
                Ok((info.name.clone(), from_value(&info.name, value)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_path_is_the_only_candidate() {
        let cfg = RuntimeConfig { onnxruntime: Some("/opt/x/libonnxruntime.so".into()), ..Default::default() };
        let only = vec![("config runtime.onnxruntime", PathBuf::from("/opt/x/libonnxruntime.so"))];
        assert_eq!(candidates_with(&cfg, Some("/env/libonnxruntime.so".into())), only);
        let env = candidates_with(&RuntimeConfig::default(), Some("/env/libonnxruntime.so".into()));
        assert_eq!(env, vec![("ORT_DYLIB_PATH", PathBuf::from("/env/libonnxruntime.so"))]);
    }

    #[test]
    fn without_settings_the_search_ends_at_the_system_path() {
        let c = candidates_with(&RuntimeConfig::default(), None);
        assert_eq!(c.last().unwrap(), &("system library path", PathBuf::from("libonnxruntime.so")));
    }
}
