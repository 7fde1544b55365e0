//! The memory-aware model manager: which variant of a model fits the memory
//! that is really free, what to evict when a load would not fit, and when to
//! downgrade or upgrade a loaded model as memory comes and goes.
//!
//! Decisions are pure functions ([`need`], [`choose`], [`evictions`],
//! [`pressure`]) with table tests; [`Manager`] is the thin state around them:
//! the probe, the measured footprints and what is loaded now.

use crate::config::MemoryConfig;
use crate::error::InferError;
use crate::memory::{Footprints, MemoryProbe, mib};
use crate::registry::{ModelSpec, Registry};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where a variant's memory need comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NeedSource {
    /// Measured when it was loaded on this box.
    Measured,
    /// models.json's `memory_mb`.
    Estimate,
    /// A rule from the file size (twice the file plus 16 MiB).
    FileSize,
}

/// One variant's memory need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VariantNeed {
    pub name: String,
    pub quality: u32,
    /// Weights and sessions: what the model is charged once loaded.
    pub bytes: u64,
    pub source: NeedSource,
    /// Room to leave beyond `bytes` for the work itself (a decoder's KV
    /// cache), counted when choosing, not charged: requests are admitted
    /// against the memory really free.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working: Option<(u64, String)>,
}

impl VariantNeed {
    /// What choosing this variant must find free (before headroom).
    pub fn total(&self) -> u64 {
        self.bytes.saturating_add(self.working.as_ref().map_or(0, |w| w.0))
    }
}

/// A variant's need: the larger of its measured footprint and its
/// estimate (a load shows weights and sessions, not the working memory of
/// a job, which models.json's estimate includes), else the file-size rule.
pub fn need(measured: Option<u64>, estimate_mb: Option<u64>, file_bytes: u64) -> (u64, NeedSource) {
    match (measured, estimate_mb) {
        (Some(m), Some(e)) if e << 20 > m => (e << 20, NeedSource::Estimate),
        (Some(m), _) => (m, NeedSource::Measured),
        (None, Some(e)) => (e << 20, NeedSource::Estimate),
        (None, None) => (file_bytes.saturating_mul(2).saturating_add(16 << 20), NeedSource::FileSize),
    }
}

fn need_text(n: &VariantNeed) -> String {
    let source = match n.source {
        NeedSource::Measured => "measured",
        NeedSource::Estimate => "estimated",
        NeedSource::FileSize => "from file size",
    };
    match &n.working {
        Some((bytes, what)) => {
            format!("'{}' needs {} MiB ({source}) + {} MiB for {what}", n.name, mib(n.bytes), mib(*bytes))
        }
        None => format!("'{}' needs {} MiB ({source})", n.name, mib(n.bytes)),
    }
}

/// Picks the highest-quality variant whose need plus `headroom` fits in
/// `room` (bytes); among equal quality the first listed. The reason says
/// which was chosen and why the better ones were not.
pub fn choose(needs: &[VariantNeed], room: u64, headroom: u64) -> Result<(usize, String), String> {
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by(|&a, &b| needs[b].quality.cmp(&needs[a].quality).then(a.cmp(&b)));
    let mut skipped = Vec::new();
    for i in order {
        let n = &needs[i];
        if n.total().saturating_add(headroom) <= room {
            let mut reason =
                format!("{}, fits in {} MiB free with {} MiB headroom", need_text(n), mib(room), mib(headroom));
            if !skipped.is_empty() {
                reason.push_str(&format!("; too big: {}", skipped.join(", ")));
            }
            return Ok((i, reason));
        }
        skipped.push(need_text(n));
    }
    Err(format!(
        "no variant fits in {} MiB free with {} MiB headroom: {}",
        mib(room),
        mib(headroom),
        skipped.join(", ")
    ))
}

/// The index of `model`'s variant `name`, asked for by name (a request or a
/// pressure swap): no memory figure decides it.
pub fn requested(model: &ModelSpec, name: &str) -> Result<usize, InferError> {
    model
        .variants
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| InferError::bad_input(format!("model '{}' has no variant '{name}'", model.name)))
}

/// A loaded model as eviction sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub model: String,
    pub bytes: u64,
    pub idle: Duration,
    pub pinned: bool,
}

/// Which loaded models to unload, least recently used first, so that `need`
/// fits in `room` plus what they free; `None` when even all unpinned ones
/// would not make room.
pub fn evictions(residents: &[Resident], room: u64, need: u64) -> Option<Vec<String>> {
    if need <= room {
        return Some(Vec::new());
    }
    let mut order: Vec<&Resident> = residents.iter().filter(|r| !r.pinned).collect();
    order.sort_by(|a, b| b.idle.cmp(&a.idle).then(a.model.cmp(&b.model)));
    let mut freed = 0u64;
    let mut out = Vec::new();
    for r in order {
        freed = freed.saturating_add(r.bytes);
        out.push(r.model.clone());
        if room.saturating_add(freed) >= need {
            return Some(out);
        }
    }
    None
}

/// What the pressure check decides for one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pressure {
    Steady,
    /// Swap `model` to the smaller `variant`.
    Downgrade {
        model: String,
        variant: String,
    },
    /// Swap `model` back to the better `variant`.
    Upgrade {
        model: String,
        variant: String,
    },
}

/// A loaded model as the pressure check sees it.
#[derive(Debug, Clone)]
pub struct LoadedView {
    pub model: String,
    pub variant: String,
    pub needs: Vec<VariantNeed>,
    /// Time since it was loaded or last swapped.
    pub residency: Duration,
}

/// Below `low` free bytes, downgrade the loaded model whose current variant
/// needs the most to its next smaller variant (the next lower quality rank:
/// ranks order a model's sizes, while measured and estimated needs are not
/// always comparable). Above `high`, upgrade a model
/// resident for at least `min_residency` to its next better variant, if
/// the extra need leaves more than `low` free (hysteresis: no thrash).
pub fn pressure(available: u64, low: u64, high: u64, min_residency: Duration, loaded: &[LoadedView]) -> Pressure {
    let current = |v: &LoadedView| v.needs.iter().find(|n| n.name == v.variant).cloned();
    if available < low {
        let mut best: Option<(u64, String, String)> = None;
        for v in loaded {
            let Some(cur) = current(v) else { continue };
            let smaller = v
                .needs
                .iter()
                .filter(|n| n.quality < cur.quality)
                .max_by(|a, b| a.quality.cmp(&b.quality).then(b.bytes.cmp(&a.bytes)));
            if let Some(s) = smaller
                && best.as_ref().is_none_or(|(bytes, _, _)| cur.bytes > *bytes)
            {
                best = Some((cur.bytes, v.model.clone(), s.name.clone()));
            }
        }
        return best.map_or(Pressure::Steady, |(_, model, variant)| Pressure::Downgrade { model, variant });
    }
    if available > high {
        for v in loaded.iter().filter(|v| v.residency >= min_residency) {
            let Some(cur) = current(v) else { continue };
            let better = v
                .needs
                .iter()
                .filter(|n| n.quality > cur.quality)
                .min_by(|a, b| a.quality.cmp(&b.quality).then(a.bytes.cmp(&b.bytes)));
            if let Some(b) = better {
                let extra = b.bytes.saturating_sub(cur.bytes);
                if available.saturating_sub(extra) > low {
                    return Pressure::Upgrade { model: v.model.clone(), variant: b.name.clone() };
                }
            }
        }
    }
    Pressure::Steady
}

struct Loaded {
    variant: String,
    /// What it is charged against the budget.
    bytes: u64,
    /// Its RSS growth while loading.
    bytes_at_load: u64,
    last_used: Instant,
    since: Instant,
}

/// The manager's state: probe, footprints, and what is loaded.
pub struct Manager {
    cfg: MemoryConfig,
    probe: Arc<dyn MemoryProbe>,
    footprints: Footprints,
    registry: std::sync::RwLock<Arc<Registry>>,
    loaded: Mutex<HashMap<String, Loaded>>,
    /// Room held for loads in progress (model → bytes), so loads that start
    /// together do not all see the same free room.
    reserved: Mutex<HashMap<String, u64>>,
    /// One reservation decided at a time.
    reserving: Mutex<()>,
}

/// A load plan: the variant, why, and who must make room.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub variant: String,
    pub reason: String,
    pub evict: Vec<String>,
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
            loaded: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashMap::new()),
            reserving: Mutex::new(()),
        }
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, Loaded>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
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
    /// loaded models use when a budget is set, else what the probe reports.
    pub fn room(&self) -> Result<u64, InferError> {
        match self.cfg.budget_mb {
            Some(budget) => Ok((budget << 20).saturating_sub(self.used())),
            None => self.probe.available_bytes().map_err(|e| InferError::unavailable(format!("memory probe: {e}"))),
        }
    }

    /// What loaded models are charged plus the room held for loads in progress, bytes.
    pub fn used(&self) -> u64 {
        let loaded: u64 = self.loaded().values().map(|l| l.bytes).sum();
        let reserved: u64 = self.reserved.lock().unwrap_or_else(|e| e.into_inner()).values().sum();
        loaded + reserved
    }

    /// What each loaded model is charged now, bytes.
    pub fn charges(&self) -> Vec<(String, u64)> {
        self.loaded().iter().map(|(name, l)| (name.clone(), l.bytes)).collect()
    }

    /// [`Manager::plan_load`] for a load about to happen: the planned evictions
    /// are taken off the books and the variant's need is held until
    /// [`Manager::record_load`] or [`Manager::cancel_load`], so a load that
    /// starts meanwhile plans with the room that is really left.
    pub fn reserve_load(&self, model: &ModelSpec, requested: Option<&str>) -> Result<LoadPlan, InferError> {
        let _one = self.reserving.lock().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan_load(model, requested)?;
        let need = self.needs(model).iter().find(|n| n.name == plan.variant).map_or(0, |n| n.bytes);
        {
            let mut loaded = self.loaded();
            for victim in &plan.evict {
                loaded.remove(victim);
            }
        }
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).insert(model.name.clone(), need);
        Ok(plan)
    }

    /// A reserved load failed: its room is free again.
    pub fn cancel_load(&self, model: &str) {
        self.reserved.lock().unwrap_or_else(|e| e.into_inner()).remove(model);
    }

    /// Records what `model` holds once it has run (the process's growth from
    /// before its load to after its first job: sessions, arenas, buffers), keeps
    /// it as the variant's footprint, and returns the idle models to unload so
    /// that a budget still holds (least recently used first, never pinned ones).
    pub fn record_run(&self, model: &ModelSpec, bytes: u64) -> Vec<String> {
        let Some(variant) = self.loaded().get(&model.name).map(|l| l.variant.clone()) else { return Vec::new() };
        let spec = model.variants.iter().find(|v| v.name == variant);
        // The growth can read low (memory another model gave back is reused), so the
        // footprint only ever rises, and models.json's estimate stays a floor.
        let footprint =
            spec.and_then(|v| self.footprints.get(&model.name, &variant, &v.sha256)).unwrap_or(0).max(bytes);
        if let Some(v) = spec {
            self.footprints.record(&model.name, &variant, &v.sha256, footprint);
        }
        let estimate = spec.and_then(|v| v.memory_mb).map_or(0, |mb| mb << 20);
        if let Some(l) = self.loaded().get_mut(&model.name) {
            l.bytes = l.bytes_at_load.max(footprint).max(estimate);
        }
        let Some(budget) = self.cfg.budget_mb.map(|b| b << 20) else { return Vec::new() };
        let used = self.used();
        if used <= budget {
            return Vec::new();
        }
        let residents = self.residents_except(&model.name);
        let victims = evictions(&residents, 0, used - budget).unwrap_or_else(|| {
            // Even all idle ones would not do: unload them all; the rest is pinned or this model.
            residents.iter().filter(|r| !r.pinned).map(|r| r.model.clone()).collect()
        });
        let mut loaded = self.loaded();
        for victim in &victims {
            loaded.remove(victim);
        }
        victims
    }

    /// The loaded models other than `model`, as eviction sees them.
    fn residents_except(&self, model: &str) -> Vec<Resident> {
        let now = Instant::now();
        let registry = self.registry();
        self.loaded()
            .iter()
            .filter(|(name, _)| *name != model)
            .map(|(name, l)| Resident {
                model: name.clone(),
                bytes: l.bytes,
                idle: now - l.last_used,
                pinned: registry.get(name).is_some_and(|m| m.pin),
            })
            .collect()
    }

    /// The needs of every variant of `model`.
    pub fn needs(&self, model: &ModelSpec) -> Vec<VariantNeed> {
        model
            .variants
            .iter()
            .map(|v| {
                // Every graph the variant loads: its file and its parts (a vision encoder, token embeddings).
                let file_bytes = std::iter::once(&v.file)
                    .chain(v.parts.values().map(|p| &p.file))
                    .map(|f| std::fs::metadata(self.registry().resolve(f)).map_or(0, |m| m.len()))
                    .sum();
                let measured = self.footprints.get(&model.name, &v.name, &v.sha256);
                let (bytes, source) = need(measured, v.memory_mb, file_bytes);
                let working = model.task.working_memory(&self.registry().resolve(&v.file));
                VariantNeed { name: v.name.clone(), quality: v.quality, bytes, source, working }
            })
            .collect()
    }

    /// Plans loading `model`: the best variant that fits in the room left
    /// plus what unloading idle, unpinned models would free, and which of
    /// them to unload (least recently used first).
    pub fn plan_load(&self, model: &ModelSpec, requested: Option<&str>) -> Result<LoadPlan, InferError> {
        let needs = self.needs(model);
        let room = self.room()?;
        let headroom = self.cfg.headroom_mb << 20;
        let residents = self.residents_except(&model.name);
        let evictable: u64 = residents.iter().filter(|r| !r.pinned).map(|r| r.bytes).sum();
        let (index, reason) = match requested {
            Some(name) => (self::requested(model, name)?, "requested".to_string()),
            None => choose(&needs, room.saturating_add(evictable), headroom)
                .map_err(|why| InferError::unavailable(format!("model '{}' cannot load: {why}", model.name)))?,
        };
        // A requested variant (a request or a pressure swap) never evicts others.
        let evict = match requested {
            Some(_) => Vec::new(),
            None => evictions(&residents, room, needs[index].total().saturating_add(headroom)).unwrap_or_default(),
        };
        Ok(LoadPlan { variant: needs[index].name.clone(), reason, evict })
    }

    /// Records that `model` is loaded as `variant`, its RSS growth while loading
    /// `bytes`. It is charged the larger of that and the variant's need (what it
    /// held after running, measured before, else models.json's estimate): a
    /// session holds little at load and far more once it runs.
    pub fn record_load(&self, model: &ModelSpec, variant: &str, bytes: Option<u64>) {
        let need = self.needs(model).iter().find(|n| n.name == variant).map_or(0, |n| n.bytes);
        let at_load = bytes.unwrap_or(0);
        let now = Instant::now();
        self.loaded().insert(
            model.name.clone(),
            Loaded {
                variant: variant.to_string(),
                bytes: at_load.max(need),
                bytes_at_load: at_load,
                last_used: now,
                since: now,
            },
        );
        self.cancel_load(&model.name);
    }

    /// Records that `model` is no longer loaded.
    pub fn record_unload(&self, model: &str) {
        self.loaded().remove(model);
    }

    /// Records that `model` served a job now.
    pub fn touch(&self, model: &str) {
        if let Some(l) = self.loaded().get_mut(model) {
            l.last_used = Instant::now();
        }
    }

    /// Loaded models idle for longer than their keep-alive (never pinned ones).
    pub fn idle_expired(&self) -> Vec<String> {
        let now = Instant::now();
        let registry = self.registry();
        self.loaded()
            .iter()
            .filter_map(|(name, l)| {
                let m = registry.get(name)?;
                let keep = m.keep_alive_s.or(self.cfg.keep_alive_s).filter(|&k| k > 0)?;
                (!m.pin && now - l.last_used >= Duration::from_secs(keep)).then(|| name.clone())
            })
            .collect()
    }

    /// This round's pressure decision.
    pub fn pressure(&self) -> Result<Pressure, String> {
        let available = self.probe.available_bytes()?;
        let now = Instant::now();
        let snapshot: Vec<(String, String, Duration)> =
            self.loaded().iter().map(|(name, l)| (name.clone(), l.variant.clone(), now - l.since)).collect();
        let views: Vec<LoadedView> = snapshot
            .into_iter()
            .filter_map(|(model, variant, residency)| {
                let needs = self.needs(self.registry().get(&model)?);
                Some(LoadedView { model, variant, needs, residency })
            })
            .collect();
        Ok(pressure(
            available,
            self.cfg.low_watermark_mb << 20,
            self.cfg.high_watermark_mb << 20,
            Duration::from_secs(self.cfg.min_residency_s),
            &views,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn n(name: &str, quality: u32, mb: u64) -> VariantNeed {
        VariantNeed { name: name.into(), quality, bytes: mb * MB, source: NeedSource::Estimate, working: None }
    }

    #[test]
    fn the_need_is_measured_else_estimated_else_from_the_file_size() {
        assert_eq!(need(Some(5 * MB), Some(9), 100), (9 * MB, NeedSource::Estimate), "the estimate is a floor");
        assert_eq!(need(Some(12 * MB), Some(9), 100), (12 * MB, NeedSource::Measured));
        assert_eq!(need(Some(5 * MB), None, 100), (5 * MB, NeedSource::Measured));
        assert_eq!(need(None, Some(9), 100), (9 * MB, NeedSource::Estimate));
        assert_eq!(need(None, None, 10 * MB), (36 * MB, NeedSource::FileSize));
    }

    #[test]
    fn selection_table() {
        let needs = [n("small", 1, 50), n("large", 3, 400), n("medium", 2, 150)];
        // (room MiB, headroom MiB, chosen)
        let table = [
            (1000, 64, Some("large")),
            (464, 64, Some("large")),
            (463, 64, Some("medium")),
            (200, 0, Some("medium")),
            (120, 64, Some("small")),
            (100, 64, None),
        ];
        for (room, headroom, want) in table {
            let got = choose(&needs, room * MB, headroom * MB).ok().map(|(i, _)| needs[i].name.as_str());
            assert_eq!(got, want, "room {room} MiB, headroom {headroom} MiB");
        }
        let (_, reason) = choose(&needs, 300 * MB, 0).unwrap();
        assert!(
            reason.contains("'medium' needs 150 MiB (estimated)") && reason.contains("too big: 'large' needs 400 MiB"),
            "{reason}"
        );
        let err = choose(&needs, 10 * MB, 0).unwrap_err();
        assert!(err.contains("no variant fits in 10 MiB"), "{err}");
    }

    #[test]
    fn the_working_memory_counts_in_the_choice_and_the_reason() {
        let kv = |mut n: VariantNeed| {
            n.working = Some((180 * MB, "the KV cache of 2048 tokens of context".into()));
            n
        };
        let needs = [kv(n("fp32", 2, 700)), kv(n("int4", 1, 380))];
        // 764 MiB would hold fp32's weights with headroom, not its KV cache too.
        let (i, reason) = choose(&needs, 800 * MB, 64 * MB).unwrap();
        assert_eq!(needs[i].name, "int4");
        assert!(
            reason.contains("'int4' needs 380 MiB (estimated) + 180 MiB for the KV cache of 2048 tokens")
                && reason.contains("too big: 'fp32' needs 700 MiB (estimated) + 180 MiB"),
            "{reason}"
        );
        assert_eq!(needs[choose(&needs, 944 * MB, 64 * MB).unwrap().0].name, "fp32");
        assert_eq!(needs[choose(&needs, 943 * MB, 64 * MB).unwrap().0].name, "int4");
    }

    #[test]
    fn equal_quality_keeps_the_listed_order() {
        let needs = [n("a", 1, 10), n("b", 1, 5)];
        assert_eq!(choose(&needs, 100 * MB, 0).unwrap().0, 0);
    }

    fn r(model: &str, mb: u64, idle_s: u64, pinned: bool) -> Resident {
        Resident { model: model.into(), bytes: mb * MB, idle: Duration::from_secs(idle_s), pinned }
    }

    #[test]
    fn eviction_order_table() {
        let residents = [
            r("fresh", 100, 1, false),
            r("stale", 100, 600, false),
            r("pinned", 500, 9999, true),
            r("older", 50, 60, false),
        ];
        // (room MiB, need MiB, evicted)
        let table: [(u64, u64, Option<Vec<&str>>); 5] = [
            (300, 200, Some(vec![])),
            (100, 200, Some(vec!["stale"])),
            (100, 250, Some(vec!["stale", "older"])),
            (100, 350, Some(vec!["stale", "older", "fresh"])),
            (100, 400, None),
        ];
        for (room, need_mb, want) in table {
            let got = evictions(&residents, room * MB, need_mb * MB);
            let want = want.map(|w| w.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "room {room}, need {need_mb}");
        }
    }

    fn view(variant: &str, residency_s: u64) -> LoadedView {
        LoadedView {
            model: "m".into(),
            variant: variant.into(),
            needs: vec![n("large", 2, 400), n("small", 1, 100)],
            residency: Duration::from_secs(residency_s),
        }
    }

    #[test]
    fn pressure_hysteresis_table() {
        let (low, high, min) = (200 * MB, 800 * MB, Duration::from_secs(60));
        let down = Pressure::Downgrade { model: "m".into(), variant: "small".into() };
        let up = Pressure::Upgrade { model: "m".into(), variant: "large".into() };
        // (available MiB, loaded variant, residency s, decision)
        let table = [
            (150, "large", 0, down.clone()),
            (150, "small", 0, Pressure::Steady),   // nothing smaller
            (500, "large", 0, Pressure::Steady),   // between the watermarks
            (500, "small", 999, Pressure::Steady), // not above high
            (900, "small", 10, Pressure::Steady),  // too soon after the swap
            (900, "small", 60, up.clone()),
            (450, "small", 999, Pressure::Steady),
        ];
        for (available, variant, residency, want) in table {
            assert_eq!(
                pressure(available * MB, low, high, min, &[view(variant, residency)]),
                want,
                "{available} MiB, {variant}"
            );
        }
        // An upgrade that would push free memory under the low watermark is not made.
        let big = LoadedView { needs: vec![n("huge", 2, 2000), n("small", 1, 100)], ..view("small", 999) };
        assert_eq!(pressure(900 * MB, low, high, min, &[big]), Pressure::Steady);
    }
}
