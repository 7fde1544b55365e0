//! The memory-aware model manager: which variant of a model fits the memory
//! that is really free, what to evict when a load would not fit, and when to
//! downgrade or upgrade a loaded model as memory comes and goes.
//!
//! Decisions are pure functions with table tests ([`need`], [`choose`],
//! [`choose_room`], [`make_room`], [`Shield`], [`evictions`], [`pressure`]);
//! the books of what each load is charged are the ledger, one entry per load
//! paid for by a [`Charge`] its worker owns; [`Manager`] is the thin state
//! around them: the probe, the measured footprints and the books.

mod ledger;
mod policy;
#[cfg(test)]
mod tests;

pub use ledger::{Charge, Entry, Stage};
pub use policy::{
    IN_USE, LoadedView, NeedSource, Pressure, Resident, Room, Shield, VariantNeed, choose, choose_room, evictions,
    make_room, need, pressure, requested,
};

use crate::config::MemoryConfig;
use crate::error::InferError;
use crate::memory::{Footprints, MemoryProbe, mib};
use crate::registry::{ModelSpec, Registry};
use ledger::{Book, Ledger};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The manager's state: probe, footprints, and the books.
pub struct Manager {
    cfg: MemoryConfig,
    probe: Arc<dyn MemoryProbe>,
    footprints: Footprints,
    registry: std::sync::RwLock<Arc<Registry>>,
    ledger: Arc<Ledger>,
    shield: Shield,
}

/// A load plan: the variant, why, and who must make room.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub variant: String,
    pub reason: String,
    pub evict: Vec<String>,
    /// The shielded model it would wait for, and how long, when one must go.
    pub wait: Option<(String, Duration)>,
}

/// One decision over the books.
struct Decision {
    index: usize,
    reason: String,
    room: Room,
    /// It fits in the room free now.
    now: bool,
}

impl Manager {
    /// The registry decisions are made over.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Decides over `registry` from now on (a reload).
    pub fn set_registry(&self, registry: Arc<Registry>) {
        *self.registry.write().unwrap_or_else(|e| e.into_inner()) = registry;
    }

    /// A manager over `registry`, with measured footprints kept in `cfg.state_dir`.
    pub fn new(cfg: MemoryConfig, probe: Arc<dyn MemoryProbe>, registry: Arc<Registry>) -> Manager {
        let footprints = Footprints::open(Some(&cfg.resolved_state_dir()));
        Manager {
            cfg,
            probe,
            footprints,
            registry: std::sync::RwLock::new(registry),
            ledger: Arc::default(),
            shield: Shield::DEFAULT,
        }
    }

    /// The same manager with another eviction shield (tests, tuning).
    pub fn with_shield(mut self, shield: Shield) -> Manager {
        self.shield = shield;
        self
    }

    /// The configuration in force.
    pub fn config(&self) -> &MemoryConfig {
        &self.cfg
    }

    /// What the probe says now.
    pub fn probe(&self) -> &Arc<dyn MemoryProbe> {
        &self.probe
    }

    /// The memory models may still use, in bytes: `budget_mb` minus what
    /// loads are charged and set aside when a budget is set, else what the
    /// probe reports less what loads under way will still take.
    pub fn room(&self) -> Result<u64, InferError> {
        self.room_in(&self.ledger.lock(), None)
    }

    /// The room on `book` for load `me` (its own entry left out).
    fn room_in(&self, book: &Book, me: Option<u64>) -> Result<u64, InferError> {
        let others = || book.entries.iter().filter(move |(id, _)| Some(**id) != me).map(|(_, e)| e);
        match self.cfg.budget_mb {
            Some(budget) => Ok((budget << 20).saturating_sub(Self::taken(others()))),
            None => {
                let free =
                    self.probe.available_bytes().map_err(|e| InferError::unavailable(format!("memory probe: {e}")))?;
                // Loaded models are in the probe's figure; loads under way and waiting are not yet.
                let pending: u64 =
                    others().filter(|e| matches!(e.stage, Stage::Waiting | Stage::Loading)).map(|e| e.taken()).sum();
                Ok(free.saturating_sub(pending))
            }
        }
    }

    /// The room for the work of `model`'s requests (a decoder's KV cache):
    /// the room left plus, under a budget, what its loads keep for their work
    /// (without one, the probe's free memory already holds it).
    pub fn room_for_work(&self, model: &str) -> Result<u64, InferError> {
        let book = self.ledger.lock();
        Ok(self.room_in(&book, None)?.saturating_add(self.kept_for_work(&book, model)))
    }

    /// The room `model`'s loads keep for their work under a budget, bytes
    /// (without one, requests are admitted against the probe's free memory).
    pub fn working(&self, model: &str) -> u64 {
        self.kept_for_work(&self.ledger.lock(), model)
    }

    fn kept_for_work(&self, book: &Book, model: &str) -> u64 {
        if self.cfg.budget_mb.is_none() {
            return 0;
        }
        book.entries.values().filter(|e| e.model == model && e.stage.holds()).map(|e| e.working).sum()
    }

    /// What loads are charged plus the room set aside for waiting ones, bytes.
    pub fn used(&self) -> u64 {
        Self::taken(self.ledger.lock().entries.values())
    }

    /// The memory `entries` take: what they hold, where the room set aside for
    /// waiting loads counts only beyond the memory on its way back to them.
    fn taken<'a>(entries: impl Iterator<Item = &'a Entry>) -> u64 {
        let (mut held, mut evicting, mut set_aside) = (0u64, 0u64, 0u64);
        for e in entries {
            match e.stage {
                Stage::Waiting => set_aside += e.taken(),
                Stage::Evicting => evicting += e.taken(),
                Stage::Loading | Stage::Loaded => held += e.taken(),
            }
        }
        held + evicting.max(set_aside)
    }

    /// What each model's loads hold now (loading, loaded, or unloading), bytes.
    pub fn charges(&self) -> Vec<(String, u64)> {
        let mut by_model: BTreeMap<String, u64> = BTreeMap::new();
        for e in self.ledger.lock().entries.values().filter(|e| e.stage.holds()) {
            *by_model.entry(e.model.clone()).or_default() += e.bytes;
        }
        by_model.into_iter().collect()
    }

    /// Every load on the books now, by the id of its [`Charge`].
    pub fn ledger(&self) -> Vec<(u64, Entry)> {
        self.ledger.lock().entries.iter().map(|(id, e)| (*id, e.clone())).collect()
    }

    /// The loaded models of others than `model` (and load `me`) as eviction sees them, one per model.
    fn residents(&self, book: &Book, me: Option<u64>, model: &str) -> Vec<Resident> {
        let now = Instant::now();
        let registry = self.registry();
        let mut out: Vec<Resident> = Vec::new();
        for (_, e) in book.entries.iter().filter(|(id, e)| Some(**id) != me && e.model != model) {
            if e.stage != Stage::Loaded {
                continue;
            }
            let idle = now - e.last_used;
            let r = Resident {
                model: e.model.clone(),
                bytes: e.taken(),
                idle,
                pinned: registry.get(&e.model).is_some_and(|m| m.pin),
                shielded: self.shield.left(e.load_time, now - e.since),
                warm: idle < policy::IN_USE,
            };
            match out.iter_mut().find(|o| o.model == r.model) {
                Some(o) => {
                    o.bytes += r.bytes;
                    o.idle = o.idle.min(r.idle);
                    o.shielded = o.shielded.max(r.shielded);
                    o.warm |= r.warm;
                }
                None => out.push(r),
            }
        }
        out
    }

    /// The loads of others than `model` under way or waiting, as eviction
    /// will see them once loaded: in use, shielded for the longest shield.
    fn loads_under_way(&self, book: &Book, me: Option<u64>, model: &str) -> Vec<Resident> {
        let registry = self.registry();
        book.entries
            .iter()
            .filter(|(id, e)| {
                Some(**id) != me && e.model != model && matches!(e.stage, Stage::Waiting | Stage::Loading)
            })
            .map(|(_, e)| Resident {
                model: e.model.clone(),
                bytes: e.taken(),
                idle: Duration::ZERO,
                pinned: registry.get(&e.model).is_some_and(|m| m.pin),
                shielded: self.shield.cap.max(Duration::from_millis(100)),
                warm: true,
            })
            .collect()
    }

    /// Memory on its way back for a load of `model`: models being unloaded and,
    /// unless a swap asks (its own worker holds the old variant), older loads
    /// of the same model, whose workers are finishing their queue to exit.
    fn releasing(book: &Book, me: Option<u64>, model: &str, swap: bool) -> u64 {
        book.entries
            .iter()
            .filter(|(id, e)| {
                Some(**id) != me
                    && (e.stage == Stage::Evicting || (!swap && e.model == model && e.stage == Stage::Loaded))
            })
            .map(|(_, e)| e.taken())
            .sum()
    }

    fn decide(
        &self,
        book: &Book,
        me: Option<u64>,
        model: &ModelSpec,
        needs: &[VariantNeed],
        requested: Option<&str>,
    ) -> Result<Decision, InferError> {
        let room = self.room_in(book, me)?;
        let releasing = Self::releasing(book, me, &model.name, requested.is_some());
        // What will be free once that is back: under a budget, the books may hold more
        // than the budget for a while (memory on its way back and the room set aside for it).
        let releasing = match self.cfg.budget_mb {
            Some(budget) => {
                let others: u64 = book.entries.iter().filter(|(id, _)| Some(**id) != me).map(|(_, e)| e.taken()).sum();
                (budget << 20).saturating_sub(others.saturating_sub(releasing)).saturating_sub(room)
            }
            None => releasing,
        };
        if let Some(name) = requested {
            // A variant asked for (a pressure swap) never evicts others; under a
            // budget it must fit beside the variant it replaces.
            let index = self::requested(model, name)?;
            let need = needs[index].bytes;
            let reason = "requested".to_string();
            return match self.cfg.budget_mb {
                None => Ok(Decision { index, reason, room: Room::Evict(Vec::new()), now: true }),
                Some(_) if need <= room.saturating_add(releasing) => {
                    Ok(Decision { index, reason, room: Room::Evict(Vec::new()), now: need <= room })
                }
                Some(budget) => Err(InferError::unavailable(format!(
                    "variant '{name}' of model '{}' needs {} MiB and {} MiB of memory.budget_mb = {budget} are free",
                    model.name,
                    mib(need),
                    mib(room)
                ))),
            };
        }
        let headroom = self.cfg.headroom_mb << 20;
        let mut residents = self.residents(book, me, &model.name);
        let (index, room_for, reason) = match choose_room(needs, headroom, &residents, room, releasing) {
            Ok(chosen) => chosen,
            Err(why) => {
                // Not now, but once the other loads under way are done and have served
                // their shields (taken as the longest): wait for them, not a refusal.
                residents.extend(self.loads_under_way(book, me, &model.name));
                match choose_room(needs, headroom, &residents, room, releasing) {
                    Ok(later) => later,
                    Err(_) => {
                        return Err(InferError::unavailable(format!("model '{}' cannot load: {why}", model.name)));
                    }
                }
            }
        };
        let now = matches!(&room_for, Room::Evict(v) if v.is_empty())
            && needs[index].total().saturating_add(headroom) <= room;
        Ok(Decision { index, reason, room: room_for, now })
    }

    /// Reserves room to load `model` (or its `requested` variant): the variant
    /// is chosen, the models that must make room are marked on the books and
    /// handed to `evict`, and this waits (until `deadline`) for their memory to
    /// come back, or for a shielded model to have served its time. The charge
    /// returned holds the variant's need until it is dropped; the caller keeps
    /// it for as long as the sessions it loads live and drops it after them.
    pub fn reserve_load(
        &self,
        model: &ModelSpec,
        requested: Option<&str>,
        deadline: Instant,
        evict: &mut dyn FnMut(&str),
    ) -> Result<(LoadPlan, Charge), InferError> {
        let needs = self.needs(model);
        let patience = deadline.saturating_duration_since(Instant::now());
        let mut book = self.ledger.lock();
        let charge = self.ledger.open(&mut book, &model.name);
        let id = charge.id();
        loop {
            let d = match self.decide(&book, Some(id), model, &needs, requested) {
                Ok(d) => d,
                Err(e) => {
                    drop(book);
                    return Err(e);
                }
            };
            let need = &needs[d.index];
            // Evictions are granted in arrival order: a load that must unload others (or
            // wait for a shield) waits while an earlier load waits for room, so none starves.
            let behind =
                book.entries.range(..id).find(|(_, e)| e.stage == Stage::Waiting).map(|(_, e)| e.model.clone());
            let own = book.entries.get_mut(&id).expect("a load's own entry stays while its charge lives");
            own.variant = need.name.clone();
            // A load that has made room already keeps its turn.
            let queued = behind.is_some() && own.bytes == 0 && !matches!(&d.room, Room::Evict(v) if v.is_empty());
            let working = need.working.as_ref().map_or(0, |w| w.0);
            let victims = match &d.room {
                _ if queued => {
                    (own.bytes, own.working) = (0, 0);
                    Vec::new()
                }
                Room::Evict(victims) if victims.is_empty() && d.now => {
                    (own.bytes, own.working) = (need.bytes, working);
                    own.stage = Stage::Loading;
                    own.since = Instant::now();
                    book.begin(id);
                    drop(book);
                    let plan = LoadPlan { variant: need.name.clone(), reason: d.reason, evict: Vec::new(), wait: None };
                    return Ok((plan, charge));
                }
                Room::Evict(victims) => {
                    // Set aside: the memory coming back is this load's, with the room its
                    // work needs (a decoder's KV cache), so a newcomer cannot take it meanwhile.
                    (own.bytes, own.working) = (need.bytes, working);
                    victims.clone()
                }
                Room::Wait { .. } => {
                    (own.bytes, own.working) = (0, 0);
                    Vec::new()
                }
            };
            if !victims.is_empty() {
                for e in book.entries.values_mut() {
                    if e.stage == Stage::Loaded && victims.contains(&e.model) {
                        e.stage = Stage::Evicting;
                    }
                }
                drop(book);
                for v in &victims {
                    evict(v);
                }
                book = self.ledger.lock();
                continue;
            }
            // The deadline bounds the wait for a turn and for shields; a load that has made
            // room waits for that memory to come back (its models finish their queues) as
            // long again rather than waste the evictions.
            let earmarked = book.entries.get(&id).is_some_and(|e| e.bytes > 0);
            let deadline = if earmarked { deadline + patience } else { deadline };
            let now = Instant::now();
            if now >= deadline {
                drop(book);
                let why = match behind {
                    Some(earlier) if queued => format!("{}, after the load of '{earlier}' that waits first", d.reason),
                    _ => d.reason,
                };
                return Err(InferError::overloaded(format!(
                    "model '{}' found no room in time: {why}; try again later",
                    model.name
                )));
            }
            let nap = match &d.room {
                _ if queued => Duration::from_millis(250),
                Room::Wait { after, .. } => *after,
                Room::Evict(_) => Duration::from_secs(1),
            };
            book = self.ledger.wait(book, nap.min(deadline - now).max(Duration::from_millis(1)));
        }
    }

    /// Records that the load of `charge` is done: `model` runs as `variant`,
    /// the process grew `bytes` while loading it, in `load_time`. It is charged
    /// the larger of that growth (when no other load disturbed the measure)
    /// and the variant's need (what it held after running, measured before,
    /// else models.json's estimate): a session holds little at load and far
    /// more once it runs. Returns the models to unload if a budget no longer holds.
    pub fn record_load(
        &self,
        charge: &Charge,
        model: &ModelSpec,
        variant: &str,
        bytes: Option<u64>,
        load_time: Duration,
    ) -> Vec<String> {
        let need = self.needs(model).iter().find(|n| n.name == variant).map_or(0, |n| n.bytes);
        let mut book = self.ledger.lock();
        let at_load = if book.clean(charge.id()) { bytes.unwrap_or(0) } else { 0 };
        let now = Instant::now();
        if let Some(e) = book.entries.get_mut(&charge.id()) {
            e.variant = variant.to_string();
            e.bytes = at_load.max(need);
            e.bytes_at_load = at_load;
            e.stage = Stage::Loaded;
            e.load_time = load_time;
            e.since = now;
            e.last_used = now;
        }
        let victims = self.over_budget(&mut book, charge.id());
        drop(book);
        self.ledger.notify();
        victims
    }

    /// Records what the load of `charge` holds once it has run (the process's
    /// growth from before its load to after its first job: sessions, arenas,
    /// buffers), keeps it as the variant's footprint, and returns the idle
    /// models to unload so that a budget still holds (least recently used
    /// first, unshielded ones first, never pinned ones). A measure that other
    /// loads or unloads disturbed is not taken.
    pub fn record_run(&self, charge: &Charge, model: &ModelSpec, bytes: u64) -> Vec<String> {
        let (variant, at_load) = {
            let mut book = self.ledger.lock();
            let Some(e) = book.entries.get(&charge.id()) else { return Vec::new() };
            let got = (e.variant.clone(), e.bytes_at_load);
            if !book.finish(charge.id()) {
                return Vec::new();
            }
            got
        };
        let spec = model.variants.iter().find(|v| v.name == variant);
        // The growth can read low (memory another model gave back is reused), so the
        // footprint only ever rises, and models.json's estimate stays a floor.
        let footprint =
            spec.and_then(|v| self.footprints.get(&model.name, &variant, &v.sha256)).unwrap_or(0).max(bytes);
        if let Some(v) = spec {
            self.footprints.record(&model.name, &variant, &v.sha256, footprint);
        }
        let estimate = spec.and_then(|v| v.memory_mb).map_or(0, |mb| mb << 20);
        let mut book = self.ledger.lock();
        if let Some(e) = book.entries.get_mut(&charge.id())
            && e.stage.holds()
        {
            e.bytes = at_load.max(footprint).max(estimate);
        }
        self.over_budget(&mut book, charge.id())
    }

    /// When what is held is over the budget (a measure rose above a need):
    /// the idle models to unload, marked on the books.
    fn over_budget(&self, book: &mut Book, me: u64) -> Vec<String> {
        let Some(budget) = self.cfg.budget_mb.map(|b| b << 20) else { return Vec::new() };
        let held: u64 = book.entries.values().filter(|e| e.stage.holds()).map(|e| e.bytes).sum();
        if held <= budget {
            return Vec::new();
        }
        let Some(model) = book.entries.get(&me).map(|e| e.model.clone()) else { return Vec::new() };
        let residents = self.residents(book, Some(me), &model);
        let open: Vec<Resident> = residents.iter().filter(|r| r.shielded.is_zero()).cloned().collect();
        let excess = held - budget;
        let victims = evictions(&open, 0, excess)
            .or_else(|| evictions(&residents, 0, excess))
            // Even all idle ones would not do: unload them all; the rest is pinned or this model.
            .unwrap_or_else(|| residents.iter().filter(|r| !r.pinned).map(|r| r.model.clone()).collect());
        for e in book.entries.values_mut() {
            if e.stage == Stage::Loaded && victims.contains(&e.model) {
                e.stage = Stage::Evicting;
            }
        }
        victims
    }

    /// The needs of every variant of `model`.
    pub fn needs(&self, model: &ModelSpec) -> Vec<VariantNeed> {
        let registry = self.registry();
        model
            .variants
            .iter()
            .map(|v| {
                // Every graph the variant loads: its file and its parts (a vision encoder, token embeddings).
                let file_bytes = std::iter::once(&v.file)
                    .chain(v.parts.values().map(|p| &p.file))
                    .map(|f| std::fs::metadata(registry.resolve(model, f)).map_or(0, |m| m.len()))
                    .sum();
                let measured = self.footprints.get(&model.name, &v.name, &v.sha256);
                let (bytes, source) = need(measured, v.memory_mb, file_bytes);
                let working = model.task.working_memory(&registry.resolve(model, &v.file));
                VariantNeed { name: v.name.clone(), quality: v.quality, bytes, source, working }
            })
            .collect()
    }

    /// Plans loading `model` as things stand, without reserving anything: the
    /// variant [`Manager::reserve_load`] would choose now, the models it would
    /// unload, or the shielded one it would wait for.
    pub fn plan_load(&self, model: &ModelSpec, requested: Option<&str>) -> Result<LoadPlan, InferError> {
        let needs = self.needs(model);
        let book = self.ledger.lock();
        let d = self.decide(&book, None, model, &needs, requested)?;
        let (evict, wait) = match d.room {
            Room::Evict(victims) => (victims, None),
            Room::Wait { model, after } => (Vec::new(), Some((model, after))),
        };
        Ok(LoadPlan { variant: needs[d.index].name.clone(), reason: d.reason, evict, wait })
    }

    /// Records that `model` served a job now.
    pub fn touch(&self, model: &str) {
        let now = Instant::now();
        for e in self.ledger.lock().entries.values_mut().filter(|e| e.model == model && e.stage == Stage::Loaded) {
            e.last_used = now;
        }
    }

    /// Loaded models idle for longer than their keep-alive (never pinned ones).
    pub fn idle_expired(&self) -> Vec<String> {
        let now = Instant::now();
        let registry = self.registry();
        let mut out: Vec<String> = Vec::new();
        for e in self.ledger.lock().entries.values().filter(|e| e.stage == Stage::Loaded) {
            let Some(m) = registry.get(&e.model) else { continue };
            let Some(keep) = m.keep_alive_s.or(self.cfg.keep_alive_s).filter(|&k| k > 0) else { continue };
            if !m.pin && now - e.last_used >= Duration::from_secs(keep) && !out.contains(&e.model) {
                out.push(e.model.clone());
            }
        }
        out
    }

    /// This round's pressure decision. Under a budget, an upgrade is made
    /// only when the better variant fits beside the one it replaces.
    pub fn pressure(&self) -> Result<Pressure, String> {
        let available = self.probe.available_bytes()?;
        let now = Instant::now();
        let mut snapshot: BTreeMap<String, (String, Duration)> = BTreeMap::new();
        for e in self.ledger.lock().entries.values().filter(|e| e.stage == Stage::Loaded) {
            snapshot.insert(e.model.clone(), (e.variant.clone(), now - e.since));
        }
        let registry = self.registry();
        let views: Vec<LoadedView> = snapshot
            .into_iter()
            .filter_map(|(model, (variant, residency))| {
                let needs = self.needs(registry.get(&model)?);
                Some(LoadedView { model, variant, needs, residency })
            })
            .collect();
        let decision = pressure(
            available,
            self.cfg.low_watermark_mb << 20,
            self.cfg.high_watermark_mb << 20,
            Duration::from_secs(self.cfg.min_residency_s),
            &views,
        );
        if let Pressure::Upgrade { model, variant } = &decision
            && self.cfg.budget_mb.is_some()
        {
            let need = views
                .iter()
                .find(|v| &v.model == model)
                .and_then(|v| v.needs.iter().find(|n| &n.name == variant))
                .map_or(0, |n| n.bytes);
            if need > self.room().map_err(|e| e.message)? {
                return Ok(Pressure::Steady);
            }
        }
        Ok(decision)
    }
}
