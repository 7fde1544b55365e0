//! A loaded model's sessions: one run on the worker thread itself, or a pool
//! of instances, each on a thread of its own.

use super::{BusyCell, Cells, Job, StateCell, WorkerCtx, run_jobs};
use crate::backend::BackendKind;
use crate::engine::LoadedModel;
use crate::error::InferError;
use crate::pipeline::Prepare;
use std::sync::Arc;

/// A model's sessions and their charge on the manager's books. Fields drop
/// in order: the sessions first, then the charge, so the books never show
/// memory free that sessions still hold.
pub(super) struct Held {
    pub(super) sessions: Sessions,
    pub(super) charge: crate::manager::Charge,
    /// The process's RSS just before the load, to measure its first job against.
    pub(super) rss_before: Option<u64>,
}

impl Held {
    /// Drops the sessions, gives their memory back to the system, then takes
    /// the charge off the books (so the next load measures from the truth).
    pub(super) fn unload(self) {
        let Held { sessions, charge, .. } = self;
        drop(sessions);
        crate::memory::trim_heap();
        drop(charge);
    }
}

/// A loaded model's sessions.
pub(super) enum Sessions {
    /// One instance, run on the worker thread itself (no hand-off on the hot path).
    One(LoadedModel),
    /// Several, each on a thread of its own.
    Pool(Pool),
}

impl Sessions {
    /// The first instance's variant, engine and placement.
    pub(super) fn first(&self) -> ModelFacts {
        match self {
            Sessions::One(m) => ModelFacts::of(m),
            Sessions::Pool(p) => p.facts.clone(),
        }
    }

    pub(super) fn batching(&self) -> Option<crate::registry::BatchSpec> {
        match self {
            Sessions::One(m) => m.batching(),
            Sessions::Pool(p) => p.facts.batching,
        }
    }
}

/// What the worker keeps of a model's first instance once its session moved to a pool thread.
#[derive(Clone)]
pub(super) struct ModelFacts {
    pub(super) variant: String,
    pub(super) reason: String,
    pub(super) backend: BackendKind,
    pub(super) provider: String,
    pub(super) placement: Option<crate::backend::Placement>,
    pub(super) batching: Option<crate::registry::BatchSpec>,
    pub(super) preparer: Arc<dyn Prepare>,
}

impl ModelFacts {
    pub(super) fn of(m: &LoadedModel) -> ModelFacts {
        ModelFacts {
            variant: m.plan.variant.clone(),
            reason: m.plan.variant_reason.clone(),
            backend: m.plan.backend.backend,
            provider: m.provider().to_string(),
            placement: m.placement().cloned(),
            batching: m.batching(),
            preparer: m.preparer(),
        }
    }
}

/// `instances` sessions of one model, each on its own thread; the worker
/// hands a job to an idle one and learns from `done` when it is idle again.
pub(super) struct Pool {
    pub(super) facts: ModelFacts,
    pub(super) feeds: Vec<std::sync::mpsc::Sender<Vec<Job>>>,
    idle: Vec<usize>,
    done: std::sync::mpsc::Receiver<usize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    pub(super) fn start(
        ctx: &WorkerCtx,
        model: &str,
        models: Vec<LoadedModel>,
        state: &StateCell,
        busy: &BusyCell,
    ) -> std::io::Result<Pool> {
        let facts = ModelFacts::of(&models[0]);
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut pool = Pool { facts, feeds: Vec::new(), idle: Vec::new(), done, threads: Vec::new() };
        for (i, mut m) in models.into_iter().enumerate() {
            let (feed, jobs) = std::sync::mpsc::channel::<Vec<Job>>();
            let (ctx, model, state, busy, done) =
                (ctx.clone(), model.to_string(), state.clone(), busy.clone(), done_tx.clone());
            let thread = std::thread::Builder::new().name(format!("inferd-{model}-{i}")).spawn(move || {
                let cells = Cells { ctx: &ctx, model: &model, state: &state, busy: &busy };
                while let Ok(batch) = jobs.recv() {
                    run_jobs(&cells, i, &mut m, batch);
                    if done.send(i).is_err() {
                        break;
                    }
                }
            })?;
            pool.feeds.push(feed);
            pool.threads.push(thread);
            pool.idle.push(i);
        }
        pool.idle.reverse(); // instance 0 first
        Ok(pool)
    }

    /// An idle instance, waiting for one if all are busy; none if every instance thread stopped.
    pub(super) fn idle(&mut self) -> Option<usize> {
        while let Ok(i) = self.done.try_recv() {
            self.idle.push(i);
        }
        self.idle.pop().or_else(|| self.done.recv().ok())
    }

    pub(super) fn hand(&mut self, instance: usize, jobs: Vec<Job>) {
        if let Err(std::sync::mpsc::SendError(jobs)) = self.feeds[instance].send(jobs) {
            for j in jobs {
                let _ = j.reply.send(Err(InferError::internal("the instance thread of the model stopped")));
            }
        }
    }
}

impl Drop for Pool {
    /// Lets every instance finish the jobs it holds, then joins the threads.
    fn drop(&mut self) {
        self.feeds.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
