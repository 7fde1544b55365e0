//! Admission and dispatch: one bounded queue and one worker thread per
//! model. A job for a full queue is refused at once (Overloaded); a job not
//! answered by its deadline gets Timeout; a model is loaded lazily by its
//! worker on its first job. An admitted image job is decoded and resized on
//! the decode threads (one per core) while its place in the
//! queue is held, so the worker only runs the model. Async callers never run
//! inference themselves.

use crate::config::JobsConfig;
use crate::engine::Engine;
use crate::error::InferError;
use crate::job::{JobInput, JobOptions, JobOutput};
use crate::manager::{Manager, Pressure};
use crate::metrics::{Metrics, ModelGauges};
use crate::pipeline::{Input, Prepare};
use crate::quarantine::{Quarantine, Verdict};
use crate::report::{BuildingEngine, ModelReport};
use crate::worker::{self, Job, ModelState, StateCell, Work, WorkerCtx};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

struct Slot {
    queue: mpsc::Sender<Work>,
    state: StateCell,
    /// The loaded model's preparer (set by its worker).
    preparer: worker::PreparerCell,
    busy: worker::BusyCell,
    thread: std::thread::JoinHandle<()>,
}

/// A model's state and queue as reported by the API.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    pub state: ModelState,
    pub queue_depth: usize,
}

/// Queues and workers for every model of one engine.
pub struct Scheduler {
    /// Replaced as a whole on reload; workers keep the engine they started with.
    engine: std::sync::RwLock<Engine>,
    jobs: JobsConfig,
    metrics: Arc<Metrics>,
    manager: Arc<Manager>,
    slots: Mutex<HashMap<String, Slot>>,
    closed: std::sync::atomic::AtomicBool,
    evict_tx: mpsc::UnboundedSender<String>,
    evict_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Threads that decode and resize images, one per core (started on first use).
    decoders: std::sync::OnceLock<DecodePool>,
    /// Poison jobs and suspects (off unless the daemon opens it on its state directory).
    quarantine: Arc<Quarantine>,
}

impl Scheduler {
    /// A scheduler with no worker started yet.
    pub fn new(engine: Engine, jobs: JobsConfig, metrics: Arc<Metrics>, manager: Arc<Manager>) -> Scheduler {
        let (evict_tx, evict_rx) = mpsc::unbounded_channel();
        Scheduler {
            engine: std::sync::RwLock::new(engine),
            jobs,
            metrics,
            manager,
            slots: Mutex::new(HashMap::new()),
            closed: false.into(),
            evict_tx,
            evict_rx: Mutex::new(Some(evict_rx)),
            decoders: std::sync::OnceLock::new(),
            quarantine: Arc::new(Quarantine::off()),
        }
    }

    /// Refuses poison jobs and runs suspects alone, as `quarantine` records them.
    pub fn with_quarantine(mut self, quarantine: Arc<Quarantine>) -> Scheduler {
        self.quarantine = quarantine;
        self
    }

    /// The model manager.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Starts the manager's background work until `stop`: evictions asked
    /// for by loads, idle unloads, the memory-pressure check, and preloads.
    pub fn start_background(self: &Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let evictions = self.evict_rx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut rx) = evictions {
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(model) = rx.recv().await {
                    let _ = me.unload(&model).await;
                }
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            let interval = Duration::from_millis(me.manager.config().probe_interval_ms);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                for model in me.manager.idle_expired() {
                    tracing::info!(model, "unloading: idle longer than its keep-alive");
                    me.metrics.record_event(&model, "unload_idle");
                    let _ = me.unload(&model).await;
                }
                match me.manager.pressure() {
                    Ok(Pressure::Steady) => {}
                    Ok(Pressure::Downgrade { model, variant } | Pressure::Upgrade { model, variant }) => {
                        let queue = me.slots().get(&model).map(|s| s.queue.clone());
                        if let Some(q) = queue {
                            // Sent through the job queue: jobs already queued finish on the old variant.
                            let _ = q.send(Work::Swap(variant)).await;
                        }
                    }
                    Err(e) => tracing::warn!("memory probe: {e}"),
                }
            }
        });
        for model in self.manager.config().preload.clone() {
            let me = self.clone();
            tokio::spawn(async move {
                match me.load(&model).await {
                    Ok(()) => tracing::info!(model, "preloaded"),
                    Err(e) => tracing::warn!(model, "cannot preload: {}", e.message),
                }
            });
        }
    }

    /// The engine new workers start with (the registry and configuration in force).
    pub fn engine(&self) -> Engine {
        self.engine.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Reads the running models.json (and its models.d) again and swaps in
    /// what changed, as a reload does with the configuration kept: what a pull
    /// over the socket ends with. Returns the models added or changed.
    pub async fn reload_registry(&self) -> Result<Vec<String>, String> {
        let old = self.engine();
        let config = old.config().clone();
        let registry = crate::registry::Registry::load_for(&config, &old.registry().file).map_err(|e| e.to_string())?;
        self.swap_registry(config, registry, false).await
    }

    /// Verifies what `registry` adds or changes (sha256, declared inputs and
    /// outputs) and swaps it in with `config`; a bad file keeps the old set
    /// serving. `engine_changed`: every model reloads on its next job.
    pub async fn swap_registry(
        &self,
        config: crate::config::Config,
        registry: crate::registry::Registry,
        engine_changed: bool,
    ) -> Result<Vec<String>, String> {
        let old = self.engine();
        let (added, changed, removed) = old.registry().diff(&registry);
        let incoming: std::collections::HashSet<String> = added.iter().chain(&changed).cloned().collect();
        let registry = Arc::new(registry);
        let checked = registry.clone();
        let problems = tokio::task::spawn_blocking(move || checked.check_models(|name| incoming.contains(name)))
            .await
            .map_err(|e| format!("the registry check failed: {e}"))?;
        if !problems.is_empty() {
            let list: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
            return Err(format!("{} is not valid: {}", registry.file.display(), list.join("; ")));
        }
        let registry = Arc::try_unwrap(registry).map_err(|_| "the registry is still shared".to_string())?;
        let stale: Vec<String> = if engine_changed {
            old.registry().models.iter().map(|m| m.name.clone()).collect()
        } else {
            changed.iter().chain(&removed).cloned().collect()
        };
        self.replace_engine(Engine::new(config, registry), stale).await;
        tracing::info!(
            added = ?added,
            changed = ?changed,
            removed = ?removed,
            "reloaded{}",
            if engine_changed { " (runtime or limits changed: every model reloads on its next job)" } else { "" }
        );
        Ok(added.into_iter().chain(changed).collect())
    }

    /// Serves `engine` from now on (a reload): the models in `stale` (changed
    /// or removed) are unloaded once the jobs already queued for them have
    /// run on the old session; their next jobs start a worker on the new one.
    pub async fn replace_engine(&self, engine: Engine, stale: Vec<String>) {
        self.manager.set_registry(engine.registry_arc());
        *self.engine.write().unwrap_or_else(|e| e.into_inner()) = engine;
        let slots: Vec<(String, Slot)> = {
            let mut all = self.slots();
            stale.iter().filter_map(|m| all.remove(m).map(|s| (m.clone(), s))).collect()
        };
        for (model, slot) in slots {
            tracing::info!(model, "reload: the model changed; its worker finishes its queue, then unloads");
            drop(slot.queue);
            join(slot.thread).await;
        }
    }

    /// Whether the daemon can still answer: the slots lock is free within a
    /// second, no worker thread died, and no job has run longer than `stuck_after`.
    pub fn health(&self, stuck_after: Duration) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let slots = loop {
            match self.slots.try_lock() {
                Ok(s) => break s,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(std::sync::TryLockError::WouldBlock) => return Err("the scheduler is locked up".into()),
            }
        };
        for (model, slot) in slots.iter() {
            if slot.thread.is_finished() && !slot.queue.is_closed() {
                return Err(format!("the worker of model '{model}' died"));
            }
            if let Some(since) = worker::busy_since(&slot.busy)
                && since.elapsed() > stuck_after
            {
                return Err(format!(
                    "the worker of model '{model}' is stuck in one job for {} s",
                    since.elapsed().as_secs()
                ));
            }
        }
        Ok(())
    }

    /// Loaded models whose engine (TensorRT) is being built in the background, with the provider.
    pub fn building_engines(&self) -> Vec<BuildingEngine> {
        let mut out: Vec<BuildingEngine> = self
            .slots()
            .iter()
            .filter_map(|(m, s)| match worker::get_state(&s.state) {
                ModelState::Loaded { placement: Some(p), provider, .. } => {
                    p.building.map(|building| BuildingEngine { model: m.clone(), building, serving_on: provider })
                }
                _ => None,
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// The report of `model`: spec, plans, state and queue.
    pub fn report(&self, model: &str) -> Result<ModelReport, InferError> {
        let engine = self.engine();
        let spec = engine.registry().get(model).ok_or_else(|| InferError::unknown_model(model))?;
        let status = self.status(model);
        Ok(ModelReport::of(&engine, &self.manager, spec, &status.state, status.queue_depth))
    }

    /// The reports of every registered model, in models.json's order.
    pub fn reports(&self) -> Vec<ModelReport> {
        let engine = self.engine();
        engine
            .registry()
            .models
            .iter()
            .map(|m| {
                let status = self.status(&m.name);
                ModelReport::of(&engine, &self.manager, m, &status.state, status.queue_depth)
            })
            .collect()
    }

    /// Names of the loaded models.
    pub fn loaded_models(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .slots()
            .iter()
            .filter(|(_, s)| matches!(worker::get_state(&s.state), ModelState::Loaded { .. }))
            .map(|(m, _)| m.clone())
            .collect();
        names.sort();
        names
    }

    /// The shared metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The queue of `model`, starting its worker if needed.
    fn queue(&self, model: &str) -> Result<mpsc::Sender<Work>, InferError> {
        self.slot(model).map(|(queue, _)| queue)
    }

    /// The queue of `model` and its preparer cell, starting its worker if needed.
    fn slot(&self, model: &str) -> Result<(mpsc::Sender<Work>, worker::PreparerCell), InferError> {
        let engine = self.engine();
        if engine.registry().get(model).is_none() {
            return Err(InferError::unknown_model(model));
        }
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(InferError::unavailable("inferd is shutting down"));
        }
        let mut slots = self.slots();
        if let Some(slot) = slots.get(model)
            && !slot.queue.is_closed()
        {
            return Ok((slot.queue.clone(), slot.preparer.clone()));
        }
        let (tx, rx) = mpsc::channel(self.jobs.queue_capacity);
        let state: StateCell = Arc::new(Mutex::new(ModelState::Unloaded));
        let busy: worker::BusyCell = Arc::default();
        // Until the model loads, jobs are prepared from its models.json section where the task can
        // (a generation request is tokenised and checked before any load).
        let registry = engine.registry();
        let from_spec =
            registry.get(model).and_then(|m| m.task.spec_preparer(registry.dir_of(m), &engine.config().limits));
        let preparer: worker::PreparerCell = Arc::new(Mutex::new(
            from_spec.map(|make| Arc::new(crate::pipeline::Deferred::new(make)) as Arc<dyn crate::pipeline::Prepare>),
        ));
        let ctx = WorkerCtx {
            engine,
            manager: self.manager.clone(),
            metrics: self.metrics.clone(),
            evict: self.evict_tx.clone(),
            quarantine: self.quarantine.clone(),
        };
        let thread = worker::spawn(ctx, model.to_string(), rx, state.clone(), busy.clone(), preparer.clone())
            .map_err(|e| InferError::internal(format!("cannot start a worker thread: {e}")))?;
        slots.insert(model.to_string(), Slot { queue: tx.clone(), state, preparer: preparer.clone(), busy, thread });
        Ok((tx, preparer))
    }

    /// Refuses at once, before any body is read, a job for an unknown model or
    /// for a model whose queue is full.
    pub fn admit(&self, model: &str) -> Result<(), InferError> {
        if self.queue(model)?.capacity() == 0 {
            return Err(InferError::overloaded(format!(
                "the queue of model '{model}' is full ({} jobs waiting); try again later",
                self.jobs.queue_capacity
            )));
        }
        Ok(())
    }

    /// Runs one job on `model`: refused at once when its queue is full,
    /// answered with Timeout after `jobs.timeout_ms`.
    pub async fn submit(&self, model: &str, input: JobInput, options: JobOptions) -> Result<JobOutput, InferError> {
        let started = Instant::now();
        let outcome = self.submit_inner(model, input, options, started).await;
        if self.engine().registry().get(model).is_some() {
            self.metrics.record_job(model, &outcome, started.elapsed());
        } else if let Err(e) = &outcome {
            self.metrics.record_error(e.kind);
        }
        outcome
    }

    async fn submit_inner(
        &self,
        model: &str,
        input: JobInput,
        options: JobOptions,
        started: Instant,
    ) -> Result<JobOutput, InferError> {
        let verdict = options.digest.as_deref().map_or(Verdict::Clean, |d| self.quarantine.verdict(d));
        if verdict == Verdict::Poison {
            tracing::warn!(model, digest = options.digest.as_deref(), "refusing a poison job");
            return Err(InferError::poison(format!(
                "this job was running when the daemon died {} times in a row; it is not run again (docs/mqtt.md#poison-jobs)",
                crate::quarantine::STRIKES
            )));
        }
        if let Some(spec) = self.engine().registry().get(model) {
            crate::pipeline::admits(&*spec.task, &input)?;
        }
        let (queue, preparer) = self.slot(model)?;
        // Hold a place in the queue first: a full queue answers at once, before any decoding.
        let place = queue.try_reserve_owned().map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InferError::overloaded(format!(
                "the queue of model '{model}' is full ({} jobs waiting); try again later",
                self.jobs.queue_capacity
            )),
            mpsc::error::TrySendError::Closed(_) => {
                InferError::unavailable(format!("model '{model}' is being unloaded"))
            }
        })?;
        let deadline = started + Duration::from_millis(self.jobs.timeout_ms);
        let run = async {
            let (input, pre_ms) = self.prepare(worker::get_preparer(&preparer), input).await?;
            let (reply, answer) = oneshot::channel();
            let suspect = verdict == Verdict::Suspect;
            place.send(Work::Job(Box::new(Job { input, options, enqueued: Instant::now(), pre_ms, reply, suspect })));
            match answer.await {
                Ok(result) => result,
                Err(_) => Err(InferError::internal(format!("the worker of model '{model}' stopped without answering"))),
            }
        };
        match tokio::time::timeout_at(deadline.into(), run).await {
            Ok(result) => result,
            Err(_) => {
                Err(InferError::timeout(format!("no answer from model '{model}' within {} ms", self.jobs.timeout_ms)))
            }
        }
    }

    /// Prepares a job with its loaded model's preparer on the decode threads,
    /// when the preparer asks for that (image work); returns the input for the
    /// worker and the milliseconds it took. Otherwise, and while the model is
    /// not loaded yet, the worker prepares the job with the same preparer.
    async fn prepare(&self, preparer: Option<Arc<dyn Prepare>>, input: JobInput) -> Result<(Input, f64), InferError> {
        let Some(preparer) = preparer.filter(|p| p.off_worker()) else {
            return Ok((Input::Sent(input), 0.0));
        };
        let (reply, answer) = oneshot::channel();
        self.decoders.get_or_init(DecodePool::start).run(move || {
            let t = Instant::now();
            let done = preparer.prepare(input);
            let _ = reply.send(done.map(|p| (Input::Prepared(p), t.elapsed().as_secs_f64() * 1000.0)));
        })?;
        answer.await.unwrap_or_else(|_| Err(InferError::internal("preparing the job failed (the decoder stopped)")))
    }

    /// Loads `model` now (if not loaded) and waits for it, up to `jobs.load_timeout_ms`.
    pub async fn load(&self, model: &str) -> Result<(), InferError> {
        let queue = self.queue(model)?;
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(Work::Load(reply))
            .map_err(|_| InferError::overloaded(format!("the queue of model '{model}' is full; try again later")))?;
        match tokio::time::timeout(Duration::from_millis(self.jobs.load_timeout_ms), answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::internal(format!("the worker of model '{model}' stopped while loading"))),
            Err(_) => Err(InferError::timeout(format!(
                "model '{model}' did not load within {} ms",
                self.jobs.load_timeout_ms
            ))),
        }
    }

    /// Unloads `model`: its queued jobs still run, then the worker drops the session.
    pub async fn unload(&self, model: &str) -> Result<(), InferError> {
        if self.engine().registry().get(model).is_none() {
            return Err(InferError::unknown_model(model));
        }
        let slot = self.slots().remove(model);
        if let Some(slot) = slot {
            drop(slot.queue);
            join(slot.thread).await;
        }
        Ok(())
    }

    /// `model`'s state and queue depth.
    pub fn status(&self, model: &str) -> ModelStatus {
        match self.slots().get(model) {
            Some(slot) => ModelStatus {
                state: worker::get_state(&slot.state),
                queue_depth: slot.queue.max_capacity() - slot.queue.capacity(),
            },
            None => ModelStatus { state: ModelState::Unloaded, queue_depth: 0 },
        }
    }

    /// Gauges of every registered model, for /metrics (from their reports).
    pub fn gauges(&self) -> Vec<ModelGauges> {
        self.reports()
            .into_iter()
            .map(|r| ModelGauges {
                queue_depth: r.queue_depth,
                loaded: r.loaded,
                memory_bytes: r.running.as_ref().and_then(|run| run.memory_bytes),
                nodes: r.placement().map(|p| p.nodes.clone()).unwrap_or_default(),
                model: r.name,
            })
            .collect()
    }

    /// Refuses new jobs, lets every worker finish its queue and waits for them, up to `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let slots: Vec<Slot> = self.slots().drain().map(|(_, s)| s).collect();
        let threads: Vec<std::thread::JoinHandle<()>> = slots
            .into_iter()
            .map(|s| {
                drop(s.queue);
                s.thread
            })
            .collect();
        let all = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!("workers still busy after {} ms; stopping without them", deadline.as_millis());
        }
    }
}

/// A fixed set of threads for image work, one per core, started on first
/// use: as many threads in the hundredth hour as in the first (tokio's
/// blocking pool grows and shrinks with load), and never more decoding at
/// once than cores. A rayon pool, so the JPEG decoder's per-component work
/// runs on these same threads (it uses the pool it is called from) instead
/// of spawning threads of its own for each image. Tasks wait in the pool's
/// unbounded queue, bounded in practice by the queues' admission.
struct DecodePool {
    pool: Result<rayon::ThreadPool, String>,
}

impl DecodePool {
    fn start() -> DecodePool {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .thread_name(|i| format!("inferd-decode-{i}"))
            .build()
            .map_err(|e| {
                tracing::error!("cannot start the decode threads: {e}");
                e.to_string()
            });
        DecodePool { pool }
    }

    fn run(&self, task: impl FnOnce() + Send + 'static) -> Result<(), InferError> {
        let pool = self.pool.as_ref().map_err(|e| InferError::internal(format!("no decode thread is running: {e}")))?;
        // A panic in a decoder must not reach rayon (which would abort): the task's reply just closes.
        pool.spawn(move || drop(std::panic::catch_unwind(std::panic::AssertUnwindSafe(task))));
        Ok(())
    }
}

async fn join(thread: std::thread::JoinHandle<()>) {
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
}
