//! How much memory is really free, and what models really use.
//!
//! [`MemoryProbe`] reports the memory a new model may use: the system's
//! *available* memory (MemAvailable: free plus reclaimable page cache, not
//! MemFree), capped by the daemon's own cgroup limit (`memory.max` −
//! `memory.current` on cgroup v2, `memory.limit_in_bytes` −
//! `memory.usage_in_bytes` on v1) when there is one, e.g. under systemd's
//! `MemoryMax=`. On Jetson and Apple Silicon the GPU shares this memory, so the
//! system figure is the right one. [`Footprints`] keeps the measured memory of
//! each variant ever loaded on this box, in the state directory.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Reports the memory available for loading models.
pub trait MemoryProbe: Send + Sync {
    /// Bytes a new model may use now.
    fn available_bytes(&self) -> Result<u64, String>;
    /// One line saying where the figure comes from.
    fn describe(&self) -> String;
}

/// The real probe: sysinfo's available memory, capped by the cgroup limit.
pub struct SystemProbe {
    sys: Mutex<sysinfo::System>,
    cgroup_root: PathBuf,
}

impl Default for SystemProbe {
    fn default() -> Self {
        SystemProbe { sys: Mutex::new(sysinfo::System::new()), cgroup_root: PathBuf::from("/sys/fs/cgroup") }
    }
}

impl SystemProbe {
    fn system_available(&self) -> u64 {
        let mut sys = self.sys.lock().unwrap_or_else(|e| e.into_inner());
        sys.refresh_memory();
        sys.available_memory()
    }

    fn cgroup_room(&self) -> Option<u64> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        cgroup_room(&own, &self.cgroup_root)
    }
}

impl MemoryProbe for SystemProbe {
    fn available_bytes(&self) -> Result<u64, String> {
        let system = self.system_available();
        if system == 0 {
            return Err("the system reports no available memory figure".into());
        }
        Ok(self.cgroup_room().map_or(system, |room| room.min(system)))
    }

    fn describe(&self) -> String {
        let system = self.system_available();
        match self.cgroup_room() {
            Some(room) => format!(
                "{} MiB available (system {} MiB, cgroup room {} MiB)",
                mib(system.min(room)),
                mib(system),
                mib(room)
            ),
            None => format!("{} MiB available (system MemAvailable)", mib(system)),
        }
    }
}

/// Room left under this process's cgroup memory limit, from the text of
/// `/proc/self/cgroup` and the cgroup filesystem at `root`; `None` when unlimited.
pub fn cgroup_room(proc_self_cgroup: &str, root: &Path) -> Option<u64> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    for line in proc_self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            // cgroup v2: "0::/system.slice/inferd.service"
            let dir = root.join(rel);
            if let (Some(max), Some(current)) = (read(dir.join("memory.max")), read(dir.join("memory.current"))) {
                if max == "max" {
                    continue;
                }
                let (max, current) = (max.parse::<u64>().ok()?, current.parse::<u64>().ok()?);
                return Some(max.saturating_sub(current));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            // cgroup v1: "4:memory:/system.slice/inferd.service"
            let dir = root.join("memory").join(rel);
            if let (Some(limit), Some(usage)) =
                (read(dir.join("memory.limit_in_bytes")), read(dir.join("memory.usage_in_bytes")))
            {
                let (limit, usage) = (limit.parse::<u64>().ok()?, usage.parse::<u64>().ok()?);
                // v1 reports "no limit" as a huge number near i64::MAX.
                if limit >= (1u64 << 62) {
                    continue;
                }
                return Some(limit.saturating_sub(usage));
            }
        }
    }
    None
}

/// A probe whose figure the caller sets: for tests and for trying policies.
#[derive(Debug, Default)]
pub struct FakeProbe {
    bytes: AtomicU64,
}

impl FakeProbe {
    /// A probe reporting `mib` MiB available.
    pub fn new_mib(mib: u64) -> FakeProbe {
        FakeProbe { bytes: AtomicU64::new(mib << 20) }
    }

    /// Sets the reported figure to `mib` MiB.
    pub fn set_mib(&self, mib: u64) {
        self.bytes.store(mib << 20, Ordering::SeqCst);
    }
}

impl MemoryProbe for FakeProbe {
    fn available_bytes(&self) -> Result<u64, String> {
        Ok(self.bytes.load(Ordering::SeqCst))
    }

    fn describe(&self) -> String {
        format!("{} MiB available (fake probe)", mib(self.bytes.load(Ordering::SeqCst)))
    }
}

/// Bytes as whole MiB, rounded up.
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Sets the allocator up for a daemon that handles large, short-lived
/// buffers (request bodies, images, tensors): with glibc, allocations of 1 MiB
/// and more are mapped on their own and go back to the system when freed.
/// (glibc's default threshold rises with each large free, up to 32 MiB, after
/// which such buffers stay on the heap and RSS keeps the high-water mark.)
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is accepted or refused.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Gives memory freed on the heap back to the system (glibc keeps freed
/// pages of its arenas otherwise); called every few seconds by the daemon.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident set size of this process in bytes, from `/proc/self/statm`;
/// `None` where that file does not exist (not Linux).
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(resident_pages * u64::try_from(page).ok()?)
}

/// Measured memory of variants loaded on this box, kept in
/// `{state_dir}/footprints.json`, keyed by model, variant and the file's
/// sha256 (a new file is measured anew).
pub struct Footprints {
    file: Option<PathBuf>,
    figures: Mutex<BTreeMap<String, u64>>,
}

#[derive(Serialize, Deserialize, Default)]
struct FootprintFile {
    footprints: BTreeMap<String, u64>,
}

impl Footprints {
    /// Loads the figures from `state_dir` (none yet is fine; an unreadable file is logged and ignored).
    pub fn open(state_dir: Option<&Path>) -> Footprints {
        let file = state_dir.map(|d| d.join("footprints.json"));
        let figures = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|bytes| match serde_json::from_slice::<FootprintFile>(&bytes) {
                Ok(f) => Some(f.footprints),
                Err(e) => {
                    tracing::warn!("ignoring unreadable footprints.json: {e}");
                    None
                }
            })
            .unwrap_or_default();
        Footprints { file, figures: Mutex::new(figures) }
    }

    /// Figures are what a variant held after its first job (`/run`); earlier
    /// versions kept the growth while loading, far less, under the bare key.
    fn key(model: &str, variant: &str, sha256: &str) -> String {
        format!("{model}/{variant}/{sha256}/run")
    }

    /// The measured bytes of a variant, if it was ever loaded here.
    pub fn get(&self, model: &str, variant: &str, sha256: &str) -> Option<u64> {
        self.figures.lock().unwrap_or_else(|e| e.into_inner()).get(&Self::key(model, variant, sha256)).copied()
    }

    /// Records a measurement and saves the file (atomically: write then rename).
    pub fn record(&self, model: &str, variant: &str, sha256: &str, bytes: u64) {
        let snapshot = {
            let mut figures = self.figures.lock().unwrap_or_else(|e| e.into_inner());
            figures.insert(Self::key(model, variant, sha256), bytes);
            figures.clone()
        };
        let Some(file) = &self.file else { return };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = file.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&FootprintFile { footprints: snapshot })?)?;
            std::fs::rename(tmp, file)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %file.display(), "cannot save measured footprints: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_grows_when_memory_is_touched() {
        let before = process_rss_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = process_rss_bytes().unwrap();
        assert!(after >= before + (32 << 20), "before {before}, after {after}");
        drop(block);
    }

    #[test]
    fn cgroup_v2_and_v1_limits_give_the_room_left() {
        let root = tempfile::tempdir().unwrap();
        let v2 = root.path().join("system.slice/inferd.service");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "1073741824\n").unwrap();
        std::fs::write(v2.join("memory.current"), "268435456\n").unwrap();
        assert_eq!(cgroup_room("0::/system.slice/inferd.service\n", root.path()), Some(768 << 20));
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_room("0::/system.slice/inferd.service\n", root.path()), None);

        let v1 = root.path().join("memory/box");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "536870912").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "134217728").unwrap();
        assert_eq!(cgroup_room("4:memory:/box\n0::/\n", root.path()), Some(384 << 20));
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712").unwrap();
        assert_eq!(cgroup_room("4:memory:/box\n", root.path()), None);
    }

    #[test]
    fn footprints_survive_a_restart_and_are_keyed_by_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = Footprints::open(Some(dir.path()));
        f.record("mlp", "large", "abc", 12 << 20);
        let again = Footprints::open(Some(dir.path()));
        assert_eq!(again.get("mlp", "large", "abc"), Some(12 << 20));
        assert_eq!(again.get("mlp", "large", "def"), None, "another file is measured anew");
    }

    #[test]
    fn the_system_probe_reports_something_plausible() {
        let bytes = SystemProbe::default().available_bytes().unwrap();
        assert!(bytes > 16 << 20, "{bytes}");
    }
}
