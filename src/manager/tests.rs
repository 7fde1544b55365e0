//! The manager's books under loads, unloads, evictions and failures: the
//! regressions one by one, then a property test with random concurrent
//! operations (seeded, so a failure can be run again).

use super::*;
use crate::error::ErrorKind;
use crate::memory::FakeProbe;
use std::sync::Mutex;

const MB: u64 = 1 << 20;
const SHA: &str = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881";

/// (model, [(variant, quality, MiB)], pinned)
type Spec<'a> = (&'a str, &'a [(&'a str, u32, u64)], bool);

struct Fixture {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    manager: Manager,
}

impl Fixture {
    fn new(models: &[Spec<'_>], budget_mb: u64, headroom_mb: u64, shield: Shield) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"x").unwrap();
        let models: Vec<String> = models
            .iter()
            .map(|(name, variants, pin)| {
                let variants: Vec<String> = variants
                    .iter()
                    .map(|(v, q, mb)| {
                        format!(r#"{{"name":"{v}","file":"m.onnx","sha256":"{SHA}","quality":{q},"memory_mb":{mb}}}"#)
                    })
                    .collect();
                format!(r#"{{"name":"{name}","task":"raw","pin":{pin},"variants":[{}]}}"#, variants.join(","))
            })
            .collect();
        let json = format!(r#"{{"models":[{}]}}"#, models.join(","));
        let registry = Arc::new(Registry::from_json(&json, &dir.path().join("models.json")).unwrap());
        let cfg = MemoryConfig {
            budget_mb: Some(budget_mb),
            headroom_mb,
            state_dir: Some(dir.path().join("state")),
            ..Default::default()
        };
        let manager = Manager::new(cfg, Arc::new(FakeProbe::new_mib(1 << 20)), registry.clone()).with_shield(shield);
        Fixture { _dir: dir, registry, manager }
    }

    fn spec(&self, name: &str) -> ModelSpec {
        self.registry.get(name).unwrap().clone()
    }

    /// Reserves and loads `model` with no eviction expected; returns its charge.
    fn load(&self, model: &str) -> Charge {
        let (plan, charge) = self
            .manager
            .reserve_load(&self.spec(model), None, soon(), &mut |v| panic!("unexpected eviction of {v}"))
            .unwrap();
        let _ = self.manager.record_load(&charge, &self.spec(model), &plan.variant, None, ms(10));
        charge
    }

    fn charged(&self) -> Vec<(String, u64)> {
        self.manager.charges().into_iter().map(|(m, b)| (m, b / MB)).collect()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn owned(v: &[(&str, u64)]) -> Vec<(String, u64)> {
    v.iter().map(|(m, b)| (m.to_string(), *b)).collect()
}

const OCR: Spec = ("ocr", &[("v6", 2, 480), ("v4", 1, 340)], false);
const RECEIPT: Spec = ("receipt", &[("v6", 2, 480), ("v4", 1, 340)], false);
const MINILM: Spec = ("minilm", &[("int8", 1, 96)], false);
const LLM: Spec = ("llm", &[("fp32", 2, 700), ("int4", 1, 380)], false);

#[test]
fn a_model_loaded_again_while_its_old_worker_drains_keeps_its_charge() {
    // The reported drift: 'ocr' is unloaded (idle, or to make room) and its worker
    // finishes its queue; meanwhile a job starts a new worker, which loads it again.
    // When the old worker exits, the new load's charge stays.
    let f = Fixture::new(&[OCR, MINILM], 1200, 0, Shield::NONE);
    let old = f.load("ocr");
    let new = f.load("ocr");
    assert_eq!(f.charged(), owned(&[("ocr", 960)]), "both hold memory until the old one is gone");
    drop(old);
    assert_eq!(f.charged(), owned(&[("ocr", 480)]));
    drop(new);
    assert_eq!((f.charged(), f.manager.room().unwrap()), (vec![], 1200 * MB));
}

#[test]
fn a_second_load_of_a_model_waits_for_the_old_one_to_be_gone_when_both_do_not_fit() {
    let f = Arc::new(Fixture::new(&[OCR], 700, 0, Shield::NONE));
    let old = f.load("ocr");
    let g = f.clone();
    let started = Instant::now();
    let second = std::thread::spawn(move || {
        let (plan, charge) = g.manager.reserve_load(&g.spec("ocr"), None, soon(), &mut |_| {}).unwrap();
        (plan.variant, charge, started.elapsed())
    });
    std::thread::sleep(ms(100));
    assert_eq!(f.charged(), owned(&[("ocr", 480)]), "the second load holds nothing yet");
    drop(old);
    let (variant, charge, waited) = second.join().unwrap();
    assert_eq!(variant, "v6", "once the old one is gone, the best fits");
    assert!(waited >= ms(100), "{waited:?}");
    drop(charge);
    assert!(f.manager.ledger().is_empty());
}

#[test]
fn a_failed_load_leaves_nothing_on_the_books() {
    let f = Fixture::new(&[OCR, MINILM], 700, 16, Shield::NONE);
    let kept = f.load("minilm");
    let (_, charge) = f.manager.reserve_load(&f.spec("ocr"), None, soon(), &mut |_| {}).unwrap();
    assert_eq!(f.manager.used(), (96 + 480) * MB, "its room is held while it loads");
    drop(charge); // the engine refused the file
    assert_eq!(f.charged(), owned(&[("minilm", 96)]));
    drop(kept);
    assert_eq!(f.manager.room().unwrap(), 700 * MB);
}

#[test]
fn an_evicted_model_is_charged_until_its_sessions_are_gone_and_the_newcomer_waits_for_them() {
    let f = Arc::new(Fixture::new(&[OCR, RECEIPT, MINILM], 700, 16, Shield::NONE));
    let ocr = Arc::new(Mutex::new(Some(f.load("ocr"))));
    let minilm = f.load("minilm");
    let (g, victim) = (f.clone(), ocr.clone());
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    let receipt = std::thread::spawn(move || {
        g.manager
            .reserve_load(&g.spec("receipt"), None, soon(), &mut |v| seen.lock().unwrap().push(v.to_string()))
            .unwrap()
    });
    std::thread::sleep(ms(100));
    assert_eq!(*asked.lock().unwrap(), vec!["ocr".to_string()], "the least recently used that makes room");
    // The evicted worker still finishes its queue: still charged, and receipt holds nothing yet.
    assert_eq!(f.charged(), owned(&[("minilm", 96), ("ocr", 480)]));
    let stages: Vec<Stage> = f.manager.ledger().into_iter().map(|(_, e)| e.stage).collect();
    assert!(stages.contains(&Stage::Evicting) && stages.contains(&Stage::Waiting), "{stages:?}");
    drop(victim.lock().unwrap().take()); // its worker exits
    let (plan, charge) = receipt.join().unwrap();
    assert_eq!(plan.variant, "v6");
    assert_eq!(f.charged(), owned(&[("minilm", 96), ("receipt", 480)]));
    drop((charge, minilm));
}

#[test]
fn a_shielded_model_makes_the_newcomer_wait_then_gives_way() {
    let shield = Shield { factor: 0, floor: ms(300), cap: ms(300) };
    let f = Fixture::new(&[OCR, RECEIPT], 600, 0, shield);
    let ocr = Mutex::new(Some(f.load("ocr")));
    let plan = f.manager.plan_load(&f.spec("receipt"), None).unwrap();
    assert!(plan.wait.as_ref().is_some_and(|(m, _)| m == "ocr") && plan.evict.is_empty(), "{plan:?}");
    assert!(plan.reason.contains("fits once 'ocr' has served its shield"), "{}", plan.reason);
    let started = Instant::now();
    let (plan, charge) = f
        .manager
        .reserve_load(&f.spec("receipt"), None, soon(), &mut |v| {
            assert_eq!(v, "ocr");
            drop(ocr.lock().unwrap().take());
        })
        .unwrap();
    assert!(started.elapsed() >= ms(250), "evicted after its shield only: {:?}", started.elapsed());
    assert_eq!((plan.variant.as_str(), f.charged()), ("v6", owned(&[("receipt", 480)])));
    drop(charge);
}

#[test]
fn a_newcomer_whose_deadline_comes_first_gets_a_typed_error_naming_the_shielded_model() {
    let shield = Shield { factor: 0, floor: Duration::from_secs(30), cap: Duration::from_secs(30) };
    let f = Fixture::new(&[OCR, RECEIPT], 600, 0, shield);
    let _ocr = f.load("ocr");
    let started = Instant::now();
    let err = f
        .manager
        .reserve_load(&f.spec("receipt"), None, Instant::now() + ms(150), &mut |v| panic!("{v} evicted"))
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(err.kind, ErrorKind::Overloaded, "{err:?}");
    assert!(err.message.contains("'ocr' has served its shield") && err.message.contains("try again"), "{err:?}");
    assert_eq!(f.charged(), owned(&[("ocr", 480)]), "the refused load left nothing behind");
}

#[test]
fn a_load_that_fits_only_once_another_load_is_done_waits_for_it_instead_of_being_refused() {
    let f = Arc::new(Fixture::new(&[OCR, RECEIPT], 600, 0, Shield::NONE));
    let (plan, loading) = f.manager.reserve_load(&f.spec("ocr"), None, soon(), &mut |_| {}).unwrap();
    let g = f.clone();
    let receipt = std::thread::spawn(move || {
        g.manager.reserve_load(&g.spec("receipt"), None, soon(), &mut |v| assert_eq!(v, "ocr")).map(|(p, _)| p)
    });
    std::thread::sleep(ms(100));
    assert!(!receipt.is_finished(), "it waits while ocr loads");
    let _ = f.manager.record_load(&loading, &f.spec("ocr"), &plan.variant, None, ms(10));
    std::thread::sleep(ms(50));
    drop(loading); // evicted once loaded (no shield here): its worker exits
    assert_eq!(receipt.join().unwrap().unwrap().variant, "v6");
}

#[test]
fn loads_that_must_unload_others_take_their_turn_in_arrival_order() {
    let shield = Shield { factor: 0, floor: ms(200), cap: ms(200) };
    let f = Arc::new(Fixture::new(&[OCR, RECEIPT, LLM], 600, 0, shield));
    let ocr = Arc::new(Mutex::new(Some(f.load("ocr"))));
    let order = Arc::new(Mutex::new(Vec::new()));
    let start = |model: &'static str| {
        let (f, ocr, order) = (f.clone(), ocr.clone(), order.clone());
        std::thread::spawn(move || {
            let (_, charge) = f
                .manager
                .reserve_load(&f.spec(model), None, soon(), &mut |_| drop(ocr.lock().unwrap().take()))
                .unwrap();
            order.lock().unwrap().push(model);
            std::thread::sleep(ms(50));
            drop(charge);
        })
    };
    let first = start("llm"); // waits for ocr's shield
    std::thread::sleep(ms(30));
    let second = start("receipt");
    first.join().unwrap();
    second.join().unwrap();
    assert_eq!(*order.lock().unwrap(), vec!["llm", "receipt"]);
}

#[test]
fn beside_a_model_in_use_the_smaller_variant_is_taken_rather_than_unloading_it() {
    // 900 MiB: the LLM (int4) and minilm leave 424 MiB; ocr's v4 fits there, v6 would unload the LLM.
    let f = Fixture::new(&[OCR, LLM, MINILM], 900, 64, Shield::NONE);
    let (plan, llm) = f.manager.reserve_load(&f.spec("llm"), Some("int4"), soon(), &mut |_| {}).unwrap();
    let _ = f.manager.record_load(&llm, &f.spec("llm"), &plan.variant, None, ms(10));
    let _minilm = f.load("minilm");
    f.manager.touch("llm");
    let plan = f.manager.plan_load(&f.spec("ocr"), None).unwrap();
    assert_eq!((plan.variant.as_str(), plan.evict.len()), ("v4", 0), "{}", plan.reason);
}

#[test]
fn a_swap_under_a_budget_must_fit_beside_the_variant_it_replaces() {
    let f = Fixture::new(&[OCR], 800, 0, Shield::NONE);
    let (plan, small) = f.manager.reserve_load(&f.spec("ocr"), Some("v4"), soon(), &mut |_| {}).unwrap();
    let _ = f.manager.record_load(&small, &f.spec("ocr"), &plan.variant, None, ms(10));
    let err = f.manager.reserve_load(&f.spec("ocr"), Some("v6"), soon(), &mut |_| {}).unwrap_err();
    assert!(err.message.contains("needs 480 MiB and 460 MiB of memory.budget_mb = 800 are free"), "{err:?}");
    assert_eq!(f.charged(), owned(&[("ocr", 340)]));
}

#[test]
fn a_measure_over_the_need_unloads_idle_models_at_once_and_a_disturbed_one_is_not_taken() {
    let f = Fixture::new(&[OCR, MINILM], 700, 0, Shield::NONE);
    let minilm = f.load("minilm");
    let (plan, ocr) = f.manager.reserve_load(&f.spec("ocr"), None, soon(), &mut |_| {}).unwrap();
    assert!(f.manager.record_load(&ocr, &f.spec("ocr"), &plan.variant, Some(100 * MB), ms(10)).is_empty());
    // Its first job shows 650 MiB held: over the budget with minilm.
    assert_eq!(f.manager.record_run(&ocr, &f.spec("ocr"), 650 * MB), vec!["minilm".to_string()]);
    assert_eq!(f.charged(), owned(&[("minilm", 96), ("ocr", 650)]), "minilm holds until its worker is gone");
    drop((minilm, ocr));
    // Two loads at once: neither measure is taken; each is charged its need.
    let (plan, a) = f.manager.reserve_load(&f.spec("minilm"), None, soon(), &mut |_| {}).unwrap();
    let (_, b) = f.manager.reserve_load(&f.spec("ocr"), None, soon(), &mut |_| {}).unwrap();
    let _ = f.manager.record_load(&a, &f.spec("minilm"), &plan.variant, Some(500 * MB), ms(10));
    assert!(f.manager.record_run(&a, &f.spec("minilm"), 600 * MB).is_empty());
    assert_eq!(f.charged()[0], ("minilm".to_string(), 96));
    assert_eq!(f.manager.needs(&f.spec("minilm"))[0].bytes, 96 * MB, "the disturbed measure was not kept");
    drop((a, b));
}

/// A small xorshift generator: the property test needs no crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Sessions as the workers hold them: each with its footprint and its charge.
struct Held {
    model: String,
    footprint: u64,
    charge: Charge,
}

/// The property: what the books hold for loaded models (loaded, or being
/// unloaded) is exactly the sessions alive with their footprints, and all
/// that is held stays within the budget.
fn check(manager: &Manager, alive: &[Held], budget: u64, seed: u64) {
    let books = manager.ledger();
    let mut charged: Vec<(u64, u64)> = books
        .iter()
        .filter(|(_, e)| matches!(e.stage, Stage::Loaded | Stage::Evicting))
        .map(|(id, e)| (*id, e.bytes))
        .collect();
    let mut held: Vec<(u64, u64)> = alive.iter().map(|h| (h.charge.id(), h.footprint)).collect();
    charged.sort();
    held.sort();
    assert_eq!(charged, held, "seed {seed}: the books and the sessions alive differ");
    let holding: u64 = books.iter().filter(|(_, e)| e.stage.holds()).map(|(_, e)| e.bytes).sum();
    assert!(holding <= budget, "seed {seed}: {} MiB held over a {} MiB budget", holding / MB, budget / MB);
    let sum: u64 = alive.iter().map(|h| h.footprint).sum();
    let loaded: u64 = charged.iter().map(|(_, b)| b).sum();
    assert_eq!(loaded, sum, "seed {seed}: the charges are the footprints of what is loaded");
}

static LOADED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static EVICTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn churn(seed: u64) {
    const BUDGET: u64 = 1000;
    let models: [Spec; 6] = [
        OCR,
        RECEIPT,
        MINILM,
        LLM,
        ("color", &[("fp32", 1, 1)], false),
        ("pinned", &[("big", 2, 200), ("small", 1, 50)], true),
    ];
    let shield = Shield { factor: 2, floor: Duration::ZERO, cap: ms(4) };
    let f = Arc::new(Fixture::new(&models, BUDGET, 16, shield));
    let world: Arc<Mutex<Vec<Held>>> = Arc::default();
    let evictions: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let names: Vec<&'static str> = models.iter().map(|m| m.0).collect();
    // The scheduler's side: an eviction by name unloads that model's workers after they drain.
    let evictor = {
        let (world, evictions, done) = (world.clone(), evictions.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed ^ 0x9e37_79b9);
            while !done.load(std::sync::atomic::Ordering::SeqCst) || !evictions.lock().unwrap().is_empty() {
                let next = evictions.lock().unwrap().pop();
                match next {
                    Some(model) => {
                        std::thread::sleep(Duration::from_micros(rng.below(1500))); // its queue drains
                        world.lock().unwrap().retain(|h| h.model != model);
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let workers: Vec<_> = (0..6u64)
        .map(|t| {
            let (f, world, evictions) = (f.clone(), world.clone(), evictions.clone());
            let names = names.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ ((t + 1) * 0x1234_5678_9abc));
                for _ in 0..150 {
                    let model = names[rng.below(names.len() as u64) as usize];
                    let spec = f.spec(model);
                    match rng.below(100) {
                        // Load (sometimes a swap to a named variant), or fail to.
                        0..=49 => {
                            let requested = (rng.below(5) == 0)
                                .then(|| spec.variants[rng.below(spec.variants.len() as u64) as usize].name.clone());
                            let deadline = Instant::now() + ms(rng.below(150));
                            let mut evict = |v: &str| {
                                EVICTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                evictions.lock().unwrap().push(v.to_string())
                            };
                            let Ok((plan, charge)) =
                                f.manager.reserve_load(&spec, requested.as_deref(), deadline, &mut evict)
                            else {
                                REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                continue;
                            };
                            LOADED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            std::thread::sleep(Duration::from_micros(rng.below(2000))); // loading
                            if rng.below(6) == 0 {
                                drop(charge); // the load failed
                                continue;
                            }
                            let need = f.manager.needs(&spec).iter().find(|n| n.name == plan.variant).unwrap().bytes;
                            let mut alive = world.lock().unwrap();
                            let at_load = Some(rng.below(need + 1));
                            let load_time = Duration::from_micros(rng.below(3000));
                            let victims = f.manager.record_load(&charge, &spec, &plan.variant, at_load, load_time);
                            assert!(victims.is_empty(), "seed {seed}: no measure rose over its need");
                            alive.push(Held { model: model.to_string(), footprint: need, charge });
                        }
                        // A job runs: its first-run measure, and it is used.
                        50..=69 => {
                            let alive = world.lock().unwrap();
                            if let Some(h) = alive.iter().find(|h| h.model == model) {
                                let bytes = rng.below(h.footprint + 1);
                                assert!(f.manager.record_run(&h.charge, &spec, bytes).is_empty());
                                f.manager.touch(model);
                            }
                        }
                        // An unload (idle, asked for, a reload), one worker's sessions.
                        70..=84 => {
                            let mut alive = world.lock().unwrap();
                            if !alive.is_empty() {
                                let i = rng.below(alive.len() as u64) as usize;
                                alive.swap_remove(i);
                            }
                        }
                        _ => check(&f.manager, &world.lock().unwrap(), BUDGET * MB, seed),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    evictor.join().unwrap();
    check(&f.manager, &world.lock().unwrap(), BUDGET * MB, seed);
    world.lock().unwrap().clear();
    assert!(f.manager.ledger().is_empty(), "seed {seed}: {:?}", f.manager.ledger());
    assert_eq!(f.manager.room().unwrap(), BUDGET * MB);
}

#[test]
fn the_books_equal_the_loaded_footprints_under_random_concurrent_loads_unloads_evictions_and_failures() {
    let seeds: u64 = std::env::var("INFERD_LEDGER_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    for seed in 1..=seeds {
        churn(seed);
    }
    let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let (loads, evictions, refused) = (count(&LOADED), count(&EVICTED), count(&REFUSED));
    eprintln!("{seeds} seeds: {loads} loads reserved, {evictions} evictions, {refused} refused");
    assert!(loads > 100 * seeds && evictions > 10 * seeds && refused > 0, "the churn exercised too little");
}

#[test]
fn a_decoder_keeps_the_room_of_its_kv_cache_and_a_model_that_fits_only_in_it_must_evict_it() {
    // The 900 MiB churn: PP-OCR loaded beside a just-loaded LLM into the room of its KV
    // cache, and the chats were refused until the next turn. Here the tiny decoder (8 MiB,
    // and a KV cache of 128 positions) and a raw model of exactly the rest of the budget.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.onnx"), b"x").unwrap();
    let fixture = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/generate"));
    let raw: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture.join("models.json")).unwrap()).unwrap();
    let mut llm = raw["models"][0].clone();
    llm["name"] = "llm".into();
    llm["generation"]["tokenizer"] = fixture.join("tokenizer.json").display().to_string().into();
    llm["variants"][0]["file"] = fixture.join("tiny-decoder.onnx").display().to_string().into();
    let json = serde_json::json!({"models": [
        llm,
        {"name": "big", "task": "raw", "variants": [{"name": "v", "file": "m.onnx", "sha256": SHA, "memory_mb": 92}]}
    ]});
    let registry = Arc::new(Registry::from_json(&json.to_string(), &dir.path().join("models.json")).unwrap());
    let cfg = MemoryConfig {
        budget_mb: Some(100),
        headroom_mb: 0,
        state_dir: Some(dir.path().join("state")),
        ..Default::default()
    };
    let manager = Manager::new(cfg, Arc::new(FakeProbe::new_mib(1 << 20)), registry.clone()).with_shield(Shield::NONE);
    let spec = |m: &str| registry.get(m).unwrap().clone();
    let (plan, llm) = manager.reserve_load(&spec("llm"), None, soon(), &mut |v| panic!("evicted {v}")).unwrap();
    let _ = manager.record_load(&llm, &spec("llm"), &plan.variant, None, ms(10));
    let working = manager.working("llm");
    assert!(working > 0, "the decoder keeps room for its KV cache");
    assert_eq!(manager.room().unwrap(), 92 * MB - working, "the room left is the budget less its charge and that");
    assert_eq!(manager.room_for_work("llm").unwrap(), 92 * MB, "its own requests are admitted against it");
    // 8 + 92 MiB is the budget: 'big' would fit beside the decoder's charge, not beside its KV room.
    let evicted = Mutex::new(Vec::new());
    let big = std::thread::scope(|s| {
        let t = s.spawn(|| {
            manager.reserve_load(&spec("big"), None, soon(), &mut |v| evicted.lock().unwrap().push(v.to_string()))
        });
        while evicted.lock().unwrap().is_empty() && !t.is_finished() {
            std::thread::sleep(ms(5));
        }
        drop(llm); // the evicted decoder's sessions are gone
        t.join().unwrap()
    });
    assert_eq!(*evicted.lock().unwrap(), vec!["llm".to_string()], "the decoder is evicted, not squeezed");
    let (plan, charge) = big.unwrap();
    assert_eq!(plan.variant, "v");
    drop(charge);
    assert!(manager.ledger().is_empty());
}
