//! The fleet's state on disk, beside the models it manages
//! (`models.d/.fleet/`): the documents accepted, the generation applied (the
//! last good set), the one that failed, and a journal of a swap in progress,
//! so that a box killed in the middle of one comes back on its last good set.
//!
//! A swap (attempt number A, counting up on the box) moves each replaced or
//! removed model's folder `models.d/NAME` to `.fleet/keep/A/NAME` and each
//! staged one in; those kept folders are the way back, removed once
//! `keep_generations` newer swaps have been made. Renames only, each folder
//! synced, so a power cut leaves every name either before or after.

use super::doc::{Document, Layer, Merged};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the box knows of its desired state, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The last document accepted for each layer.
    pub layers: BTreeMap<Layer, Document>,
    /// The set applied and serving: the last good generation.
    pub applied: Merged,
    /// The generation that failed (it is not tried again until a newer one comes).
    pub failed: Option<Failure>,
    /// A swap under way: undone at the next start if the box died in it.
    pub applying: Option<Applying>,
    /// The set being applied (its [`super::doc::Merged::id`]) and how many
    /// times its apply began: left set only when the box died during one.
    pub trying: Option<(String, u32)>,
    /// Swaps made on this box: names the kept folders.
    pub swaps: u64,
}

/// Why a generation was rolled back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub generation: u64,
    /// The set that failed ([`super::doc::Merged::id`]): it is not tried again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub set: String,
    /// The model that failed, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `pull`, `network` (tried again), `digest`, `check`, `load`, `smoke_test`, `swap` or `interrupted`.
    pub stage: String,
    pub message: String,
}

/// A swap in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applying {
    pub generation: u64,
    /// The swap's number: its kept folders are `keep/SWAP/`.
    pub swap: u64,
    /// Models whose folders the swap moves.
    pub names: Vec<String>,
    /// Those of `names` that had a folder before the swap.
    pub replaced: Vec<String>,
}

/// The fleet's folder under `root` (`models.d`).
pub fn dir(root: &Path) -> PathBuf {
    root.join(".fleet")
}

fn state_file(root: &Path) -> PathBuf {
    dir(root).join("state.json")
}

/// Where swap number `n` keeps the folders it replaced.
pub fn keep_dir(root: &Path, n: u64) -> PathBuf {
    dir(root).join("keep").join(n.to_string())
}

/// Makes the renames in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The state saved under `root`, or an empty one.
pub fn load(root: &Path) -> State {
    match std::fs::read(state_file(root)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!("fleet state {} is unreadable ({e}); starting from none", state_file(root).display());
            State::default()
        }),
        Err(_) => State::default(),
    }
}

/// Saves `state` (written aside, synced, renamed over).
pub fn save(root: &Path, state: &State) -> Result<(), String> {
    use std::io::Write;
    let file = state_file(root);
    std::fs::create_dir_all(dir(root)).map_err(|e| format!("cannot create {}: {e}", dir(root).display()))?;
    let tmp = file.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(state).expect("the state serialises");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&text).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, &file))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    sync_dir(&dir(root));
    Ok(())
}

/// The journal entry for a swap of `names` (number `swap`): which of them have a folder now.
pub fn journal(root: &Path, generation: u64, swap: u64, names: &[String]) -> Applying {
    let replaced = names.iter().filter(|n| root.join(n).exists()).cloned().collect();
    Applying { generation, swap, names: names.to_vec(), replaced }
}

/// Moves the journal's folders aside into its keep folder and the staged
/// folders (`staged[name]`) in their place.
pub fn swap(root: &Path, a: &Applying, staged: &BTreeMap<String, PathBuf>) -> Result<(), String> {
    let keep = keep_dir(root, a.swap);
    std::fs::create_dir_all(&keep).map_err(|e| format!("cannot create {}: {e}", keep.display()))?;
    for name in &a.names {
        let live = root.join(name);
        if live.exists() {
            std::fs::rename(&live, keep.join(name))
                .map_err(|e| format!("cannot move {} aside: {e}", live.display()))?;
        }
        if let Some(from) = staged.get(name) {
            std::fs::rename(from, &live).map_err(|e| format!("cannot put {} in place: {e}", live.display()))?;
        }
    }
    sync_dir(&keep);
    sync_dir(root);
    Ok(())
}

/// Undoes [`swap`] of the journal `a`, wherever it stopped: each model's
/// folder as it was before. Safe to run again (a second run finds nothing to do).
pub fn undo(root: &Path, a: &Applying) {
    let keep = keep_dir(root, a.swap);
    for name in &a.names {
        let (live, kept) = (root.join(name), keep.join(name));
        if kept.exists() {
            // Moved aside: the new folder (if it got in) goes, the old one comes back.
            let _ = std::fs::remove_dir_all(&live);
            if let Err(e) = std::fs::rename(&kept, &live) {
                tracing::error!("fleet: cannot put {} back: {e}", live.display());
            }
        } else if a.replaced.contains(name) {
            // Had a folder that was never moved (or was put back already): it stays.
        } else if live.exists() {
            // New in this swap: it was not there before. Its files stay for a resumed pull.
            let staging = root.join(".pull").join(name);
            let _ = std::fs::remove_dir_all(&staging);
            if std::fs::create_dir_all(root.join(".pull")).and_then(|_| std::fs::rename(&live, &staging)).is_err() {
                let _ = std::fs::remove_dir_all(&live);
            }
        }
    }
    sync_dir(root);
    let _ = std::fs::remove_dir(&keep);
}

/// Before the registry is read at start: a swap the box died in is undone,
/// so the last good set serves. Returns the state.
pub fn recover(root: &Path) -> State {
    let mut state = load(root);
    if let Some(a) = state.applying.clone() {
        tracing::warn!(
            generation = a.generation,
            models = ?a.names,
            "fleet: the box stopped in the middle of applying generation {}; back to generation {}",
            a.generation,
            state.applied.generation
        );
        undo(root, &a);
        // Only once the folders are back does the journal go: a box killed in
        // the middle of this undo finds it again (and undo is safe to repeat).
        state.applying = None;
        if let Err(e) = save(root, &state) {
            tracing::error!("fleet: {e}");
        }
    }
    state
}

/// Removes kept folders but those of the newest `keep` generations, and staging left by failed pulls of models no longer wanted.
pub fn collect_garbage(root: &Path, keep: usize, wanted: &[String]) {
    let gens = swaps_kept(root);
    let drop = gens.len().saturating_sub(keep);
    for g in &gens[..drop] {
        let _ = std::fs::remove_dir_all(keep_dir(root, *g));
    }
    if let Ok(r) = std::fs::read_dir(root.join(".pull")) {
        for e in r.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !wanted.contains(&name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    crate::pull::remove_entry_downloads(root);
}

/// The kept folders of model `name`, newest first (files a pull may reuse).
pub fn kept(root: &Path, name: &str) -> Vec<PathBuf> {
    swaps_kept(root).into_iter().rev().map(|g| keep_dir(root, g).join(name)).filter(|p| p.is_dir()).collect()
}

/// The numbers of the swaps whose folders are kept, oldest first.
fn swaps_kept(root: &Path) -> Vec<u64> {
    let mut swaps: Vec<u64> = std::fs::read_dir(dir(root).join("keep"))
        .map(|r| r.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    swaps.sort_unstable();
    swaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(root: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("model.json"), text).unwrap();
    }

    #[test]
    fn a_swap_interrupted_is_undone_at_start_and_kept_folders_age_out() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        model(root, "a", "a1");
        model(root, "b", "b1");
        model(&root.join(".pull"), "a", "a2");
        model(&root.join(".pull"), "c", "c2");
        let staged: BTreeMap<String, PathBuf> =
            ["a", "c"].iter().map(|n| (n.to_string(), root.join(".pull").join(n))).collect();
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let a = journal(root, 7, 1, &names);
        assert_eq!(a.replaced, ["a", "b"]);
        let state = State { applying: Some(a.clone()), ..State::default() };
        save(root, &state).unwrap();
        swap(root, &a, &staged).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("a/model.json")).unwrap(), "a2");
        assert!(!root.join("b").exists() && root.join("c").exists());
        // Killed here: the next start puts generation 6's set back.
        let state = recover(root);
        assert!(state.applying.is_none());
        let again = recover(root);
        assert_eq!(again, state, "a second start finds nothing to undo");
        assert_eq!(std::fs::read_to_string(root.join("a/model.json")).unwrap(), "a1");
        assert_eq!(std::fs::read_to_string(root.join("b/model.json")).unwrap(), "b1");
        assert!(!root.join("c").exists() && root.join(".pull/c/model.json").exists());
        // Killed before the swap moved anything, or halfway: undo leaves what was not moved, twice over.
        model(&root.join(".pull"), "a", "a3");
        let half = journal(root, 8, 2, &names);
        std::fs::create_dir_all(keep_dir(root, 2)).unwrap();
        std::fs::rename(root.join("a"), keep_dir(root, 2).join("a")).unwrap();
        std::fs::rename(root.join(".pull/a"), root.join("a")).unwrap();
        undo(root, &half);
        undo(root, &half);
        assert_eq!(std::fs::read_to_string(root.join("a/model.json")).unwrap(), "a1");
        assert_eq!(std::fs::read_to_string(root.join("b/model.json")).unwrap(), "b1");
        // Kept folders: only the newest generations stay.
        for g in [3, 4, 5] {
            std::fs::create_dir_all(keep_dir(root, g).join("a")).unwrap();
        }
        assert_eq!(
            kept(root, "a"),
            [keep_dir(root, 5).join("a"), keep_dir(root, 4).join("a"), keep_dir(root, 3).join("a")]
        );
        collect_garbage(root, 2, &["a".into()]);
        assert_eq!(kept(root, "a"), [keep_dir(root, 5).join("a"), keep_dir(root, 4).join("a")]);
        assert!(!root.join(".pull/c").exists());
    }
}
