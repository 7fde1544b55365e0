//! The token chooser: one request's sampler and, when it asked for JSON,
//! its grammar, as one component (llama.cpp's `common_sampler`, mistral.rs's
//! sampler with its `llg` constraint). It sees logits and answers a token
//! that the grammar accepts; the generation loop knows neither.

use super::json::{Constraint, Grammar, TokenBytes};
use super::sample::{self, Sampler};
use crate::error::InferError;
use crate::job::GenerationParams;
use std::sync::Arc;

/// Tokens a greedy pick tries, likeliest first, before masking the whole vocabulary.
const GREEDY_TRIES: usize = 33;

/// Picks a request's tokens: sampling as it asked, kept to its grammar.
pub(super) struct Chooser {
    sampler: Sampler,
    grammar: Option<Constraint>,
}

impl Chooser {
    /// The chooser of a request with `params` and its compiled `response_format`.
    pub(super) fn new(params: &GenerationParams, grammar: Option<Arc<Grammar>>) -> Result<Chooser, InferError> {
        Ok(Chooser { sampler: Sampler::new(params)?, grammar: grammar.map(Constraint::new) })
    }

    /// True when the answer is kept to a grammar.
    pub(super) fn constrained(&self) -> bool {
        self.grammar.is_some()
    }

    /// The next token from `logits`, taken by the grammar. `vocab` (each
    /// token's bytes) is asked for only when there is a grammar.
    pub(super) fn choose<'v>(
        &mut self,
        logits: &[f32],
        vocab: impl FnOnce() -> &'v TokenBytes,
    ) -> Result<u32, InferError> {
        let Some(c) = self.grammar.as_mut() else { return Ok(self.sampler.pick(logits) as u32) };
        let vocab = vocab();
        let token = pick_allowed(c, &mut self.sampler, vocab, logits)?;
        if !c.accept(vocab, token) {
            return Err(InferError::internal("the picked token does not continue the JSON answer"));
        }
        Ok(token as u32)
    }

    /// True once the grammar's value is complete (the answer ends).
    pub(super) fn is_complete(&self) -> bool {
        self.grammar.as_ref().is_some_and(Constraint::is_done)
    }

    /// The text that closes a JSON value cut short by its token budget.
    pub(super) fn closing(&self) -> Option<String> {
        self.grammar.as_ref().filter(|c| !c.is_done()).map(Constraint::completion)
    }
}

/// Picks among the tokens that continue the JSON answer. Greedy decoding
/// tries the likeliest tokens first (usually the best is allowed); sampling,
/// and a greedy pick that finds none soon, masks the whole vocabulary.
fn pick_allowed(
    c: &mut Constraint,
    sampler: &mut Sampler,
    vocab: &TokenBytes,
    logits: &[f32],
) -> Result<usize, InferError> {
    if sampler.is_greedy() {
        let mut best = sample::argmax(logits);
        if c.allows(vocab, best) {
            return Ok(best);
        }
        let mut rest = logits.to_vec();
        for _ in 1..GREEDY_TRIES {
            rest[best] = f32::NEG_INFINITY;
            best = sample::argmax(&rest);
            if c.allows(vocab, best) {
                return Ok(best);
            }
        }
    }
    let masked: Vec<f32> =
        logits.iter().enumerate().map(|(t, &v)| if c.allows(vocab, t) { v } else { f32::NEG_INFINITY }).collect();
    if !masked.iter().any(|v| v.is_finite()) {
        return Err(InferError::internal("no token of the vocabulary continues the JSON answer"));
    }
    Ok(sampler.pick(&masked))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[&str]) -> TokenBytes {
        TokenBytes(pieces.iter().map(|p| Some(p.as_bytes().to_vec().into_boxed_slice())).collect())
    }

    fn greedy() -> GenerationParams {
        GenerationParams { temperature: Some(0.0), ..Default::default() }
    }

    #[test]
    fn without_a_grammar_it_samples_and_never_reads_the_vocabulary() {
        let mut c = Chooser::new(&greedy(), None).unwrap();
        assert!(!c.constrained());
        assert_eq!(c.choose(&[0.1, 2.0, 0.5], || unreachable!("no grammar, no vocabulary")).unwrap(), 1);
        assert!(!c.is_complete() && c.closing().is_none());
    }

    #[test]
    fn the_grammar_overrules_the_likeliest_token_and_closes_a_cut_answer() {
        let v = vocab(&["hello", "{", "}", "\"a\"", ":", "1", " "]);
        let grammar = Arc::new(Grammar::any_object());
        let mut c = Chooser::new(&greedy(), Some(grammar)).unwrap();
        assert!(c.constrained());
        // "hello" is likeliest but cannot open a JSON object: "{" is chosen.
        assert_eq!(c.choose(&[9.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0], || &v).unwrap(), 1);
        assert_eq!(c.choose(&[9.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0], || &v).unwrap(), 3);
        assert!(!c.is_complete());
        let closing = c.closing().unwrap();
        let text = format!("{{\"a\"{closing}");
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
        assert_eq!(c.choose(&[0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0], || &v).unwrap(), 4);
        assert_eq!(c.choose(&[9.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0], || &v).unwrap(), 5);
        assert_eq!(c.choose(&[9.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0], || &v).unwrap(), 2);
        assert!(c.is_complete() && c.closing().is_none());
    }

    #[test]
    fn sampling_is_kept_to_the_grammar_too() {
        let v = vocab(&["x", "{", "}"]);
        let params = GenerationParams { temperature: Some(1.0), seed: Some(7), ..Default::default() };
        for _ in 0..20 {
            let mut c = Chooser::new(&params, Some(Arc::new(Grammar::any_object()))).unwrap();
            assert_eq!(c.choose(&[5.0, 0.0, 5.0], || &v).unwrap(), 1, "only '{{' opens an object");
        }
    }
}
