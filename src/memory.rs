//! What memory this process uses, as the kernel counts it. (The memory-aware
//! model manager builds on this.)

/// Resident set size of this process in bytes, from `/proc/self/statm`;
/// `None` where that file does not exist (not Linux).
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(resident_pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rss_grows_when_memory_is_touched() {
        let before = super::process_rss_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        let after = super::process_rss_bytes().unwrap();
        assert!(after >= before + (32 << 20), "before {before}, after {after}");
        drop(block);
    }
}
