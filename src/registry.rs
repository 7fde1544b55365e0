//! models.json, the registry: which models exist, their variants (sizes of
//! the same model), how to feed them and how to read their answers. Loading
//! checks the structure and that files exist; [`Registry::check`] also
//! verifies sha256 sums and compares each spec with what the ONNX file
//! declares. Every problem names its exact JSON path.

use crate::backend::{BackendChoice, onnx_file};
use crate::pipeline::{self, Task};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The file as written: `{"version": 1, "models": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    #[serde(default = "version_one")]
    pub version: u32,
    pub models: Vec<ModelSpec>,
}

fn version_one() -> u32 {
    1
}

/// One model: a name clients use, a task, and one or more variants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub task: Task,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default)]
    pub backend: BackendChoice,
    /// Execution providers in order of preference, with their options; empty means the config's `runtime.providers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<crate::backend::providers::ProviderSpec>,
    /// Refuse silent fallback from the first provider; default the config's `runtime.strict_providers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_providers: Option<bool>,
    pub variants: Vec<VariantSpec>,
    /// How images become the input tensor (image tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<pipeline::image::ImageInputSpec>,
    /// How the output tensor is read (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<pipeline::classify::OutputSpec>,
    /// How text becomes tokens (embedding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<pipeline::embed::TextSpec>,
    /// How a YOLO output is decoded (object detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<pipeline::detect::DetectionSpec>,
    /// Detection, recognition and angle settings (ocr); RapidOCR's defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr: Option<pipeline::ocr::OcrSpec>,
    /// Dynamic batching: jobs gathered into one engine call (models with a dynamic batch dimension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
    /// Sessions of the model serving jobs side by side, each on its own thread (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// Tokenizer, graph names, limits and chat template (text-generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<pipeline::generate::GenerationSpec>,
    /// Receipt extraction settings (document-fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<pipeline::document::DocumentSpec>,
    /// A text file with one label per line, relative to models.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// Unload after this many idle seconds (0: never); default the config's `memory.keep_alive_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<u64>,
    /// Never unload for idleness or to make room for another model.
    #[serde(default)]
    pub pin: bool,
}

/// Most sessions one model may run side by side.
pub const MAX_INSTANCES: usize = 64;

impl ModelSpec {
    /// Sessions serving this model side by side.
    pub fn instances(&self) -> usize {
        self.instances.unwrap_or(1).clamp(1, MAX_INSTANCES)
    }
}

/// One size of a model: its file and what it costs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantSpec {
    pub name: String,
    /// The ONNX file, relative to models.json.
    pub file: PathBuf,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<u64>,
    /// Estimated memory when loaded, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Higher is better; the best variant that fits is chosen.
    #[serde(default)]
    pub quality: u32,
    /// Further graphs the task runs besides `file`, by role (ocr: `rec`, `cls`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parts: BTreeMap<String, PartSpec>,
}

/// Dynamic batching of one model: jobs waiting together run as one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Most jobs in one call.
    pub max_batch: usize,
    /// How long the first job of a batch waits for others, microseconds.
    #[serde(default = "default_max_delay_us")]
    pub max_delay_us: u64,
}

fn default_max_delay_us() -> u64 {
    2000
}

/// A further graph of a variant: its file and sha256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartSpec {
    /// The ONNX file, relative to models.json.
    pub file: PathBuf,
    /// sha256 of the file, lower-case hex.
    pub sha256: String,
}

/// One thing wrong with a registry, at a JSON path such as `models[2].variants[0].sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a registry was refused: every problem found, each at its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} has {} problem(s):\n  {}", file.display(), problems.len(), problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
pub struct RegistryError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// A loaded, structurally valid registry with paths resolved.
#[derive(Debug, Clone)]
pub struct Registry {
    pub file: PathBuf,
    pub dir: PathBuf,
    pub models: Vec<ModelSpec>,
}

/// Largest models.json read (a registry is small; this stops a wrong path to a big file).
const MAX_REGISTRY_BYTES: u64 = 8 << 20;

impl Registry {
    /// Reads and validates `file`: JSON shape, names, task requirements and
    /// that every referenced file exists. sha256 and ONNX checks are in [`Registry::check`].
    pub fn load(file: &Path) -> Result<Registry, RegistryError> {
        let fail = |path: &str, message: String| RegistryError {
            file: file.to_path_buf(),
            problems: vec![Problem { path: path.into(), message }],
        };
        let mut text = String::new();
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_REGISTRY_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| fail("$", format!("cannot read: {e}")))?;
        if text.len() as u64 > MAX_REGISTRY_BYTES {
            return Err(fail("$", format!("larger than {} MiB", MAX_REGISTRY_BYTES >> 20)));
        }
        Self::from_json(&text, file)
    }

    /// Parses and validates registry `text` as if read from `file` (paths resolve against its folder).
    pub fn from_json(text: &str, file: &Path) -> Result<Registry, RegistryError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let parsed: RegistryFile = serde_path_to_error::deserialize(de).map_err(|e| RegistryError {
            file: file.to_path_buf(),
            problems: vec![Problem { path: json_path(&e.path().to_string()), message: e.inner().to_string() }],
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let registry = Registry { file: file.to_path_buf(), dir, models: parsed.models };
        let mut problems = Vec::new();
        if parsed.version != 1 {
            problems.push(Problem {
                path: "version".into(),
                message: format!("unsupported version {} (this inferd reads 1)", parsed.version),
            });
        }
        registry.validate_structure(&mut problems);
        if problems.is_empty() { Ok(registry) } else { Err(RegistryError { file: file.to_path_buf(), problems }) }
    }

    /// Reads `file` as [`Registry::load`] does, and unless `allow_outside`
    /// refuses paths that leave its folder (see [`Registry::escaping_paths`]).
    pub fn load_confined(file: &Path, allow_outside: bool) -> Result<Registry, RegistryError> {
        let registry = Self::load(file)?;
        let problems = if allow_outside { Vec::new() } else { registry.escaping_paths() };
        if problems.is_empty() { Ok(registry) } else { Err(RegistryError { file: file.to_path_buf(), problems }) }
    }

    /// Paths in the registry that leave its folder: absolute, or with `..`.
    pub fn escaping_paths(&self) -> Vec<Problem> {
        let escapes = |p: &Path| p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir);
        let mut problems = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let mut paths: Vec<(String, &Path)> = Vec::new();
            for (j, v) in m.variants.iter().enumerate() {
                paths.push((format!("models[{i}].variants[{j}].file"), &v.file));
                for (role, part) in &v.parts {
                    paths.push((format!("models[{i}].variants[{j}].parts.{role}.file"), &part.file));
                }
            }
            if let Some(l) = &m.labels {
                paths.push((format!("models[{i}].labels"), l));
            }
            if let Some(t) = &m.text {
                paths.push((format!("models[{i}].text.tokenizer"), &t.tokenizer));
            }
            if let Some(g) = &m.generation {
                paths.push((format!("models[{i}].generation.tokenizer"), &g.tokenizer));
            }
            for (path, p) in paths.into_iter().filter(|(_, p)| escapes(p)) {
                problems.push(Problem {
                    path,
                    message: format!(
                        "{} is outside the folder of models.json; set models_outside = true in the configuration to allow it",
                        p.display()
                    ),
                });
            }
        }
        problems
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name)
    }

    /// A path from models.json, resolved against its folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.dir.join(path)
    }

    fn validate_structure(&self, problems: &mut Vec<Problem>) {
        let mut names = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = |field: &str| format!("models[{i}]{field}");
            let mut push = |path: String, message: String| problems.push(Problem { path, message });
            if !valid_name(&m.name) {
                push(
                    at(".name"),
                    format!("'{}' is not a valid name (1-64 of A-Z a-z 0-9 . _ -, not starting with . or -)", m.name),
                );
            } else if !names.insert(m.name.as_str()) {
                push(at(".name"), format!("duplicate model name '{}'", m.name));
            }
            if m.variants.is_empty() {
                push(at(".variants"), "a model needs at least one variant".into());
            }
            let mut variant_names = HashSet::new();
            for (j, v) in m.variants.iter().enumerate() {
                let vat = |field: &str| at(&format!(".variants[{j}]{field}"));
                if !valid_name(&v.name) {
                    push(vat(".name"), format!("'{}' is not a valid variant name", v.name));
                } else if !variant_names.insert(v.name.as_str()) {
                    push(vat(".name"), format!("duplicate variant name '{}'", v.name));
                }
                let files = std::iter::once((String::new(), &v.file, &v.sha256))
                    .chain(v.parts.iter().map(|(role, p)| (format!(".parts.{role}"), &p.file, &p.sha256)));
                for (at, file, sha) in files {
                    if !is_sha256_hex(sha) {
                        push(vat(&format!("{at}.sha256")), "must be 64 lower-case hex digits".into());
                    }
                    let file = self.resolve(file);
                    if !file.is_file() {
                        push(vat(&format!("{at}.file")), format!("file {} does not exist", file.display()));
                    }
                }
            }
            if let Some(text) = &m.text
                && !self.resolve(&text.tokenizer).is_file()
            {
                push(at(".text.tokenizer"), format!("file {} does not exist", self.resolve(&text.tokenizer).display()));
            }
            if let Some(g) = &m.generation
                && !self.resolve(&g.tokenizer).is_file()
            {
                push(
                    at(".generation.tokenizer"),
                    format!("file {} does not exist", self.resolve(&g.tokenizer).display()),
                );
            }
            if let Some(labels) = &m.labels
                && !self.resolve(labels).is_file()
            {
                push(at(".labels"), format!("file {} does not exist", self.resolve(labels).display()));
            }
            for p in pipeline::validate_spec(m) {
                push(at(&p.path), p.message);
            }
        }
    }

    /// Deep check of every model: sha256 of every variant file, and each
    /// spec against the inputs/outputs the ONNX file declares. Returns every problem found.
    pub fn check(&self) -> Vec<Problem> {
        self.check_models(|_| true)
    }

    /// [`Registry::check`] of the models whose name `pick` accepts (a reload
    /// checks the models it adds or changes before it swaps them in).
    pub fn check_models(&self, pick: impl Fn(&str) -> bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (i, m) in self.models.iter().enumerate().filter(|(_, m)| pick(&m.name)) {
            for (j, v) in m.variants.iter().enumerate() {
                let at = |field: &str| format!("models[{i}].variants[{j}]{field}");
                let file = self.resolve(&v.file);
                match verify_sha256(&file, &v.sha256) {
                    Ok(()) => {}
                    Err(message) => {
                        problems.push(Problem { path: at(".sha256"), message });
                        continue;
                    }
                }
                match onnx_file::declared_io(&file) {
                    Ok(io) => {
                        let labels = m.labels.as_ref().and_then(|l| read_labels(&self.resolve(l)).ok());
                        for p in pipeline::check_against_model(m, &io.inputs, &io.outputs, labels.as_deref()) {
                            problems.push(Problem {
                                path: format!("models[{i}]{}", p.path),
                                message: format!("{} (variant '{}')", p.message, v.name),
                            });
                        }
                    }
                    Err(message) => problems.push(Problem { path: at(".file"), message }),
                }
                for (role, part) in &v.parts {
                    let file = self.resolve(&part.file);
                    let pat = |field: &str| at(&format!(".parts.{role}{field}"));
                    if let Err(message) = verify_sha256(&file, &part.sha256) {
                        problems.push(Problem { path: pat(".sha256"), message });
                        continue;
                    }
                    match onnx_file::declared_io(&file) {
                        Ok(io) => {
                            for p in pipeline::check_part(m, role, &io.inputs, &io.outputs) {
                                problems.push(Problem { path: pat(""), message: p.message });
                            }
                        }
                        Err(message) => problems.push(Problem { path: pat(".file"), message }),
                    }
                }
            }
        }
        problems
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks that the file at `path` has sha256 `expected`; the error says both sums.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<(), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let actual = hex::encode(hasher.finalize());
    if actual == expected {
        Ok(())
    } else {
        Err(format!("sha256 mismatch for {}: models.json says {expected}, the file has {actual}", path.display()))
    }
}

/// Reads a labels file: one label per line, trailing empty lines ignored.
pub fn read_labels(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read labels {}: {e}", path.display()))?;
    let mut labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    while labels.last().is_some_and(String::is_empty) {
        labels.pop();
    }
    Ok(labels)
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// serde_path_to_error writes `models[0].task`; the root is `.` — show it as `$`.
fn json_path(p: &str) -> String {
    if p.is_empty() || p == "." { "$".into() } else { p.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(json: &str) -> Result<Registry, RegistryError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"x").unwrap();
        let file = dir.path().join("models.json");
        let r = Registry::from_json(json, &file);
        drop(dir);
        r
    }

    const SHA: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";

    fn raw_model(name: &str) -> String {
        format!(r#"{{"name":"{name}","task":"raw","variants":[{{"name":"v","file":"m.onnx","sha256":"{SHA}"}}]}}"#)
    }

    #[test]
    fn a_valid_raw_model_loads() {
        let r = registry(&format!(r#"{{"models":[{}]}}"#, raw_model("a"))).unwrap();
        assert_eq!(r.models[0].variants[0].quality, 0);
    }

    #[test]
    fn unknown_task_is_reported_at_its_path() {
        let err = registry(r#"{"models":[{"name":"a","task":"dance","variants":[]}]}"#).unwrap_err();
        assert_eq!(err.problems[0].path, "models[0].task");
        assert!(err.problems[0].message.contains("dance"), "{err}");
    }

    #[test]
    fn duplicates_and_bad_sha_are_all_reported() {
        let json = format!(r#"{{"models":[{},{}]}}"#, raw_model("a"), raw_model("a").replace(SHA, "abc"));
        let err = registry(&json).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert!(paths.contains(&"models[1].name"), "{err}");
        assert!(paths.contains(&"models[1].variants[0].sha256"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_with_their_path() {
        let json = format!(r#"{{"models":[{}]}}"#, raw_model("a").replace(r#""task""#, r#""labls":"x","task""#));
        let err = registry(&json).unwrap_err();
        assert_eq!(err.problems[0].path, "models[0].labls");
    }

    #[test]
    fn names_are_restricted_to_what_topics_and_urls_carry() {
        assert!(valid_name("resnet-18_v1.2"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("+"));
        assert!(!valid_name(""));
        assert!(!valid_name("-x"));
    }
}
