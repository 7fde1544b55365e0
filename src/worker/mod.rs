//! The OS thread that owns one model's engine sessions. It takes work from a
//! bounded queue, loads the model on first need (jobs wait in the queue
//! meanwhile), runs jobs and publishes the model's state. A model with one
//! instance runs its jobs on this thread; with `instances: n` it loads n
//! sessions, each on a thread of its own, and hands every job (or gathered
//! batch) to the first idle one. A panic inside an engine is caught and
//! answered as an internal error, so one bad job never takes the worker down.

use crate::backend::BackendKind;
use crate::engine::{Engine, LoadOptions, LoadedModel};
use crate::error::InferError;
use crate::job::JobOutput;
use crate::manager::Manager;
use crate::metrics::Metrics;
use crate::pipeline::{Input, Prepare};
use serde::Serialize;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A job waiting for the worker.
pub struct Job {
    /// As the client sent it, or prepared by the model's preparer at admission.
    pub input: Input,
    pub options: crate::job::JobOptions,
    /// When the job entered the queue (after its image work).
    pub enqueued: Instant,
    /// Milliseconds of image work done before the job was queued.
    pub pre_ms: f64,
    pub reply: oneshot::Sender<Result<JobOutput, InferError>>,
    /// Running at the last death of the daemon: runs alone (see `quarantine`).
    pub suspect: bool,
}

/// What a worker is asked to do.
pub enum Work {
    Job(Box<Job>),
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
    /// Where jobs are marked running (poison-job quarantine).
    pub quarantine: Arc<crate::quarantine::Quarantine>,
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
        /// Sessions serving jobs side by side.
        instances: usize,
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

/// The loaded model's preparer, for admission to prepare jobs with (none while unloaded).
pub type PreparerCell = Arc<Mutex<Option<Arc<dyn Prepare>>>>;

/// The preparer in `cell`.
pub fn get_preparer(cell: &PreparerCell) -> Option<Arc<dyn Prepare>> {
    cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn set_preparer(cell: &PreparerCell, preparer: Option<Arc<dyn Prepare>>) {
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = preparer;
}

/// When each instance's current job started (none while idle or loading), for the watchdog.
pub type BusyCell = Arc<Mutex<Vec<Option<Instant>>>>;

/// When the oldest job running on the model's instances started.
pub fn busy_since(cell: &BusyCell) -> Option<Instant> {
    cell.lock().unwrap_or_else(|e| e.into_inner()).iter().flatten().min().copied()
}

fn set_busy(cell: &BusyCell, instance: usize, since: Option<Instant>) {
    let mut all = cell.lock().unwrap_or_else(|e| e.into_inner());
    if all.len() <= instance {
        all.resize(instance + 1, None);
    }
    all[instance] = since;
}

/// Sets the state in `cell`.
pub fn set_state(cell: &StateCell, state: ModelState) {
    *cell.lock().unwrap_or_else(|e| e.into_inner()) = state;
}

/// Reads the state in `cell`.
pub fn get_state(cell: &StateCell) -> ModelState {
    cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

mod interleave;
mod sessions;

use interleave::interleave;
use sessions::{Held, Pool, Sessions};

/// Starts the worker thread for `model`; it runs until `queue`'s senders are
/// all dropped and the queue is drained, then unloads.
pub fn spawn(
    ctx: WorkerCtx,
    model: String,
    queue: mpsc::Receiver<Work>,
    state: StateCell,
    busy: BusyCell,
    preparer: PreparerCell,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("inferd-{model}"))
        .spawn(move || run(ctx, model, queue, state, busy, preparer))
}

fn run(
    ctx: WorkerCtx,
    model: String,
    mut queue: mpsc::Receiver<Work>,
    state: StateCell,
    busy: BusyCell,
    preparer: PreparerCell,
) {
    let mut loaded: Option<Held> = None;
    // Work taken from the queue while gathering a batch, to do next.
    let mut next: std::collections::VecDeque<Work> = std::collections::VecDeque::new();
    let cells = Cells { ctx: &ctx, model: &model, state: &state, busy: &busy };
    while let Some(work) = next.pop_front().or_else(|| queue.blocking_recv()) {
        match work {
            Work::Load(reply) => {
                let _ = reply.send(ensure_loaded(&ctx, &model, &mut loaded, (&state, &busy, &preparer)).map(|_| ()));
            }
            Work::Swap(variant) => swap(&ctx, &model, &mut loaded, (&state, &busy, &preparer), &variant),
            Work::Job(job) => {
                let job = *job;
                if job.reply.is_closed() {
                    continue; // the client gave up (timeout or disconnect): do not spend the engine on it
                }
                // A model about to load is measured from here to after its first job.
                let rss_before = if loaded.is_none() { crate::memory::process_rss_bytes() } else { None };
                let sessions = match ensure_loaded(&ctx, &model, &mut loaded, (&state, &busy, &preparer)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                        continue;
                    }
                };
                // Measured after its first job on this thread (a pool runs jobs elsewhere).
                let measure_from = rss_before.filter(|_| matches!(sessions, Sessions::One(_)));
                if let Sessions::One(m) = sessions
                    && m.parallel().is_some()
                {
                    interleave(&cells, m, job, &mut queue, &mut next);
                    if let Some(before) = measure_from {
                        charge_after_first_run(&ctx, loaded.as_ref(), &model, before);
                    }
                    continue;
                }
                // Wait for an idle instance before gathering, so the jobs that arrive meanwhile join the batch.
                let instance = match sessions {
                    Sessions::One(_) => None,
                    Sessions::Pool(pool) => match pool.idle() {
                        Some(i) => Some(i),
                        None => {
                            let _ = job.reply.send(Err(InferError::internal("every instance of the model stopped")));
                            continue;
                        }
                    },
                };
                let jobs = match sessions.batching() {
                    // A suspect runs alone: if it kills the daemon again, nobody else is struck.
                    Some(b) if !job.suspect => {
                        gather(job, &mut queue, &mut next, b.max_batch, Duration::from_micros(b.max_delay_us))
                    }
                    _ => vec![job],
                };
                match (sessions, instance) {
                    (Sessions::Pool(pool), Some(i)) => pool.hand(i, jobs),
                    (Sessions::One(m), _) => run_jobs(&cells, 0, m, jobs),
                    (Sessions::Pool(_), None) => unreachable!("an idle instance was taken above"),
                }
                if let Some(before) = measure_from {
                    charge_after_first_run(&ctx, loaded.as_ref(), &model, before);
                }
            }
        }
    }
    set_preparer(&preparer, None);
    if let Some(held) = loaded.take() {
        held.unload(); // its memory goes back to the system, then off the books
        tracing::info!(model, "model unloaded");
    }
    set_state(&state, ModelState::Unloaded);
}

/// What the threads running a model's jobs share.
#[derive(Clone, Copy)]
struct Cells<'a> {
    ctx: &'a WorkerCtx,
    model: &'a str,
    state: &'a StateCell,
    busy: &'a BusyCell,
}

/// Runs `jobs` (one, or a gathered batch) on `m` and answers each.
fn run_jobs(cells: &Cells<'_>, instance: usize, m: &mut LoadedModel, jobs: Vec<Job>) {
    set_busy(cells.busy, instance, Some(Instant::now()));
    let queue_ms: Vec<(f64, f64)> =
        jobs.iter().map(|j| (j.enqueued.elapsed().as_secs_f64() * 1000.0, j.pre_ms)).collect();
    let _marks: Vec<crate::quarantine::Mark> = jobs.iter().map(|j| mark_running(cells.ctx, &j.options)).collect();
    let (inputs, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| ((j.input, j.options), j.reply)).unzip();
    let results = catch_unwind(AssertUnwindSafe(|| {
        if inputs.len() == 1 {
            let (input, options) = inputs.into_iter().next().expect("one job");
            vec![m.run(input, &options)]
        } else {
            m.run_batch(inputs)
        }
    }))
    .unwrap_or_else(|panic| {
        let e = InferError::internal(format!("the engine panicked: {}", panic_text(&panic)));
        replies.iter().map(|_| Err(e.clone())).collect()
    });
    set_busy(cells.busy, instance, None);
    cells.ctx.manager.touch(cells.model);
    if instance == 0 {
        refresh_placement(cells.state, m);
    }
    for ((reply, result), (queue_ms, pre_ms)) in replies.into_iter().zip(results).zip(queue_ms) {
        let _ = reply.send(result.map(|mut out| {
            out.timings.queue_ms = queue_ms;
            out.timings.pre_ms += pre_ms;
            out
        }));
    }
}

/// Marks a job running for the quarantine (a death now leaves the mark); the
/// test hook aborts here, with the mark in place, as a real crash would.
fn mark_running(ctx: &WorkerCtx, options: &crate::job::JobOptions) -> crate::quarantine::Mark {
    let mark = ctx.quarantine.running(options.digest.as_deref());
    if options.crash_on_run {
        crate::quarantine::crash_now();
    }
    mark
}

/// Loads `variant` (or the one the manager picks) as many times as the model
/// has instances; returns the sessions, with their charge, and their measured
/// footprint, all together. The room is reserved first: models that must make
/// room are unloaded, and the load waits (up to 3/4 of a job's timeout) for
/// their memory, or for a model just loaded to have served its shield.
fn load(
    ctx: &WorkerCtx,
    model: &str,
    variant: Option<&str>,
    state: &StateCell,
    busy: &BusyCell,
) -> Result<(Held, Option<u64>), InferError> {
    let spec = ctx.engine.registry().get(model).ok_or_else(|| InferError::unknown_model(model))?.clone();
    // Three quarters of a job's timeout: a load that finds no room by then is answered before its job times out.
    let deadline = Instant::now() + Duration::from_millis(ctx.engine.config().jobs.timeout_ms * 3 / 4);
    // Dropped last (after any sessions below): a failed load's room is free again.
    let (plan, charge) = ctx.manager.reserve_load(&spec, variant, deadline, &mut |victim| {
        tracing::info!(model = victim, "unloading to make room for {model}");
        evict(ctx, victim);
    })?;
    let before = crate::memory::process_rss_bytes();
    let started = Instant::now();
    let options = LoadOptions { variant: Some(plan.variant.clone()), ..Default::default() };
    let instances = spec.instances();
    let mut models = Vec::with_capacity(instances);
    for _ in 0..instances {
        let outcome = catch_unwind(AssertUnwindSafe(|| ctx.engine.load(model, &options)))
            .unwrap_or_else(|panic| Err(InferError::internal(format!("loading panicked: {}", panic_text(&panic)))));
        match outcome {
            Ok(mut m) => {
                m.plan.variant_reason = plan.reason.clone();
                models.push(m);
            }
            Err(e) => {
                ctx.metrics.record_event(model, "load_failed");
                return Err(e);
            }
        }
    }
    let load_time = started.elapsed();
    ctx.metrics.record_load_time(model, load_time);
    ctx.metrics.record_event(model, "load");
    let measured = before.zip(crate::memory::process_rss_bytes()).map(|(b, a)| a.saturating_sub(b));
    for victim in ctx.manager.record_load(&charge, &spec, &plan.variant, measured, load_time) {
        tracing::info!(model = victim, "unloading: {model} holds more than its need, over the budget");
        evict(ctx, &victim);
    }
    tracing::info!(model, variant = %plan.variant, instances, measured_mib = measured.map(crate::memory::mib), "variant chosen: {}", plan.reason);
    let sessions = if models.len() == 1 {
        Sessions::One(models.pop().expect("one model"))
    } else {
        Sessions::Pool(
            Pool::start(ctx, model, models, state, busy)
                .map_err(|e| InferError::internal(format!("cannot start an instance thread: {e}")))?,
        )
    };
    Ok((Held { sessions, charge, rss_before: before }, measured))
}

/// Asks the scheduler to unload `victim` (its worker finishes its queue; its
/// charge stays on the books until its sessions are gone).
fn evict(ctx: &WorkerCtx, victim: &str) {
    ctx.metrics.record_event(victim, "evict");
    let _ = ctx.evict.send(victim.to_string());
}

/// After a freshly loaded model's first job: charge it what the process grew
/// by since before its load, and unload idle models if the budget no longer holds.
fn charge_after_first_run(ctx: &WorkerCtx, loaded: Option<&Held>, model: &str, rss_before_load: u64) {
    let (Some(spec), Some(now), Some(loaded)) =
        (ctx.engine.registry().get(model).cloned(), crate::memory::process_rss_bytes(), loaded)
    else {
        return;
    };
    // Measured from just before the load itself (not before a wait for room).
    let held = now.saturating_sub(loaded.rss_before.unwrap_or(rss_before_load));
    for victim in ctx.manager.record_run(&loaded.charge, &spec, held) {
        tracing::info!(
            model = victim,
            "unloading: {model} holds {} MiB after its first job, over the budget",
            crate::memory::mib(held)
        );
        evict(ctx, &victim);
    }
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
            // A suspect runs alone, after this batch.
            Ok(Work::Job(j)) if !j.suspect => jobs.push(*j),
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

fn loaded_state(sessions: &Sessions, memory_bytes: Option<u64>) -> ModelState {
    let f = sessions.first();
    ModelState::Loaded {
        variant: f.variant,
        reason: f.reason,
        instances: match sessions {
            Sessions::One(_) => 1,
            Sessions::Pool(p) => p.feeds.len(),
        },
        backend: f.backend,
        provider: f.provider,
        memory_bytes,
        placement: f.placement,
    }
}

/// The cells a worker publishes its model through: state, busy times, preparer.
type Published<'a> = (&'a StateCell, &'a BusyCell, &'a PreparerCell);

fn ensure_loaded<'a>(
    ctx: &WorkerCtx,
    model: &str,
    loaded: &'a mut Option<Held>,
    (state, busy, preparer): Published<'_>,
) -> Result<&'a mut Sessions, InferError> {
    if loaded.is_none() {
        set_state(state, ModelState::Loading);
        match load(ctx, model, None, state, busy) {
            Ok((s, memory_bytes)) => {
                set_state(state, loaded_state(&s.sessions, memory_bytes));
                set_preparer(preparer, Some(s.sessions.first().preparer));
                *loaded = Some(s);
            }
            Err(e) => {
                tracing::warn!(model, "cannot load: {}", e.message);
                set_state(state, ModelState::Failed { error: e.clone() });
                return Err(e);
            }
        }
    }
    Ok(&mut loaded.as_mut().expect("loaded above").sessions)
}

/// Switches a loaded model to `variant`: the new one is loaded while the old
/// one still holds, then the old one is dropped (its instances finish the
/// jobs they hold first). Jobs wait in the queue for the switch, none fails;
/// if the new variant cannot load, the old one stays.
fn swap(
    ctx: &WorkerCtx,
    model: &str,
    loaded: &mut Option<Held>,
    (state, busy, preparer): Published<'_>,
    variant: &str,
) {
    let Some(current) = loaded.as_ref() else { return };
    if current.sessions.first().variant == variant {
        return;
    }
    let from = current.sessions.first().variant;
    let quality = |name: &str| {
        ctx.engine
            .registry()
            .get(model)
            .and_then(|m| m.variants.iter().find(|v| v.name == name))
            .map_or(0, |v| v.quality)
    };
    let event = if quality(variant) < quality(&from) { "downgrade" } else { "upgrade" };
    match load(ctx, model, Some(variant), state, busy) {
        Ok((s, memory_bytes)) => {
            if let Some(old) = loaded.replace(s) {
                old.unload(); // the old sessions, then their charge
            }
            let now = &loaded.as_ref().expect("just set").sessions;
            set_state(state, loaded_state(now, memory_bytes));
            set_preparer(preparer, Some(now.first().preparer));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(closed: bool) -> (Job, Option<oneshot::Receiver<Result<JobOutput, InferError>>>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            input: Input::Sent(crate::job::JobInput::Text(vec![])),
            options: crate::job::JobOptions::default(),
            enqueued: Instant::now(),
            pre_ms: 0.0,
            reply,
            suspect: false,
        };
        (job, if closed { None } else { Some(answer) })
    }

    #[test]
    fn gather_takes_queued_jobs_up_to_the_batch_and_keeps_other_work_in_order() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut next = std::collections::VecDeque::new();
        let mut kept = Vec::new();
        for _ in 0..5 {
            let (j, a) = job(false);
            kept.push(a);
            tx.try_send(Work::Job(Box::new(j))).unwrap_or_else(|_| panic!("queue full"));
        }
        let (first, _a) = job(false);
        let batch = gather(first, &mut rx, &mut next, 4, Duration::from_millis(5));
        assert_eq!(batch.len(), 4, "up to max_batch");
        // A job whose client went away is skipped; other work stops the batch and is kept.
        let (gone, _) = job(true);
        tx.try_send(Work::Job(Box::new(gone))).unwrap_or_else(|_| panic!("queue full"));
        tx.try_send(Work::Swap("small".into())).unwrap_or_else(|_| panic!("queue full"));
        let (after, _b) = job(false);
        tx.try_send(Work::Job(Box::new(after))).unwrap_or_else(|_| panic!("queue full"));
        let (first, _c) = job(false);
        let batch = gather(first, &mut rx, &mut next, 8, Duration::from_millis(5));
        assert_eq!(batch.len(), 3, "the first and the two left from before; the closed one skipped");
        assert!(matches!(next.pop_front(), Some(Work::Swap(v)) if v == "small"));
        assert!(matches!(rx.try_recv(), Ok(Work::Job(_))), "the job after the swap waits its turn");
    }

    #[test]
    fn gather_waits_at_most_its_delay_for_a_batch() {
        let (_tx, mut rx) = mpsc::channel::<Work>(4);
        let mut next = std::collections::VecDeque::new();
        let (first, _a) = job(false);
        let started = Instant::now();
        let batch = gather(first, &mut rx, &mut next, 8, Duration::from_millis(20));
        assert_eq!(batch.len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(20), "{:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
