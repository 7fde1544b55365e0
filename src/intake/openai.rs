//! OpenAI-compatible text generation on the socket: `POST /v1/completions`
//! and `POST /v1/chat/completions`, requests and answers shaped as OpenAI's
//! (model, choices, finish_reason, usage), with `"stream": true` answered as
//! server-sent events (`data: {chunk}` … `data: [DONE]`). Fields OpenAI
//! clients send that inferd has no use for (`user`, penalties) are ignored;
//! ones it cannot honour (`n` > 1) are refused.

use super::http::{AppState, error_response, read_body};
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{
    ChatMessage, FinishReason, GenerateRequest, GenerationParams, JobInput, JobOptions, JobOutput, JobResult, Prompt,
};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

/// One text or a list of them (OpenAI allows both for `prompt` and `stop`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// What both endpoints share.
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(flatten)]
    params: GenerationParams,
    /// The newer name of `max_tokens` (chat).
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[serde(flatten)]
    common: Common,
    prompt: OneOrMany,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[serde(flatten)]
    common: Common,
    messages: Vec<WireMessage>,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

/// A message's text, and its images (each with where it stood in the text);
/// an http(s) image is left empty and its URL put in `fetches` (with the
/// message's index `message`), to be fetched before the job is queued.
fn content_of(
    c: Option<Content>,
    limits: &Limits,
    seen: &mut usize,
    message: usize,
    fetches: &mut Vec<PendingImage>,
) -> Result<ChatMessageParts, InferError> {
    let mut text = String::new();
    let mut images = Vec::new();
    match c {
        None => {}
        Some(Content::Text(t)) => text = t,
        Some(Content::Parts(parts)) => {
            for p in &parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => text.push_str(
                        p.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| InferError::bad_input("a text part needs \"text\""))?,
                    ),
                    Some("image_url") => {
                        *seen += 1;
                        if *seen > limits.max_images_per_request {
                            return Err(InferError::bad_input(format!(
                                "more than {} images in one request (limits.max_images_per_request)",
                                limits.max_images_per_request
                            )));
                        }
                        // {"image_url": {"url": "..."}} as OpenAI sends it; a bare string too.
                        let url = match p.get("image_url") {
                            Some(Value::String(u)) => u.as_str(),
                            Some(v) => v.get("url").and_then(Value::as_str).unwrap_or(""),
                            None => "",
                        };
                        let bytes = if url.starts_with("http://") || url.starts_with("https://") {
                            fetches.push(PendingImage {
                                message,
                                image: images.len(),
                                number: *seen,
                                url: url.to_string(),
                            });
                            Vec::new()
                        } else {
                            image_bytes(url, limits)
                                .map_err(|e| InferError::bad_input(format!("image {}: {}", *seen, e.message)))?
                        };
                        images.push((text.len(), bytes));
                    }
                    kind => {
                        return Err(InferError::bad_input(format!(
                            "message content part of type {} is not supported (text, image_url)",
                            kind.unwrap_or("(none)")
                        )));
                    }
                }
            }
        }
    }
    Ok((text, images))
}

type ChatMessageParts = (String, Vec<(usize, Vec<u8>)>);

/// An http(s) image of a chat request, fetched before the job is queued.
#[derive(Debug, Clone)]
pub struct PendingImage {
    /// Its message and its place among the message's images.
    message: usize,
    image: usize,
    /// Its number in the request, for errors (`image 2: ...`).
    number: usize,
    url: String,
}

/// An OpenAI-style request as read from its body.
#[derive(Debug)]
pub struct OpenAiRequest {
    pub model: String,
    pub request: GenerateRequest,
    pub stream: bool,
    /// Images still to fetch (http(s) URLs).
    pub fetches: Vec<PendingImage>,
}

impl OpenAiRequest {
    /// Fetches the request's http(s) images (limits.image_fetch), all at once.
    pub async fn fetch_images(&mut self, limits: &Limits) -> Result<(), InferError> {
        let fetches = std::mem::take(&mut self.fetches);
        let got =
            futures_util::future::join_all(fetches.iter().map(|f| super::fetch::fetch(&f.url, &limits.image_fetch)))
                .await;
        let Prompt::Chat(messages) = &mut self.request.prompt else { return Ok(()) };
        for (f, bytes) in fetches.iter().zip(got) {
            let bytes = bytes.map_err(|e| InferError::bad_input(format!("image {}: {}", f.number, e.message)))?;
            if let Some(slot) = messages.get_mut(f.message).and_then(|m| m.images.get_mut(f.image)) {
                slot.1 = bytes;
            }
        }
        Ok(())
    }
}

/// The bytes of an `image_url`: a `data:image/...;base64,` URL, or a
/// `file://` path under one of `limits.image_dirs` (http(s): [`OpenAiRequest::fetch_images`]).
fn image_bytes(url: &str, limits: &Limits) -> Result<Vec<u8>, InferError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (header, data) = rest.split_once(',').ok_or_else(|| InferError::bad_input("the data URL has no ','"))?;
        let media = header
            .strip_suffix(";base64")
            .ok_or_else(|| InferError::bad_input("the data URL is not base64 (data:image/png;base64,...)"))?;
        if !media.starts_with("image/") {
            return Err(InferError::bad_input(format!("the data URL holds '{media}', not an image")));
        }
        return crate::job::decode_base64_image(data, limits, "the data URL");
    }
    if let Some(path) = url.strip_prefix("file://") {
        if limits.image_dirs.is_empty() {
            return Err(InferError::bad_input(
                "file:// images are read only from the directories in limits.image_dirs, and none is configured",
            ));
        }
        // One answer for a path outside the directories, whether it exists
        // or not (and for one that does not exist inside them): the error
        // tells nothing about files the client may not read.
        let refused = || {
            InferError::bad_input(format!(
                "{path} is not under a directory of limits.image_dirs, or is not a file there"
            ))
        };
        let real = std::fs::canonicalize(path).map_err(|_| refused())?;
        let allowed =
            limits.image_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| real.starts_with(d));
        if !allowed || !real.is_file() {
            return Err(refused());
        }
        let size = std::fs::metadata(&real).map(|m| m.len() as usize).unwrap_or(0);
        if size > limits.max_image_bytes {
            return Err(InferError::bad_input(format!(
                "it is {size} bytes, over the limit of {} (limits.max_image_bytes)",
                limits.max_image_bytes
            )));
        }
        return std::fs::read(&real).map_err(|e| InferError::bad_input(format!("cannot read {path}: {e}")));
    }
    Err(InferError::bad_input(if url.is_empty() {
        "an image_url part needs {\"image_url\": {\"url\": ...}}".to_string()
    } else {
        format!("'{}' is not a data:, file:// or http(s) URL", url.chars().take(40).collect::<String>())
    }))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// `POST /v1/completions`.
pub async fn completions(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(app, headers, body, Kind::Completion).await
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(app): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    answer(app, headers, body, Kind::Chat).await
}

async fn answer(app: AppState, headers: HeaderMap, body: Body, kind: Kind) -> Response {
    let parsed = read_body(&app, body, &headers).await.and_then(|(b, _room)| {
        let r = parse_request(&b, kind == Kind::Chat, &app.limits)?;
        // The content digest marks the job running for the poison-job quarantine.
        let path = if kind == Kind::Chat { "chat" } else { "completions" };
        let mut options = JobOptions::default();
        crate::quarantine::Tag::of(&r.model, &b, &[("endpoint".into(), path.into())]).apply(&mut options);
        Ok((r, options))
    });
    match parsed {
        Ok((r, options)) => run(app, kind, r, options).await,
        Err(e) => error_response(&e),
    }
}

/// Reads an OpenAI-style body (`chat`: messages, else a prompt): the model
/// named, the generation request, whether to stream, and the images to fetch.
pub fn parse_request(bytes: &[u8], chat: bool, limits: &Limits) -> Result<OpenAiRequest, InferError> {
    let invalid = |e: serde_json::Error| InferError::bad_input(format!("invalid request: {e}"));
    let mut fetches = Vec::new();
    let (c, prompt) = if chat {
        let b: ChatBody = serde_json::from_slice(bytes).map_err(invalid)?;
        if b.messages.is_empty() {
            return Err(InferError::bad_input("messages is empty"));
        }
        let mut seen = 0;
        let messages = b
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let (content, images) = content_of(m.content, limits, &mut seen, i, &mut fetches)?;
                Ok(ChatMessage { role: m.role, content, images })
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        (b.common, Prompt::Chat(messages))
    } else {
        let b: CompletionBody = serde_json::from_slice(bytes).map_err(invalid)?;
        let prompt = match b.prompt {
            OneOrMany::One(p) => p,
            OneOrMany::Many(mut ps) if ps.len() == 1 => ps.remove(0),
            OneOrMany::Many(_) => {
                return Err(InferError::bad_input("give one prompt; a list of prompts is not supported"));
            }
        };
        (b.common, Prompt::Text(prompt))
    };
    if c.n.is_some_and(|n| n != 1) {
        return Err(InferError::bad_input("n must be 1: one choice per request"));
    }
    if c.params.stop.len() > 4 {
        return Err(InferError::bad_input("at most 4 stop strings"));
    }
    if chat && c.params.echo {
        return Err(InferError::bad_input("echo is for /v1/completions"));
    }
    c.params.logprobs_wanted().map_err(InferError::bad_input)?;
    if c.stream && (c.params.logprobs.is_some() || c.params.top_logprobs.is_some()) {
        return Err(InferError::bad_input("logprobs come with whole answers: ask without stream"));
    }
    let mut params = c.params;
    params.max_tokens = params.max_tokens.or(c.max_completion_tokens);
    let request = GenerateRequest { prompt, params, stream: None };
    Ok(OpenAiRequest { model: c.model, request, stream: c.stream, fetches })
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks the request against the model, submits it, and answers whole or as a stream.
async fn run(app: AppState, kind: Kind, mut r: OpenAiRequest, options: JobOptions) -> Response {
    let engine = app.scheduler.engine();
    let Some(spec) = engine.registry().get(&r.model) else {
        return error_response(&InferError::unknown_model(&r.model));
    };
    if !spec.task.takes().0.contains(&crate::job::InputKind::Prompt) {
        return error_response(&InferError::bad_input(format!(
            "model '{}' is a {} model; this endpoint needs a text-generation or vision-language model",
            r.model,
            spec.task.task()
        )));
    }
    // The task's own checks (a response_format, images for a model that reads
    // none) come before any fetch: a request the model refuses costs no fetch.
    let input = JobInput::Generate(r.request);
    if let Err(e) = crate::pipeline::admits(&*spec.task, &input) {
        return error_response(&e);
    }
    let JobInput::Generate(request) = input else { unreachable!("built as a generation just above") };
    r.request = request;
    // http(s) images are fetched once the request is known to go somewhere.
    if !r.fetches.is_empty()
        && let Err(e) = r.fetch_images(&app.limits).await
    {
        return error_response(&e);
    }
    let OpenAiRequest { model, mut request, stream, .. } = r;
    let id =
        format!("{}-{}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let echo = match (&request.prompt, request.params.echo) {
        (crate::job::Prompt::Text(t), true) => Some(t.clone()),
        _ => None,
    };
    let meta = Meta { id, model: model.clone(), created: now_s(), kind, echo };
    if !stream {
        let out = app.scheduler.submit(&model, JobInput::Generate(request), options).await;
        return match out {
            Ok(out) => axum::Json(meta.whole(&out)).into_response(),
            Err(e) => error_response(&e),
        };
    }
    let (tx, mut pieces) = mpsc::unbounded_channel();
    request.stream = Some(tx);
    let scheduler = app.scheduler.clone();
    let mut job =
        Job(tokio::spawn(async move { scheduler.submit(&model, JobInput::Generate(request), options).await }));
    // Wait for the first piece (or the end), so a request refused at once gets its status code.
    let first = tokio::select! {
        biased;
        piece = pieces.recv() => piece,
        done = &mut job.0 => {
            match flatten(done) {
                Err(e) => return error_response(&e),
                Ok(out) => {
                    let rest: Vec<String> = std::iter::from_fn(|| pieces.try_recv().ok()).collect();
                    let body = meta.opening().into_iter().chain(rest.iter().map(|p| meta.piece(p)))
                        .chain([meta.closing(&out), "data: [DONE]\n\n".to_string()])
                        .collect::<String>();
                    return sse(Body::from(body));
                }
            }
        }
    };
    let opening: Vec<String> = meta.opening().into_iter().chain(first.iter().map(|p| meta.piece(p))).collect();
    let state = Stream { meta, pieces, job: Some(job), opening };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if !s.opening.is_empty() {
            let text: String = s.opening.drain(..).collect();
            return Some((Ok::<Bytes, std::convert::Infallible>(Bytes::from(text)), s));
        }
        let job = s.job.as_mut()?;
        tokio::select! {
            biased;
            Some(piece) = s.pieces.recv() => {
                let text = s.meta.piece(&piece);
                Some((Ok(Bytes::from(text)), s))
            }
            done = &mut job.0 => {
                s.job = None;
                let mut text: String = std::iter::from_fn(|| s.pieces.try_recv().ok()).map(|p| s.meta.piece(&p)).collect();
                match flatten(done) {
                    Ok(out) => text.push_str(&s.meta.closing(&out)),
                    Err(e) => text.push_str(&format!("data: {}\n\n", json!({"error": e}))),
                }
                text.push_str("data: [DONE]\n\n");
                Some((Ok(Bytes::from(text)), s))
            }
        }
    });
    sse(Body::from_stream(stream))
}

fn sse(body: Body) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| error_response(&InferError::internal("cannot build the stream response")))
}

/// The submitted job; aborted when the stream is dropped (the client left),
/// which closes its reply and ends the sequence at its next step.
struct Job(tokio::task::JoinHandle<Result<JobOutput, InferError>>);

impl Drop for Job {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn flatten(done: Result<Result<JobOutput, InferError>, tokio::task::JoinError>) -> Result<JobOutput, InferError> {
    done.unwrap_or_else(|e| Err(InferError::internal(format!("the generation task failed: {e}"))))
}

struct Stream {
    meta: Meta,
    pieces: mpsc::UnboundedReceiver<String>,
    job: Option<Job>,
    opening: Vec<String>,
}

/// The id, model and time every chunk of one answer carries.
struct Meta {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    /// The prompt, given back before the answer (completions with `echo`).
    echo: Option<String>,
}

fn parts(out: &JobOutput) -> (&str, FinishReason, Value) {
    match &out.result {
        JobResult::Generation { text, finish_reason, usage, .. } => (text, *finish_reason, json!(usage)),
        _ => ("", FinishReason::Stop, Value::Null),
    }
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// A stream chunk; `end` adds its fields (`usage`, `timings`) to the last one.
    fn chunk(&self, choice: Value, end: Option<Value>) -> String {
        let mut v = json!({"id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
                           "choices": [choice]});
        if let (Some(Value::Object(fields)), Value::Object(map)) = (end, &mut v) {
            map.extend(fields);
        }
        format!("data: {v}\n\n")
    }

    /// Chat streams open with the assistant's role.
    fn opening(&self) -> Option<String> {
        (self.kind == Kind::Chat)
            .then(|| self.chunk(json!({"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}), None))
    }

    fn piece(&self, text: &str) -> String {
        match self.kind {
            Kind::Chat => self.chunk(json!({"index": 0, "delta": {"content": text}, "finish_reason": null}), None),
            Kind::Completion => {
                self.chunk(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}), None)
            }
        }
    }

    /// The last chunk: why it ended, the usage and the timings.
    fn closing(&self, out: &JobOutput) -> String {
        let (_, reason, usage) = parts(out);
        let end = json!({"usage": usage, "timings": out.timings});
        match self.kind {
            Kind::Chat => self.chunk(json!({"index": 0, "delta": {}, "finish_reason": reason}), Some(end)),
            Kind::Completion => {
                self.chunk(json!({"index": 0, "text": "", "logprobs": null, "finish_reason": reason}), Some(end))
            }
        }
    }

    fn whole(&self, out: &JobOutput) -> Value {
        let (text, reason, usage) = parts(out);
        let logprobs = match &out.result {
            JobResult::Generation { logprobs: Some(l), .. } => Some(l.as_ref()),
            _ => None,
        };
        let choice = match self.kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": logprobs.map(chat_logprobs), "finish_reason": reason}),
            Kind::Completion => {
                let prompt = self.echo.as_deref();
                json!({"index": 0, "text": format!("{}{text}", prompt.unwrap_or_default()),
                       "logprobs": logprobs.map(completion_logprobs), "finish_reason": reason})
            }
        };
        // Extensions (as llama.cpp's server adds its own): where the time went, in ms, and what ran it.
        json!({"id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage, "timings": out.timings,
               "variant": out.variant, "backend": out.backend, "provider": out.provider})
    }
}

/// Chat's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
fn chat_logprobs(l: &crate::job::Logprobs) -> Value {
    let content: Vec<Value> = l
        .completion
        .iter()
        .map(|t| {
            let top: Vec<Value> =
                t.top.iter().map(|a| json!({"token": a.token, "logprob": a.logprob, "bytes": a.bytes})).collect();
            json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' `logprobs`: parallel lists of tokens, their log-probabilities,
/// the alternatives (token -> log-probability) and each token's character
/// offset in the returned text; with `echo`, the prompt's tokens first (the
/// very first has no log-probability).
fn completion_logprobs(l: &crate::job::Logprobs) -> Value {
    let (mut tokens, mut values, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut at = 0usize;
    for t in l.prompt.iter().chain(&l.completion) {
        tokens.push(json!(t.token));
        values.push(json!(t.logprob));
        tops.push(match t.logprob {
            None => Value::Null,
            Some(_) => Value::Object(t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect()),
        });
        offsets.push(json!(at));
        at += t.token.chars().count();
    }
    json!({"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets})
}
