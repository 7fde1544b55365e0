//! Plans and loads models: which variant and engine each model uses and why
//! ([`Plan`]), and a [`LoadedModel`] that runs one job through
//! pre-processing, the engine and post-processing. Synchronous: the CLI calls
//! it directly, the daemon from worker threads.

use crate::backend::providers::ProviderSpec;
use crate::backend::{self, BackendChoice, BackendDecision, InferenceBackend, LoadRequest, Placement};
use crate::config::Config;
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobOutput, JobResult, Timings};
use crate::pipeline::{self, Input, Pipeline, Prepare, Prepared};
use crate::registry::{ModelSpec, Registry};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// Overrides a caller may put on a model's own choices.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub backend: Option<BackendChoice>,
    pub variant: Option<String>,
}

/// What a loaded model runs as, and why: its variant and engine.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: String,
    /// The model's task, as models.json names it.
    pub task: &'static str,
    pub variant: String,
    pub variant_reason: String,
    #[serde(flatten)]
    pub backend: BackendDecision,
    pub providers: Vec<ProviderSpec>,
    /// Refuse to fall back from the first provider.
    pub strict_providers: bool,
}

/// How a model would run: its engine and providers, and why.
#[derive(Debug, Clone, Serialize)]
pub struct EnginePlan {
    #[serde(flatten)]
    pub backend: BackendDecision,
    pub providers: Vec<ProviderSpec>,
    /// Refuse to fall back from the first provider.
    pub strict_providers: bool,
}

/// Plans and loads the models of one registry under one configuration.
#[derive(Clone)]
pub struct Engine {
    config: Arc<Config>,
    registry: Arc<Registry>,
}

impl Engine {
    /// An engine over `registry` with `config`.
    pub fn new(config: Config, registry: Registry) -> Engine {
        Engine { config: Arc::new(config), registry: Arc::new(registry) }
    }

    /// The registry this engine serves.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry, shared.
    pub fn registry_arc(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The configuration this engine runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Decides engine and providers for `name` without loading anything (the
    /// variant is the memory manager's choice: [`crate::manager::Manager::plan_load`]).
    pub fn plan(&self, name: &str, backend: Option<BackendChoice>) -> Result<EnginePlan, InferError> {
        let model = self.registry.get(name).ok_or_else(|| InferError::unknown_model(name))?;
        let ort = backend::ort::status_lazy(&self.config.runtime);
        let decision = backend::decide(backend.unwrap_or(model.backend), ort.as_deref().map_err(String::as_str))?;
        Ok(EnginePlan {
            backend: decision,
            providers: self.providers(model),
            strict_providers: model.strict_providers.unwrap_or(self.config.runtime.strict_providers),
        })
    }

    fn providers(&self, model: &ModelSpec) -> Vec<ProviderSpec> {
        if model.providers.is_empty() { self.config.runtime.providers.clone() } else { model.providers.clone() }
    }

    fn load_request<'a>(&'a self, plan: &'a Plan, state_dir: &'a std::path::Path, sha256: &'a str) -> LoadRequest<'a> {
        let model = self.registry.get(&plan.model);
        LoadRequest {
            providers: &plan.providers,
            runtime: &self.config.runtime,
            strict: plan.strict_providers,
            state_dir,
            model: &plan.model,
            sha256,
            instances: model.map_or(1, |m| m.instances()),
            spinning: self.config.runtime.spinning.unwrap_or_else(|| model.is_some_and(|m| m.task.many_short_runs())),
        }
    }

    /// Loads `name`: the variant `options` asks for, else the one the memory
    /// manager picks for the memory free now (the daemon's one chooser, so
    /// `inferd infer --local` and `bench --via local` run what the daemon
    /// would); verifies the file's sha256, creates the engine session and
    /// checks models.json against what the model declares.
    pub fn load(&self, name: &str, options: &LoadOptions) -> Result<LoadedModel, InferError> {
        let model = self.registry.get(name).ok_or_else(|| InferError::unknown_model(name))?;
        // A variant already decided (by a worker's manager, or asked for) needs no memory figures.
        let (variant, variant_reason) = match options.variant.as_deref() {
            Some(name) => {
                (model.variants[crate::manager::requested(model, name)?].name.clone(), "requested".to_string())
            }
            None => {
                let probe = Arc::new(crate::memory::SystemProbe::default());
                let manager = crate::manager::Manager::new(self.config.memory.clone(), probe, self.registry_arc());
                let plan = manager.plan_load(model, None)?;
                (plan.variant, plan.reason)
            }
        };
        let mut engine_plan = self.plan(name, options.backend)?;
        if engine_plan.backend.backend == backend::BackendKind::Ort {
            // The plan saw the library's file; loading it can still fail (a broken or foreign file).
            if let Err(why) = backend::ort::runtime(&self.config.runtime) {
                let choice = options.backend.unwrap_or(model.backend);
                engine_plan.backend = backend::decide(choice, Err(why.as_str()))?;
            }
        }
        let plan = Plan {
            model: model.name.clone(),
            task: model.task.task(),
            variant,
            variant_reason,
            backend: engine_plan.backend,
            providers: engine_plan.providers,
            strict_providers: engine_plan.strict_providers,
        };
        let variant =
            model.variants.iter().find(|v| v.name == plan.variant).expect("plan names a variant of the model");
        let file = self.registry.resolve(model, &variant.file);
        crate::registry::verify_sha256(&file, &variant.sha256).map_err(InferError::unavailable)?;
        let started = Instant::now();
        let state_dir = self.config.memory.resolved_state_dir();
        let engine =
            backend::load(plan.backend.backend, &file, &self.load_request(&plan, &state_dir, &variant.sha256))?;
        let problems = model.check_io(self.registry.dir_of(model), engine.inputs(), engine.outputs());
        if !problems.is_empty() {
            let text: Vec<String> =
                problems.iter().map(|p| format!("models.json {}{}: {}", name, p.path, p.message)).collect();
            return Err(InferError::unavailable(format!(
                "the spec does not match the model file: {}",
                text.join("; ")
            )));
        }
        let mut parts = Vec::with_capacity(variant.parts.len());
        for (role, part) in &variant.parts {
            let file = self.registry.resolve(model, &part.file);
            crate::registry::verify_sha256(&file, &part.sha256).map_err(InferError::unavailable)?;
            let engine =
                backend::load(plan.backend.backend, &file, &self.load_request(&plan, &state_dir, &part.sha256))?;
            let problems = model.task.check_part(role, engine.inputs(), engine.outputs());
            if let Some(p) = problems.first() {
                return Err(InferError::unavailable(format!(
                    "the spec does not match the model file: models.json {name}.variants.{}{}: {}",
                    plan.variant, p.path, p.message
                )));
            }
            parts.push(pipeline::Part { role: role.clone(), file, engine });
        }
        let pipeline = model.task.build(pipeline::Graph {
            dir: self.registry.dir_of(model),
            inputs: engine.inputs(),
            optional_inputs: engine.optional_inputs(),
            outputs: engine.outputs(),
            parts,
            limits: &self.config.limits,
        })?;
        let preparer = pipeline.preparer();
        tracing::info!(
            model = name,
            variant = %plan.variant,
            backend = %plan.backend.backend,
            provider = engine.provider(),
            load_ms = started.elapsed().as_millis() as u64,
            "model loaded ({})",
            plan.backend.reason
        );
        Ok(LoadedModel { plan, engine, pipeline, preparer, batch: model.batch })
    }
}

/// A model ready to run jobs: its engine session and its pipeline.
pub struct LoadedModel {
    pub plan: Plan,
    engine: Box<dyn InferenceBackend>,
    pipeline: Box<dyn Pipeline>,
    preparer: Arc<dyn Prepare>,
    batch: Option<crate::registry::BatchSpec>,
}

impl LoadedModel {
    /// The execution provider that runs the graph.
    pub fn provider(&self) -> &str {
        self.engine.provider()
    }

    /// Where the main graph's nodes went (ONNX Runtime).
    pub fn placement(&self) -> Option<&Placement> {
        self.engine.placement()
    }

    /// What prepares this model's jobs; admission runs it off the worker where it says so.
    pub fn preparer(&self) -> Arc<dyn Prepare> {
        self.preparer.clone()
    }

    /// The job's prepared input (preparing it here if admission did not), adding the time to `timings`.
    fn prepare(&self, input: Input, timings: &mut Timings) -> Result<Prepared, InferError> {
        match input {
            Input::Prepared(p) => Ok(p),
            Input::Sent(input) => {
                let t = Instant::now();
                let prepared = self.preparer.prepare(input);
                timings.pre_ms += t.elapsed().as_secs_f64() * 1000.0;
                prepared
            }
        }
    }

    /// Runs one job as a client sent it: prepare, engine(s), finish, with timings.
    pub fn infer(&mut self, input: JobInput, options: &JobOptions) -> Result<JobOutput, InferError> {
        self.run(Input::Sent(input), options)
    }

    /// Runs one job, prepared or not, with timings.
    pub fn run(&mut self, input: Input, options: &JobOptions) -> Result<JobOutput, InferError> {
        let mut timings = Timings::default();
        let input = self.prepare(input, &mut timings)?;
        let result = self.pipeline.run(self.engine.as_mut(), input, options, &mut timings)?;
        Ok(self.output(timings, None, result))
    }

    fn output(&self, timings: Timings, batch: Option<usize>, result: JobResult) -> JobOutput {
        JobOutput {
            model: self.plan.model.clone(),
            variant: self.plan.variant.clone(),
            backend: self.engine.kind(),
            provider: self.engine.provider().to_string(),
            timings,
            batch,
            result,
        }
    }

    /// For tasks whose job is many engine calls ([`LoadedModel::parallel`]):
    /// starts `input`'s sequence, with the timings of its preparation.
    pub fn start(&mut self, input: Input) -> Result<(Box<dyn pipeline::Sequence>, Timings), InferError> {
        let mut timings = Timings::default();
        let prepared = self.prepare(input, &mut timings)?;
        let stepper =
            self.pipeline.stepper().ok_or_else(|| InferError::internal("the model's task runs a job in one go"))?;
        Ok((stepper.start(prepared)?, timings))
    }

    /// Advances every sequence in `seqs` by one step (in one engine call where the graph allows).
    pub fn step(&mut self, seqs: &mut [&mut (dyn pipeline::Sequence + 'static)]) -> Vec<Result<(), InferError>> {
        match self.pipeline.stepper() {
            Some(stepper) => stepper.step(self.engine.as_mut(), seqs),
            None => seqs.iter().map(|_| Err(InferError::internal("the model's task runs a job in one go"))).collect(),
        }
    }

    /// Gives back the engine memory that ended sequences left pooled ([`pipeline::Stepper::release`]).
    pub fn release(&mut self) {
        if let Some(stepper) = self.pipeline.stepper() {
            stepper.release(self.engine.as_mut());
        }
    }

    /// Whether this model's jobs are many engine calls each (they interleave), and how many run together.
    pub fn parallel(&self) -> Option<usize> {
        self.pipeline.stepper().map(|s| s.parallel())
    }

    /// The output of a job that ran outside [`LoadedModel::run`] (interleaved steps).
    pub fn answer(&self, timings: Timings, result: JobResult) -> JobOutput {
        self.output(timings, None, result)
    }

    /// The model's dynamic batching, when it has one with more than one job per call.
    pub fn batching(&self) -> Option<crate::registry::BatchSpec> {
        self.batch.filter(|b| b.max_batch > 1)
    }

    /// Runs several jobs as one engine call where the task allows (results in
    /// order); a job the batch cannot take is run alone, so it fails only itself.
    pub fn run_batch(&mut self, jobs: Vec<(Input, JobOptions)>) -> Vec<Result<JobOutput, InferError>> {
        let n = jobs.len();
        let mut timings = Timings::default();
        let mut results: Vec<Option<Result<JobOutput, InferError>>> = jobs.iter().map(|_| None).collect();
        let mut prepared = Vec::with_capacity(n);
        let mut at = Vec::with_capacity(n);
        for (i, (input, options)) in jobs.into_iter().enumerate() {
            match self.prepare(input, &mut timings) {
                Ok(p) => {
                    prepared.push((p, options));
                    at.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let ran = self.pipeline.run_batch(self.engine.as_mut(), prepared, &mut timings);
        for (i, r) in at.into_iter().zip(ran) {
            results[i] = Some(r.map(|result| self.output(timings, Some(n), result)));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(InferError::internal("a batched job got no answer"))))
            .collect()
    }
}
