//! models.json, the registry: which models exist, their variants (sizes of
//! the same model), how to feed them and how to read their answers. Loading
//! checks the structure and that files exist; [`Registry::check`] also
//! verifies sha256 sums and compares each spec with what the ONNX file
//! declares. Every problem names its exact JSON path.

use crate::backend::{BackendChoice, onnx_file};
use crate::pipeline::{self, SpecProblem, TaskSection};
use crate::tensor::TensorInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The file as written: `{"version": 1, "models": [...]}`; each model is
/// read by [`ModelSpec::from_json`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default = "version_one")]
    version: u32,
    models: Vec<serde_json::Map<String, serde_json::Value>>,
}

fn version_one() -> u32 {
    1
}

/// One model: a name clients use, a task with its section, and one or more
/// variants. The fields here are every model's; the rest of a model's object
/// (`input`, `labels`, `generation`, ...) is its task's section, read by the
/// task's module ([`TaskSection`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
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
    /// Dynamic batching: jobs gathered into one engine call (models with a dynamic batch dimension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchSpec>,
    /// Sessions of the model serving jobs side by side, each on its own thread (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<usize>,
    /// Unload after this many idle seconds (0: never); default the config's `memory.keep_alive_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive_s: Option<u64>,
    /// Never unload for idleness or to make room for another model.
    #[serde(default)]
    pub pin: bool,
    /// The task (`task` in models.json) and its section; see [`ModelSpec::to_json`] for the whole model.
    #[serde(skip)]
    pub task: TaskSection,
    /// The folder its paths are relative to when it is not the registry's: a
    /// `models.d/NAME/model.json` entry's own folder.
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

impl ModelSpec {
    /// Every file the model names: variants, their parts, and its task's (labels, tokenizer …).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for v in &self.variants {
            out.push(v.file.clone());
            out.extend(v.parts.values().map(|p| p.file.clone()));
        }
        out.extend(self.task.files().into_iter().map(|(_, p)| p.to_path_buf()));
        out
    }

    /// Reads one model's object: the task named by `task` reads its own
    /// fields; the rest are the model's. Problems carry paths relative to the model.
    pub fn from_json(mut object: serde_json::Map<String, serde_json::Value>) -> Result<ModelSpec, Vec<Problem>> {
        let problem = |path: String, message: String| vec![Problem { path, message }];
        let kind = match object.remove("task") {
            Some(serde_json::Value::String(name)) => pipeline::task_kind(&name).ok_or_else(|| {
                let names: Vec<String> = pipeline::TASKS.iter().map(|t| format!("`{}`", t.name)).collect();
                problem(".task".into(), format!("unknown variant `{name}`, expected one of {}", names.join(", ")))
            })?,
            Some(other) => return Err(problem(".task".into(), format!("invalid type: {other}, expected a task name"))),
            None => return Err(problem(String::new(), "missing field `task`".into())),
        };
        let mut section = serde_json::Map::new();
        let mut problems = Vec::new();
        for field in kind.fields() {
            if let Some(v) = object.remove(*field) {
                section.insert(field.to_string(), v);
            }
        }
        let foreign: Vec<String> = object
            .keys()
            .filter(|k| pipeline::TASKS.iter().any(|t| t.fields().contains(&k.as_str())))
            .cloned()
            .collect();
        for field in foreign {
            object.remove(&field);
            problems.push(Problem {
                path: format!(".{field}"),
                message: format!("the {} task takes no '{field}'", kind.name),
            });
        }
        let model: Result<ModelSpec, _> = serde_path_to_error::deserialize(serde_json::Value::Object(object));
        let task = kind.parse(serde_json::Value::Object(section));
        match (model, task) {
            (Ok(mut model), Ok(task)) if problems.is_empty() => {
                model.task = task;
                Ok(model)
            }
            (model, task) => {
                if let Err(e) = model {
                    let path = e.path().to_string();
                    let path = if path.is_empty() || path == "." { String::new() } else { format!(".{path}") };
                    problems.push(Problem { path, message: e.inner().to_string() });
                }
                if let Err(p) = task {
                    problems.push(Problem { path: p.path, message: p.message });
                }
                Err(problems)
            }
        }
    }

    /// The model as models.json would write it (its fields and its task's section).
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.extend(self.task.to_json());
        }
        value
    }

    /// Compares the spec with the inputs and outputs the main graph declares
    /// (the task's checks, and a batch dimension when jobs are stacked); `dir` is models.json's folder.
    pub fn check_io(&self, dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let mut problems = self.task.check_io(dir, inputs, outputs);
        if self.batch.is_some_and(|b| b.max_batch > 1) {
            for t in inputs.iter().chain(outputs) {
                if t.shape.first().is_none_or(|d| d.is_some()) {
                    problems.push(SpecProblem::new(
                        ".batch",
                        format!("'{}' {} has no dynamic batch dimension to stack jobs on", t.name, t.shape_text()),
                    ));
                }
            }
        }
        problems
    }

    /// Checks what the model's fields and its task need of each other, without reading any file.
    fn validate(&self) -> Vec<SpecProblem> {
        let mut problems = self.validate_parts();
        problems.extend(self.task.validate());
        if let Some(b) = &self.batch {
            if !self.task.batches() {
                let mut batching: Vec<&str> = pipeline::TASKS.iter().filter(|t| t.batches()).map(|t| t.name).collect();
                let last = batching.pop().unwrap_or_default();
                let list =
                    if batching.is_empty() { last.to_string() } else { format!("{} and {last}", batching.join(", ")) };
                problems.push(SpecProblem::new(
                    ".batch",
                    format!("batching is for {list} models, not {}", self.task.task()),
                ));
            }
            if !(1..=256).contains(&b.max_batch) {
                problems.push(SpecProblem::new(".batch.max_batch", "must be 1..=256"));
            }
            if b.max_delay_us > 1_000_000 {
                problems.push(SpecProblem::new(".batch.max_delay_us", "must be at most 1000000 (one second)"));
            }
        }
        if self.instances.is_some_and(|n| !(1..=MAX_INSTANCES).contains(&n)) {
            problems.push(SpecProblem::new(".instances", format!("must be 1..={MAX_INSTANCES}")));
        }
        problems
    }

    /// Each variant has the parts its task requires and no others.
    fn validate_parts(&self) -> Vec<SpecProblem> {
        let (required, optional) = self.task.parts();
        let task = self.task.task();
        let mut problems = Vec::new();
        for (j, v) in self.variants.iter().enumerate() {
            for r in required {
                if !v.parts.contains_key(*r) {
                    problems.push(SpecProblem::new(
                        &format!(".variants[{j}].parts"),
                        format!("the {task} task needs a '{r}' part"),
                    ));
                }
            }
            for role in v.parts.keys() {
                if !required.contains(&role.as_str()) && !optional.contains(&role.as_str()) {
                    let known: Vec<&str> = required.iter().chain(optional).copied().collect();
                    problems.push(SpecProblem::new(
                        &format!(".variants[{j}].parts.{role}"),
                        if known.is_empty() {
                            format!("the {task} task takes no parts")
                        } else {
                            format!("the {task} task has no '{role}' part (parts: {})", known.join(", "))
                        },
                    ));
                }
            }
        }
        problems
    }
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
    /// Drop-in folders read besides `dir/models.d` (model packages, pulls).
    pub dropins: Vec<PathBuf>,
}

/// Largest models.json read (a registry is small; this stops a wrong path to a big file).
const MAX_REGISTRY_BYTES: u64 = 8 << 20;

impl Registry {
    /// Reads and validates `file`: JSON shape, names, task requirements and
    /// that every referenced file exists. sha256 and ONNX checks are in [`Registry::check`].
    pub fn load(file: &Path) -> Result<Registry, RegistryError> {
        Self::load_with_dropins(file, &[])
    }

    /// [`Registry::load`], with the `models.d`-style folders `dropins` read
    /// after the one beside `file`.
    pub fn load_with_dropins(file: &Path, dropins: &[PathBuf]) -> Result<Registry, RegistryError> {
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
        let mut registry = Self::from_json(&text, file)?;
        registry.dropins = dropins.to_vec();
        registry.add_dropins()?;
        Ok(registry)
    }

    /// The drop-in folders read, in order: `models.d` beside models.json, then
    /// [`Registry::dropins`] (each once).
    pub fn dropin_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = Vec::new();
        let same = |a: &Path, b: &Path| {
            a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
        };
        for root in std::iter::once(self.dir.join(crate::pull::MODELS_D)).chain(self.dropins.iter().cloned()) {
            if !roots.iter().any(|r| same(r, &root)) {
                roots.push(root);
            }
        }
        roots
    }

    /// Merges the `NAME/model.json` entries of the drop-in folders (pulled
    /// models, model packages; see [`Registry::dropin_roots`]): each one
    /// model's object, its paths relative to its own folder and never leaving
    /// it; a name models.json or another entry already has is refused.
    /// Folders starting with `.` (a pull in progress) are skipped.
    fn add_dropins(&mut self) -> Result<(), RegistryError> {
        let mut folders: Vec<PathBuf> = Vec::new();
        for root in self.dropin_roots() {
            let Ok(read) = std::fs::read_dir(&root) else { continue };
            let mut found: Vec<PathBuf> = read
                .filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .filter(|p| p.join("model.json").is_file())
                .collect();
            found.sort();
            folders.extend(found);
        }
        let mut problems = Vec::new();
        let mut places: Vec<String> = (0..self.models.len()).map(|i| format!("models[{i}]")).collect();
        let main = self.models.len();
        for folder in folders {
            let file = folder.join("model.json");
            let place = format!("{}:", file.display());
            let mut text = String::new();
            let read =
                std::fs::File::open(&file).and_then(|f| f.take(MAX_REGISTRY_BYTES + 1).read_to_string(&mut text));
            let object = match read.map_err(|e| e.to_string()).and_then(|_| {
                serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text).map_err(|e| e.to_string())
            }) {
                Ok(o) => o,
                Err(message) => {
                    problems.push(Problem { path: format!("{place} $"), message: format!("cannot read: {message}") });
                    continue;
                }
            };
            match ModelSpec::from_json(object) {
                Ok(mut m) => {
                    m.dir = Some(folder);
                    self.models.push(m);
                    places.push(place);
                }
                Err(found) => problems.extend(
                    found.into_iter().map(|p| Problem { path: format!("{place}{}", p.path), message: p.message }),
                ),
            }
        }
        if self.models.len() > main {
            let mut all = Vec::new();
            self.validate_structure(&places, &mut all);
            // models.json's own models were validated when read; what is new is the entries'.
            problems.extend(
                all.into_iter().filter(|p| !places[..main].iter().any(|m| p.path.starts_with(&format!("{m}.")))),
            );
            problems.extend(self.escaping_paths().into_iter().filter(|p| !p.path.starts_with("models[")));
        }
        if problems.is_empty() { Ok(()) } else { Err(RegistryError { file: self.file.clone(), problems }) }
    }

    /// Parses and validates registry `text` as if read from `file` (paths resolve against its folder).
    pub fn from_json(text: &str, file: &Path) -> Result<Registry, RegistryError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let parsed: RegistryFile = serde_path_to_error::deserialize(de).map_err(|e| RegistryError {
            file: file.to_path_buf(),
            problems: vec![Problem { path: json_path(&e.path().to_string()), message: e.inner().to_string() }],
        })?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut problems = Vec::new();
        // Models that read well, with their place in the file (the others' problems are kept).
        let mut read = Vec::with_capacity(parsed.models.len());
        for (i, object) in parsed.models.into_iter().enumerate() {
            match ModelSpec::from_json(object) {
                Ok(m) => read.push((i, m)),
                Err(found) => problems.extend(
                    found.into_iter().map(|p| Problem { path: format!("models[{i}]{}", p.path), message: p.message }),
                ),
            }
        }
        let all_read = problems.is_empty();
        let (places, models): (Vec<usize>, Vec<ModelSpec>) = read.into_iter().unzip();
        let places: Vec<String> = places.iter().map(|i| format!("models[{i}]")).collect();
        let registry = Registry { file: file.to_path_buf(), dir, models, dropins: Vec::new() };
        if parsed.version != 1 {
            problems.push(Problem {
                path: "version".into(),
                message: format!("unsupported version {} (this inferd reads 1)", parsed.version),
            });
        }
        registry.validate_structure(&places, &mut problems);
        if problems.is_empty() && all_read {
            Ok(registry)
        } else {
            Err(RegistryError { file: file.to_path_buf(), problems })
        }
    }

    /// Reads `file` as [`Registry::load`] does, and unless `allow_outside`
    /// refuses paths that leave its folder (see [`Registry::escaping_paths`]).
    pub fn load_confined(file: &Path, allow_outside: bool) -> Result<Registry, RegistryError> {
        Self::load_confined_with(file, allow_outside, &[])
    }

    /// [`Registry::load_confined`] with more drop-in folders (see [`Registry::load_with_dropins`]).
    pub fn load_confined_with(
        file: &Path,
        allow_outside: bool,
        dropins: &[PathBuf],
    ) -> Result<Registry, RegistryError> {
        let registry = Self::load_with_dropins(file, dropins)?;
        let problems = if allow_outside { Vec::new() } else { registry.escaping_paths() };
        if problems.is_empty() { Ok(registry) } else { Err(RegistryError { file: file.to_path_buf(), problems }) }
    }

    /// The registry at `file` as `config` reads it: its drop-in folders, and
    /// paths leaving the folder refused unless `models_outside`.
    pub fn load_for(config: &crate::config::Config, file: &Path) -> Result<Registry, RegistryError> {
        Self::load_confined_with(file, config.models_outside, &config.dropins())
    }

    /// Paths in the registry that leave its folder: absolute, or with `..`.
    pub fn escaping_paths(&self) -> Vec<Problem> {
        let escapes = |p: &Path| p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir);
        let mut problems = Vec::new();
        for (i, m) in self.models.iter().enumerate() {
            let place = self.place(i);
            let mut paths: Vec<(String, &Path)> = Vec::new();
            for (j, v) in m.variants.iter().enumerate() {
                paths.push((format!("{place}.variants[{j}].file"), &v.file));
                for (role, part) in &v.parts {
                    paths.push((format!("{place}.variants[{j}].parts.{role}.file"), &part.file));
                }
            }
            for (at, p) in m.task.files() {
                paths.push((format!("{place}{at}"), p));
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

    /// A path of `model`'s, resolved against its folder (models.json's, or its models.d entry's).
    pub fn resolve(&self, model: &ModelSpec, path: &Path) -> PathBuf {
        self.dir_of(model).join(path)
    }

    /// The folder `model`'s paths are relative to.
    pub fn dir_of<'a>(&'a self, model: &'a ModelSpec) -> &'a Path {
        model.dir.as_deref().unwrap_or(&self.dir)
    }

    /// Where the `i`th model is written: `models[i]` of models.json, or its models.d file.
    pub fn place(&self, i: usize) -> String {
        match &self.models[i].dir {
            Some(dir) => format!("{}:", dir.join("model.json").display()),
            None => format!("models[{i}]"),
        }
    }

    /// Checks names, files and task requirements; `places` name the models where they are written
    /// (`models[3]`, or a `models.d` entry's file).
    fn validate_structure(&self, places: &[String], problems: &mut Vec<Problem>) {
        let mut names = HashSet::new();
        for (place, m) in places.iter().zip(&self.models) {
            let at = |field: &str| format!("{place}{field}");
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
                    let file = self.resolve(m, file);
                    if !file.is_file() {
                        push(vat(&format!("{at}.file")), format!("file {} does not exist", file.display()));
                    }
                }
            }
            for (path, f) in m.task.files() {
                if !self.resolve(m, f).is_file() {
                    push(at(&path), format!("file {} does not exist", self.resolve(m, f).display()));
                }
            }
            for p in m.validate() {
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
            let place = self.place(i);
            for (j, v) in m.variants.iter().enumerate() {
                let at = |field: &str| format!("{place}.variants[{j}]{field}");
                let file = self.resolve(m, &v.file);
                match verify_sha256(&file, &v.sha256) {
                    Ok(()) => {}
                    Err(message) => {
                        problems.push(Problem { path: at(".sha256"), message });
                        continue;
                    }
                }
                match onnx_file::declared_io(&file) {
                    Ok(io) => {
                        for p in m.check_io(self.dir_of(m), &io.inputs, &io.outputs) {
                            problems.push(Problem {
                                path: format!("{place}{}", p.path),
                                message: format!("{} (variant '{}')", p.message, v.name),
                            });
                        }
                    }
                    Err(message) => problems.push(Problem { path: at(".file"), message }),
                }
                for (role, part) in &v.parts {
                    let file = self.resolve(m, &part.file);
                    let pat = |field: &str| at(&format!(".parts.{role}{field}"));
                    if let Err(message) = verify_sha256(&file, &part.sha256) {
                        problems.push(Problem { path: pat(".sha256"), message });
                        continue;
                    }
                    match onnx_file::declared_io(&file) {
                        Ok(io) => {
                            for p in m.task.check_part(role, &io.inputs, &io.outputs) {
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

impl Registry {
    /// Models added, changed (any field, or where its files resolve) and removed from `self` to `new`.
    pub fn diff(&self, new: &Registry) -> (Vec<String>, Vec<String>, Vec<String>) {
        let old = self;
        let key = |r: &Registry, m: &ModelSpec| (m.to_json().to_string(), r.dir_of(m).to_path_buf());
        let mut added = Vec::new();
        let mut changed = Vec::new();
        for m in &new.models {
            match old.get(&m.name) {
                None => added.push(m.name.clone()),
                Some(o) if key(old, o) != key(new, m) => changed.push(m.name.clone()),
                Some(_) => {}
            }
        }
        let removed = old.models.iter().filter(|m| new.get(&m.name).is_none()).map(|m| m.name.clone()).collect();
        (added, changed, removed)
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

/// A model or variant name: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -.
pub fn valid_name(name: &str) -> bool {
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

#[cfg(test)]
mod diff_tests {
    use super::*;

    const SHA: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";

    fn model(name: &str, file: &str) -> String {
        format!(r#"{{"name":"{name}","task":"raw","variants":[{{"name":"v","file":"{file}","sha256":"{SHA}"}}]}}"#)
    }

    fn registry(dir: &std::path::Path, models: &[String]) -> Registry {
        for f in ["a.onnx", "b.onnx"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let json = format!(r#"{{"models":[{}]}}"#, models.join(","));
        Registry::from_json(&json, &dir.join("models.json")).unwrap()
    }

    #[test]
    fn a_reload_sees_models_added_changed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let old = registry(dir.path(), &[model("same", "a.onnx"), model("edited", "a.onnx"), model("gone", "a.onnx")]);
        let new = registry(dir.path(), &[model("same", "a.onnx"), model("edited", "b.onnx"), model("fresh", "a.onnx")]);
        let (added, changed, removed) = old.diff(&new);
        assert_eq!((added, changed, removed), (vec!["fresh".into()], vec!["edited".into()], vec!["gone".into()]));
        // The same entry in another folder points at other files: changed.
        let moved = registry(other.path(), &[model("same", "a.onnx")]);
        let (added, changed, _) = registry(dir.path(), &[model("same", "a.onnx")]).diff(&moved);
        assert_eq!((added.len(), changed), (0, vec!["same".to_string()]));
        let (added, changed, removed) = old.diff(&old);
        assert!(added.is_empty() && changed.is_empty() && removed.is_empty(), "nothing differs from itself");
    }
}
