//! ONNX Runtime, loaded dynamically from a shared library found at run time
//! (so one binary serves boxes with and without it), and the execution
//! providers registered in order with an explicit, logged fallback.

#[cfg(target_os = "linux")]
use super::providers::{ArenaExtend, ConvSearch};
#[cfg(target_os = "macos")]
use super::providers::{ComputeUnits, CoreMlFormat};
use super::providers::{ProviderOptions, ProviderSpec, TensorRtOptions};
use super::trt_cache;
use super::{
    BackendError, BackendKind, InferenceBackend, LoadRequest, NamedTensors, Placement, Provider, State,
    check_inputs_with,
};
use crate::config::GraphOptimization;
use crate::config::RuntimeConfig;
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use ort::environment::Environment;
use ort::ep::ExecutionProviderDispatch;
use ort::logging::LogLevel;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorElementType, ValueType};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

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

static RUNTIME: OnceLock<OrtRuntime> = OnceLock::new();
/// The last failed attempt to load ONNX Runtime: when, and why.
static LAST_FAILURE: Mutex<Option<(std::time::Instant, String)>> = Mutex::new(None);
/// A failed load is tried again after this long (a failure can be passing:
/// out of file descriptors, a library being upgraded).
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// The process-wide ONNX Runtime, loaded on first call from the first
/// candidate of [`candidates`] that loads. Once loaded it stays; a failed
/// load is tried again on a call at least 10 s later (until then the call
/// returns the failure). `Err` says every place tried and why.
pub fn runtime(cfg: &RuntimeConfig) -> Result<&'static OrtRuntime, String> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let mut last = LAST_FAILURE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    if let Some(why) = recent(&last) {
        return Err(why);
    }
    match init(cfg) {
        Ok(rt) => {
            *last = None;
            Ok(RUNTIME.get_or_init(|| rt))
        }
        Err(why) => {
            *last = Some((std::time::Instant::now(), why.clone()));
            Err(why)
        }
    }
}

/// A failure that stands (younger than [`RETRY_AFTER`]); an older one is tried again.
fn recent(last: &Option<(std::time::Instant, String)>) -> Option<String> {
    last.as_ref().filter(|(when, _)| when.elapsed() < RETRY_AFTER).map(|(_, why)| why.clone())
}

/// Why the last attempt to load ONNX Runtime failed, while it is not loaded.
pub fn load_failure() -> Option<String> {
    if RUNTIME.get().is_some() {
        return None;
    }
    LAST_FAILURE.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, why)| why.clone())
}

/// Whether ONNX Runtime is usable, as `decide` wants it: a description or why not.
pub fn status(cfg: &RuntimeConfig) -> Result<String, String> {
    runtime(cfg).map(OrtRuntime::describe)
}

/// [`status`] without loading the library: the loaded runtime if it is,
/// else where it would be loaded from (the daemon loads it with the first
/// model, so it idles small and starts fast), else why there is none.
pub fn status_lazy(cfg: &RuntimeConfig) -> Result<String, String> {
    if let Some(loaded) = RUNTIME.get() {
        return Ok(loaded.describe());
    }
    // A recent failure stands; an older one is tried again by the next load.
    if let Some(why) = recent(&LAST_FAILURE.lock().unwrap_or_else(|e| e.into_inner())) {
        return Err(why);
    }
    // The first place init would try, when it is a file here; otherwise (a bare
    // name for the system's search path, or nothing) find out by loading.
    match candidates(cfg).into_iter().next() {
        Some((source, path)) if path.is_file() => {
            Ok(format!("ONNX Runtime {ORT_VERSION} at {} ({source}; loads with the first model)", path.display()))
        }
        _ => status(cfg),
    }
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
    placement: Placement,
    inputs: Vec<TensorInfo>,
    /// Initializers that are also inputs: fed when a run gives them.
    optional: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
    /// A TensorRT session being built in the background; swapped in when ready.
    upgrade: Option<std::sync::mpsc::Receiver<Result<Built, BackendError>>>,
    /// Run options that give the CPU arena's free regions back at the end of
    /// a run (`None` without the arena, where ONNX Runtime frees as it goes).
    release: Option<ort::session::RunOptions>,
}

/// A created session: the session, where its nodes went, and its main provider.
struct Built {
    session: Session,
    placement: Placement,
    provider: String,
}

impl OrtBackend {
    /// Creates a session for `file`, registering the request's providers in
    /// order with their options; a provider that fails is logged with ONNX
    /// Runtime's own error and the next one is tried (unless strict); CPU is
    /// always the last resort. When TensorRT comes first and its engine is not
    /// cached yet, the model serves on the other providers while the engine
    /// is built in the background.
    pub fn load(file: &Path, request: &LoadRequest<'_>) -> Result<OrtBackend, BackendError> {
        let rt = runtime(request.runtime)
            .map_err(|e| BackendError::Unavailable(format!("ONNX Runtime is not available: {e}")))?;
        let specs: Vec<ProviderSpec> =
            request.providers.iter().filter(|p| p.provider != Provider::Cpu).cloned().collect();
        let caches = Caches::prepare(&specs, request, &rt.version);
        let background = match (specs.first(), &caches.tensorrt) {
            (Some(ProviderSpec { options: ProviderOptions::Tensorrt(t), .. }), Some(dir))
                if t.engine_cache && t.build_in_background && !trt_cache::has_engine(dir) && !request.strict =>
            {
                Some(dir.clone())
            }
            _ => None,
        };
        let (built, upgrade) = match background {
            None => (create(rt, file, &specs, request, &caches)?, None),
            Some(dir) => {
                // Serve on the rest now; build the TensorRT engine on a thread of its own.
                let mut now = create(rt, file, &specs[1..], request, &caches)?;
                now.placement.building = Some("TensorRT".into());
                let (tx, rx) = std::sync::mpsc::channel();
                let (file, specs, model) = (file.to_path_buf(), specs.clone(), request.model.to_string());
                let (runtime, state_dir, sha, instances, spinning) = (
                    request.runtime.clone(),
                    request.state_dir.to_path_buf(),
                    request.sha256.to_string(),
                    request.instances,
                    request.spinning,
                );
                tracing::info!(model, engine = %dir.display(), "building the TensorRT engine in the background; serving on {} meanwhile", now.provider);
                let spawned = std::thread::Builder::new().name(format!("trt-build-{model}")).spawn(move || {
                    let started = std::time::Instant::now();
                    // Strict: a TensorRT that cannot register or takes nothing is a failed build, not a swap.
                    let request = LoadRequest {
                        providers: &specs,
                        runtime: &runtime,
                        strict: true,
                        state_dir: &state_dir,
                        model: &model,
                        sha256: &sha,
                        instances,
                        spinning,
                    };
                    // The cache folders prepared above (GPU and TensorRT probed once per load).
                    let result = create(rt, &file, &specs, &request, &caches);
                    if result.is_ok() {
                        tracing::info!(model, seconds = started.elapsed().as_secs(), "TensorRT engine built");
                    }
                    let _ = tx.send(result);
                });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start the TensorRT build thread: {e}; staying on {}", now.provider);
                    now.placement.building = None;
                }
                (now, Some(rx))
            }
        };
        let inputs = built.session.inputs().iter().map(|o| outlet_info(o.name(), o.dtype())).collect();
        let optional =
            built.session.overridable_initializers().iter().map(|o| outlet_info(o.name(), o.dtype())).collect();
        let outputs = built.session.outputs().iter().map(|o| outlet_info(o.name(), o.dtype())).collect();
        tracing::info!(model = request.model, placement = %built.placement.summary(), "session created");
        Ok(OrtBackend {
            session: built.session,
            provider: built.provider,
            placement: built.placement,
            inputs,
            optional,
            outputs,
            upgrade,
            release: if request.runtime.cpu_arena { releasing_options() } else { None },
        })
    }

    /// Swaps in the TensorRT session once its background build is done.
    fn take_upgrade(&mut self) {
        let Some(rx) = &self.upgrade else { return };
        match rx.try_recv() {
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Ok(Ok(built)) => {
                tracing::info!(placement = %built.placement.summary(), "now serving on the TensorRT engine");
                (self.session, self.placement, self.provider) = (built.session, built.placement, built.provider);
                self.upgrade = None;
            }
            Ok(Err(e)) => {
                tracing::warn!("building the TensorRT engine failed: {e}; staying on {}", self.provider);
                self.placement.building = None;
                self.upgrade = None;
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.placement.building = None;
                self.upgrade = None;
            }
        }
    }
}

/// Cache folders of the providers that keep compiled engines.
struct Caches {
    tensorrt: Option<PathBuf>,
    coreml: Option<PathBuf>,
}

impl Caches {
    fn prepare(specs: &[ProviderSpec], request: &LoadRequest<'_>, ort_version: &str) -> Caches {
        let mut caches = Caches { tensorrt: None, coreml: None };
        for spec in specs {
            match &spec.options {
                ProviderOptions::Tensorrt(t) if t.engine_cache => {
                    let profile =
                        [&t.profile_min, &t.profile_opt, &t.profile_max].map(TensorRtOptions::profile_text).join("/");
                    let identity = trt_cache::EngineIdentity {
                        model_sha256: request.sha256.to_string(),
                        onnxruntime: ort_version.to_string(),
                        tensorrt: trt_cache::tensorrt_version().unwrap_or_else(|| "unknown".into()),
                        gpu: trt_cache::gpu_identity(),
                        precision: if t.fp16 { "fp16" } else { "fp32" }.into(),
                        profile: if profile == "//" { String::new() } else { profile },
                    };
                    match trt_cache::prepare(request.state_dir, request.model, &identity) {
                        Ok(dir) => caches.tensorrt = Some(dir),
                        Err(e) => tracing::warn!(model = request.model, "no TensorRT engine cache: {e}"),
                    }
                }
                ProviderOptions::Coreml(c) if c.cache => {
                    let dir = request
                        .state_dir
                        .join("coreml")
                        .join(request.model)
                        .join(&request.sha256[..16.min(request.sha256.len())]);
                    match std::fs::create_dir_all(&dir) {
                        Ok(()) => caches.coreml = Some(dir),
                        Err(e) => tracing::warn!(model = request.model, "no CoreML cache: {e}"),
                    }
                }
                _ => {}
            }
        }
        caches
    }
}

/// Threads per session when the configuration leaves it to inferd: the
/// cores shared among the model's instances, at most 4 (more rarely pays on
/// the small graphs edge boxes run, and leaves cores for the other models).
pub fn default_intra_threads(cores: usize, instances: usize) -> usize {
    (cores / instances.max(1)).clamp(1, 4)
}

/// Creates one session with `specs` (CPU implied last) and reads where its nodes went.
fn create(
    rt: &'static OrtRuntime,
    file: &Path,
    specs: &[ProviderSpec],
    request: &LoadRequest<'_>,
    caches: &Caches,
) -> Result<Built, BackendError> {
    let load_err = |message: String| BackendError::Load { path: file.display().to_string(), message };
    let captured: Arc<Mutex<Vec<String>>> = Arc::default();
    let capturing = Arc::new(AtomicBool::new(true));
    let mut builder = Session::builder(&rt.env).map_err(|e| load_err(e.to_string()))?;
    let cfg = request.runtime;
    let intra = match cfg.intra_threads {
        0 => default_intra_threads(std::thread::available_parallelism().map_or(1, |n| n.get()), request.instances),
        n => n,
    };
    // A CPU-only model can start from the optimised graph saved last time.
    let optimized = (cfg.optimized_model_cache && specs.is_empty() && !request.sha256.is_empty()).then(|| {
        request.state_dir.join("optimized").join(format!(
            "{}-{}-ort{}.onnx",
            request.model,
            &request.sha256[..16.min(request.sha256.len())],
            rt.version
        ))
    });
    let reuse = optimized.as_ref().is_some_and(|p| p.is_file());
    let level = match (reuse, cfg.graph_optimization) {
        (true, _) | (_, GraphOptimization::Disable) => GraphOptimizationLevel::Disable,
        (_, GraphOptimization::Basic) => GraphOptimizationLevel::Level1,
        (_, GraphOptimization::Extended) => GraphOptimizationLevel::Level2,
        (_, GraphOptimization::All) => GraphOptimizationLevel::All,
    };
    let spin = if request.spinning { "1" } else { "0" };
    let e = |e: ort::Error<ort::session::builder::SessionBuilder>| load_err(e.to_string());
    builder = builder
        .with_intra_threads(intra)
        .map_err(e)?
        .with_inter_threads(cfg.inter_threads.max(1))
        .map_err(e)?
        .with_parallel_execution(cfg.inter_threads > 1)
        .map_err(e)?
        .with_optimization_level(level)
        .map_err(e)?
        .with_memory_pattern(cfg.memory_pattern)
        .map_err(e)?
        .with_config_entry("session.intra_op.allow_spinning", spin)
        .map_err(e)?
        .with_config_entry("session.inter_op.allow_spinning", spin)
        .map_err(e)?;
    if let (Some(path), false) = (&optimized, reuse) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        builder = builder.with_optimized_model_path(path).map_err(e)?;
    }
    // ONNX Runtime states node placement at verbose level while it partitions the graph.
    let (sink, on) = (captured.clone(), capturing.clone());
    let logger: ort::logging::LoggerFunction = Arc::new(move |level, _category, _id, _location, message: &str| {
        if on.load(Ordering::Relaxed) && message.contains("placed on [") {
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(message.to_string());
        }
        match level {
            // An optional input (an initializer a run may override, such as `logits_to_keep`) is meant.
            LogLevel::Warning if message.contains("appears in graph inputs and will not be treated as constant") => {
                tracing::debug!(target: "onnxruntime", "{message}")
            }
            LogLevel::Warning => tracing::warn!(target: "onnxruntime", "{message}"),
            LogLevel::Error | LogLevel::Fatal => tracing::error!(target: "onnxruntime", "{message}"),
            _ => {}
        }
    });
    builder = builder.with_logger(logger).map_err(|e| load_err(e.to_string()))?;
    builder = builder.with_log_level(LogLevel::Verbose).map_err(|e| load_err(e.to_string()))?;
    let mut registered: Vec<String> = Vec::new();
    for spec in specs {
        let p = spec.provider;
        let Some(dispatch) = dispatch(spec, caches) else {
            let why = format!("{} is not built into this binary for this platform", p.ort_name());
            if request.strict {
                return Err(load_err(format!("strict providers: {why}")));
            }
            tracing::warn!(model = request.model, provider = p.ort_name(), "{why}; trying the next");
            continue;
        };
        match builder.with_execution_providers([dispatch.error_on_failure()]) {
            Ok(b) => {
                builder = b;
                registered.push(p.ort_name().to_string());
            }
            Err(e) => {
                if request.strict {
                    return Err(load_err(format!("strict providers: {} failed to register: {e}", p.ort_name())));
                }
                tracing::warn!(model = request.model, provider = p.ort_name(), error = %e, "execution provider failed to register; trying the next");
                builder = e.recover();
            }
        }
    }
    registered.push(Provider::Cpu.ort_name().to_string());
    if !cfg.cpu_arena {
        builder = builder
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
            .map_err(|e| load_err(e.to_string()))?;
    }
    let source = match (&optimized, reuse) {
        (Some(path), true) => {
            tracing::debug!(model = request.model, path = %path.display(), "starting from the saved optimised graph");
            path.as_path()
        }
        _ => file,
    };
    let session = builder.commit_from_file(source).map_err(|e| load_err(e.to_string()))?;
    capturing.store(false, Ordering::Relaxed);
    let lines = std::mem::take(&mut *captured.lock().unwrap_or_else(|e| e.into_inner()));
    let nodes = parse_placement(&lines);
    let provider = registered.iter().find(|p| nodes.get(*p).is_some_and(|&n| n > 0)).unwrap_or(&registered[0]).clone();
    if request.strict
        && let Some(first) = specs.first()
        && nodes.get(first.provider.ort_name()).copied().unwrap_or(0) == 0
        && !nodes.is_empty()
    {
        return Err(load_err(format!(
            "strict providers: {} took no node of the graph (placement: {})",
            first.provider.ort_name(),
            Placement { registered: registered.clone(), nodes, building: None }.summary()
        )));
    }
    Ok(Built { session, placement: Placement { registered, nodes, building: None }, provider })
}

/// Node counts per provider from ONNX Runtime's placement lines
/// (`All nodes placed on [CPUExecutionProvider]. Number of nodes: 12`,
/// `Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 30`).
pub fn parse_placement(lines: &[String]) -> BTreeMap<String, usize> {
    let mut nodes = BTreeMap::new();
    for line in lines.iter().flat_map(|l| l.lines()) {
        let Some(rest) = line.split_once("placed on [").map(|(_, r)| r) else { continue };
        let Some((provider, tail)) = rest.split_once(']') else { continue };
        let count = tail.rsplit(':').next().and_then(|n| n.trim().parse::<usize>().ok());
        if let Some(n) = count {
            *nodes.entry(provider.to_string()).or_insert(0) += n;
        }
    }
    nodes
}

/// The ONNX Runtime provider for `spec`, with its options; `None` where this build lacks it.
#[allow(unreachable_patterns, unused_variables)]
fn dispatch(spec: &ProviderSpec, caches: &Caches) -> Option<ExecutionProviderDispatch> {
    match (&spec.provider, &spec.options) {
        #[cfg(target_os = "linux")]
        (Provider::Cuda, ProviderOptions::Cuda(o)) => {
            use ort::ep::cuda::ConvAlgorithmSearch;
            let mut ep = ort::ep::CUDA::default().with_device_id(o.device_id as i32);
            if let Some(mb) = o.gpu_mem_limit_mb {
                ep = ep.with_memory_limit((mb as usize) << 20);
            }
            if let Some(a) = o.arena_extend_strategy {
                ep = ep.with_arena_extend_strategy(match a {
                    ArenaExtend::NextPowerOfTwo => ort::ep::ArenaExtendStrategy::NextPowerOfTwo,
                    ArenaExtend::SameAsRequested => ort::ep::ArenaExtendStrategy::SameAsRequested,
                });
            }
            if let Some(c) = o.cudnn_conv_algo_search {
                ep = ep.with_conv_algorithm_search(match c {
                    ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                    ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                    ConvSearch::Default => ConvAlgorithmSearch::Default,
                });
            }
            Some(ep.build())
        }
        #[cfg(target_os = "linux")]
        (Provider::Tensorrt, ProviderOptions::Tensorrt(o)) => {
            let mut ep = ort::ep::TensorRT::default().with_device_id(o.device_id as i32).with_fp16(o.fp16);
            if let Some(mb) = o.max_workspace_mb {
                ep = ep.with_max_workspace_size((mb as usize) << 20);
            }
            if let Some(dir) = &caches.tensorrt {
                let dir = dir.display().to_string();
                ep = ep
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            if !o.profile_min.is_empty() {
                ep = ep
                    .with_profile_min_shapes(TensorRtOptions::profile_text(&o.profile_min))
                    .with_profile_opt_shapes(TensorRtOptions::profile_text(&o.profile_opt))
                    .with_profile_max_shapes(TensorRtOptions::profile_text(&o.profile_max));
            }
            Some(ep.build())
        }
        #[cfg(target_os = "macos")]
        (Provider::Coreml, ProviderOptions::Coreml(o)) => {
            use ort::ep::coreml::{ComputeUnits as Units, ModelFormat};
            let mut ep = ort::ep::CoreML::default()
                .with_model_format(match o.format {
                    CoreMlFormat::Mlprogram => ModelFormat::MLProgram,
                    CoreMlFormat::Neuralnetwork => ModelFormat::NeuralNetwork,
                })
                .with_compute_units(match o.compute_units {
                    ComputeUnits::All => Units::All,
                    ComputeUnits::CpuOnly => Units::CPUOnly,
                    ComputeUnits::CpuAndGpu => Units::CPUAndGPU,
                    ComputeUnits::CpuAndNeuralEngine => Units::CPUAndNeuralEngine,
                })
                .with_static_input_shapes(o.static_shapes);
            if let Some(dir) = &caches.coreml {
                ep = ep.with_model_cache_dir(dir.display().to_string());
            }
            Some(ep.build())
        }
        (Provider::Cpu, _) => Some(ort::ep::CPU::default().build()),
        _ => None,
    }
}

/// Run options that shrink the CPU arena once the run is done: its regions
/// left wholly free go back to the system (ONNX Runtime's
/// `memory.enable_memory_arena_shrinkage`).
fn releasing_options() -> Option<ort::session::RunOptions> {
    let made = ort::session::RunOptions::new()
        .and_then(|mut o| o.set("memory.enable_memory_arena_shrinkage", "cpu:0").map(|()| o));
    match made {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!("cannot make run options that shrink the arena ({e}); a long run's memory stays in it");
            None
        }
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

impl OrtBackend {
    /// Runs the session; `release`: with the options that shrink the arena afterwards.
    fn run_with(&mut self, inputs: NamedTensors, release: bool) -> Result<NamedTensors, BackendError> {
        self.take_upgrade();
        let inputs = check_inputs_with(&self.inputs, &self.optional, inputs)?;
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            let value = to_value(tensor).map_err(|e| BackendError::Input(format!("input '{name}': {e}")))?;
            values.push((Cow::Owned(name), value.into()));
        }
        let outputs = match self.release.as_ref().filter(|_| release) {
            Some(options) => self.session.run_with_options(values, options),
            None => self.session.run(values),
        }
        .map_err(|e| BackendError::Run(e.to_string()))?;
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

    fn optional_inputs(&self) -> &[TensorInfo] {
        &self.optional
    }

    fn placement(&self) -> Option<&Placement> {
        Some(&self.placement)
    }

    fn run(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
        self.run_with(inputs, false)
    }

    fn run_releasing(&mut self, inputs: NamedTensors) -> Result<NamedTensors, BackendError> {
        self.run_with(inputs, true)
    }

    fn new_state(&mut self, count: usize, shape: &[usize]) -> Option<Result<Box<dyn State>, BackendError>> {
        // Host buffers bound in place serve a CPU session; another provider would copy them each run.
        if self.provider != Provider::Cpu.ort_name() {
            return None;
        }
        let make = || -> ort::Result<Box<dyn State>> {
            let allocator = ort::memory::Allocator::default();
            let mut values = Vec::with_capacity(count);
            for _ in 0..count {
                let mut t =
                    ort::value::Tensor::<f32>::new(&allocator, shape.iter().map(|&d| d as i64).collect::<Vec<_>>())?;
                t.extract_tensor_mut().1.fill(0.0);
                values.push(t);
            }
            Ok(Box::new(OrtState { shape: shape.to_vec(), values }))
        };
        Some(make().map_err(|e| BackendError::Run(format!("cannot allocate the engine's buffers {shape:?}: {e}"))))
    }

    fn run_in_place(
        &mut self,
        inputs: NamedTensors,
        state: &mut dyn State,
        bind: &[(String, String)],
        outputs: &[String],
        release: bool,
    ) -> Result<NamedTensors, BackendError> {
        self.take_upgrade();
        let state = state
            .as_any_mut()
            .downcast_mut::<OrtState>()
            .ok_or_else(|| BackendError::Run("buffers made by another engine".into()))?;
        if bind.len() > state.values.len() {
            return Err(BackendError::Run(format!("{} bindings for {} buffers", bind.len(), state.values.len())));
        }
        let run = |e: ort::Error| BackendError::Run(e.to_string());
        let mut binding = self.session.create_binding().map_err(run)?;
        let mut held = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            if let Some(info) = self.inputs.iter().find(|i| i.name == name)
                && let Some(dtype) = info.dtype
                && dtype != tensor.dtype()
            {
                return Err(BackendError::Input(format!("input '{name}' must be {dtype}, got {}", tensor.dtype())));
            }
            let value = to_value(tensor).map_err(|e| BackendError::Input(format!("input '{name}': {e}")))?;
            binding.bind_input(name.as_str(), &value).map_err(run)?;
            held.push(value);
        }
        for ((input, output), value) in bind.iter().zip(state.values.iter_mut()) {
            binding.bind_input(input.as_str(), &*value).map_err(run)?;
            binding.bind_output(output.as_str(), &mut *value).map_err(run)?;
        }
        let cpu = ort::memory::MemoryInfo::new(
            ort::memory::AllocationDevice::CPU,
            0,
            ort::memory::AllocatorType::Device,
            ort::memory::MemoryType::Default,
        )
        .map_err(run)?;
        for name in outputs {
            binding.bind_output_to_device(name.as_str(), &cpu).map_err(run)?;
        }
        let results = match self.release.as_ref().filter(|_| release) {
            Some(options) => self.session.run_binding_with_options(&binding, options),
            None => self.session.run_binding(&binding),
        }
        .map_err(run)?;
        let out = outputs
            .iter()
            .map(|name| {
                let value = results
                    .get(name)
                    .ok_or_else(|| BackendError::Run(format!("ONNX Runtime returned no output '{name}'")))?;
                Ok((name.clone(), from_value(name, value)?))
            })
            .collect();
        drop(held);
        out
    }
}

/// ONNX Runtime tensors kept between runs ([`InferenceBackend::new_state`]).
struct OrtState {
    shape: Vec<usize>,
    values: Vec<ort::value::Tensor<f32>>,
}

impl State for OrtState {
    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn count(&self) -> usize {
        self.values.len()
    }

    fn buffer(&mut self, i: usize) -> &mut [f32] {
        self.values[i].extract_tensor_mut().1
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_threads_share_the_cores_among_instances() {
        // (cores, instances) -> threads per session
        for (cores, instances, want) in [(2, 1, 2), (8, 1, 4), (8, 2, 4), (8, 4, 2), (2, 2, 1), (2, 8, 1), (1, 1, 1)] {
            assert_eq!(default_intra_threads(cores, instances), want, "{cores} cores, {instances} instances");
        }
    }

    #[test]
    fn placement_lines_are_read_per_provider() {
        let lines = vec![
            "Node placements".to_string(),
            " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 16".to_string(),
            " Node(s) placed on [CPUExecutionProvider].    Number of nodes: 1".to_string(),
        ];
        let nodes = parse_placement(&lines);
        assert_eq!(nodes.get("CUDAExecutionProvider"), Some(&16));
        assert_eq!(nodes.get("CPUExecutionProvider"), Some(&1));
        let all = parse_placement(&["All nodes placed on [CPUExecutionProvider]. Number of nodes: 12".to_string()]);
        assert_eq!(all.into_iter().collect::<Vec<_>>(), vec![("CPUExecutionProvider".to_string(), 12)]);
    }

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
