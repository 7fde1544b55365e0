//! Text into the tokenizer: chat messages through the template, then
//! tokenised and decoded back, as text generation does with a prompt.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static TOKENIZER: OnceLock<tokenizers::Tokenizer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tokenizer = TOKENIZER.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/generate/tokenizer.json");
        tokenizers::Tokenizer::from_file(path).unwrap()
    });
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(2, '\u{0}');
    let (role, content) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let messages = vec![inferd::job::ChatMessage { role: role.to_string(), content: content.to_string() }];
    if let Ok(prompt) = inferd::pipeline::ChatTemplate::default().render(&messages)
        && let Ok(encoding) = tokenizer.encode(prompt.as_str(), false)
    {
        let back = tokenizer.decode(encoding.get_ids(), false).unwrap();
        assert_eq!(back, prompt, "byte-level BPE gives the text back");
    }
});
