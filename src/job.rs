//! A job as the core sees it, transport-neutral: what comes in
//! ([`JobInput`] + [`JobOptions`]) and what goes back ([`JobOutput`] or an
//! [`InferError`](crate::error::InferError)). Front-ends translate to and from these.

use crate::backend::{BackendKind, NamedTensors};
use crate::tensor::TensorJson;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a client sends.
#[derive(Debug, Clone)]
pub enum JobInput {
    /// An encoded image (JPEG, PNG), for image tasks.
    Image(Vec<u8>),
    /// Named tensors, for the `raw` task.
    Tensors(NamedTensors),
    /// One or more texts, for text tasks.
    Text(Vec<String>),
    /// A prompt to continue, for `text-generation`.
    Generate(GenerateRequest),
}

/// The kinds of [`JobInput`], as a task states which it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Image,
    Tensors,
    Text,
    Prompt,
}

impl JobInput {
    /// Which kind of input this is.
    pub fn kind(&self) -> InputKind {
        match self {
            JobInput::Image(_) => InputKind::Image,
            JobInput::Tensors(_) => InputKind::Tensors,
            JobInput::Text(_) => InputKind::Text,
            JobInput::Generate(_) => InputKind::Prompt,
        }
    }
}

/// A text-generation request, as the OpenAI-style endpoints and MQTT give it.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: GenerationParams,
    /// Receives the text as it is generated, piece by piece; closed when the sequence ends.
    pub stream: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// How to generate: the settings every front-end takes under the same names
/// (OpenAI-style bodies, MQTT envelopes), declared once.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationParams {
    /// Most new tokens; default the model's `generation.max_tokens`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// 0 is greedy; default 1.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Sample from the `top_k` likeliest tokens only (0: all).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of tokens whose probability reaches `top_p`.
    #[serde(default)]
    pub top_p: Option<f32>,
    /// The same seed and settings give the same tokens.
    #[serde(default)]
    pub seed: Option<u64>,
    /// The text ends before the first of these: one string or a list.
    #[serde(default, deserialize_with = "one_or_many")]
    pub stop: Vec<String>,
    /// `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name": …, "schema": {…}}}`:
    /// a JSON answer is kept to by constrained decoding.
    #[serde(default)]
    pub response_format: Option<Box<serde_json::Value>>,
    /// Log-probabilities of the tokens: `true` (chat) or the number of
    /// likeliest alternatives to list with each (completions, 0..=20).
    #[serde(default, deserialize_with = "bool_or_count")]
    pub logprobs: Option<u8>,
    /// The likeliest alternatives listed with each token's log-probability (chat, 0..=20).
    #[serde(default)]
    pub top_logprobs: Option<u8>,
    /// The prompt comes back before the answer; with `logprobs`, its tokens
    /// are scored too (the first has none). `max_tokens` may then be 0.
    #[serde(default)]
    pub echo: bool,
}

/// `true`/`false`/`null` or a count: `true` is 0 alternatives, `false` and `null` none.
fn bool_or_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum BoolOrCount {
        Bool(bool),
        Count(u8),
    }
    Ok(match Option::<BoolOrCount>::deserialize(d)? {
        None | Some(BoolOrCount::Bool(false)) => None,
        Some(BoolOrCount::Bool(true)) => Some(0),
        Some(BoolOrCount::Count(n)) => Some(n),
    })
}

impl GenerationParams {
    /// Most alternatives listed with a token's log-probability.
    pub const MAX_TOP_LOGPROBS: usize = 20;

    /// How many alternatives go with each token's log-probability, when
    /// log-probabilities are asked for at all; refused past [`Self::MAX_TOP_LOGPROBS`].
    pub fn logprobs_wanted(&self) -> Result<Option<usize>, String> {
        let top = match (self.logprobs, self.top_logprobs) {
            (None, None) => return Ok(None),
            (_, Some(t)) | (Some(t), None) => usize::from(t),
        };
        if top > Self::MAX_TOP_LOGPROBS {
            return Err(format!("top_logprobs must be 0..={}", Self::MAX_TOP_LOGPROBS));
        }
        Ok(Some(top))
    }
}

/// One token's log-probability under the model (its raw logits, before
/// temperature and sampling), with the likeliest alternatives at its place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    /// The token's bytes (a token may hold part of a character).
    pub bytes: Vec<u8>,
    /// `None` for the prompt's first token: nothing precedes it.
    pub logprob: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// An alternative at a token's place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

/// The log-probabilities of a generation: the prompt's tokens (with `echo`) and the answer's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Logprobs {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt: Vec<TokenLogprob>,
    pub completion: Vec<TokenLogprob>,
}

/// One string or a list of strings, as a list (`null` is none).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// What to continue: plain text, or chat messages rendered by the model's template.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Chat(Vec<ChatMessage>),
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text(String::new())
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// Images in the message (OpenAI `image_url` parts), encoded as sent, each
    /// with the byte offset in `content` where it stood among the text.
    #[serde(skip)]
    pub images: Vec<(usize, Vec<u8>)>,
}

/// Why a sequence ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

/// Tokens a generation used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// `"text"` in a request: one text or a batch.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TextInput {
    One(String),
    Many(Vec<String>),
}

/// Per-request options.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobOptions {
    /// How many classes to return (classification); default from models.json.
    pub top_k: Option<usize>,
    /// The job's content digest, from intakes whose jobs come again after a
    /// death (MQTT): marks it running for the poison-job quarantine.
    #[serde(skip)]
    pub digest: Option<String>,
    /// Test hook (debug builds): the worker aborts the process when it runs this job.
    #[serde(skip)]
    pub crash_on_run: bool,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub queue_ms: f64,
    pub pre_ms: f64,
    pub infer_ms: f64,
    pub post_ms: f64,
}

/// One scored class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub score: f32,
}

/// One detected object: class, score and box `[x1, y1, x2, y2]` in the original image's pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// The task-specific answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum JobResult {
    /// `image-classification`: best classes first.
    Classification { classes: Vec<ClassScore> },
    /// `raw`: every output tensor by name.
    Tensors { outputs: BTreeMap<String, TensorJson> },
    /// `object-detection`: boxes, best first.
    Detections { detections: Vec<Detection> },
    /// `embedding`: one vector per text, in order.
    Embeddings { embeddings: Vec<Vec<f32>>, dimensions: usize },
    /// `document-fields`: a receipt's fields, and the OCR lines they were read from.
    Document { fields: DocumentFields, lines: Vec<TextLine> },
    /// `ocr`: text lines in reading order.
    Ocr { lines: Vec<TextLine> },
    /// `text-generation`: the text, why it ended, the token counts and the generated token ids.
    Generation {
        text: String,
        finish_reason: FinishReason,
        usage: Usage,
        tokens: Vec<u32>,
        /// When the request asked for them (`logprobs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        logprobs: Option<Box<Logprobs>>,
    },
    /// A task's own answer, as the JSON object it writes: a task added as one
    /// module answers with this when none of the shapes above is its answer.
    Other(serde_json::Map<String, serde_json::Value>),
}

/// One bought item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<u32>,
    pub price: f64,
}

/// The fields found on a receipt; `null` where not found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DocumentFields {
    pub store: Option<String>,
    /// ISO 8601 `YYYY-MM-DD`.
    pub date: Option<String>,
    /// `HH:MM` or `HH:MM:SS`.
    pub time: Option<String>,
    pub total: Option<f64>,
    pub subtotal: Option<f64>,
    pub tax: Option<f64>,
    /// ISO 4217 code.
    pub currency: Option<String>,
    pub items: Vec<Item>,
}

/// One line of text found in an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextLine {
    pub text: String,
    /// The recogniser's mean probability over the line's characters, 0..1.
    pub confidence: f32,
    /// Corners `[x, y]` in the original image's pixels: top-left, top-right, bottom-right, bottom-left.
    #[serde(rename = "box")]
    pub quad: [[f32; 2]; 4],
}

/// A finished job: which model, variant and engine answered, how long it took, and the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobOutput {
    pub model: String,
    pub variant: String,
    pub backend: BackendKind,
    pub provider: String,
    pub timings: Timings,
    /// How many jobs ran together in one engine call (dynamic batching); absent when alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    pub result: JobResult,
}

/// The JSON body of an infer request, as the socket API, MQTT and
/// `inferd infer` share it: exactly one of `image_base64` or `inputs`, plus options.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// An encoded image (JPEG, PNG), base64.
    #[serde(default)]
    pub image_base64: Option<String>,
    /// Named tensors for the `raw` task.
    #[serde(default)]
    pub inputs: Option<BTreeMap<String, TensorJson>>,
    /// Text (one or a batch) for text tasks.
    #[serde(default)]
    pub text: Option<TextInput>,
    /// Classes to return (classification).
    #[serde(default)]
    pub top_k: Option<usize>,
}

/// Parses a JSON infer request into a job, enforcing `limits` before anything big is built.
pub fn parse_json_request(
    bytes: &[u8],
    limits: &crate::config::Limits,
) -> Result<(JobInput, JobOptions), crate::error::InferError> {
    let request: InferRequest = serde_json::from_slice(bytes).map_err(|e| {
        crate::error::InferError::bad_input(format!(
            "invalid JSON request ({e}); expected {{\"image_base64\": \"...\"}}, {{\"inputs\": {{NAME: {{\"shape\", \"dtype\", \"data\"}}}}}} or {{\"text\": \"...\" | [\"...\"]}}, with optional \"top_k\""
        ))
    })?;
    request.into_job(limits)
}

/// The bytes of an `image_base64` field, within `limits.max_image_bytes`.
pub fn decode_image_base64(b64: &str, limits: &crate::config::Limits) -> Result<Vec<u8>, crate::error::InferError> {
    decode_base64_image(b64, limits, "image_base64")
}

/// Base64 image bytes within `limits.max_image_bytes` (the size checked before
/// decoding); `what` names the field in the error.
pub fn decode_base64_image(
    b64: &str,
    limits: &crate::config::Limits,
    what: &str,
) -> Result<Vec<u8>, crate::error::InferError> {
    use crate::error::InferError;
    use base64::Engine as _;
    if b64.len() / 4 * 3 > limits.max_image_bytes + 3 {
        return Err(InferError::bad_input(format!("the image is over the limit of {} bytes", limits.max_image_bytes)));
    }
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| InferError::bad_input(format!("{what} is not valid base64: {e}")))
}

impl InferRequest {
    /// The job this request asks for, enforcing `limits` before anything big is built.
    pub fn into_job(self, limits: &crate::config::Limits) -> Result<(JobInput, JobOptions), crate::error::InferError> {
        use crate::error::InferError;
        let options = JobOptions { top_k: self.top_k, ..Default::default() };
        let given =
            [self.image_base64.is_some(), self.inputs.is_some(), self.text.is_some()].iter().filter(|g| **g).count();
        if given != 1 {
            return Err(InferError::bad_input(if given == 0 {
                "the request has none of image_base64, inputs or text"
            } else {
                "give one of image_base64, inputs or text, not several"
            }));
        }
        let input = if let Some(b64) = self.image_base64 {
            JobInput::Image(decode_image_base64(&b64, limits)?)
        } else if let Some(inputs) = self.inputs {
            JobInput::Tensors(
                inputs
                    .into_iter()
                    .map(|(name, t)| {
                        crate::tensor::Tensor::from_json(&t, limits.max_tensor_elements)
                            .map(|tensor| (name.clone(), tensor))
                            .map_err(|e| InferError::bad_input(format!("input '{name}': {e}")))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        } else {
            match self.text {
                Some(TextInput::One(t)) => JobInput::Text(vec![t]),
                Some(TextInput::Many(ts)) => JobInput::Text(ts),
                None => unreachable!("counted above"),
            }
        };
        Ok((input, options))
    }
}

/// What a request body is: the one rule every front-end reads bodies by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A JSON request (`{"image_base64" | "inputs" | "text", ...}`, or an MQTT envelope).
    Json,
    /// Plain text, for a text task.
    Text,
    /// An encoded image (or bytes to try as one).
    Image,
}

impl Payload {
    /// What `bytes` are: by their declared media type when there is one
    /// (`application/json`, `text/plain`, anything else an image); without
    /// one, JSON when the first non-blank byte is `{`, else text when
    /// `text_task` (the model takes text), else an image.
    pub fn sniff(bytes: &[u8], declared: Option<&str>, text_task: bool) -> Payload {
        match declared.filter(|d| !d.is_empty()) {
            Some(d) if d.starts_with("application/json") => Payload::Json,
            Some(d) if d.starts_with("text/plain") => Payload::Text,
            Some(_) => Payload::Image,
            None if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') => Payload::Json,
            None if text_task => Payload::Text,
            None => Payload::Image,
        }
    }

    /// The media type to declare when sending `bytes` to the daemon: JPEG,
    /// PNG, JSON, UTF-8 text, or bytes.
    pub fn media_type(bytes: &[u8]) -> &'static str {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            "image/jpeg"
        } else if bytes.starts_with(b"\x89PNG") {
            "image/png"
        } else if Payload::sniff(bytes, None, false) == Payload::Json {
            "application/json"
        } else if std::str::from_utf8(bytes).is_ok() {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        }
    }

    /// The job in `bytes` read as this kind of payload: JSON parsed with
    /// `limits` enforced, text as one text, an image as its bytes.
    pub fn read(
        self,
        bytes: Vec<u8>,
        limits: &crate::config::Limits,
    ) -> Result<(JobInput, JobOptions), crate::error::InferError> {
        match self {
            Payload::Json => parse_json_request(&bytes, limits),
            Payload::Text => String::from_utf8(bytes)
                .map(|t| (JobInput::Text(vec![t]), JobOptions::default()))
                .map_err(|_| crate::error::InferError::bad_input("the text is not UTF-8")),
            Payload::Image => Ok((JobInput::Image(bytes), JobOptions::default())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_type_wins_and_without_one_the_bytes_and_the_task_decide() {
        let cases: [(&[u8], Option<&str>, bool, Payload); 8] = [
            (b"{}", Some("application/json; charset=utf-8"), false, Payload::Json),
            (b"hello", Some("text/plain"), false, Payload::Text),
            (b"{}", Some("image/jpeg"), false, Payload::Image),
            (b"  {\"text\": 1}", None, false, Payload::Json),
            (b"  {\"text\": 1}", Some(""), true, Payload::Json),
            (b"hello", None, true, Payload::Text),
            (b"hello", None, false, Payload::Image),
            (b"\xFF\xD8\xFF", None, false, Payload::Image),
        ];
        for (bytes, declared, text_task, want) in cases {
            assert_eq!(Payload::sniff(bytes, declared, text_task), want, "{bytes:?} {declared:?} {text_task}");
        }
        assert_eq!(Payload::media_type(b"\xFF\xD8\xFFx"), "image/jpeg");
        assert_eq!(Payload::media_type(b"{\"a\": 1}"), "application/json");
        assert_eq!(Payload::media_type(b"plain"), "text/plain; charset=utf-8");
        assert_eq!(Payload::media_type(b"\x00\xFE"), "application/octet-stream");
    }
}
