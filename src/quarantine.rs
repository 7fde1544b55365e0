//! Poison jobs: a job that kills the daemon is not run again after the
//! second time.
//!
//! A job that comes with a content digest (MQTT jobs: the broker delivers an
//! unacknowledged job again after a restart) is marked *running* in the state
//! directory — one empty file named by its digest under `running/` — before
//! the engine starts it, and unmarked when it ends. A daemon that dies leaves
//! its marks behind. At the next start each mark is a *strike* against its
//! digest; a digest with strikes from two deaths in a row is *poison*:
//! admission answers it with a typed `poison` error (on MQTT: on its reply
//! route, then acknowledged), it never reaches the engine again, and the
//! metric `inferd_poison_jobs_total` counts it. A job with one strike is a
//! *suspect*: it runs alone (no batch, no other sequence beside it), so the
//! second death, if it comes, is its own and strikes nobody else.
//!
//! Only deaths strike: a job that fails with an error is not marked at exit,
//! and a suspect that runs to its end (answered or failed) loses its strike.
//! Strikes of digests that were not running at the last death are dropped
//! (two deaths *in a row*); poison verdicts are kept (at most
//! [`MAX_POISON`], oldest first out).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Poison digests remembered across restarts, at most.
pub const MAX_POISON: usize = 1024;
/// Deaths in a row that make a job poison.
pub const STRIKES: u32 = 2;

/// A job's content digest (hex sha256 of what the client sent).
pub type Digest = String;

/// What the quarantine needs of a job, read from what its client sent: its
/// digest (its model and the bytes and properties it came with) and, in
/// tests, the crash hook. Every intake whose clients may send a job again
/// tags its jobs with it.
pub struct Tag {
    digest: Digest,
    crash: bool,
}

impl Tag {
    pub fn of(model: &str, payload: &[u8], properties: &[(String, String)]) -> Tag {
        Tag { digest: digest(model, payload, properties), crash: crash_requested(payload) }
    }

    /// Puts the tag on a job's options.
    pub fn apply(self, options: &mut crate::job::JobOptions) {
        (options.digest, options.crash_on_run) = (Some(self.digest), self.crash);
    }
}

/// The digest of a job: its model and the bytes and properties it came with.
pub fn digest(model: &str, payload: &[u8], properties: &[(String, String)]) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for part in [model.as_bytes(), payload] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (k, v) in properties {
        for part in [k.as_bytes(), v.as_bytes()] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    hex::encode(h.finalize())
}

/// What admission does with a job, from its strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Never seen at a death: runs as usual.
    Clean,
    /// Running at the last death: runs alone.
    Suspect,
    /// Running at two deaths in a row: refused.
    Poison,
}

/// The strikes after a death: each digest running at it gets one more than
/// it had, the others none; poison stays poison. Pure, for table tests.
pub fn strike(before: &BTreeMap<Digest, u32>, running: &[Digest]) -> BTreeMap<Digest, u32> {
    let mut after: BTreeMap<Digest, u32> =
        before.iter().filter(|&(_, &n)| n >= STRIKES).map(|(d, &n)| (d.clone(), n)).collect();
    for d in running {
        let n = before.get(d).copied().unwrap_or(0).saturating_add(1);
        after.insert(d.clone(), n.max(after.get(d).copied().unwrap_or(0)));
    }
    after
}

/// The verdict of a digest with `strikes`.
pub fn verdict(strikes: u32) -> Verdict {
    match strikes {
        0 => Verdict::Clean,
        n if n < STRIKES => Verdict::Suspect,
        _ => Verdict::Poison,
    }
}

/// The strike record of one daemon's state directory.
pub struct Quarantine {
    /// `state_dir/quarantine` (None: nothing is recorded, every job is clean).
    dir: Option<PathBuf>,
    strikes: Mutex<BTreeMap<Digest, u32>>,
}

impl Quarantine {
    /// Reads the marks a previous run left in `state_dir` (a death), turns them
    /// into strikes and clears them. A directory that cannot be written leaves
    /// quarantine off (logged), never the daemon down.
    pub fn open(state_dir: &Path) -> Quarantine {
        let dir = state_dir.join("quarantine");
        let running_dir = dir.join("running");
        if let Err(e) = std::fs::create_dir_all(&running_dir) {
            tracing::warn!(dir = %running_dir.display(), "poison-job quarantine is off: cannot create its directory: {e}");
            return Quarantine { dir: None, strikes: Mutex::default() };
        }
        let before: BTreeMap<Digest, u32> = std::fs::read(dir.join("strikes.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut running = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&running_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    running.push(name);
                }
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut after = strike(&before, &running);
        while after.len() > MAX_POISON {
            let oldest = after.keys().next().cloned().expect("not empty");
            after.remove(&oldest);
        }
        for d in &running {
            match verdict(after[d]) {
                Verdict::Poison => tracing::error!(
                    digest = %d,
                    "a job was running at {} deaths of the daemon in a row: it is poison and will be answered with an error, never run again",
                    after[d]
                ),
                _ => {
                    tracing::warn!(digest = %d, "a job was running when the daemon died; if it comes again it runs alone")
                }
            }
        }
        let q = Quarantine { dir: Some(dir), strikes: Mutex::new(after) };
        q.save();
        q
    }

    /// A record that marks nothing (no state directory).
    pub fn off() -> Quarantine {
        Quarantine { dir: None, strikes: Mutex::default() }
    }

    fn save(&self) {
        let Some(dir) = &self.dir else { return };
        let strikes = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = dir.join("strikes.json.part");
        let written = std::fs::write(&tmp, serde_json::to_vec(&*strikes).unwrap_or_default())
            .and_then(|()| std::fs::rename(&tmp, dir.join("strikes.json")));
        if let Err(e) = written {
            tracing::warn!("cannot write the poison-job record: {e}");
        }
    }

    /// What admission does with the job of `digest`.
    pub fn verdict(&self, digest: &str) -> Verdict {
        verdict(self.strikes.lock().unwrap_or_else(|e| e.into_inner()).get(digest).copied().unwrap_or(0))
    }

    /// Marks `digest` running until the returned guard drops (the job ended,
    /// answered or failed). A death before that leaves the mark. A suspect
    /// that ends loses its strike: the same content (a request sent again and
    /// again) is only poison when it is running at two deaths in a row *and*
    /// has not run to its end between them.
    pub fn running(self: &std::sync::Arc<Self>, digest: Option<&str>) -> Mark {
        let (path, d) = match (&self.dir, digest) {
            (Some(dir), Some(d)) => (dir.join("running").join(d), d),
            _ => return Mark { path: None, suspect: None },
        };
        let suspect = (self.verdict(d) == Verdict::Suspect).then(|| (self.clone(), d.to_string()));
        match std::fs::File::create(&path) {
            Ok(_) => Mark { path: Some(path), suspect },
            Err(e) => {
                tracing::warn!("cannot mark a job running: {e}");
                Mark { path: None, suspect }
            }
        }
    }

    /// A suspect ran to its end: its strike goes.
    fn cleared(&self, digest: &str) {
        let mut strikes = self.strikes.lock().unwrap_or_else(|e| e.into_inner());
        if strikes.get(digest).is_some_and(|&n| n < STRIKES) {
            strikes.remove(digest);
            drop(strikes);
            tracing::info!(digest, "a job that was running when the daemon died ran to its end: no longer a suspect");
            self.save();
        }
    }
}

/// A job marked running; unmarked when dropped (and, a suspect, cleared).
pub struct Mark {
    path: Option<PathBuf>,
    suspect: Option<(std::sync::Arc<Quarantine>, Digest)>,
}

impl Drop for Mark {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
        if let Some((q, d)) = self.suspect.take() {
            q.cleared(&d);
        }
    }
}

/// A test-only crash: in debug builds, with `TESTHOOK_INFERD_CRASH_ON` set, a
/// job whose payload contains its text is to abort the process when it runs
/// (as a stack overflow would), so tests can prove quarantine without a real
/// defect. Release builds never crash on purpose.
pub fn crash_requested(payload: &[u8]) -> bool {
    #[cfg(debug_assertions)]
    if let Ok(word) = std::env::var("TESTHOOK_INFERD_CRASH_ON")
        && !word.is_empty()
    {
        return payload.windows(word.len()).any(|w| w == word.as_bytes());
    }
    let _ = payload;
    false
}

/// Aborts the process (the test hook's crash).
pub fn crash_now() -> ! {
    tracing::error!("TESTHOOK_INFERD_CRASH_ON: aborting the process (test hook)");
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, u32)]) -> BTreeMap<Digest, u32> {
        pairs.iter().map(|(d, n)| (d.to_string(), *n)).collect()
    }

    /// (strikes before, digests running at the death, strikes after)
    type StrikeCase<'a> = (&'a [(&'a str, u32)], &'a [&'a str], &'a [(&'a str, u32)]);

    #[test]
    fn strikes_count_deaths_in_a_row_and_poison_stays() {
        let d = |s: &str| s.to_string();
        let table: &[StrikeCase] = &[
            (&[], &["a", "b"], &[("a", 1), ("b", 1)]),
            (&[("a", 1), ("b", 1)], &["a"], &[("a", 2)]), // b was not running at the second death: cleared
            (&[("a", 2)], &[], &[("a", 2)]),              // poison is remembered
            (&[("a", 2)], &["c"], &[("a", 2), ("c", 1)]),
            (&[("a", 1)], &[], &[]), // a clean stop between: not in a row
        ];
        for (before, running, after) in table {
            let running: Vec<Digest> = running.iter().map(|s| d(s)).collect();
            assert_eq!(strike(&map(before), &running), map(after), "{before:?} + {running:?}");
        }
        assert_eq!(
            [verdict(0), verdict(1), verdict(2), verdict(5)],
            [Verdict::Clean, Verdict::Suspect, Verdict::Poison, Verdict::Poison]
        );
    }

    #[test]
    fn marks_left_by_a_death_become_strikes_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let job = digest("llm", b"{\"prompt\":\"x\"}", &[]);
        assert_ne!(job, digest("llm", b"{\"prompt\":\"y\"}", &[]));
        assert_ne!(job, digest("llm", b"{\"prompt\":\"x\"}", &[("prompt".into(), "z".into())]));
        let open = || std::sync::Arc::new(Quarantine::open(dir.path()));
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Clean);
        drop(q.running(Some(&job))); // ran and ended: no mark
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Clean);
        std::mem::forget(q.running(Some(&job))); // died while it ran
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Suspect);
        std::mem::forget(q.running(Some(&job))); // and again
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Poison);
        let q = open(); // a clean restart keeps the verdict
        assert_eq!(q.verdict(&job), Verdict::Poison);
    }

    #[test]
    fn a_suspect_that_runs_to_its_end_is_cleared_so_a_repeated_request_is_not_poisoned_by_unrelated_deaths() {
        // A health check sent every few seconds is running at one death (an OOM kill, a power cut),
        // runs fine many times after, and is running again at the next death: not poison.
        let dir = tempfile::tempdir().unwrap();
        let open = || std::sync::Arc::new(Quarantine::open(dir.path()));
        let job = digest("color", b"same image", &[]);
        std::mem::forget(open().running(Some(&job))); // a death while it ran
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Suspect);
        drop(q.running(Some(&job))); // it ran to its end: cleared, also on disk
        assert_eq!(q.verdict(&job), Verdict::Clean);
        std::mem::forget(q.running(Some(&job))); // running at the next death
        let q = open();
        assert_eq!(q.verdict(&job), Verdict::Suspect, "one death in a row, not two");
    }
}
