//! The configuration file: any TOML (or not) is a Config or a clear error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = inferd::config::Config::from_toml_str(text);
    }
});
