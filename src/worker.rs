//! The OS thread that owns one model's engine session. It takes work from a
//! bounded queue, loads the model on first need (jobs wait in the queue
//! meanwhile), runs jobs one at a time and publishes the model's state.
//! A panic inside an engine is caught and answered as an internal error, so
//! one bad job never takes the worker down.

use crate::backend::BackendKind;
use crate::engine::{Engine, LoadOptions, LoadedModel};
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobOutput};
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;
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
}

/// Where a model stands, as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum ModelState {
    Unloaded,
    Loading,
    Loaded { variant: String, backend: BackendKind, provider: String, memory_bytes: Option<u64> },
    Failed { error: InferError },
}

/// Shared view of a model's state.
pub type StateCell = Arc<Mutex<ModelState>>;

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
    engine: Engine,
    model: String,
    queue: mpsc::Receiver<Work>,
    state: StateCell,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("inferd-{model}")).spawn(move || run(engine, model, queue, state))
}

fn run(engine: Engine, model: String, mut queue: mpsc::Receiver<Work>, state: StateCell) {
    let mut loaded: Option<LoadedModel> = None;
    while let Some(work) = queue.blocking_recv() {
        match work {
            Work::Load(reply) => {
                let _ = reply.send(ensure_loaded(&engine, &model, &mut loaded, &state).map(|_| ()));
            }
            Work::Job(job) => {
                if job.reply.is_closed() {
                    continue; // the client gave up (timeout or disconnect): do not spend the engine on it
                }
                let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1000.0;
                let result = ensure_loaded(&engine, &model, &mut loaded, &state).and_then(|m| {
                    catch_unwind(AssertUnwindSafe(|| m.infer(job.input, &job.options))).unwrap_or_else(|panic| {
                        Err(InferError::internal(format!("the engine panicked: {}", panic_text(&panic))))
                    })
                });
                let _ = job.reply.send(result.map(|mut out| {
                    out.timings.queue_ms = queue_ms;
                    out
                }));
            }
        }
    }
    if loaded.take().is_some() {
        tracing::info!(model, "model unloaded");
    }
    set_state(&state, ModelState::Unloaded);
}

fn ensure_loaded<'a>(
    engine: &Engine,
    model: &str,
    loaded: &'a mut Option<LoadedModel>,
    state: &StateCell,
) -> Result<&'a mut LoadedModel, InferError> {
    if loaded.is_none() {
        set_state(state, ModelState::Loading);
        let before = crate::memory::process_rss_bytes();
        let outcome = catch_unwind(AssertUnwindSafe(|| engine.load(model, &LoadOptions::default())))
            .unwrap_or_else(|panic| Err(InferError::internal(format!("loading panicked: {}", panic_text(&panic)))));
        match outcome {
            Ok(m) => {
                let memory_bytes = before.zip(crate::memory::process_rss_bytes()).map(|(b, a)| a.saturating_sub(b));
                set_state(
                    state,
                    ModelState::Loaded {
                        variant: m.plan.variant.clone(),
                        backend: m.plan.backend.backend,
                        provider: m.provider().to_string(),
                        memory_bytes,
                    },
                );
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

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
