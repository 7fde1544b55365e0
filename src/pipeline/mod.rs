//! The task interface: what a model job means (classification, detection,
//! OCR, embeddings, generation, ...) is one module per task under
//! `src/pipeline/`, reached only through the traits here. A task module
//! brings its models.json section ([`TaskSpec`]), its spec and ONNX checks,
//! its preparation ([`Prepare`], run off the worker where it is worth it),
//! its [`Pipeline`] and, when a job is many engine calls, a [`Stepper`] the
//! worker interleaves. The registry, the scheduler, the worker and the
//! front-ends name no task module: [`TASKS`] is the only place that lists them.
//!
//! Adding a task: a module here implementing [`TaskSpec`] (+ [`Section`]),
//! its `mod` line and its line in `tasks!`, its docs (docs/models-json.md).
//! See docs/DESIGN.md.

// `image` is the image helpers tasks share; the task modules are declared
// below, private: nothing outside `src/pipeline/` can name one (the compiler
// keeps the rule).
pub mod image;
#[cfg(feature = "libjpeg-turbo")]
pub mod jpeg;

pub use generate::json::{Grammar, JsonState, limits as schema_limits, parse_response_format};
pub use ocr::ctc;

use crate::backend::{InferenceBackend, NamedTensors};
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{InputKind, JobInput, JobOptions, JobResult, Timings};
use crate::tensor::TensorInfo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Lists each task's section in [`TASKS`].
macro_rules! tasks {
    ($($module:ident::$section:ident),* $(,)?) => {
        /// Every task inferd knows, by its models.json name.
        pub static TASKS: &[TaskKind] = &[$(TaskKind::of::<$module::$section>()),*];
    };
}

// The task modules, declared outside the macro so that `cargo fmt` reaches them.
mod classify;
mod detect;
mod document;
mod embed;
mod generate;
mod ocr;
mod raw;
mod vision;

// The one registration point: a task is its module and its line here.
tasks! {
    classify::ClassificationSpec,
    detect::DetectionTaskSpec,
    embed::EmbeddingSpec,
    ocr::OcrTaskSpec,
    document::DocumentTaskSpec,
    generate::GenerationTaskSpec,
    vision::VisionLanguageSpec,
    raw::RawSpec,
}

/// A task as models.json names it: how its section of a model is read.
pub struct TaskKind {
    /// Its name in models.json's `task` (`image-classification`).
    pub name: &'static str,
    fields: fn() -> &'static [&'static str],
    batches: fn() -> bool,
    parse: fn(serde_json::Value) -> Result<Arc<dyn TaskSpec>, SpecProblem>,
}

impl TaskKind {
    /// The task whose section is `S`.
    pub const fn of<S: Section>() -> TaskKind {
        TaskKind { name: S::TASK, fields: field_names::<S>, batches: batches::<S>, parse: parse_section::<S> }
    }

    /// The models.json fields of its section (besides the ones every model has).
    pub fn fields(&self) -> &'static [&'static str] {
        (self.fields)()
    }

    /// Whether its jobs can be stacked into one engine call.
    pub fn batches(&self) -> bool {
        (self.batches)()
    }

    /// Reads its section: the model's fields that [`TaskKind::fields`] names.
    pub fn parse(&self, section: serde_json::Value) -> Result<TaskSection, SpecProblem> {
        (self.parse)(section).map(TaskSection)
    }
}

/// The task called `name` in models.json.
pub fn task_kind(name: &str) -> Option<&'static TaskKind> {
    TASKS.iter().find(|t| t.name == name)
}

/// A task's models.json section as a Rust type: its fields sit beside the
/// model's own (`"task": "image-classification", "input": {...}, "labels": "..."`).
pub trait Section: TaskSpec + Serialize + DeserializeOwned + Default + Sized + 'static {
    /// The task's name in models.json.
    const TASK: &'static str;
}

fn batches<S: Section>() -> bool {
    S::default().batches()
}

fn parse_section<S: Section>(value: serde_json::Value) -> Result<Arc<dyn TaskSpec>, SpecProblem> {
    let spec: S = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path.is_empty() || path == "." { String::new() } else { format!(".{path}") };
        SpecProblem { path, message: e.inner().to_string() }
    })?;
    Ok(Arc::new(spec))
}

/// The field names serde reads for `S` (from its derived `Deserialize`).
fn field_names<S: DeserializeOwned>() -> &'static [&'static str] {
    #[derive(Debug)]
    struct Found(&'static [&'static str]);
    impl fmt::Display for Found {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }
    impl std::error::Error for Found {}
    impl serde::de::Error for Found {
        fn custom<T: fmt::Display>(_: T) -> Self {
            Found(&[])
        }
    }
    struct Probe;
    impl<'de> serde::Deserializer<'de> for Probe {
        type Error = Found;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Found> {
            Err(Found(&[]))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Found> {
            Err(Found(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    match S::deserialize(Probe) {
        Err(Found(fields)) => fields,
        Ok(_) => &[],
    }
}

/// A model's task and its parsed models.json section.
#[derive(Clone)]
pub struct TaskSection(Arc<dyn TaskSpec>);

impl TaskSection {
    /// The section as JSON, with `task` (to compare two registries, or to show).
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut map = self.0.section();
        map.insert("task".into(), self.0.task().into());
        map
    }
}

impl std::ops::Deref for TaskSection {
    type Target = dyn TaskSpec;
    fn deref(&self) -> &(dyn TaskSpec + 'static) {
        self.0.as_ref()
    }
}

impl fmt::Debug for TaskSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", serde_json::Value::Object(self.to_json()))
    }
}

impl Default for TaskSection {
    /// The `raw` task, with nothing to configure.
    fn default() -> Self {
        TaskSection(Arc::new(raw::RawSpec::default()))
    }
}

/// What a task is, read from its models.json section: the checks, the
/// inputs it takes and how it builds its pipeline on a loaded graph. One
/// implementation per task module; nothing outside `src/pipeline/` knows which.
pub trait TaskSpec: Send + Sync + 'static {
    /// The task's name in models.json (from [`Section::TASK`]).
    fn task(&self) -> &'static str;
    /// The section as JSON (from its `Serialize`).
    fn section(&self) -> serde_json::Map<String, serde_json::Value>;
    /// The kinds of input its jobs take, and how to say so when a job has another.
    fn takes(&self) -> (&'static [InputKind], &'static str);
    /// Whether a chat's images reach its model (vision-language); other tasks
    /// refuse a chat with images at admission, before any image is fetched.
    fn reads_images(&self) -> bool {
        false
    }
    /// Files its section names, relative to models.json, each with its JSON path (`.labels`).
    fn files(&self) -> Vec<(String, &Path)> {
        Vec::new()
    }
    /// The further graphs (`parts`) a variant must have, and may have.
    fn parts(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&[], &[])
    }
    /// Whether jobs can be stacked into one engine call (models.json `batch`).
    fn batches(&self) -> bool {
        false
    }
    /// Checks the section on its own, without reading any file.
    fn validate(&self) -> Vec<SpecProblem>;
    /// Compares the section with what the main graph declares; `dir` is models.json's folder.
    fn check_io(&self, _dir: &Path, _inputs: &[TensorInfo], _outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        Vec::new()
    }
    /// Compares the section with what the part `role` declares.
    fn check_part(&self, _role: &str, _inputs: &[TensorInfo], _outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        Vec::new()
    }
    /// Builds the pipeline that runs this task's jobs on a loaded graph.
    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError>;

    /// True when a job is many short engine runs (a decoder's steps): the
    /// engine's threads then spin between operators rather than sleep.
    fn many_short_runs(&self) -> bool {
        false
    }

    /// Memory a variant needs beyond its weights once it works, and what for
    /// (text generation: the KV cache of the context it must leave room for);
    /// counted when a variant is chosen. `file`: the variant's graph.
    fn working_memory(&self, _file: &Path) -> Option<(u64, String)> {
        None
    }

    /// What prepares this task's jobs from its section alone (a tokenizer, a
    /// chat template; `dir` is models.json's folder), for admission while the
    /// model is not loaded, so a bad request is refused before any load.
    /// None: jobs wait for the loaded model's preparer.
    fn spec_preparer(&self, _dir: &Path, _limits: &Limits) -> Option<MakePreparer> {
        None
    }
}

/// Makes a task's preparer from its section alone ([`TaskSpec::spec_preparer`]).
pub type MakePreparer = Box<dyn FnOnce() -> Result<Arc<dyn Prepare>, InferError> + Send>;

/// A preparer made on its first job, on the decode threads where admission
/// runs it (reading a tokenizer takes a while); a failure to make it is each
/// job's answer (the model could not load either).
pub struct Deferred {
    make: std::sync::Mutex<Option<MakePreparer>>,
    made: std::sync::OnceLock<Result<Arc<dyn Prepare>, InferError>>,
}

impl Deferred {
    pub fn new(make: MakePreparer) -> Deferred {
        Deferred { make: std::sync::Mutex::new(Some(make)), made: std::sync::OnceLock::new() }
    }
}

impl Prepare for Deferred {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        let made = self.made.get_or_init(|| {
            let make = self.make.lock().unwrap_or_else(|e| e.into_inner()).take();
            make.map_or_else(|| Err(InferError::internal("the preparer was not made")), |make| make())
        });
        match made {
            Ok(preparer) => preparer.prepare(input),
            Err(e) => Err(e.clone()),
        }
    }

    fn off_worker(&self) -> bool {
        true
    }
}

impl<S: Section> SectionJson for S {
    fn section_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        }
    }
}

/// A [`Section`]'s fields as JSON: what [`TaskSpec::section`] returns.
pub trait SectionJson {
    fn section_json(&self) -> serde_json::Map<String, serde_json::Value>;
}

/// Implements the naming half of [`TaskSpec`] for a [`Section`].
macro_rules! section_names {
    () => {
        fn task(&self) -> &'static str {
            <Self as $crate::pipeline::Section>::TASK
        }
        fn section(&self) -> serde_json::Map<String, serde_json::Value> {
            $crate::pipeline::SectionJson::section_json(self)
        }
    };
}
pub(crate) use section_names;

/// A loaded main graph and what a task needs to build its pipeline on it.
pub struct Graph<'a> {
    /// models.json's folder (labels and tokenizers are relative to it).
    pub dir: &'a Path,
    pub inputs: &'a [TensorInfo],
    /// Inputs the graph gives a default for ([`InferenceBackend::optional_inputs`]).
    pub optional_inputs: &'a [TensorInfo],
    pub outputs: &'a [TensorInfo],
    /// The variant's further graphs.
    pub parts: Vec<Part>,
    pub limits: &'a Limits,
}

/// What image tasks take ([`TaskSpec::takes`]).
const AN_IMAGE: (&[InputKind], &str) = (&[InputKind::Image], "an image");

/// Whether the task of `spec` takes this kind of input at all: checked before
/// a job is queued, so a wrong body is refused without loading the model.
pub fn admits(spec: &dyn TaskSpec, input: &JobInput) -> Result<(), InferError> {
    let (kinds, wanted) = spec.takes();
    if !kinds.contains(&input.kind()) {
        return Err(InferError::bad_input(format!("the {} task takes {wanted}", spec.task())));
    }
    let JobInput::Generate(request) = input else { return Ok(()) };
    if let crate::job::Prompt::Chat(messages) = &request.prompt
        && messages.iter().any(|m| !m.images.is_empty())
        && !spec.reads_images()
    {
        return Err(InferError::bad_input(format!(
            "this is a {} model: it reads no images (send them to a vision-language model)",
            spec.task()
        )));
    }
    // A response_format is compiled here too (linear in its size, within its
    // limits), so a bad one is refused before its model loads.
    if let Some(format) = &request.params.response_format {
        generate::json::parse_response_format(format).map_err(InferError::bad_input)?;
    }
    Ok(())
}

/// A problem with a model's spec, at a path relative to the model (`.input.width`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub path: String,
    pub message: String,
}

impl SpecProblem {
    /// A problem at `path` (relative to the model).
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        SpecProblem { path: path.to_string(), message: message.into() }
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

/// A section's `labels` file as [`TaskSpec::files`] lists it.
fn label_file(labels: &Option<PathBuf>) -> Vec<(String, &Path)> {
    labels.iter().map(|l| (".labels".to_string(), l.as_path())).collect()
}

/// The labels at `file` (relative to `dir`), or none when the section names no file.
fn labels_at(dir: &Path, file: Option<&PathBuf>) -> Result<Vec<String>, InferError> {
    match file {
        Some(f) => read_labels(&dir.join(f)).map_err(InferError::unavailable),
        None => Ok(Vec::new()),
    }
}

/// A job's input as its task's preparer made it: what that task's pipeline
/// runs on (tensors and the image size, decoded pixels, a request). Only the
/// task that made it can read it.
pub struct Prepared(Box<dyn Any + Send>);

impl Prepared {
    /// Wraps a task's prepared input.
    pub fn new<T: Any + Send>(value: T) -> Prepared {
        Prepared(Box::new(value))
    }

    /// The prepared input as the task's own type.
    pub fn take<T: Any>(self) -> Result<T, InferError> {
        self.0.downcast::<T>().map(|b| *b).map_err(|_| InferError::internal("a job prepared for another task"))
    }
}

/// A job's input on its way to the worker: as the client sent it, or already
/// prepared by the model's preparer on the decode threads.
pub enum Input {
    Sent(JobInput),
    Prepared(Prepared),
}

/// Turns what a client sent into what the task's pipeline runs on. A loaded
/// model hands its preparer to admission, which runs it on the decode threads
/// when [`Prepare::off_worker`] says so; otherwise the worker runs it.
pub trait Prepare: Send + Sync {
    /// Checks and converts `input` (decoding, resizing, tokenising).
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError>;
    /// Whether admission should prepare jobs on the decode threads (image
    /// work), so it runs beside inference instead of in front of it.
    fn off_worker(&self) -> bool {
        false
    }
}

/// What pre-processing learned that post-processing needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The original image's width and height, for tasks that map boxes back.
    pub image_size: Option<(u32, u32)>,
    /// The attention mask of tokenised text `[batch × tokens]`, for pooling.
    pub attention_mask: Option<Vec<u32>>,
}

/// A single-graph task's prepared input: the graph's tensors and what the
/// finish step needs to know of the job.
pub struct GraphInput {
    pub tensors: NamedTensors,
    pub ctx: Context,
}

/// Runs one job of a task on a loaded model: its main graph is `engine`;
/// graphs of further parts (OCR's recogniser) belong to the pipeline.
pub trait Pipeline: Send {
    /// What prepares this pipeline's input; admission gets it from the loaded model.
    fn preparer(&self) -> Arc<dyn Prepare>;

    /// Answers one prepared job, adding where the time went to `timings`.
    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: Prepared,
        options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError>;

    /// For tasks whose job is many engine calls (text generation): the
    /// stepper the worker interleaves their jobs with.
    fn stepper(&self) -> Option<&dyn Stepper> {
        None
    }

    /// Answers several jobs; the default answers them one by one. Single-graph
    /// tasks stack them into one engine call (dynamic batching). `timings` are the batch's.
    fn run_batch(
        &mut self,
        engine: &mut dyn InferenceBackend,
        jobs: Vec<(Prepared, JobOptions)>,
        timings: &mut Timings,
    ) -> Vec<Result<JobResult, InferError>> {
        jobs.into_iter().map(|(input, options)| self.run(engine, input, &options, timings)).collect()
    }
}

/// Starts the jobs of a many-call task as sequences the worker advances a
/// step at a time, side by side, without knowing what the task is.
pub trait Stepper {
    /// Most sequences one session advances together.
    fn parallel(&self) -> usize;
    /// Starts a job's sequence.
    fn start(&self, input: Prepared) -> Result<Box<dyn Sequence>, InferError>;
    /// Advances every sequence in `seqs` (all started by this stepper) by one
    /// step — together, in one engine call, where the graph allows — and says how each went.
    fn step(
        &self,
        engine: &mut dyn InferenceBackend,
        seqs: &mut [&mut (dyn Sequence + 'static)],
    ) -> Vec<Result<(), InferError>>;
    /// Gives back to the system the engine memory that large sequences, now
    /// ended, left pooled in it (called when at least
    /// [`crate::worker`]'s trim threshold of sequences ended at once).
    fn release(&self, _engine: &mut dyn InferenceBackend) {}
}

/// One job of a many-call task in progress.
pub trait Sequence: Send {
    /// Bytes it can grow to (a KV cache), so the worker refuses what memory cannot hold.
    fn memory_bytes(&self) -> u64;
    /// The task's own state, for its stepper to step.
    fn as_any_mut(&mut self) -> &mut dyn Any;
    /// True once it has ended.
    fn is_done(&self) -> bool;
    /// True when its client went away (nobody to answer).
    fn is_abandoned(&self) -> bool;
    /// The answer of an ended sequence.
    fn finish(self: Box<Self>) -> JobResult;
}

/// A task that runs its graph once per job: tensors in, tensors out.
pub trait SingleGraph: Send {
    /// What makes a job's [`GraphInput`].
    fn preparer(&self) -> Arc<dyn Prepare>;
    /// Reads the model's `outputs` into the task's answer.
    fn finish(&self, outputs: NamedTensors, ctx: &Context, options: &JobOptions) -> Result<JobResult, InferError>;
}

impl<T: SingleGraph> Pipeline for T {
    fn preparer(&self) -> Arc<dyn Prepare> {
        SingleGraph::preparer(self)
    }

    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: Prepared,
        options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let GraphInput { tensors, ctx } = input.take()?;
        let t1 = std::time::Instant::now();
        let outputs = engine.run(tensors)?;
        let t2 = std::time::Instant::now();
        let result = self.finish(outputs, &ctx, options)?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        timings.infer_ms += ms(t1, t2);
        timings.post_ms += ms(t2, std::time::Instant::now());
        Ok(result)
    }

    fn run_batch(
        &mut self,
        engine: &mut dyn InferenceBackend,
        jobs: Vec<(Prepared, JobOptions)>,
        timings: &mut Timings,
    ) -> Vec<Result<JobResult, InferError>> {
        let ms = |a: std::time::Instant| a.elapsed().as_secs_f64() * 1000.0;
        let mut results: Vec<Option<Result<JobResult, InferError>>> = jobs.iter().map(|_| None).collect();
        let mut prepared = Vec::with_capacity(jobs.len());
        for (i, (input, options)) in jobs.into_iter().enumerate() {
            match input.take::<GraphInput>() {
                Ok(g) => prepared.push((i, g.tensors, g.ctx, options)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let stacked = stack(prepared.iter().map(|p| p.1.clone()).collect());
        let t1 = std::time::Instant::now();
        let run = stacked.and_then(|(inputs, sizes)| {
            let outputs = engine.run(inputs).map_err(|e| e.to_string())?;
            split(outputs, &sizes)
        });
        timings.infer_ms += ms(t1);
        let t2 = std::time::Instant::now();
        match run {
            Ok(per_job) => {
                for ((i, _, ctx, options), outputs) in prepared.into_iter().zip(per_job) {
                    results[i] = Some(self.finish(outputs, &ctx, &options));
                }
            }
            Err(why) => {
                // The batch could not run as one: run each alone, so one odd job fails only itself.
                tracing::debug!("running {} jobs one by one: {why}", prepared.len());
                for (i, tensors, ctx, options) in prepared {
                    results[i] = Some(
                        engine.run(tensors).map_err(InferError::from).and_then(|o| self.finish(o, &ctx, &options)),
                    );
                }
            }
        }
        timings.post_ms += ms(t2);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(InferError::internal("a batched job got no answer"))))
            .collect()
    }
}

/// Stacks the jobs' named tensors input by input; every job must name the same inputs.
fn stack(jobs: Vec<NamedTensors>) -> Result<(NamedTensors, Vec<usize>), String> {
    let names: Vec<String> = jobs.first().ok_or("no jobs")?.iter().map(|(n, _)| n.clone()).collect();
    let mut columns: Vec<Vec<crate::tensor::Tensor>> = names.iter().map(|_| Vec::with_capacity(jobs.len())).collect();
    for job in jobs {
        if job.len() != names.len() {
            return Err("jobs name different inputs".into());
        }
        for (k, (name, t)) in job.into_iter().enumerate() {
            if name != names[k] {
                return Err("jobs name different inputs".into());
            }
            columns[k].push(t);
        }
    }
    let mut sizes = Vec::new();
    let mut out = Vec::with_capacity(names.len());
    for (name, column) in names.into_iter().zip(columns) {
        let (t, s) = crate::tensor::concat_batch(column)?;
        if !sizes.is_empty() && sizes != s {
            return Err("inputs of one job differ in batch size".into());
        }
        sizes = s;
        out.push((name, t));
    }
    Ok((out, sizes))
}

/// Splits every output by the jobs' batch sizes: one set of named outputs per job.
fn split(outputs: NamedTensors, sizes: &[usize]) -> Result<Vec<NamedTensors>, String> {
    let mut per_job: Vec<NamedTensors> = sizes.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for (name, t) in outputs {
        for (job, piece) in per_job.iter_mut().zip(crate::tensor::split_batch(t, sizes)?) {
            job.push((name.clone(), piece));
        }
    }
    Ok(per_job)
}

/// A further graph of a variant (models.json `parts`), loaded on the same engine as the main one.
pub struct Part {
    /// Its role for the task (`rec`, `cls`).
    pub role: String,
    pub file: PathBuf,
    pub engine: Box<dyn InferenceBackend>,
}

/// Prepares an image job into `spec`'s input tensor, remembering the image
/// size (image-classification, object-detection), on the decode threads.
pub struct ImagePreparer {
    pub spec: image::ImageInputSpec,
    pub limits: Limits,
}

impl Prepare for ImagePreparer {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        let JobInput::Image(bytes) = input else { return Err(InferError::bad_input("the task takes an image")) };
        let (tensor, size) = self.spec.tensor_and_size(&bytes, &self.limits)?;
        Ok(Prepared::new(GraphInput {
            tensors: vec![(self.spec.tensor.clone(), tensor)],
            ctx: Context { image_size: Some(size), ..Default::default() },
        }))
    }

    fn off_worker(&self) -> bool {
        true
    }
}

/// The output named `wanted` (or the first one), as `what` for the error.
fn take_output(
    outputs: NamedTensors,
    wanted: Option<&str>,
    what: &str,
) -> Result<(String, crate::tensor::Tensor), InferError> {
    outputs
        .into_iter()
        .find(|(n, _)| wanted.is_none_or(|w| w == n))
        .ok_or_else(|| InferError::backend(format!("the model returned no {what} tensor")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_has_its_own_name_and_reads_its_own_fields() {
        let mut names: Vec<&str> = TASKS.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TASKS.len());
        assert_eq!(task_kind("image-classification").unwrap().fields(), &["input", "output", "labels"]);
        assert!(task_kind("raw").unwrap().fields().is_empty());
        assert!(task_kind("dance").is_none());
    }

    #[test]
    fn a_section_is_read_with_its_paths_and_shown_back() {
        let kind = task_kind("embedding").unwrap();
        let err = kind.parse(serde_json::json!({"text": {"tokenizer": 3}})).unwrap_err();
        assert_eq!(err.path, ".text.tokenizer", "{err:?}");
        let ok = kind.parse(serde_json::json!({"text": {"tokenizer": "t.json"}})).unwrap();
        assert_eq!(ok.task(), "embedding");
        assert_eq!(ok.to_json()["text"]["tokenizer"], "t.json");
    }

    #[test]
    fn a_prepared_input_is_read_only_as_the_type_it_was_made_as() {
        assert_eq!(Prepared::new(7u32).take::<u32>().unwrap(), 7);
        assert!(Prepared::new(7u32).take::<String>().is_err());
    }
}
