//! An MQTT payload: raw image bytes or a JSON envelope (ids, reply routes,
//! images, tensors, texts, prompts) becomes a job or a typed error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = inferd::config::Limits::default();
    let _ = inferd::intake::mqtt::parse_job(data, &limits, 1 << 20);
});
