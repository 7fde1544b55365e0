//! A generation applied on this box: pull → verify → check → load → smoke
//! test for every new or changed model, then the swap (journaled, see
//! [`super::store`]) and the registry reloaded; any failure before the swap
//! leaves the serving set as it was and reports `rolled_back` with the
//! stage and the reason. The state reported is kept in a watch channel the
//! MQTT agent publishes.

use super::doc::{self, DocError, Document, FleetTopics, Layer, Merged, TrustedKey};
use super::store::{self, Failure, State};
use crate::config::Config;
use crate::pull::{self, PullErrorKind};
use crate::scheduler::Scheduler;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Times the box may die while applying one set before it stops trying it.
const MAX_INTERRUPTED: u32 = 3;
/// First wait before a pull that failed on the network is tried again (doubling, up to 10 min).
const RETRY_FIRST: Duration = Duration::from_secs(15);

/// Where the box is with its desired state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No desired state yet.
    Idle,
    Applying,
    Applied,
    /// The newest generation failed; the last good one serves.
    RolledBack,
    /// A pull failed on the network; it is tried again.
    Retrying,
}

/// A model as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// `pulling`, `checking`, `smoke_test`, `staged`, or once applied, the model's own state
    /// (`unloaded`, `loading`, `loaded`, `failed`).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Bytes downloaded of the pull under way, and the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<(u64, u64)>,
}

/// A document refused, where and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refused {
    pub topic: String,
    #[serde(flatten)]
    pub error: DocError,
}

/// What `{prefix}/NODE/reported` carries (retained).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reported {
    pub node: String,
    /// The generation serving (the last good one).
    pub generation: u64,
    /// The newest generation desired.
    pub desired_generation: u64,
    pub state: Phase,
    /// Each layer's accepted generation.
    pub layers: BTreeMap<String, u64>,
    /// The models of the fleet's set serving, and those being applied.
    pub models: BTreeMap<String, ModelReport>,
    /// Why the newest generation was rolled back (or is being retried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    /// The last document refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
}

/// The fleet side of a daemon.
pub struct Fleet {
    root: PathBuf,
    config: Config,
    topics: FleetTopics,
    keys: Vec<TrustedKey>,
    scheduler: Arc<Scheduler>,
    state: Mutex<State>,
    desired: tokio::sync::watch::Sender<Merged>,
    report: tokio::sync::watch::Sender<Reported>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fleet {
    /// The fleet of this daemon, from the `state` [`store::recover`] gave.
    pub fn new(config: Config, scheduler: Arc<Scheduler>, state: State) -> Result<Arc<Fleet>, String> {
        let topics = FleetTopics {
            prefix: config.mqtt.prefix.clone(),
            node: config.mqtt.node(),
            groups: config.fleet.groups.clone(),
        };
        let keys = config.fleet.keys()?;
        let root = config.pull_dir(&config.registry_path());
        let report = Reported {
            node: topics.node.clone(),
            generation: state.applied.generation,
            desired_generation: state.applied.generation,
            state: if state.applied.generation == 0 { Phase::Idle } else { Phase::Applied },
            layers: BTreeMap::new(),
            models: BTreeMap::new(),
            error: state.failed.clone(),
            refused: None,
        };
        let fleet = Arc::new(Fleet {
            root,
            config,
            topics,
            keys,
            scheduler,
            desired: tokio::sync::watch::channel(Merged::default()).0,
            report: tokio::sync::watch::channel(report).0,
            state: Mutex::new(state),
        });
        let merged = fleet.merged();
        fleet.desired.send_replace(merged);
        fleet.refresh_models();
        Ok(fleet)
    }

    pub fn topics(&self) -> &FleetTopics {
        &self.topics
    }

    /// The state to publish, changing as the box applies.
    pub fn reports(&self) -> tokio::sync::watch::Receiver<Reported> {
        self.report.subscribe()
    }

    /// The report with every applied model's state as the scheduler has it now.
    pub fn snapshot(&self) -> Reported {
        self.refresh_models();
        self.report.borrow().clone()
    }

    /// The merged desired state of the accepted layers.
    fn merged(&self) -> Merged {
        let state = lock(&self.state);
        let order = std::iter::once(Layer::Fleet)
            .chain(self.topics.groups.iter().map(|g| Layer::Group(g.clone())))
            .chain(std::iter::once(Layer::Node(self.topics.node.clone())));
        let docs: Vec<&Document> = order.filter_map(|l| state.layers.get(&l)).collect();
        doc::merge(docs)
    }

    /// A message on a desired topic: read, checked against the layer's last
    /// generation, kept, and the merged state handed to the apply loop; a
    /// refusal is reported and changes nothing.
    pub fn accept(&self, topic: &str, payload: &[u8]) {
        let Some(layer) = self.topics.layer_of(topic) else { return };
        if payload.is_empty() {
            tracing::info!(%topic, "fleet: the retained document was cleared; the layer keeps its last one (publish a signed document with no models to empty it)");
            return;
        }
        let max = self.config.fleet.max_document_kib.saturating_mul(1024);
        let read = doc::read(payload, &layer, &self.keys, self.config.fleet.trust_broker, max).and_then(|d| {
            let mut state = lock(&self.state);
            match state.layers.get(&layer) {
                Some(old) if old.generation == d.generation && old.models == d.models => Ok(false),
                Some(old) if old.generation >= d.generation => Err(DocError {
                    kind: doc::DocErrorKind::Stale,
                    message: format!(
                        "generation {} for {layer}: generation {} was already accepted (generations only go up)",
                        d.generation, old.generation
                    ),
                }),
                _ => {
                    state.layers.insert(layer.clone(), d);
                    if let Err(e) = store::save(&self.root, &state) {
                        tracing::error!("fleet: {e}");
                    }
                    Ok(true)
                }
            }
        });
        match read {
            Ok(false) => {}
            Ok(true) => {
                tracing::info!(%topic, "fleet: document accepted for {layer}");
                self.report.send_modify(|r| r.refused = None);
                self.desired.send_replace(self.merged());
            }
            Err(e) => {
                tracing::warn!(%topic, kind = ?e.kind, "fleet: document refused: {}", e.message);
                self.report.send_modify(|r| r.refused = Some(Refused { topic: topic.to_string(), error: e }));
            }
        }
    }

    /// Applies each new merged state until `stop`; a pull that failed on the network is tried again with backoff.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut desired = self.desired.subscribe();
        let mut retry = RETRY_FIRST;
        loop {
            let merged = desired.borrow_and_update().clone();
            let outcome = self.apply(&merged).await;
            let wait = match outcome {
                Outcome::Retry => {
                    let w = retry;
                    retry = (retry * 2).min(Duration::from_secs(600));
                    Some(w)
                }
                Outcome::Done => {
                    retry = RETRY_FIRST;
                    None
                }
            };
            tokio::select! {
                changed = desired.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
                _ = async { match wait { Some(w) => tokio::time::sleep(w).await, None => std::future::pending().await } } => {}
            }
        }
    }

    /// Applies `merged`; whatever the outcome, the attempt is over (only a box
    /// that dies during one leaves its mark, counted at the next start).
    async fn apply(&self, merged: &Merged) -> Outcome {
        let outcome = self.attempt(merged).await;
        let mut s = lock(&self.state);
        if s.trying.take().is_some()
            && let Err(e) = store::save(&self.root, &s)
        {
            tracing::error!("fleet: {e}");
        }
        outcome
    }

    async fn attempt(&self, merged: &Merged) -> Outcome {
        let (applied, failed, trying, layers) = {
            let s = lock(&self.state);
            let layers: BTreeMap<String, u64> = s.layers.iter().map(|(l, d)| (l.to_string(), d.generation)).collect();
            (s.applied.clone(), s.failed.clone(), s.trying.clone(), layers)
        };
        self.report.send_modify(|r| {
            r.desired_generation = merged.generation;
            r.layers = layers;
        });
        if merged.generation == 0 || *merged == applied {
            self.set_phase(if applied.generation == 0 { Phase::Idle } else { Phase::Applied }, None);
            return Outcome::Done;
        }
        let (g, set) = (merged.generation, merged.id());
        // The same set that failed is not tried again (a network failure is).
        if let Some(f) = failed.filter(|f| f.generation == g && f.set == set && f.stage != "network") {
            self.set_phase(Phase::RolledBack, Some(f));
            return Outcome::Done;
        }
        // Begun before and the box died each time (a load that kills the process, a power cut).
        let began = trying.filter(|(t, _)| *t == set).map_or(0, |(_, n)| n);
        if began >= MAX_INTERRUPTED {
            let message = format!("the box stopped {began} times while applying generation {g}; not trying it again");
            return self.fail(failure(g, &set, None, "interrupted", message));
        }
        {
            let mut s = lock(&self.state);
            s.trying = Some((set.clone(), began + 1));
            if let Err(e) = store::save(&self.root, &s) {
                tracing::error!("fleet: {e}");
            }
        }
        tracing::info!(generation = g, "fleet: applying generation {g} (serving {})", applied.generation);
        self.set_phase(Phase::Applying, None);
        let plan = doc::plan(&applied.models, &merged.models);
        let local: Vec<String> = {
            let engine = self.scheduler.engine();
            let ours =
                |m: &crate::registry::ModelSpec| m.dir.as_deref().and_then(Path::parent) == Some(self.root.as_path());
            engine.registry().models.iter().filter(|m| !ours(m)).map(|m| m.name.clone()).collect()
        };
        let mut staged: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut newer = self.desired.subscribe();
        for name in &plan.fetch {
            let d = &merged.models[name];
            if local.contains(name) {
                let message = format!(
                    "'{name}' is a model of models.json or of a model package; the fleet manages the models it pulled only"
                );
                return self.fail(failure(g, &set, Some(name), "check", message));
            }
            // A newer desired state takes over before the swap: what was
            // downloaded stays staged (resumed or reused), nothing serving changed.
            let staging = tokio::select! {
                r = self.stage(name, d) => r,
                _ = newer.changed() => {
                    tracing::info!(generation = g, model = %name, "fleet: a newer desired state arrived; generation {g} is left before its swap");
                    return Outcome::Done;
                }
            };
            match staging {
                Ok(dir) => staged.insert(name.clone(), dir),
                Err((stage, message, network)) => {
                    let f = failure(g, &set, Some(name), stage, message);
                    if network {
                        tracing::warn!(model = %name, "fleet: {}; trying again", f.message);
                        lock(&self.state).failed = Some(f.clone());
                        self.set_phase(Phase::Retrying, Some(f));
                        return Outcome::Retry;
                    }
                    return self.fail(f);
                }
            };
        }
        // The swap, journaled: a box that dies in it comes back on the last good set.
        let names: Vec<String> = plan.fetch.iter().chain(&plan.remove).cloned().collect();
        let journal = {
            let mut s = lock(&self.state);
            s.swaps += 1;
            let journal = store::journal(&self.root, g, s.swaps, &names);
            s.applying = Some(journal.clone());
            if let Err(e) = store::save(&self.root, &s) {
                s.applying = None;
                drop(s);
                return self.fail(failure(g, &set, None, "swap", e));
            }
            journal
        };
        let swapped = store::swap(&self.root, &journal, &staged);
        let reloaded = match swapped {
            Ok(()) => self.scheduler.reload_registry().await,
            Err(e) => Err(e),
        };
        if let Err(e) = reloaded {
            store::undo(&self.root, &journal);
            if let Err(again) = self.scheduler.reload_registry().await {
                tracing::error!(
                    "fleet: the registry of generation {} does not read again: {again}",
                    applied.generation
                );
            }
            lock(&self.state).applying = None;
            return self.fail(failure(g, &set, None, "swap", e));
        }
        for (name, d) in &merged.models {
            if d.preload
                && let Err(e) = self.scheduler.load(name).await
            {
                tracing::warn!(model = %name, "fleet: preload failed: {}", e.message);
            }
        }
        {
            let mut s = lock(&self.state);
            s.applied = merged.clone();
            s.failed = None;
            s.applying = None;
            if let Err(e) = store::save(&self.root, &s) {
                tracing::error!("fleet: {e}");
            }
        }
        let wanted: Vec<String> = merged.models.keys().cloned().collect();
        store::collect_garbage(&self.root, self.config.fleet.keep_generations, &wanted);
        tracing::info!(generation = g, added_or_changed = ?plan.fetch, removed = ?plan.remove, "fleet: generation {g} applied");
        self.report.send_modify(|r| r.generation = g);
        self.set_phase(Phase::Applied, None);
        Outcome::Done
    }

    /// Pulls, checks, loads and smoke-tests `name` in its staging folder;
    /// the stage that failed and why (and whether it was the network), if one did.
    async fn stage(&self, name: &str, d: &doc::Desired) -> Result<PathBuf, (&'static str, String, bool)> {
        self.model_state(name, "pulling", d);
        let progress = |p: pull::Progress| {
            if let pull::Progress::Bytes { done, total, .. } = p {
                self.report.send_if_modified(|r| match r.models.get_mut(name) {
                    Some(m) => {
                        m.progress = Some((done, total.unwrap_or(0)));
                        true
                    }
                    None => false,
                });
            }
        };
        let digest = d.digest();
        let want = pull::Want { name: Some(name), digest: digest.as_deref(), reuse: store::kept(&self.root, name) };
        let staged = pull::fetch(&d.source, &self.root, &want, &self.config.pull, &progress).await.map_err(|e| {
            let stage = match e.kind {
                PullErrorKind::Digest => "digest",
                PullErrorKind::Network => "network",
                _ => "pull",
            };
            (stage, e.message, e.kind == PullErrorKind::Network)
        })?;
        tracing::info!(model = %name, fetched = staged.downloaded, digest = %staged.digest, "fleet: {name} staged");
        if d.pin {
            set_pin(&staged.dir).map_err(|e| ("check", e, false))?;
        }
        self.model_state(name, "checking", d);
        let registry = pull::entry_registry(&staged.dir).map_err(|e| ("check", e.message, false))?;
        let (config, smoke, dir, owned) = (self.config.clone(), d.smoke.clone(), staged.dir.clone(), name.to_string());
        self.model_state(name, "smoke_test", d);
        tokio::task::spawn_blocking(move || smoke_test(&config, registry, &owned, smoke.as_ref(), &dir))
            .await
            .map_err(|e| ("load", format!("the check stopped: {e}"), false))?
            .map_err(|(stage, m)| (stage, m, false))?;
        self.model_state(name, "staged", d);
        Ok(staged.dir)
    }

    fn model_state(&self, name: &str, state: &str, d: &doc::Desired) {
        self.report.send_modify(|r| {
            r.models.insert(
                name.to_string(),
                ModelReport {
                    digest: d.digest(),
                    state: state.into(),
                    variant: None,
                    generation: None,
                    progress: None,
                },
            );
        });
    }

    fn set_phase(&self, phase: Phase, error: Option<Failure>) {
        self.report.send_modify(|r| {
            r.state = phase;
            r.error = error;
        });
        self.refresh_models();
    }

    /// Reports every model of the applied set as the scheduler has it (and,
    /// while applying, the models being staged).
    fn refresh_models(&self) {
        const STAGING: [&str; 4] = ["pulling", "checking", "smoke_test", "staged"];
        let applied = lock(&self.state).applied.clone();
        let mut models = BTreeMap::new();
        for (name, d) in &applied.models {
            let report = self.scheduler.report(name).ok();
            models.insert(
                name.clone(),
                ModelReport {
                    digest: d.digest(),
                    state: report.as_ref().map_or("missing", |r| r.state).to_string(),
                    variant: report.and_then(|r| r.variant),
                    generation: Some(applied.generation),
                    progress: None,
                },
            );
        }
        self.report.send_if_modified(|r| {
            if r.state == Phase::Applying {
                for (k, v) in r.models.iter().filter(|(_, v)| STAGING.contains(&v.state.as_str())) {
                    models.insert(k.clone(), v.clone());
                }
            }
            let changed = r.models != models;
            r.models = models;
            changed
        });
    }

    fn fail(&self, f: Failure) -> Outcome {
        tracing::error!(generation = f.generation, model = ?f.model, stage = %f.stage, "fleet: rolled back: {}", f.message);
        {
            let mut s = lock(&self.state);
            s.failed = Some(f.clone());
            if let Err(e) = store::save(&self.root, &s) {
                tracing::error!("fleet: {e}");
            }
        }
        self.set_phase(Phase::RolledBack, Some(f));
        Outcome::Done
    }
}

enum Outcome {
    Done,
    Retry,
}

fn failure(generation: u64, set: &str, model: Option<&str>, stage: &str, message: String) -> Failure {
    Failure { generation, set: set.to_string(), model: model.map(str::to_string), stage: stage.into(), message }
}

/// Sets `pin` in a staged model's entry.
fn set_pin(dir: &Path) -> Result<(), String> {
    let file = dir.join("model.json");
    let mut entry: serde_json::Value = std::fs::read(&file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| format!("{} does not read", file.display()))?;
    entry["pin"] = serde_json::Value::Bool(true);
    std::fs::write(&file, serde_json::to_vec_pretty(&entry).expect("JSON")).map_err(|e| e.to_string())
}

/// Checks a staged model as the daemon would serve it: sums and declared
/// interface, a load on the engine it would run on, and the smoke test's job
/// answered as expected. The stage that failed and why, if one did.
pub fn smoke_test(
    config: &Config,
    registry: crate::registry::Registry,
    name: &str,
    smoke: Option<&doc::Smoke>,
    dir: &Path,
) -> Result<(), (&'static str, String)> {
    let problems = registry.check_models(|_| true);
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.path, p.message)).collect();
        return Err(("check", list.join("; ")));
    }
    let engine = crate::engine::Engine::new(config.clone(), registry);
    let mut loaded =
        engine.load(name, &crate::engine::LoadOptions::default()).map_err(|e| ("load", e.message.clone()))?;
    let Some(smoke) = smoke else { return Ok(()) };
    let payload = match (&smoke.input, &smoke.file) {
        (Some(v), _) => serde_json::to_vec(v).expect("JSON"),
        (None, Some(f)) => std::fs::read(dir.join(f))
            .map_err(|e| ("smoke_test", format!("smoke.file {f}: {e} (the artifact must carry it)")))?,
        (None, None) => return Ok(()),
    };
    let max_payload = (config.mqtt.max_payload_mb as usize).saturating_mul(1 << 20);
    let (input, options) = crate::intake::mqtt::parse_job(&payload, &config.limits, max_payload)
        .map_err(|e| ("smoke_test", format!("the smoke test's job: {}", e.message)))?;
    let out = loaded
        .infer(input, &options)
        .map_err(|e| ("smoke_test", format!("the smoke test's job failed: {}", e.message)))?;
    let got = serde_json::to_value(&out).expect("JSON");
    doc::matches(&smoke.expect, &got, smoke.tolerance).map_err(|m| ("smoke_test", format!("the answer differs: {m}")))
}
