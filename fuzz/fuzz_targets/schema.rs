//! A `response_format` schema: compiled within its limits or refused with a
//! reason, then an answer read byte by byte and closed by the completion,
//! which must parse. No input may recurse the stack, take unbounded memory or
//! time, or panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The schema first, then (after a NUL) the start of an answer to read.
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (schema, answer) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    let Ok(schema) = serde_json::from_slice::<serde_json::Value>(schema) else { return };
    let format = serde_json::json!({"type": "json_schema", "json_schema": {"name": "f", "schema": schema}});
    let Ok(Some(grammar)) = inferd::pipeline::parse_response_format(&format) else { return };
    if grammar.fits(4096, 16).is_err() {
        return;
    }
    let mut state = grammar.start();
    let mut read = Vec::new();
    for &b in answer {
        let mut next = state.clone();
        if next.feed(&grammar, &[b]) {
            state = next;
            read.push(b);
        }
    }
    let whole = [read, state.completion(&grammar)].concat();
    let mut done = grammar.start();
    assert!(done.feed(&grammar, &whole) && done.is_done(), "the completion closes the value");
    // Checked as JSON text (IgnoredAny): serde_json's Value reads an object whose key is
    // "$serde_json::private::RawValue" as its raw-value marker and refuses valid JSON.
    serde_json::from_slice::<serde::de::IgnoredAny>(&whole).expect("a closed answer parses");
});
