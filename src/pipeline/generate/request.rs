//! A generation request made ready before it queues (text-generation-
//! inference's validation, mistral.rs's `add_request`): the prompt rendered
//! by the chat template, tokenised, its length checked against the context,
//! `max_tokens` and the sampling settings checked, `response_format`
//! compiled and checked to fit. All of it runs at admission, on the decode
//! threads, and needs the tokenizer and the template only — not the model's
//! graphs — so a bad request is refused before any model loads
//! ([`super::GenerationTaskSpec`]'s spec preparer) and never costs the
//! model's worker.
//!
//! A prompt is typed chunks: text, and what a task embeds in it (an image's
//! views) with the text that stands for it. The whole prompt is tokenised at
//! once (as the reference does), and each embedded chunk learns the prompt
//! positions of its slot tokens from the tokens' byte offsets within its own
//! text, so the decoder's embedder is told where each item goes.

use super::choose::Chooser;
use super::json::{self, TokenBytes};
use super::template::{ChatTemplate, Content};
use super::{Attached, GenerationSpec};
use crate::error::InferError;
use crate::job::{GenerateRequest, JobInput, Prompt};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// A model's tokenizer, with each token's bytes read once when needed.
pub struct Lexicon {
    tokenizer: tokenizers::Tokenizer,
    vocab: OnceLock<TokenBytes>,
    longest: OnceLock<usize>,
}

impl Lexicon {
    /// Reads the tokenizer.json at `path`.
    pub fn load(path: &Path) -> Result<Lexicon, InferError> {
        let tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| InferError::unavailable(format!("cannot read tokenizer {}: {e}", path.display())))?;
        Ok(Lexicon { tokenizer, vocab: OnceLock::new(), longest: OnceLock::new() })
    }

    /// The id of `token` in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The text of `tokens` (special tokens included as the tokenizer spells them).
    pub(super) fn decode(&self, tokens: &[u32]) -> Result<String, InferError> {
        self.tokenizer.decode(tokens, false).map_err(|e| InferError::internal(format!("cannot decode the tokens: {e}")))
    }

    /// Each token's bytes (read on first use).
    pub(super) fn vocab(&self) -> &TokenBytes {
        self.vocab.get_or_init(|| TokenBytes::of(&self.tokenizer))
    }

    /// The longest token's bytes (a schema's fit is checked with it).
    fn longest(&self) -> usize {
        *self.longest.get_or_init(|| self.vocab().longest())
    }

    /// `text`'s tokens and each one's byte range in it.
    fn encode(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>), InferError> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| InferError::bad_input(format!("cannot tokenise the prompt: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }
}

/// A token's bytes in the prompt, from..to.
type Span = (usize, usize);

/// One piece of a prompt.
pub enum Chunk {
    Text(String),
    /// Something the decoder's embedder puts in the prompt (an image's
    /// views): `text` stands for it in the prompt, and the item's values
    /// replace the tokens of that text that are `slot`.
    Embedded {
        text: String,
        slot: u32,
        item: Attached,
    },
}

/// An embedded item with the prompt positions it fills, in order.
pub struct Placed {
    pub positions: Vec<usize>,
    pub item: Attached,
}

/// What sampling records of the tokens' log-probabilities, as asked.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scoring {
    /// Alternatives per token.
    pub top: usize,
    /// The prompt's tokens are scored too.
    pub echo: bool,
}

/// A request ready to start: what the generation loop needs and nothing to check.
pub struct Ready {
    pub(super) request: GenerateRequest,
    pub(super) tokens: Vec<u32>,
    pub(super) placed: Vec<Placed>,
    pub(super) max_tokens: usize,
    pub(super) stop: Vec<String>,
    pub(super) chooser: Chooser,
    pub(super) scoring: Option<Scoring>,
}

#[cfg(test)]
impl Ready {
    /// The prompt's tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The prompt positions each embedded item fills.
    pub fn placed(&self) -> &[Placed] {
        &self.placed
    }
}

/// Makes requests ready: the model's tokenizer, chat template and limits.
pub struct Admission {
    lexicon: Arc<Lexicon>,
    template: ChatTemplate,
    context_length: usize,
    max_tokens: usize,
    max_text_bytes: usize,
}

impl Admission {
    /// The admission of a model with `spec` (files relative to `dir`).
    pub fn new(spec: &GenerationSpec, dir: &Path, max_text_bytes: usize) -> Result<Admission, InferError> {
        let lexicon = Arc::new(Lexicon::load(&dir.join(&spec.tokenizer))?);
        let template = ChatTemplate::load(spec.chat_template.as_ref(), spec.chat_stop.as_deref(), dir)?;
        Ok(Admission {
            lexicon,
            template,
            context_length: spec.context_length,
            max_tokens: spec.max_tokens,
            max_text_bytes,
        })
    }

    /// The tokenizer (shared with the generation loop).
    pub fn lexicon(&self) -> &Arc<Lexicon> {
        &self.lexicon
    }

    /// Refuses a prompt over `limits.max_text_bytes`, as the client wrote it
    /// (before the tokens a task adds for images).
    pub fn within_text_limit(&self, prompt: &str) -> Result<(), InferError> {
        if prompt.len() > self.max_text_bytes {
            return Err(InferError::bad_input(format!(
                "the prompt is {} bytes, over the limit of {}",
                prompt.len(),
                self.max_text_bytes
            )));
        }
        Ok(())
    }

    /// The chat's prompt through the template, `content` as the template reads it.
    pub fn render(&self, messages: &[crate::job::ChatMessage], content: Content) -> Result<String, InferError> {
        self.template.render(messages, content)
    }

    /// A text model's request ready to start.
    pub fn text(&self, request: GenerateRequest) -> Result<Ready, InferError> {
        let (prompt, chat) = match &request.prompt {
            Prompt::Text(t) => (t.clone(), false),
            Prompt::Chat(messages) if messages.iter().any(|m| !m.images.is_empty()) => {
                return Err(InferError::bad_input(
                    "this is a text-generation model: it reads no images (send them to a vision-language model)",
                ));
            }
            Prompt::Chat(messages) => (self.render(messages, Content::Text)?, true),
        };
        self.within_text_limit(&prompt)?;
        self.ready(request, vec![Chunk::Text(prompt)], chat)
    }

    /// `request` ready to start on the prompt `chunks` (a chat when `chat`:
    /// the template's stop strings apply).
    pub fn ready(&self, request: GenerateRequest, chunks: Vec<Chunk>, chat: bool) -> Result<Ready, InferError> {
        let grammar = self.response_format(&request)?;
        let max_tokens = self.max_tokens(&request)?;
        let chooser = Chooser::new(&request.params, grammar)?;
        let scoring = request
            .params
            .logprobs_wanted()
            .map_err(InferError::bad_input)?
            .map(|top| Scoring { top, echo: request.params.echo });
        let mut text = String::new();
        let mut spans = Vec::new();
        for chunk in chunks {
            match chunk {
                Chunk::Text(t) => text.push_str(&t),
                Chunk::Embedded { text: t, slot, item } => {
                    spans.push((text.len(), text.len() + t.len(), slot, item));
                    text.push_str(&t);
                }
            }
        }
        if text.is_empty() {
            return Err(InferError::bad_input("the prompt is empty"));
        }
        let (tokens, offsets) = self.lexicon.encode(&text)?;
        if tokens.is_empty() {
            return Err(InferError::bad_input("the prompt has no tokens"));
        }
        let context = self.context_length;
        if tokens.len() >= context {
            return Err(InferError::bad_input(format!(
                "the prompt is {} tokens; the model's context holds {context}, and at least one must be left to generate",
                tokens.len()
            )));
        }
        let placed = spans
            .into_iter()
            .map(|(start, end, slot, item)| Placed { positions: positions(&tokens, &offsets, start..end, slot), item })
            .collect();
        let mut stop = request.params.stop.clone();
        if chat && !chooser.constrained() {
            stop.extend(self.template.stop.iter().cloned());
        }
        Ok(Ready { request, tokens, placed, max_tokens, stop, chooser, scoring })
    }

    /// Compiles the `response_format` of `request` and checks it against the
    /// request: no stop strings with a JSON format, and a schema whose values
    /// can be closed within `max_tokens`.
    fn response_format(&self, request: &GenerateRequest) -> Result<Option<Arc<json::Grammar>>, InferError> {
        let Some(format) = &request.params.response_format else { return Ok(None) };
        let Some(grammar) = json::parse_response_format(format).map_err(InferError::bad_input)? else {
            return Ok(None);
        };
        if request.params.stop.iter().any(|s| !s.is_empty()) {
            return Err(InferError::bad_input(
                "stop strings do not go with a JSON response_format: the answer ends when its JSON value closes",
            ));
        }
        grammar.fits(self.max_tokens(request)?, self.lexicon.longest()).map_err(InferError::bad_input)?;
        Ok(Some(Arc::new(grammar)))
    }

    /// The request's `max_tokens`, or the model's default; refused past the model's limit.
    fn max_tokens(&self, request: &GenerateRequest) -> Result<usize, InferError> {
        let max_tokens = request.params.max_tokens.unwrap_or(self.max_tokens);
        // 0 only to score a prompt (echo): nothing is generated.
        let least = usize::from(!request.params.echo);
        if max_tokens < least || max_tokens > self.max_tokens {
            return Err(InferError::bad_input(format!("max_tokens must be {least}..={}", self.max_tokens)));
        }
        Ok(max_tokens)
    }
}

/// Positions of the tokens that are `slot` and lie within `span` (bytes of the prompt).
fn positions(tokens: &[u32], offsets: &[Span], span: std::ops::Range<usize>, slot: u32) -> Vec<usize> {
    let inside = |&(a, b): &Span| a >= span.start && b <= span.end;
    (0..tokens.len()).filter(|&i| tokens[i] == slot && offsets.get(i).is_some_and(inside)).collect()
}

/// The generation request in a job: a prompt from the OpenAI-style
/// endpoints, or one plain text (`inferd infer --text`, the native API) with the model's defaults.
pub fn request_of(input: JobInput) -> Result<GenerateRequest, InferError> {
    match input {
        JobInput::Generate(request) => Ok(request),
        JobInput::Text(mut texts) if texts.len() == 1 => {
            Ok(GenerateRequest { prompt: Prompt::Text(texts.remove(0)), ..Default::default() })
        }
        _ => {
            Err(InferError::bad_input("text-generation takes one prompt: POST /v1/completions or /v1/chat/completions"))
        }
    }
}

/// A text model's preparer: a job's request made [`Ready`], on the decode threads.
pub(super) struct ReadRequest(pub Arc<Admission>);

impl super::Prepare for ReadRequest {
    fn prepare(&self, input: JobInput) -> Result<super::Prepared, InferError> {
        Ok(super::Prepared::new(self.0.text(request_of(input)?)?))
    }

    fn off_worker(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_embedded_item_fills_only_its_own_slot_tokens() {
        // tokens: text "a<s>" | embedded "<s><s>x<s>" | text "<s>"
        let tokens = [1, 9, 9, 9, 2, 9, 9];
        let offsets = [(0, 1), (1, 4), (4, 7), (7, 10), (10, 11), (11, 14), (14, 17)];
        assert_eq!(positions(&tokens, &offsets, 4..14, 9), [2, 3, 5]);
        assert_eq!(positions(&tokens, &offsets, 4..14, 2), [4]);
        assert!(positions(&tokens, &offsets, 0..0, 9).is_empty());
    }
}
