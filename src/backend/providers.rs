//! Execution provider settings, as models.json (`providers`) and the
//! configuration (`runtime.providers`) write them: an ordered list whose
//! entries are a name (`"cuda"`) or a table with the provider's options
//! (`{"name": "tensorrt", "fp16": true}`). Parsing is strict: an unknown
//! provider or option is an error naming it.

use super::Provider;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// One entry of a provider list: the provider and its options.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProviderSpec {
    pub provider: Provider,
    pub options: ProviderOptions,
}

/// A provider's options; each provider reads only its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum ProviderOptions {
    Cuda(CudaOptions),
    Tensorrt(TensorRtOptions),
    Coreml(CoreMlOptions),
    None {},
}

/// How the CUDA arena grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArenaExtend {
    NextPowerOfTwo,
    SameAsRequested,
}

/// How cuDNN picks convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvSearch {
    /// Benchmark every algorithm once per shape (slow first run, fastest after).
    Exhaustive,
    /// cuDNN's heuristics (fast start).
    Heuristic,
    /// The default algorithm.
    Default,
}

/// CUDA provider options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CudaOptions {
    pub device_id: u32,
    /// Cap of the CUDA memory arena, MiB (Jetsons share it with the CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem_limit_mb: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arena_extend_strategy: Option<ArenaExtend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cudnn_conv_algo_search: Option<ConvSearch>,
}

/// TensorRT provider options. Engines and timing caches live under the
/// state directory, keyed so a stale one is never reused (see `trt_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TensorRtOptions {
    pub device_id: u32,
    /// Build fp16 engines (Jetson's tensor cores); off: fp32.
    pub fp16: bool,
    /// TensorRT's builder workspace, MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workspace_mb: Option<u64>,
    /// Keep built engines and the timing cache under the state directory.
    pub engine_cache: bool,
    /// Shape profile for dynamic inputs: input name → dims, for the smallest,
    /// the most common and the largest shapes the engine must take.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profile_min: BTreeMap<String, Vec<u64>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profile_opt: BTreeMap<String, Vec<u64>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub profile_max: BTreeMap<String, Vec<u64>>,
    /// Serve on the next provider while an engine that is not cached yet is built.
    pub build_in_background: bool,
}

impl Default for TensorRtOptions {
    fn default() -> Self {
        TensorRtOptions {
            device_id: 0,
            fp16: true,
            max_workspace_mb: None,
            engine_cache: true,
            profile_min: BTreeMap::new(),
            profile_opt: BTreeMap::new(),
            profile_max: BTreeMap::new(),
            build_in_background: true,
        }
    }
}

impl TensorRtOptions {
    /// A profile in ONNX Runtime's form: `input:1x3x224x224,mask:1x128`.
    pub fn profile_text(profile: &BTreeMap<String, Vec<u64>>) -> String {
        profile
            .iter()
            .map(|(name, dims)| format!("{name}:{}", dims.iter().map(u64::to_string).collect::<Vec<_>>().join("x")))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The CoreML model format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CoreMlFormat {
    /// ML Program (macOS 12+): more operators, fp16 on the Neural Engine.
    #[default]
    Mlprogram,
    Neuralnetwork,
}

/// Which Apple compute units CoreML may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeUnits {
    #[default]
    All,
    CpuOnly,
    CpuAndGpu,
    CpuAndNeuralEngine,
}

/// CoreML provider options.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoreMlOptions {
    pub format: CoreMlFormat,
    pub compute_units: ComputeUnits,
    /// Keep compiled CoreML models under the state directory.
    pub cache: bool,
    /// Compile for the model's fixed input shapes only.
    pub static_shapes: bool,
}

impl Default for CoreMlOptions {
    fn default() -> Self {
        CoreMlOptions {
            format: CoreMlFormat::Mlprogram,
            compute_units: ComputeUnits::All,
            cache: true,
            static_shapes: false,
        }
    }
}

impl ProviderSpec {
    /// `provider` with its default options.
    pub fn new(provider: Provider) -> ProviderSpec {
        let options = match provider {
            Provider::Cuda => ProviderOptions::Cuda(CudaOptions::default()),
            Provider::Tensorrt => ProviderOptions::Tensorrt(TensorRtOptions::default()),
            Provider::Coreml => ProviderOptions::Coreml(CoreMlOptions::default()),
            Provider::Cpu => ProviderOptions::None {},
        };
        ProviderSpec { provider, options }
    }

    /// The name as written in settings (`cuda`).
    pub fn name(&self) -> &'static str {
        match self.provider {
            Provider::Tensorrt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Coreml => "coreml",
            Provider::Cpu => "cpu",
        }
    }
}

impl From<Provider> for ProviderSpec {
    fn from(p: Provider) -> Self {
        ProviderSpec::new(p)
    }
}

#[derive(Deserialize)]
#[serde(tag = "name", rename_all = "lowercase")]
enum Table {
    Cuda(CudaOptions),
    #[serde(alias = "trt")]
    Tensorrt(TensorRtOptions),
    Coreml(CoreMlOptions),
    Cpu(NoOptions),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

impl<'de> Deserialize<'de> for ProviderSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ProviderSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a provider name (tensorrt, cuda, coreml, cpu) or a table with \"name\" and its options")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ProviderSpec, E> {
                Provider::parse(v)
                    .map(ProviderSpec::new)
                    .ok_or_else(|| E::custom(format!("unknown provider '{v}' (known: tensorrt, cuda, coreml, cpu)")))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ProviderSpec, A::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(match table {
                    Table::Cuda(o) => ProviderSpec { provider: Provider::Cuda, options: ProviderOptions::Cuda(o) },
                    Table::Tensorrt(o) => {
                        ProviderSpec { provider: Provider::Tensorrt, options: ProviderOptions::Tensorrt(o) }
                    }
                    Table::Coreml(o) => {
                        ProviderSpec { provider: Provider::Coreml, options: ProviderOptions::Coreml(o) }
                    }
                    Table::Cpu(_) => ProviderSpec::new(Provider::Cpu),
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ProviderSpec {
    /// The name alone when the options are the defaults, else a table with `name`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if *self == ProviderSpec::new(self.provider) {
            return s.serialize_str(self.name());
        }
        let mut value = serde_json::to_value(&self.options).map_err(serde::ser::Error::custom)?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("name".into(), self.name().into());
        }
        value.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<ProviderSpec>, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn names_and_tables_mix_in_one_list() {
        let list = parse(
            r#"["tensorrt", {"name": "cuda", "device_id": 1, "gpu_mem_limit_mb": 2048,
                "arena_extend_strategy": "same_as_requested", "cudnn_conv_algo_search": "heuristic"}, "cpu"]"#,
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0], ProviderSpec::new(Provider::Tensorrt));
        let ProviderOptions::Cuda(c) = &list[1].options else { panic!("{:?}", list[1]) };
        assert_eq!((c.device_id, c.gpu_mem_limit_mb), (1, Some(2048)));
        assert_eq!(c.cudnn_conv_algo_search, Some(ConvSearch::Heuristic));
        assert_eq!(list[2].provider, Provider::Cpu);
    }

    #[test]
    fn tensorrt_profiles_read_as_onnx_runtime_writes_them() {
        let list = parse(
            r#"[{"name": "tensorrt", "fp16": false, "profile_min": {"x": [1, 3, 32, 32]},
                 "profile_opt": {"x": [1, 3, 736, 736]}, "profile_max": {"x": [1, 3, 2048, 2048]}}]"#,
        )
        .unwrap();
        let ProviderOptions::Tensorrt(t) = &list[0].options else { panic!() };
        assert!(!t.fp16 && t.engine_cache && t.build_in_background);
        assert_eq!(TensorRtOptions::profile_text(&t.profile_max), "x:1x3x2048x2048");
    }

    #[test]
    fn unknown_providers_and_options_are_named() {
        let e = parse(r#"["npu"]"#).unwrap_err();
        assert!(e.contains("unknown provider 'npu'"), "{e}");
        let e = parse(r#"[{"name": "cuda", "gpu_mem_limit": 5}]"#).unwrap_err();
        assert!(e.contains("gpu_mem_limit"), "{e}");
        let e = parse(r#"[{"name": "coreml", "compute_units": "gpu_please"}]"#).unwrap_err();
        assert!(e.contains("gpu_please"), "{e}");
        let e = parse(r#"[{"device_id": 0}]"#).unwrap_err();
        assert!(e.contains("name"), "{e}");
    }

    #[test]
    fn defaults_print_as_a_name_and_options_as_a_table() {
        let list = parse(r#"["cuda", {"name": "coreml", "compute_units": "cpu_and_neural_engine"}]"#).unwrap();
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v[0], "cuda");
        assert_eq!(v[1]["name"], "coreml");
        assert_eq!(v[1]["compute_units"], "cpu_and_neural_engine");
        let back: Vec<ProviderSpec> = serde_json::from_value(v).unwrap();
        assert_eq!(back, list);
    }
}
