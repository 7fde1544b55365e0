//! The OS thread that owns one model's engine session. It takes work from a
//! bounded queue, loads the model on first need (jobs wait in the queue
//! meanwhile), runs jobs one at a time and publishes the model's state.
//! A panic inside an engine is caught and answered as an internal error, so
//! one bad job never takes the worker down.

use crate::backend::BackendKind;
use crate::engine::{Engine, LoadOptions, LoadedModel};
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobOutput};
use crate::manager::Manager;
use crate::metrics::Metrics;
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A job waiting for the worker.
pub struct Job {
    pub input: JobInput,
    pub options: JobOptions,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<JobOutput, InferError>>,
}

/// What a worker is asked to do.
pub enum Work {
    Job(Job),
    /// Load now (if not loaded) and say how it went.
    Load(oneshot::Sender<Result<(), InferError>>),
    /// Switch to this variant (memory pressure): load it, then drop the old one.
    Swap(String),
}

/// What a worker shares with the rest of the daemon.
#[derive(Clone)]
pub struct WorkerCtx {
    pub engine: Engine,
    pub manager: Arc<Manager>,
    pub metrics: Arc<Metrics>,
    /// Models the manager wants unloaded to make room.
    pub evict: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Where a model stands, as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ModelState {
    Unloaded,
    Loading,
    Loaded {
        variant: String,
        reason: String,
        backend: BackendKind,
        provider: String,
        memory_bytes: Option<u64>,
        /// Providers registered and graph nodes per provider (ONNX Runtime).
        #[serde(skip_serializing_if = "Option::is_none")]
        placement: Option<crate::backend::Placement>,
    },
    Failed {
        error: InferError,
    },
}

/// Shared view of a model's state.
pub type StateCell = Arc<Mutex<ModelState>>;

/// When the worker's current job started (none while idle or loading), for the watchdog.
pub type BusyCell = Arc<Mutex<Option<Instant>>>;

/// When the job the worker is running started.
pub fn busy_since(cell: &BusyCell) -> Option<Instant> {
    *cell.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the state in `cell`.
pub fn set_state(cell: &StateCell, state: ModelState) {
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = state;
}

/// Reads the state in `cell`.
pub fn get_state(cell: &StateCell) -> ModelState {
    cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Starts the worker thread for `model`; it runs until `queue`'s senders are
/// all dropped and the queue is drained, then unloads.
pub fn spawn(
    ctx: WorkerCtx,
    model: String,
    queue: mpsc::Receiver<Work>,
    state: StateCell,
    busy: BusyCell,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("inferd-{model}")).spawn(move || run(ctx, model, queue, state, busy))
}

fn run(ctx: WorkerCtx, model: String, mut queue: mpsc::Receiver<Work>, state: StateCell, busy: BusyCell) {
    let set_busy = |v: Option<Instant>| *busy.lock().unwrap_or_else(|e| e.into_inner()) = v;
    let mut loaded: Option<LoadedModel> = None;
    // Work taken from the queue while gathering a batch, to do next.
    let mut next: std::collections::VecDeque<Work> = std::collections::VecDeque::new();
    while let Some(work) = next.pop_front().or_else(|| queue.blocking_recv()) {
        match work {
            Work::Load(reply) => {
                let _ = reply.send(ensure_loaded(&ctx, &model, &mut loaded, &state).map(|_| ()));
            }
            Work::Swap(variant) => swap(&ctx, &model, &mut loaded, &state, &variant),
            Work::Job(job) => {
                if job.reply.is_closed() {
                    continue; // the client gave up (timeout or disconnect): do not spend the engine on it
                }
                let m = match ensure_loaded(&ctx, &model, &mut loaded, &state) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                        continue;
                    }
                };
                let jobs = match m.batching() {
                    Some(b) => gather(job, &mut queue, &mut next, b.max_batch, Duration::from_micros(b.max_delay_us)),
                    None => vec![job],
                };
                set_busy(Some(Instant::now()));
                let queue_ms: Vec<f64> = jobs.iter().map(|j| j.enqueued.elapsed().as_secs_f64() * 1000.0).collect();
                let (inputs, replies): (Vec<_>, Vec<_>) =
                    jobs.into_iter().map(|j| ((j.input, j.options), j.reply)).unzip();
                let results = catch_unwind(AssertUnwindSafe(|| {
                    if inputs.len() == 1 {
                        let (input, options) = inputs.into_iter().next().expect("one job");
                        vec![m.infer(input, &options)]
                    } else {
                        m.infer_batch(inputs)
                    }
                }))
                .unwrap_or_else(|panic| {
                    let e = InferError::internal(format!("the engine panicked: {}", panic_text(&panic)));
                    replies.iter().map(|_| Err(e.clone())).collect()
                });
                set_busy(None);
                ctx.manager.touch(&model);
                refresh_placement(&state, m);
                for ((reply, result), queue_ms) in replies.into_iter().zip(results).zip(queue_ms) {
                    let _ = reply.send(result.map(|mut out| {
                        out.timings.queue_ms = queue_ms;
                        out
                    }));
                }
            }
        }
    }
    if loaded.take().is_some() {
        tracing::info!(model, "model unloaded");
    }
    ctx.manager.record_unload(&model);
    set_state(&state, ModelState::Unloaded);
}

/// Loads `variant` (or the one the manager picks); returns it with its measured footprint.
fn load(ctx: &WorkerCtx, model: &str, variant: Option<&str>) -> Result<(LoadedModel, Option<u64>), InferError> {
    let spec = ctx.engine.registry().get(model).ok_or_else(|| InferError::unknown_model(model))?.clone();
    let plan = ctx.manager.plan_load(&spec, variant)?;
    for victim in &plan.evict {
        tracing::info!(model = victim, "unloading to make room for {model}");
        ctx.metrics.record_event(victim, "evict");
        ctx.manager.record_unload(victim);
        let _ = ctx.evict.send(victim.clone());
    }
    let before = crate::memory::process_rss_bytes();
    let started = Instant::now();
    let options = LoadOptions { variant: Some(plan.variant.clone()), ..Default::default() };
    let outcome = catch_unwind(AssertUnwindSafe(|| ctx.engine.load(model, &options)))
        .unwrap_or_else(|panic| Err(InferError::internal(format!("loading panicked: {}", panic_text(&panic)))));
    let mut m = match outcome {
        Ok(m) => m,
        Err(e) => {
            ctx.metrics.record_event(model, "load_failed");
            return Err(e);
        }
    };
    ctx.metrics.record_load_time(model, started.elapsed());
    ctx.metrics.record_event(model, "load");
    let measured = before.zip(crate::memory::process_rss_bytes()).map(|(b, a)| a.saturating_sub(b));
    m.plan.variant_reason = plan.reason.clone();
    ctx.manager.record_load(&spec, &plan.variant, measured);
    tracing::info!(model, variant = %plan.variant, measured_mib = measured.map(crate::memory::mib), "variant chosen: {}", plan.reason);
    Ok((m, measured))
}

/// Gathers jobs queued behind `first`, up to `max_batch`, waiting at most
/// `max_delay` for more; other work met on the way is kept in `next`, in order.
fn gather(
    first: Job,
    queue: &mut mpsc::Receiver<Work>,
    next: &mut std::collections::VecDeque<Work>,
    max_batch: usize,
    max_delay: Duration,
) -> Vec<Job> {
    let deadline = Instant::now() + max_delay;
    let mut jobs = vec![first];
    // Stop at the first other work (a load, a swap), so work keeps its order.
    while jobs.len() < max_batch && next.is_empty() {
        match queue.try_recv() {
            Ok(Work::Job(j)) if j.reply.is_closed() => {}
            Ok(Work::Job(j)) => jobs.push(j),
            Ok(other) => next.push_back(other),
            Err(mpsc::error::TryRecvError::Empty) => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep((deadline - now).min(Duration::from_micros(50)));
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        }
    }
    jobs
}

/// Updates the reported placement when the session changed under the model
/// (a TensorRT engine finished building in the background).
fn refresh_placement(state: &StateCell, m: &LoadedModel) {
    let mut cell = state.lock().unwrap_or_else(|e| e.into_inner());
    if let ModelState::Loaded { placement, provider, .. } = &mut *cell
        && placement.as_ref() != m.placement()
    {
        *placement = m.placement().cloned();
        *provider = m.provider().to_string();
    }
}

fn loaded_state(m: &LoadedModel, memory_bytes: Option<u64>) -> ModelState {
    ModelState::Loaded {
        variant: m.plan.variant.clone(),
        reason: m.plan.variant_reason.clone(),
        backend: m.plan.backend.backend,
        provider: m.provider().to_string(),
        memory_bytes,
        placement: m.placement().cloned(),
    }
}

fn ensure_loaded<'a>(
    ctx: &WorkerCtx,
    model: &str,
    loaded: &'a mut Option<LoadedModel>,
    state: &StateCell,
) -> Result<&'a mut LoadedModel, InferError> {
    if loaded.is_none() {
        set_state(state, ModelState::Loading);
        match load(ctx, model, None) {
            Ok((m, memory_bytes)) => {
                set_state(state, loaded_state(&m, memory_bytes));
                *loaded = Some(m);
            }
            Err(e) => {
                tracing::warn!(model, "cannot load: {}", e.message);
                set_state(state, ModelState::Failed { error: e.clone() });
                return Err(e);
            }
        }
    }
    Ok(loaded.as_mut().expect("loaded above"))
}

/// Switches a loaded model to `variant`: the new one is loaded while the old
/// one still holds, then the old one is dropped. Jobs wait in the queue for
/// the switch, none fails; if the new variant cannot load, the old one stays.
fn swap(ctx: &WorkerCtx, model: &str, loaded: &mut Option<LoadedModel>, state: &StateCell, variant: &str) {
    let Some(current) = loaded.as_ref() else { return };
    if current.plan.variant == variant {
        return;
    }
    let from = current.plan.variant.clone();
    let quality = |name: &str| {
        ctx.engine
            .registry()
            .get(model)
            .and_then(|m| m.variants.iter().find(|v| v.name == name))
            .map_or(0, |v| v.quality)
    };
    let event = if quality(variant) < quality(&from) { "downgrade" } else { "upgrade" };
    match load(ctx, model, Some(variant)) {
        Ok((m, memory_bytes)) => {
            set_state(state, loaded_state(&m, memory_bytes));
            *loaded = Some(m); // drops the old session
            ctx.metrics.record_event(model, event);
            tracing::info!(model, from, to = variant, "{event}d under memory pressure");
        }
        Err(e) => tracing::warn!(model, from, to = variant, "cannot {event}: {}; keeping {from}", e.message),
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
