//! models.json: parsing and validation of arbitrary text never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = inferd::registry::Registry::from_json(text, std::path::Path::new("/nonexistent/models.json"));
    }
});
