//! Pre- and post-processing per task, around the engine call: the seam
//! where tasks plug in. A [`Pipeline`] turns a [`JobInput`] into named input
//! tensors and the engine's outputs into a [`JobResult`]. Each task also
//! states what it needs from models.json and from the ONNX file, so `inferd
//! check` and model loading refuse a spec that contradicts the model.

pub mod classify;
pub mod detect;
pub mod document;
pub mod embed;
pub mod generate;
pub mod image;
pub mod ocr;
pub mod raw;

pub use ocr::ctc;

use crate::backend::{InferenceBackend, NamedTensors};
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobResult, Timings};
use crate::registry::{ModelSpec, Registry};
use crate::tensor::TensorInfo;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a model does, which decides its pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Image in, scored labels out.
    ImageClassification,
    /// Image in, labelled boxes out (YOLO).
    ObjectDetection,
    /// Text in, one vector per text out (sentence embeddings).
    Embedding,
    /// Image in, text lines with boxes out (PP-OCR: detector, recogniser, angle classifier).
    Ocr,
    /// Image of a receipt in, its fields out (OCR, then layout and pattern rules).
    DocumentFields,
    /// A prompt in, its continuation out (ONNX decoders with a KV cache).
    TextGeneration,
    /// Named tensors in and out, for any model.
    Raw,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::ImageClassification => "image-classification",
            Task::ObjectDetection => "object-detection",
            Task::Embedding => "embedding",
            Task::Ocr => "ocr",
            Task::DocumentFields => "document-fields",
            Task::TextGeneration => "text-generation",
            Task::Raw => "raw",
        })
    }
}

/// A problem with a model's spec, at a path relative to the model (`.input.width`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecProblem {
    pub path: String,
    pub message: String,
}

impl SpecProblem {
    fn new(path: &str, message: impl Into<String>) -> Self {
        SpecProblem { path: path.to_string(), message: message.into() }
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

/// Runs one job of a task on a loaded model: its main graph is `engine`;
/// graphs of further parts (OCR's recogniser) belong to the pipeline.
pub trait Pipeline: Send {
    /// Answers `input`, adding where the time went to `timings`.
    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: JobInput,
        limits: &Limits,
        options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError>;

    /// The generator, for `text-generation`: its jobs advance a token at a
    /// time so the worker can interleave them.
    fn generator(&self) -> Option<&generate::Generator> {
        None
    }

    /// Answers several jobs; the default answers them one by one. Single-graph
    /// tasks stack them into one engine call (dynamic batching). `timings` are the batch's.
    fn run_batch(
        &mut self,
        engine: &mut dyn InferenceBackend,
        jobs: Vec<(JobInput, JobOptions)>,
        limits: &Limits,
        timings: &mut Timings,
    ) -> Vec<Result<JobResult, InferError>> {
        jobs.into_iter().map(|(input, options)| self.run(engine, input, limits, &options, timings)).collect()
    }
}

/// A task that runs its graph once per job: tensors in, tensors out.
pub trait SingleGraph: Send {
    /// Decodes and validates `input` into the model's input tensors.
    fn prepare(&self, input: JobInput, limits: &Limits) -> Result<(NamedTensors, Context), InferError>;
    /// Reads the model's `outputs` into the task's answer.
    fn finish(&self, outputs: NamedTensors, ctx: &Context, options: &JobOptions) -> Result<JobResult, InferError>;
}

impl<T: SingleGraph> Pipeline for T {
    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: JobInput,
        limits: &Limits,
        options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let t0 = std::time::Instant::now();
        let (inputs, ctx) = self.prepare(input, limits)?;
        let t1 = std::time::Instant::now();
        let outputs = engine.run(inputs)?;
        let t2 = std::time::Instant::now();
        let result = self.finish(outputs, &ctx, options)?;
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1000.0;
        timings.pre_ms += ms(t0, t1);
        timings.infer_ms += ms(t1, t2);
        timings.post_ms += ms(t2, std::time::Instant::now());
        Ok(result)
    }

    fn run_batch(
        &mut self,
        engine: &mut dyn InferenceBackend,
        jobs: Vec<(JobInput, JobOptions)>,
        limits: &Limits,
        timings: &mut Timings,
    ) -> Vec<Result<JobResult, InferError>> {
        let ms = |a: std::time::Instant| a.elapsed().as_secs_f64() * 1000.0;
        let t0 = std::time::Instant::now();
        let mut results: Vec<Option<Result<JobResult, InferError>>> = jobs.iter().map(|_| None).collect();
        let mut prepared = Vec::with_capacity(jobs.len());
        for (i, (input, options)) in jobs.into_iter().enumerate() {
            match self.prepare(input, limits) {
                Ok((tensors, ctx)) => prepared.push((i, tensors, ctx, options)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        timings.pre_ms += ms(t0);
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
    pub file: std::path::PathBuf,
    pub engine: Box<dyn InferenceBackend>,
}

/// The parts `task` takes: (required, optional).
pub fn parts_of(task: Task) -> (&'static [&'static str], &'static [&'static str]) {
    match task {
        Task::Ocr | Task::DocumentFields => (&ocr::PARTS[..1], &ocr::PARTS[1..]),
        _ => (&[], &[]),
    }
}

/// `text-generation`: a whole request per run (the worker interleaves
/// requests through [`Pipeline::generator`] instead).
struct GeneratePipeline(generate::Generator);

impl Pipeline for GeneratePipeline {
    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: JobInput,
        limits: &Limits,
        _options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let request = generate::request_of(input)?;
        let t = std::time::Instant::now();
        let result = self.0.generate(engine, request, limits.max_text_bytes);
        timings.infer_ms += t.elapsed().as_secs_f64() * 1000.0;
        result
    }

    fn generator(&self) -> Option<&generate::Generator> {
        Some(&self.0)
    }
}

/// Does the image work of a job before it reaches the model's worker, so
/// decoding and resizing run beside inference instead of in front of it:
/// image-classification and object-detection get their input tensor
/// ([`JobInput::Prepared`]), OCR its decoded pixels ([`JobInput::Pixels`]).
/// Other inputs pass through; errors are the ones the worker would give.
pub fn preprocess(model: &ModelSpec, input: JobInput, limits: &Limits) -> Result<JobInput, InferError> {
    match (model.task, input) {
        (Task::ImageClassification | Task::ObjectDetection, JobInput::Image(bytes)) => match &model.input {
            Some(spec) => {
                let (tensor, image_size) = spec.tensor_and_size(&bytes, limits)?;
                Ok(JobInput::Prepared { tensors: vec![(spec.tensor.clone(), tensor)], image_size })
            }
            None => Ok(JobInput::Image(bytes)),
        },
        (Task::Ocr | Task::DocumentFields, JobInput::Image(bytes)) => {
            Ok(JobInput::Pixels(image::decode(&bytes, limits)?))
        }
        (_, input) => Ok(input),
    }
}

/// Whether `task` takes this kind of input at all: checked before a job is
/// queued, so a wrong body is refused without loading the model.
pub fn admits(task: Task, input: &JobInput) -> Result<(), InferError> {
    let (ok, wanted) = match task {
        Task::ImageClassification | Task::ObjectDetection => {
            (matches!(input, JobInput::Image(_) | JobInput::Prepared { .. }), "an image")
        }
        Task::Ocr | Task::DocumentFields => (matches!(input, JobInput::Image(_) | JobInput::Pixels(_)), "an image"),
        Task::Embedding => {
            (matches!(input, JobInput::Text(_)), "text: {\"text\": \"...\"} or {\"text\": [\"...\", ...]}")
        }
        Task::TextGeneration => (
            matches!(input, JobInput::Generate(_) | JobInput::Text(_)),
            "a prompt: POST /v1/completions or /v1/chat/completions",
        ),
        Task::Raw => (matches!(input, JobInput::Tensors(_)), "named tensors: {\"inputs\": {...}}"),
    };
    if ok { Ok(()) } else { Err(InferError::bad_input(format!("the {task} task takes {wanted}"))) }
}

/// Whether [`preprocess`] has image work to do for this input.
pub fn has_preprocessing(model: &ModelSpec, input: &JobInput) -> bool {
    matches!(input, JobInput::Image(_))
        && matches!(model.task, Task::ImageClassification | Task::ObjectDetection | Task::Ocr | Task::DocumentFields)
}

/// Decodes an image job into `spec`'s input tensor, remembering the image size;
/// other inputs are refused naming `task`.
fn prepare_image(
    spec: &image::ImageInputSpec,
    input: JobInput,
    limits: &Limits,
    task: Task,
) -> Result<(NamedTensors, Context), InferError> {
    match input {
        JobInput::Image(bytes) => {
            let (tensor, size) = spec.tensor_and_size(&bytes, limits)?;
            Ok((vec![(spec.tensor.clone(), tensor)], Context { image_size: Some(size), ..Default::default() }))
        }
        JobInput::Prepared { tensors, image_size } => {
            Ok((tensors, Context { image_size: Some(image_size), ..Default::default() }))
        }
        _ => Err(InferError::bad_input(format!("{task} takes an image"))),
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

/// Checks what a task needs from a spec, without reading any file.
pub fn validate_spec(m: &ModelSpec) -> Vec<SpecProblem> {
    let mut problems = validate_parts(m);
    problems.extend(validate_task(m));
    if !matches!(m.task, Task::Ocr | Task::DocumentFields) && m.ocr.is_some() {
        problems.push(SpecProblem::new(".ocr", format!("the {} task takes no 'ocr'", m.task)));
    }
    if let Some(b) = &m.batch {
        if !matches!(m.task, Task::ImageClassification | Task::ObjectDetection | Task::Raw) {
            problems.push(SpecProblem::new(
                ".batch",
                format!("batching is for image-classification, object-detection and raw models, not {}", m.task),
            ));
        }
        if !(1..=256).contains(&b.max_batch) {
            problems.push(SpecProblem::new(".batch.max_batch", "must be 1..=256"));
        }
        if b.max_delay_us > 1_000_000 {
            problems.push(SpecProblem::new(".batch.max_delay_us", "must be at most 1000000 (one second)"));
        }
    }
    if m.task != Task::TextGeneration && m.generation.is_some() {
        problems.push(SpecProblem::new(".generation", format!("the {} task takes no 'generation'", m.task)));
    }
    if m.task != Task::DocumentFields && m.document.is_some() {
        problems.push(SpecProblem::new(".document", format!("the {} task takes no 'document'", m.task)));
    }
    if m.instances.is_some_and(|n| !(1..=crate::registry::MAX_INSTANCES).contains(&n)) {
        problems.push(SpecProblem::new(".instances", format!("must be 1..={}", crate::registry::MAX_INSTANCES)));
    }
    problems
}

/// Each variant has the parts its task requires and no others.
fn validate_parts(m: &ModelSpec) -> Vec<SpecProblem> {
    let (required, optional) = parts_of(m.task);
    let mut problems = Vec::new();
    for (j, v) in m.variants.iter().enumerate() {
        for r in required {
            if !v.parts.contains_key(*r) {
                problems.push(SpecProblem::new(
                    &format!(".variants[{j}].parts"),
                    format!("the {} task needs a '{r}' part", m.task),
                ));
            }
        }
        for role in v.parts.keys() {
            if !required.contains(&role.as_str()) && !optional.contains(&role.as_str()) {
                let known: Vec<&str> = required.iter().chain(optional).copied().collect();
                problems.push(SpecProblem::new(
                    &format!(".variants[{j}].parts.{role}"),
                    if known.is_empty() {
                        format!("the {} task takes no parts", m.task)
                    } else {
                        format!("the {} task has no '{role}' part (parts: {})", m.task, known.join(", "))
                    },
                ));
            }
        }
    }
    problems
}

fn validate_task(m: &ModelSpec) -> Vec<SpecProblem> {
    match m.task {
        Task::ImageClassification => {
            let mut problems = Vec::new();
            match &m.input {
                Some(input) => problems.extend(input.validate()),
                None => problems.push(SpecProblem::new(".input", "image-classification needs an 'input' spec")),
            }
            if let Some(output) = &m.output {
                problems.extend(output.validate());
            }
            problems
        }
        Task::ObjectDetection => {
            let mut problems = Vec::new();
            match &m.input {
                Some(input) => {
                    problems.extend(input.validate());
                    if input.resize == image::ResizeMode::CenterCrop {
                        problems.push(SpecProblem::new(
                            ".input.resize",
                            "object-detection needs letterbox or stretch (boxes are mapped back)",
                        ));
                    }
                }
                None => problems.push(SpecProblem::new(".input", "object-detection needs an 'input' spec")),
            }
            match &m.detection {
                Some(d) => problems.extend(d.validate()),
                None => problems.push(SpecProblem::new(
                    ".detection",
                    "object-detection needs a 'detection' spec with the YOLO layout",
                )),
            }
            if m.output.is_some() {
                problems.push(SpecProblem::new(".output", "object-detection reads 'detection', not 'output'"));
            }
            problems
        }
        Task::Embedding => {
            let mut problems = match &m.text {
                Some(t) => t.validate(),
                None => vec![SpecProblem::new(".text", "embedding needs a 'text' spec with its tokenizer")],
            };
            problems.extend(no_fields(m, &["input", "output", "labels", "detection"], "embedding"));
            problems
        }
        Task::Ocr | Task::DocumentFields => {
            let mut problems = m.ocr.as_ref().map(ocr::OcrSpec::validate).unwrap_or_default();
            problems.extend(no_fields(m, &["input", "output", "labels", "detection", "text"], &m.task.to_string()));
            problems
        }
        Task::TextGeneration => {
            let mut problems = match &m.generation {
                Some(g) => g.validate(),
                None => vec![SpecProblem::new(
                    ".generation",
                    "text-generation needs a 'generation' spec with its tokenizer",
                )],
            };
            problems.extend(no_fields(
                m,
                &["input", "output", "labels", "detection", "text", "batch"],
                "text-generation",
            ));
            problems
        }
        Task::Raw => no_fields(m, &["input", "output", "labels", "detection", "text"], "raw"),
    }
}

/// Problems for each of `fields` that `m` sets although its task takes none.
fn no_fields(m: &ModelSpec, fields: &[&str], task: &str) -> Vec<SpecProblem> {
    let set = |f: &str| match f {
        "input" => m.input.is_some(),
        "output" => m.output.is_some(),
        "labels" => m.labels.is_some(),
        "detection" => m.detection.is_some(),
        "text" => m.text.is_some(),
        "batch" => m.batch.is_some(),
        _ => false,
    };
    fields
        .iter()
        .filter(|f| set(f))
        .map(|f| SpecProblem::new(&format!(".{f}"), format!("the {task} task takes no '{f}'")))
        .collect()
}

/// Compares a spec with the inputs and outputs a model declares; `labels`
/// are the model's labels when it has a readable labels file.
pub fn check_against_model(
    m: &ModelSpec,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    labels: Option<&[String]>,
) -> Vec<SpecProblem> {
    let mut problems = check_task_io(m, inputs, outputs, labels);
    if m.batch.is_some_and(|b| b.max_batch > 1) {
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

fn check_task_io(
    m: &ModelSpec,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    labels: Option<&[String]>,
) -> Vec<SpecProblem> {
    match (m.task, &m.input) {
        (Task::ImageClassification, Some(input)) => {
            let mut problems = input.check_against(inputs);
            problems.extend(classify::check_outputs(m.output.as_ref(), outputs, labels));
            problems
        }
        (Task::ObjectDetection, Some(input)) => {
            let mut problems = input.check_against(inputs);
            if let Some(d) = &m.detection {
                problems.extend(d.check_outputs(outputs, labels));
            }
            problems
        }
        (Task::Embedding, _) => m.text.as_ref().map(|t| t.check_against(inputs, outputs)).unwrap_or_default(),
        (Task::Ocr | Task::DocumentFields, _) => ocr::check_detector(inputs, outputs),
        (Task::TextGeneration, _) => {
            m.generation.as_ref().map(|g| g.check_against(inputs, outputs)).unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// Compares a part's declared inputs and outputs with what its task needs of it.
pub fn check_part(m: &ModelSpec, role: &str, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
    match m.task {
        Task::Ocr | Task::DocumentFields => ocr::check_part(role, inputs, outputs),
        _ => Vec::new(),
    }
}

/// Builds the pipeline for `m`, reading its labels or tokenizer; `inputs`
/// are the inputs the loaded model declares, `parts` its further graphs.
pub fn build(
    m: &ModelSpec,
    registry: &Registry,
    inputs: &[TensorInfo],
    outputs: &[TensorInfo],
    parts: Vec<Part>,
) -> Result<Box<dyn Pipeline>, InferError> {
    match (m.task, &m.input) {
        (Task::Ocr, _) => Ok(Box::new(ocr::OcrPipeline::new(m.ocr.clone().unwrap_or_default(), parts)?)),
        (Task::DocumentFields, _) => Ok(Box::new(
            ocr::OcrPipeline::new(m.ocr.clone().unwrap_or_default(), parts)?
                .with_fields(m.document.clone().unwrap_or_default()),
        )),
        (Task::Embedding, _) => {
            let spec = m.text.clone().ok_or_else(|| InferError::unavailable("embedding needs a 'text' spec"))?;
            let path = registry.resolve(&spec.tokenizer);
            let names = inputs.iter().map(|i| i.name.clone()).collect();
            Ok(Box::new(embed::EmbedPipeline::new(spec, &path, names)?))
        }
        (Task::ImageClassification, Some(input)) => {
            let labels = match &m.labels {
                Some(path) => crate::registry::read_labels(&registry.resolve(path)).map_err(InferError::unavailable)?,
                None => Vec::new(),
            };
            let output = m.output.clone().unwrap_or_default();
            Ok(Box::new(classify::ClassifyPipeline { input: input.clone(), output, labels }))
        }
        (Task::ObjectDetection, Some(input)) => {
            let labels = match &m.labels {
                Some(path) => crate::registry::read_labels(&registry.resolve(path)).map_err(InferError::unavailable)?,
                None => Vec::new(),
            };
            let detection = m
                .detection
                .clone()
                .ok_or_else(|| InferError::unavailable("object-detection needs a 'detection' spec"))?;
            Ok(Box::new(detect::DetectPipeline { input: input.clone(), detection, labels }))
        }
        (Task::ImageClassification | Task::ObjectDetection, None) => {
            Err(InferError::unavailable(format!("{} needs an 'input' spec", m.task)))
        }
        (Task::TextGeneration, _) => {
            let spec = m
                .generation
                .clone()
                .ok_or_else(|| InferError::unavailable("text-generation needs a 'generation' spec"))?;
            let path = registry.resolve(&spec.tokenizer);
            Ok(Box::new(GeneratePipeline(generate::Generator::new(spec, &path, inputs, outputs)?)))
        }
        (Task::Raw, _) => Ok(Box::new(raw::RawPipeline)),
    }
}
