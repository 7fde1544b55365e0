//! The socket API's JSON request → job (envelope, base64, tensor specs with
//! shape × dtype overflow, negative or huge dims) and the OpenAI-style bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = inferd::config::Limits::default();
    if let Ok((inferd::job::JobInput::Tensors(tensors), _)) = inferd::job::parse_json_request(data, &limits) {
        let elements: usize = tensors.iter().map(|(_, t)| t.data.len()).sum();
        assert!(elements <= limits.max_tensor_elements * tensors.len().max(1));
    }
    let limits = inferd::config::Limits::default();
    let _ = inferd::intake::openai::parse_request(data, false, &limits);
    let _ = inferd::intake::openai::parse_request(data, true, &limits);
});
