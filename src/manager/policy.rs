//! The manager's decisions as pure functions: plain values in, a decision
//! and its reason out, each with a table test that reads like its spec.

use crate::error::InferError;
use crate::memory::mib;
use crate::registry::ModelSpec;
use serde::Serialize;
use std::time::Duration;

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

pub(super) fn need_text(n: &VariantNeed) -> String {
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

/// The variants of `needs`, best first: highest quality, then the listed order.
fn best_first(needs: &[VariantNeed]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by(|&a, &b| needs[b].quality.cmp(&needs[a].quality).then(a.cmp(&b)));
    order
}

/// Picks the highest-quality variant whose need plus `headroom` fits in
/// `room` (bytes); among equal quality the first listed. The reason says
/// which was chosen and why the better ones were not.
pub fn choose(needs: &[VariantNeed], room: u64, headroom: u64) -> Result<(usize, String), String> {
    let mut skipped = Vec::new();
    for i in best_first(needs) {
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
    /// What is left of its shield (see [`Shield`]); zero once it has served its time.
    pub shielded: Duration,
    /// Used within [`IN_USE`]: likely to be wanted again soon.
    pub warm: bool,
}

/// The least recently used unpinned models whose unloading makes `need`
/// fit in `room`, none more (a model taken on the way but not needed in the
/// end stays, the most recently used first, then the shielded ones); `None`
/// when even all of them would not make room.
fn lru_victims(residents: &[Resident], room: u64, need: u64) -> Option<Vec<&Resident>> {
    if need <= room {
        return Some(Vec::new());
    }
    let mut order: Vec<&Resident> = residents.iter().filter(|r| !r.pinned).collect();
    order.sort_by(|a, b| b.idle.cmp(&a.idle).then(a.model.cmp(&b.model)));
    let mut freed = 0u64;
    let mut taken = Vec::new();
    for r in order {
        freed = freed.saturating_add(r.bytes);
        taken.push(r);
        if room.saturating_add(freed) >= need {
            // Give back what is not needed: shielded ones first, then the most recently used.
            let mut keep_order: Vec<usize> = (0..taken.len()).rev().collect();
            keep_order.sort_by_key(|&i| taken[i].shielded.is_zero());
            let mut out: Vec<Option<&Resident>> = taken.iter().copied().map(Some).collect();
            for i in keep_order {
                let bytes = out[i].map_or(0, |r| r.bytes);
                if room.saturating_add(freed - bytes) >= need {
                    freed -= bytes;
                    out[i] = None;
                }
            }
            return Some(out.into_iter().flatten().collect());
        }
    }
    None
}

/// Which loaded models to unload, least recently used first, so that `need`
/// fits in `room` plus what they free; `None` when even all unpinned ones
/// would not make room. Shields are not looked at: [`make_room`] does.
pub fn evictions(residents: &[Resident], room: u64, need: u64) -> Option<Vec<String>> {
    lru_victims(residents, room, need).map(|v| v.into_iter().map(|r| r.model.clone()).collect())
}

/// A model used this recently is in use: unloading it costs its users a reload.
pub const IN_USE: Duration = Duration::from_secs(60);

/// How long a freshly loaded model is kept from eviction: `factor` times
/// the time its load took, at least `floor`, at most `cap`. A load that cost
/// seconds is not thrown away a moment later for another that will be
/// thrown away in turn (thrash): the newcomer waits for the shield to end,
/// and `cap` bounds that wait well inside a job's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shield {
    pub factor: u32,
    pub floor: Duration,
    pub cap: Duration,
}

impl Shield {
    /// inferd's policy: 10 × the load time, between 3 s and 10 s.
    pub const DEFAULT: Shield = Shield { factor: 10, floor: Duration::from_secs(3), cap: Duration::from_secs(10) };
    /// No shield: least recently used first, however fresh (tests, and the old behaviour).
    pub const NONE: Shield = Shield { factor: 0, floor: Duration::ZERO, cap: Duration::ZERO };

    /// The shield of a model whose load took `load_time`.
    pub fn length(&self, load_time: Duration) -> Duration {
        load_time.saturating_mul(self.factor).max(self.floor).min(self.cap)
    }

    /// What is left of that shield `residency` after the load.
    pub fn left(&self, load_time: Duration, residency: Duration) -> Duration {
        self.length(load_time).saturating_sub(residency)
    }
}

/// How a load gets its room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// It fits once these models are unloaded and the memory already on its
    /// way back is back (no model named and nothing on its way: it fits now).
    Evict(Vec<String>),
    /// The models that must go include `model`, still shielded for `after`: wait.
    Wait { model: String, after: Duration },
}

/// Room for `need` bytes, with `room` free now and `releasing` on its way
/// back (models being unloaded): the least recently used unpinned models to
/// unload (none more), or, when one of them is still shielded, how long to
/// wait; `None` when even every unpinned model would not make room.
pub fn make_room(residents: &[Resident], room: u64, releasing: u64, need: u64) -> Option<Room> {
    let victims = lru_victims(residents, room.saturating_add(releasing), need)?;
    match victims.iter().filter(|r| !r.shielded.is_zero()).max_by(|a, b| a.shielded.cmp(&b.shielded)) {
        Some(r) => Some(Room::Wait { model: r.model.clone(), after: r.shielded }),
        None => Some(Room::Evict(victims.into_iter().map(|r| r.model.clone()).collect())),
    }
}

/// Picks the variant to load and how it gets its room: the one that waits
/// least for shields, then unloads the fewest bytes of warm models (quality
/// is not bought with the reload of a model in use), then the best. On a
/// box with room, or whose other models are idle, that is simply the best
/// that fits.
pub fn choose_room(
    needs: &[VariantNeed],
    headroom: u64,
    residents: &[Resident],
    room: u64,
    releasing: u64,
) -> Result<(usize, Room, String), String> {
    let warm_bytes = |victims: &[String]| -> u64 {
        victims.iter().filter_map(|v| residents.iter().find(|r| &r.model == v && r.warm)).map(|r| r.bytes).sum()
    };
    let mut best: Option<((Duration, u64), usize, Room)> = None;
    let mut too_big = Vec::new();
    for i in best_first(needs) {
        let Some(how) = make_room(residents, room, releasing, needs[i].total().saturating_add(headroom)) else {
            too_big.push(need_text(&needs[i]));
            continue;
        };
        let key = match &how {
            Room::Evict(victims) => (Duration::ZERO, warm_bytes(victims)),
            Room::Wait { after, .. } => (*after, 0),
        };
        if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
            best = Some((key, i, how));
        }
    }
    let free = format!("{} MiB free with {} MiB headroom", mib(room.saturating_add(releasing)), mib(headroom));
    let too_big = if too_big.is_empty() { String::new() } else { format!("; too big: {}", too_big.join(", ")) };
    let Some((_, i, how)) = best else { return Err(format!("no variant fits in {free}{too_big}")) };
    let reason = match &how {
        Room::Evict(victims) if victims.is_empty() => format!("{}, fits in {free}{too_big}", need_text(&needs[i])),
        Room::Evict(victims) => format!(
            "{}, fits in {free} once {} unloaded (least recently used){too_big}",
            need_text(&needs[i]),
            victims.join(", ")
        ),
        Room::Wait { model, after } => format!(
            "{}, fits once '{model}' has served its shield after loading ({:.1} s more){too_big}",
            need_text(&needs[i]),
            after.as_secs_f64()
        ),
    };
    Ok((i, how, reason))
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
        let idle = Duration::from_secs(idle_s);
        Resident { model: model.into(), bytes: mb * MB, idle, pinned, shielded: Duration::ZERO, warm: idle < IN_USE }
    }

    fn shielded(mut r: Resident, s: u64) -> Resident {
        r.shielded = Duration::from_secs(s);
        r
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
        // A small model taken on the way but not needed in the end stays.
        let residents = [r("tiny", 10, 900, false), r("big", 300, 5, false)];
        assert_eq!(evictions(&residents, 0, 250 * MB), Some(vec!["big".to_string()]));
    }

    #[test]
    fn shield_table() {
        let s = Shield::DEFAULT;
        let ms = Duration::from_millis;
        // (load time, residency, shield left): 10 × the load time, between 3 s and 10 s.
        let table = [
            (ms(50), ms(0), ms(3000)),       // a quick load still serves the floor
            (ms(50), ms(2900), ms(100)),     //
            (ms(50), ms(3000), ms(0)),       // served its time
            (ms(500), ms(0), ms(5000)),      // 10 × 0.5 s
            (ms(500), ms(4000), ms(1000)),   //
            (ms(2000), ms(0), ms(10000)),    // capped: a waiting load is never held past 10 s
            (ms(2000), ms(12000), ms(0)),    //
            (ms(90000), ms(9000), ms(1000)), // however slow the load
        ];
        for (load, residency, want) in table {
            assert_eq!(s.left(load, residency), want, "load {load:?}, resident {residency:?}");
        }
        assert_eq!(Shield::NONE.left(ms(5000), ms(0)), Duration::ZERO);
    }

    #[test]
    fn make_room_table() {
        let residents = [
            r("stale", 100, 600, false),
            shielded(r("fresh", 300, 0, false), 4),
            shielded(r("fresher", 200, 0, false), 9),
            r("pinned", 500, 9999, true),
        ];
        let evict = |v: &[&str]| Some(Room::Evict(v.iter().map(|s| s.to_string()).collect()));
        let wait = |m: &str, s: u64| Some(Room::Wait { model: m.into(), after: Duration::from_secs(s) });
        // (room MiB, releasing MiB, need MiB, decision)
        let table = [
            (200, 0, 150, evict(&[])),          // fits now
            (100, 100, 150, evict(&[])),        // fits once what is being unloaded is back
            (100, 0, 150, evict(&["stale"])),   // the unshielded one goes
            (100, 0, 250, wait("fresh", 4)),    // a shielded one must go (then not 'stale'): wait for it
            (100, 0, 600, wait("fresher", 9)),  // both: wait for the later shield
            (100, 0, 800, None),                // only the pinned one would do
            (100, 400, 600, evict(&["stale"])), // what comes back counts first
        ];
        for (room, releasing, need_mb, want) in table {
            assert_eq!(
                make_room(&residents, room * MB, releasing * MB, need_mb * MB),
                want,
                "room {room}, need {need_mb}"
            );
        }
    }

    #[test]
    fn under_contention_the_variant_that_unloads_least_is_chosen() {
        // A budget where an LLM, a small model and one OCR graph fit beside each other.
        let needs = [n("v6", 2, 480), n("v4", 1, 340)];
        let llm = r("llm", 380, 0, false);
        let minilm = r("minilm", 96, 30, false);
        // 423 MiB free: v4 fits beside both; v6 would unload the LLM.
        let (i, room, reason) = choose_room(&needs, 64 * MB, &[llm.clone(), minilm.clone()], 423 * MB, 0).unwrap();
        assert_eq!((needs[i].name.as_str(), room), ("v4", Room::Evict(vec![])), "{reason}");
        // An empty box: the best.
        assert_eq!(choose_room(&needs, 64 * MB, &[], 900 * MB, 0).unwrap().0, 0);
        // Both unload the same model: then the better one.
        let ocr = r("ocr", 480, 60, false);
        let (i, room, _) = choose_room(&needs, 64 * MB, &[ocr.clone(), llm.clone()], 100 * MB, 0).unwrap();
        assert_eq!((needs[i].name.as_str(), room), ("v6", Room::Evict(vec!["ocr".into()])));
        // The OCR graph was just loaded: wait for its shield rather than unload the LLM.
        let (i, room, reason) = choose_room(&needs, 64 * MB, &[shielded(ocr, 5), llm], 100 * MB, 0).unwrap();
        assert!(matches!(room, Room::Wait { ref model, .. } if model == "ocr"), "{room:?}");
        assert_eq!(needs[i].name, "v6", "equal waits: the better one");
        assert!(reason.contains("fits once 'ocr' has served its shield"), "{reason}");
        let err = choose_room(&needs, 64 * MB, &[], 100 * MB, 0).unwrap_err();
        assert!(err.contains("no variant fits in 100 MiB free") && err.contains("'v4' needs 340 MiB"), "{err}");
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
