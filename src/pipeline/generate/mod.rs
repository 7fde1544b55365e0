//! Text generation on ONNX decoders (the `text-generation` task): the
//! layout torch and optimum export GPT-2/Llama-style decoders with —
//! `input_ids`, `attention_mask`, `position_ids` and `past_key_values.{i}.key|value`
//! in, `logits` and `present.{i}.key|value` out. A prompt is tokenised once
//! (prefill); then each step feeds one token with the cache the last step
//! returned, so a sequence costs one short run per token. Each request is a
//! [`Sequence`] with its own cache, advanced a step at a time; the worker
//! interleaves the steps of several sequences on one session.
//!
//! Decoding is greedy (temperature 0) or sampled (temperature, top-k, top-p,
//! seed); a sequence ends at an end-of-sequence token, a stop string, its
//! `max_tokens`, or the model's context length.
//!
//! A decoder may take `inputs_embeds` instead of `input_ids` (the language
//! half of a vision-language model): an [`Embedder`] then turns tokens into
//! embeddings, and what the request embedded in its prompt (images, at the
//! positions [`request`] found for them) into the prompt step's embeddings;
//! everything else is the same loop.
//!
//! The parts, each in its own file: `spec` is models.json's section and the
//! graph's layout; [`request`] makes a request ready before
//! it queues (template, tokens, checks, the compiled `response_format`);
//! [`template`] is the one chat-template mechanism; [`choose`] picks tokens
//! (sampling and the grammar); [`kv`] packs the caches of sequences that
//! step together; [`text_out`] turns tokens into the answer's text, stop
//! strings and stream; [`logprobs`] scores tokens. This file is the loop.

mod choose;
pub(super) mod json;
mod kv;
mod logprobs;
pub mod request;
mod sample;
mod spec;
pub mod template;
mod text_out;

use super::{Graph, Pipeline, Prepare, Prepared, Section, SpecProblem, TaskSpec};
use crate::backend::{InferenceBackend, NamedTensors, State};
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{FinishReason, InputKind, JobOptions, JobResult, Logprobs, Timings, TokenLogprob, TopLogprob, Usage};
use crate::tensor::{Tensor, TensorData, TensorInfo};
use choose::Chooser;
use kv::Batch;
pub use request::{Admission, Chunk, Lexicon, Placed, Ready, request_of};
use request::{ReadRequest, Scoring};
use serde::{Deserialize, Serialize};
pub use spec::GenerationSpec;
use spec::{Layout, kv_name};
use std::path::Path;
use std::sync::Arc;
pub use template::{ChatPatterns, ChatTemplateSpec, Content};
use text_out::TextOut;

/// The models.json section of a `text-generation` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationTaskSpec {
    /// Tokenizer, graph names, limits and chat template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSpec>,
}

impl Section for GenerationTaskSpec {
    const TASK: &'static str = "text-generation";
}

impl TaskSpec for GenerationTaskSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        (&[InputKind::Prompt, InputKind::Text], "a prompt: POST /v1/completions or /v1/chat/completions")
    }

    fn files(&self) -> Vec<(String, &Path)> {
        self.generation.iter().flat_map(GenerationSpec::files).collect()
    }

    fn validate(&self) -> Vec<SpecProblem> {
        match &self.generation {
            Some(g) => g.validate(),
            None => {
                vec![SpecProblem::new(".generation", "text-generation needs a 'generation' spec with its tokenizer")]
            }
        }
    }

    fn check_io(&self, _dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        self.generation.as_ref().map(|g| g.check_against(inputs, outputs, false)).unwrap_or_default()
    }

    fn many_short_runs(&self) -> bool {
        true
    }

    fn working_memory(&self, file: &Path) -> Option<(u64, String)> {
        self.generation.as_ref()?.working_memory(file)
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let admission = Arc::new(self.admission(graph.dir, graph.limits)?);
        let spec = self.generation.clone().expect("checked by admission");
        let lexicon = admission.lexicon().clone();
        let generator =
            Arc::new(Generator::new(spec, lexicon, graph.inputs, graph.optional_inputs, graph.outputs, None)?);
        Ok(Box::new(GeneratePipeline::new(generator, Arc::new(ReadRequest(admission)))))
    }

    fn spec_preparer(&self, dir: &Path, limits: &Limits) -> Option<super::MakePreparer> {
        let (me, dir, limits) = (self.clone(), dir.to_path_buf(), limits.clone());
        Some(Box::new(move || Ok(Arc::new(ReadRequest(Arc::new(me.admission(&dir, &limits)?))) as Arc<dyn Prepare>)))
    }
}

impl GenerationTaskSpec {
    fn admission(&self, dir: &Path, limits: &Limits) -> Result<Admission, InferError> {
        let spec = self
            .generation
            .as_ref()
            .ok_or_else(|| InferError::unavailable("text-generation needs a 'generation' spec"))?;
        Admission::new(spec, dir, limits.max_text_bytes)
    }
}

/// Generation on a decoder (`text-generation`, and `vision-language` with
/// its own preparer): the worker interleaves its jobs through the
/// [`Stepper`](super::Stepper); [`Pipeline::run`] runs one whole request.
pub struct GeneratePipeline {
    generator: Arc<Generator>,
    preparer: Arc<dyn Prepare>,
}

impl GeneratePipeline {
    /// Runs `generator` on the jobs `preparer` makes [`Ready`].
    pub fn new(generator: Arc<Generator>, preparer: Arc<dyn Prepare>) -> GeneratePipeline {
        GeneratePipeline { generator, preparer }
    }

    fn start(&self, input: Prepared) -> Result<Sequence, InferError> {
        self.generator.start(input.take()?)
    }
}

impl Pipeline for GeneratePipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.preparer.clone()
    }

    fn run(
        &mut self,
        engine: &mut dyn InferenceBackend,
        input: Prepared,
        _options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let seq = self.start(input)?;
        let t = std::time::Instant::now();
        let result = self.generator.run_to_end(engine, seq);
        timings.infer_ms += t.elapsed().as_secs_f64() * 1000.0;
        result
    }

    fn stepper(&self) -> Option<&dyn super::Stepper> {
        Some(self)
    }
}

impl super::Stepper for GeneratePipeline {
    fn parallel(&self) -> usize {
        self.generator.parallel()
    }

    fn start(&self, input: Prepared) -> Result<Box<dyn super::Sequence>, InferError> {
        let seq = GeneratePipeline::start(self, input)?;
        Ok(Box::new(Running { generator: self.generator.clone(), seq }))
    }

    fn step(
        &self,
        engine: &mut dyn InferenceBackend,
        seqs: &mut [&mut (dyn super::Sequence + 'static)],
    ) -> Vec<Result<(), InferError>> {
        let mut own: Vec<&mut Sequence> = Vec::with_capacity(seqs.len());
        for s in seqs.iter_mut() {
            match s.as_any_mut().downcast_mut::<Running>() {
                Some(r) => own.push(&mut r.seq),
                None => return seqs.iter().map(|_| Err(InferError::internal("a sequence of another task"))).collect(),
            }
        }
        self.generator.step_together(engine, &mut own)
    }

    fn release(&self, engine: &mut dyn InferenceBackend) {
        self.generator.release(engine);
    }
}

/// A sequence and the generator that advances it.
struct Running {
    generator: Arc<Generator>,
    seq: Sequence,
}

impl super::Sequence for Running {
    fn memory_bytes(&self) -> u64 {
        self.generator.cache_bytes(&self.seq)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn is_done(&self) -> bool {
        self.seq.is_done()
    }

    fn is_abandoned(&self) -> bool {
        self.seq.is_abandoned()
    }

    fn finish(self: Box<Self>) -> JobResult {
        self.generator.result(self.seq)
    }
}

/// Turns tokens into a decoder's `inputs_embeds`, for decoders that take
/// embeddings (a vision-language model's language half).
pub trait Embedder: Send + Sync {
    /// The embeddings of `tokens`, `tokens.len() × width` values. `placed`
    /// is what the request embedded in its prompt (images), given with the
    /// prompt's step only: each item's embeddings go at its positions.
    fn embed(&self, tokens: &[u32], placed: Vec<Placed>) -> Result<Vec<f32>, InferError>;
}

/// What a task embeds in a request's prompt for its [`Embedder`] (its own type).
pub type Attached = Box<dyn std::any::Any + Send>;

/// The loaded tokenizer, the layout and the spec of one decoder.
pub struct Generator {
    spec: GenerationSpec,
    /// Makes the decoder's `inputs_embeds` when it takes embeddings.
    embedder: Option<Arc<dyn Embedder>>,
    lexicon: Arc<Lexicon>,
    layout: Layout,
    eos: Vec<u32>,
    /// The caches of the sequences that last stepped together, kept batched.
    batch: BatchSlot,
    /// Rounds in a row a long prompt's chunk waited for newcomers ([`Generator::step_together`]).
    chunk_waits: std::sync::atomic::AtomicUsize,
}

/// Rounds in a row a long prompt's chunk may wait for newcomers, at most.
const MAX_CHUNK_WAITS: usize = 3;

type BatchSlot = Arc<std::sync::Mutex<Option<Batch>>>;

static NEXT_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One request's generation: its tokens, its cache and where it stands.
pub struct Sequence {
    /// Tells it apart in a [`Batch`].
    id: u64,
    /// The generator's batch, told when this sequence goes.
    slot: BatchSlot,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_tokens: usize,
    /// Tokens the next step feeds (the prompt first, then the last token).
    feed: Vec<u32>,
    /// The cache of the tokens fed so far, `2 × layers` tensors `[1, heads, fed, head_dim]`
    /// (empty while a [`Batch`] holds it).
    past: Vec<Tensor>,
    max_tokens: usize,
    /// Picks its tokens (sampling, the `response_format` grammar).
    chooser: Chooser,
    /// The answer's text, stop strings and stream.
    out: TextOut,
    finish: Option<FinishReason>,
    /// What the request embedded in its prompt, until the prompt's first step.
    placed: Vec<Placed>,
    /// The embeddings of the prompt tokens still to feed, for a decoder fed
    /// embeddings whose prompt is read in chunks (made once, with `attached`).
    embeds: Option<Vec<f32>>,
    /// The cache in the engine's own buffers (`[1, heads, room, head_dim]`,
    /// room for the prompt and `max_tokens`), written in place by each step,
    /// for graphs whose attention writes each row's entries where its length
    /// says; `past` stays empty then.
    state: Option<Box<dyn State>>,
    /// The engine keeps no buffers: the cache goes in and out as tensors.
    no_state: bool,
    /// Log-probabilities asked for: alternatives per token, the prompt's too (`echo`), and those so far.
    scores: Option<Scores>,
}

/// What a sequence records of its tokens' log-probabilities, as asked.
struct Scores {
    asked: Scoring,
    out: Logprobs,
}

impl Scores {
    fn new(asked: Scoring) -> Scores {
        Scores { asked, out: Logprobs::default() }
    }
}

impl Drop for Sequence {
    fn drop(&mut self) {
        let mut kept = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_mut().is_some_and(|batch| batch.release(self.id)) {
            *kept = None; // no row is used: no cache outlives its requests
        }
    }
}

impl Sequence {
    /// True once the sequence has ended.
    pub fn is_done(&self) -> bool {
        self.finish.is_some()
    }

    /// True when the client streaming this sequence went away.
    pub fn is_abandoned(&self) -> bool {
        self.out.is_abandoned()
    }
}

impl Generator {
    /// Reads the graph's layout; `lexicon` is the model's tokenizer; a
    /// decoder that takes embeddings is fed by `embedder`.
    pub fn new(
        spec: GenerationSpec,
        lexicon: Arc<Lexicon>,
        inputs: &[TensorInfo],
        optional: &[TensorInfo],
        outputs: &[TensorInfo],
        embedder: Option<Arc<dyn Embedder>>,
    ) -> Result<Generator, InferError> {
        let mut layout = Layout::read(&spec.names, inputs, outputs)
            .and_then(|l| l.feeds(&spec.names, embedder.is_some()).map(|()| l))
            .map_err(InferError::unavailable)?;
        if layout.keep.is_none() && optional.iter().any(|o| o.name == spec.names.logits_to_keep) {
            layout.keep = Some(false);
        }
        let mut eos = Vec::new();
        for t in &spec.eos_tokens {
            eos.push(lexicon.token_id(t).ok_or_else(|| {
                InferError::unavailable(format!("the end-of-sequence token '{t}' is not in the tokenizer's vocabulary"))
            })?);
        }
        Ok(Generator {
            spec,
            embedder,
            lexicon,
            layout,
            eos,
            batch: Arc::new(std::sync::Mutex::new(None)),
            chunk_waits: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Bytes the KV cache of `seq` can reach (its prompt plus `max_tokens`,
    /// within the context), twice over: each step holds the cache it feeds
    /// and the one the model returns; plus the working memory of one prefill
    /// chunk ([`Generator::prefill_bytes`]).
    pub fn cache_bytes(&self, seq: &Sequence) -> u64 {
        let positions = (seq.prompt_tokens + seq.max_tokens).min(self.spec.context_length);
        2 * positions as u64 * self.layout.bytes_per_position() + self.prefill_bytes(seq.prompt_tokens, positions)
    }

    /// The working memory of reading a prompt of `prompt` tokens, one chunk
    /// at a time, with `positions` in the cache at most: the chunk's logits
    /// (`chunk × vocab` f32) and one layer's attention scores and their
    /// softmax (`chunk × positions` f32 each, for, counted generously, 4
    /// query heads per cache head), the largest tensors of a chunk's run.
    /// SmolLM2's 8,130-token prompt: 477 MiB counted, and the process peaked
    /// 1,060 MiB above the loaded model with the 715 MiB of caches
    /// (docs/RELIABILITY.md, "Hostile generation requests").
    pub fn prefill_bytes(&self, prompt: usize, positions: usize) -> u64 {
        let chunk = prompt.min(self.spec.prefill_chunk) as u64;
        let vocab = self.layout.vocab.unwrap_or(1 << 16) as u64;
        4 * chunk * (vocab + 2 * 4 * self.layout.heads as u64 * positions as u64)
    }

    /// Most sequences to interleave on one session.
    pub fn parallel(&self) -> usize {
        self.spec.parallel
    }

    /// Starts a sequence on a request made [`Ready`] at admission.
    pub fn start(&self, ready: Ready) -> Result<Sequence, InferError> {
        let Ready { request, tokens, placed, max_tokens, stop, chooser, scoring } = ready;
        if scoring.is_some_and(|s| s.echo) && self.layout.keep.is_none() {
            return Err(InferError::bad_input(format!(
                "this model's graph gives logits for the last position only: it cannot score the prompt \
                 (echo with logprobs needs a '{}' input)",
                self.spec.names.logits_to_keep
            )));
        }
        let past = (0..2 * self.layout.layers)
            .map(|_| Tensor {
                shape: vec![1, self.layout.heads, 0, self.layout.head_dim],
                data: TensorData::F32(vec![]),
            })
            .collect();
        Ok(Sequence {
            id: NEXT_SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            slot: self.batch.clone(),
            prompt_tokens: tokens.len(),
            feed: tokens.clone(),
            tokens,
            past,
            max_tokens,
            chooser,
            out: TextOut::new(stop, request.stream),
            finish: None,
            placed,
            embeds: None,
            state: None,
            no_state: false,
            scores: scoring.map(Scores::new),
        })
    }

    /// The tokens the decoder is fed, `rows` rows of equal length: token ids,
    /// or their embeddings (with what the prompt embeds in place).
    fn feed(&self, tokens: &[u32], rows: usize, placed: Vec<Placed>) -> Result<(String, Tensor), InferError> {
        let names = &self.spec.names;
        let cols = tokens.len() / rows.max(1);
        match (&self.embedder, self.layout.embeds) {
            (Some(embedder), Some(width)) => {
                let values = embedder.embed(tokens, placed)?;
                if values.len() != tokens.len() * width {
                    return Err(InferError::internal(format!(
                        "{} embedding values for {} tokens of width {width}",
                        values.len(),
                        tokens.len()
                    )));
                }
                Ok((
                    names.inputs_embeds.clone(),
                    Tensor { shape: vec![rows, cols, width], data: TensorData::F32(values) },
                ))
            }
            _ => Ok((
                names.input_ids.clone(),
                Tensor { shape: vec![rows, cols], data: TensorData::I64(tokens.iter().map(|&t| t as i64).collect()) },
            )),
        }
    }

    /// Runs one step of `seq` on `engine`: feeds what is pending with the
    /// cache, picks the next token, and ends the sequence when it should.
    pub fn step(&self, engine: &mut dyn InferenceBackend, seq: &mut Sequence) -> Result<(), InferError> {
        if seq.finish.is_some() {
            return Ok(());
        }
        if self.in_place(engine, seq)? {
            return self.step_in_place(engine, seq);
        }
        let names = &self.spec.names;
        let (fed, n, input) = self.next_chunk(seq)?;
        let mut inputs: NamedTensors = vec![input];
        inputs.extend(self.keep_input(seq, n));
        if self.layout.attention_mask {
            inputs.push((
                names.attention_mask.clone(),
                Tensor { shape: vec![1, fed + n], data: TensorData::I64(vec![1; fed + n]) },
            ));
        }
        if self.layout.position_ids {
            inputs.push((
                names.position_ids.clone(),
                Tensor { shape: vec![1, n], data: TensorData::I64((fed..fed + n).map(|p| p as i64).collect()) },
            ));
        }
        let past = std::mem::take(&mut seq.past);
        for (i, t) in past.into_iter().enumerate() {
            inputs.push((self.cache_name(&names.past, i), t));
        }
        // A long prompt's chunks leave the engine's pool as it was: their working memory does not stay.
        let release = n > 1 && seq.prompt_tokens > self.spec.prefill_chunk;
        let (all, vocab, presents) = self.run(engine, inputs, release)?;
        self.score_prompt(seq, fed, n, &all, vocab);
        if n < seq.feed.len() {
            // A chunk of the prompt: its cache is kept, its logits are not needed.
            check_cache(&presents, fed + n)?;
            tracing::debug!(read = fed + n, prompt = seq.prompt_tokens, "prompt chunk read");
            seq.past = presents;
            seq.feed.drain(..n);
            return Ok(());
        }
        self.absorb(seq, &all[all.len() - vocab..], presents)
    }

    /// What `seq` feeds next: a long prompt is read a chunk per call (other
    /// sequences step in between, and a chunk's memory is bounded). Returns
    /// the positions already fed, the tokens fed now and their input.
    fn next_chunk(&self, seq: &mut Sequence) -> Result<(usize, usize, (String, Tensor)), InferError> {
        let names = &self.spec.names;
        let (fed, n) = (seq.tokens.len() - seq.feed.len(), seq.feed.len().min(self.spec.prefill_chunk));
        let chunked = n < seq.feed.len() || seq.embeds.is_some();
        let input = match (&self.embedder, chunked) {
            (Some(_), true) => {
                if seq.embeds.is_none() {
                    let (_, all) = self.feed(&seq.feed, 1, std::mem::take(&mut seq.placed))?;
                    let TensorData::F32(values) = all.data else {
                        return Err(InferError::internal("embeddings are not f32"));
                    };
                    seq.embeds = Some(values);
                }
                let embeds = seq.embeds.as_mut().expect("made above");
                let width = embeds.len() / seq.feed.len().max(1);
                let rows: Vec<f32> = embeds.drain(..n * width).collect();
                if embeds.is_empty() {
                    seq.embeds = None;
                }
                (names.inputs_embeds.clone(), Tensor { shape: vec![1, n, width], data: TensorData::F32(rows) })
            }
            _ => self.feed(&seq.feed[..n], 1, std::mem::take(&mut seq.placed))?,
        };
        Ok((fed, n, input))
    }

    /// Whether `seq` keeps its cache in the engine's buffers, made on its
    /// first step: graphs that write each row's entries where its length
    /// says ([`kv::Align::Left`]), on engines that keep buffers.
    fn in_place(&self, engine: &mut dyn InferenceBackend, seq: &mut Sequence) -> Result<bool, InferError> {
        if seq.state.is_some() {
            return Ok(true);
        }
        if seq.no_state || self.layout.align != kv::Align::Left || seq.tokens.len() != seq.feed.len() {
            return Ok(false);
        }
        let room = (seq.prompt_tokens + seq.max_tokens).min(self.spec.context_length);
        let shape = [1, self.layout.heads, room, self.layout.head_dim];
        match engine.new_state(2 * self.layout.layers, &shape) {
            Some(state) => {
                seq.state = Some(state?);
                Ok(true)
            }
            None => {
                seq.no_state = true;
                Ok(false)
            }
        }
    }

    /// Pairs of cache input and output names, bound to one buffer each.
    fn bindings(&self) -> Vec<(String, String)> {
        let names = &self.spec.names;
        (0..2 * self.layout.layers)
            .map(|i| (self.cache_name(&names.past, i), self.cache_name(&names.present, i)))
            .collect()
    }

    /// [`Generator::step`] of a sequence whose cache is in the engine's buffers.
    fn step_in_place(&self, engine: &mut dyn InferenceBackend, seq: &mut Sequence) -> Result<(), InferError> {
        let names = &self.spec.names;
        let (fed, n, input) = self.next_chunk(seq)?;
        let room = seq.state.as_ref().expect("in place").shape()[2];
        if fed + n > room {
            return Err(InferError::internal(format!("{} positions for a cache of {room}", fed + n)));
        }
        let mut inputs: NamedTensors = vec![
            input,
            (names.attention_mask.clone(), Tensor { shape: vec![1, fed + n], data: TensorData::I64(vec![1; fed + n]) }),
        ];
        inputs.extend(self.keep_input(seq, n));
        let release = n > 1 && seq.prompt_tokens > self.spec.prefill_chunk;
        let state = seq.state.as_mut().expect("in place");
        let mut outputs = engine.run_in_place(
            inputs,
            state.as_mut(),
            &self.bindings(),
            std::slice::from_ref(&names.logits),
            release,
        )?;
        let (all, vocab) = take_logits(&mut outputs, &names.logits)?;
        self.score_prompt(seq, fed, n, &all, vocab);
        if n < seq.feed.len() {
            tracing::debug!(read = fed + n, prompt = seq.prompt_tokens, "prompt chunk read");
            seq.feed.drain(..n);
            return Ok(());
        }
        self.next_token(seq, &all[all.len() - vocab..])
    }

    /// `logits_to_keep` for a step of `seq` feeding `n` tokens, where the
    /// graph takes it: all `n` while its prompt is scored (echo with
    /// logprobs), else 1 (a graph's default may be every position).
    fn keep_input(&self, seq: &Sequence, n: usize) -> Option<(String, Tensor)> {
        let scoring = seq.scores.as_ref().is_some_and(|s| s.asked.echo) && seq.tokens.len() == seq.prompt_tokens;
        self.layout.keep?;
        let keep = if scoring { n } else { 1 };
        Some((
            self.spec.names.logits_to_keep.clone(),
            Tensor { shape: vec![1], data: TensorData::I64(vec![keep as i64]) },
        ))
    }

    /// The inputs of one decoding step of a batch but its caches: one token a
    /// row, the mask of rows of `lens` cached positions in a batch `longest`
    /// wide, `logits_to_keep` and the rows' positions where the graph takes them.
    fn step_inputs(&self, tokens: &[u32], lens: &[usize], longest: usize) -> Result<NamedTensors, InferError> {
        let names = &self.spec.names;
        let b = tokens.len();
        let mask = self.layout.rows().step_mask(lens, longest);
        let mut inputs: NamedTensors = vec![
            self.feed(tokens, b, Vec::new())?,
            (names.attention_mask.clone(), Tensor { shape: vec![b, longest + 1], data: TensorData::I64(mask) }),
        ];
        inputs.extend(self.last_only());
        if self.layout.position_ids {
            inputs.push((
                names.position_ids.clone(),
                Tensor { shape: vec![b, 1], data: TensorData::I64(lens.iter().map(|&l| l as i64).collect()) },
            ));
        }
        Ok(inputs)
    }

    /// `logits_to_keep` = 1 where the graph takes it (steps that score no prompt).
    fn last_only(&self) -> Option<(String, Tensor)> {
        self.layout.keep.map(|_| {
            (self.spec.names.logits_to_keep.clone(), Tensor { shape: vec![1], data: TensorData::I64(vec![1]) })
        })
    }

    /// Records the log-probabilities of the prompt's tokens from a prompt
    /// step's logits (`all`: the rows of positions `fed..fed + n`, when the
    /// prompt is scored): row `j` scores the token after position `fed + j`.
    fn score_prompt(&self, seq: &mut Sequence, fed: usize, n: usize, all: &[f32], vocab: usize) {
        let Some(scores) = seq.scores.as_mut().filter(|s| s.asked.echo) else { return };
        if seq.tokens.len() != seq.prompt_tokens || all.len() != n * vocab {
            return;
        }
        if fed == 0 {
            let first = seq.tokens[0];
            let (token, bytes) = self.token_text(first);
            scores.out.prompt.push(TokenLogprob { token, bytes, logprob: None, top: Vec::new() });
        }
        let top = scores.asked.top;
        for j in 0..n {
            let Some(&next) = seq.tokens.get(fed + j + 1).filter(|_| fed + j + 1 < seq.prompt_tokens) else { break };
            let entry = self.logprob_of(&all[j * vocab..(j + 1) * vocab], next, top);
            seq.scores.as_mut().expect("checked").out.prompt.push(entry);
        }
    }

    /// `token`'s log-probability in one row of logits, with the `top` likeliest.
    fn logprob_of(&self, logits: &[f32], token: u32, top: usize) -> TokenLogprob {
        let row = logprobs::Row::new(logits);
        let (text, bytes) = self.token_text(token);
        let top = row
            .top(top)
            .into_iter()
            .map(|(t, logprob)| {
                let (token, bytes) = self.token_text(t as u32);
                TopLogprob { token, bytes, logprob }
            })
            .collect();
        TokenLogprob { token: text, bytes, logprob: Some(row.of(token as usize)), top }
    }

    /// A token's bytes and their text (lossy where the token holds part of a character).
    fn token_text(&self, token: u32) -> (String, Vec<u8>) {
        let bytes = self.lexicon.vocab().0.get(token as usize).and_then(|b| b.as_deref()).unwrap_or_default().to_vec();
        (String::from_utf8_lossy(&bytes).into_owned(), bytes)
    }

    /// Runs the decoder: the logits (f32, at least one row of `vocab`), `vocab`, and the cache outputs.
    fn run(
        &self,
        engine: &mut dyn InferenceBackend,
        inputs: NamedTensors,
        release: bool,
    ) -> Result<(Vec<f32>, usize, Vec<Tensor>), InferError> {
        let names = &self.spec.names;
        let mut outputs = if release { engine.run_releasing(inputs)? } else { engine.run(inputs)? };
        let (all, vocab) = take_logits(&mut outputs, &names.logits)?;
        let mut presents = Vec::with_capacity(2 * self.layout.layers);
        for i in 0..2 * self.layout.layers {
            presents.push(take_output(&mut outputs, &self.cache_name(&names.present, i))?);
        }
        Ok((all, vocab, presents))
    }

    /// Gives back the engine memory that long sequences left pooled (the
    /// arena keeps the peak of their last steps): one token with an empty
    /// cache, run with the engine's releasing options. A few milliseconds.
    pub fn release(&self, engine: &mut dyn InferenceBackend) {
        let names = &self.spec.names;
        let token = self.eos.first().copied().unwrap_or(0);
        let mut inputs: NamedTensors = match self.feed(&[token], 1, Vec::new()) {
            Ok(feed) => vec![feed],
            Err(e) => {
                tracing::debug!(error = %e, "cannot release the engine's pooled memory");
                return;
            }
        };
        if self.layout.attention_mask {
            inputs.push((names.attention_mask.clone(), Tensor { shape: vec![1, 1], data: TensorData::I64(vec![1]) }));
        }
        inputs.extend(self.last_only());
        if self.layout.position_ids {
            inputs.push((names.position_ids.clone(), Tensor { shape: vec![1, 1], data: TensorData::I64(vec![0]) }));
        }
        let (heads, hd) = (self.layout.heads, self.layout.head_dim);
        for i in 0..2 * self.layout.layers {
            inputs.push((
                self.cache_name(&names.past, i),
                Tensor { shape: vec![1, heads, 0, hd], data: TensorData::F32(Vec::new()) },
            ));
        }
        if let Err(e) = engine.run_releasing(inputs) {
            tracing::debug!(error = %e, "cannot release the engine's pooled memory");
        }
    }

    /// `past.{layer}.{kv}` (or `present`) of cache tensor `i` (key and value alternate).
    fn cache_name(&self, pattern: &str, i: usize) -> String {
        kv_name(pattern, i / 2, if i.is_multiple_of(2) { "key" } else { "value" })
    }

    /// Advances every sequence by one step. Sequences past their prompt step
    /// together in one engine call, their caches packed into one batch as the
    /// graph reads it ([`kv::Rows`]: padded and masked, each row keeping its
    /// own positions); prompts, and graphs without an attention mask, run one
    /// by one.
    ///
    /// A long prompt (over `prefill_chunk`) is read a chunk per round, one
    /// long prompt per round; a round in which a newcomer reads its short
    /// prompt or picks its first token skips the chunk (at most
    /// [`MAX_CHUNK_WAITS`] rounds in a row), so a short request waits for at
    /// most the chunk already running, not for every chunk of the long one.
    pub fn step_together(
        &self,
        engine: &mut dyn InferenceBackend,
        seqs: &mut [&mut Sequence],
    ) -> Vec<Result<(), InferError>> {
        let batchable = self.layout.batchable();
        let decoding: Vec<usize> = (0..seqs.len())
            .filter(|&i| {
                batchable
                    && seqs[i].finish.is_none()
                    && seqs[i].feed.len() == 1
                    && seqs[i].tokens.len() > seqs[i].prompt_tokens
            })
            .collect();
        let mut results: Vec<Result<(), InferError>> = (0..seqs.len()).map(|_| Ok(())).collect();
        // Caches kept batched serve the same sequences stepping together again; else they go back to each.
        let ids: Vec<u64> = decoding.iter().map(|&i| seqs[i].id).collect();
        let mut kept = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        // A batch in the engine's buffers keeps serving when streams left it (their rows idle, no copy);
        // one of tensors, or a batch someone new joins, goes back to each sequence.
        if kept.as_ref().is_some_and(|b| decoding.len() <= 1 || !b.serves(&ids)) {
            let batch = kept.take().expect("checked above");
            self.unbatch(batch, seqs);
        }
        drop(kept);
        if decoding.len() > 1 {
            let mut group: Vec<&mut Sequence> = Vec::with_capacity(decoding.len());
            for (i, s) in seqs.iter_mut().enumerate() {
                if decoding.contains(&i) {
                    group.push(&mut **s);
                }
            }
            let outcome = self.step_batch(engine, &mut group);
            for (&i, r) in decoding.iter().zip(outcome) {
                results[i] = r;
            }
        }
        let chunk = self.spec.prefill_chunk;
        let long = |s: &Sequence| {
            s.finish.is_none()
                && s.tokens.len() == s.prompt_tokens
                && (s.feed.len() > chunk || s.feed.len() < s.prompt_tokens)
        };
        let young = seqs.iter().any(|s| s.finish.is_none() && !long(s) && s.tokens.len() <= s.prompt_tokens + 1);
        let waits = self.chunk_waits.load(std::sync::atomic::Ordering::Relaxed);
        let mut chunk_turn = !young || waits >= MAX_CHUNK_WAITS;
        let (mut waited, mut ran) = (false, false);
        for (i, s) in seqs.iter_mut().enumerate() {
            if decoding.len() > 1 && decoding.contains(&i) {
                continue;
            }
            if long(s) {
                if !chunk_turn {
                    waited = true;
                    continue;
                }
                (chunk_turn, ran) = (false, true);
            }
            results[i] = self.step(engine, s);
        }
        let waits = if waited && !ran { waits + 1 } else { 0 };
        self.chunk_waits.store(waits, std::sync::atomic::Ordering::Relaxed);
        results
    }

    /// Gives each sequence of `batch` its own cache back (the rows' positions).
    fn unbatch(&self, mut batch: Batch, seqs: &mut [&mut Sequence]) {
        let rows_of: Vec<Option<usize>> = seqs.iter().map(|s| batch.row_of(s.id)).collect();
        if let Some(state) = batch.state.as_mut() {
            // Each row's positions back into its own buffers (rows are left-aligned).
            let (rows, room) = (self.layout.rows(), state.shape()[2]);
            for (s, row) in seqs.iter_mut().zip(rows_of).filter(|(s, _)| s.finish.is_none()) {
                let (Some(row), Some(own)) = (row, s.state.as_mut()) else {
                    continue;
                };
                let (keep, own_room) = (s.tokens.len() - s.feed.len(), own.shape()[2]);
                for i in 0..2 * self.layout.layers {
                    rows.copy_row((state.buffer(i), row, room), (own.buffer(i), 0, own_room), keep);
                }
            }
            return;
        }
        let (rows, total) = (self.layout.rows(), batch.total);
        for s in seqs.iter_mut().filter(|s| s.finish.is_none()) {
            let Some(row) = batch.row_of(s.id) else { continue };
            let keep = s.tokens.len() - s.feed.len();
            s.past = batch
                .caches
                .iter()
                .map(|c| Tensor {
                    shape: vec![1, rows.heads, keep, rows.head_dim],
                    data: TensorData::F32(rows.unpack(c, row, total, keep)),
                })
                .collect();
        }
    }

    /// One decoding step of several sequences as one engine call. Their
    /// caches come from the batch the same sequences made last step, else
    /// are packed from each one's own; the caches returned stay batched.
    fn step_batch(&self, engine: &mut dyn InferenceBackend, seqs: &mut [&mut Sequence]) -> Vec<Result<(), InferError>> {
        if seqs.iter().all(|s| s.state.is_some()) {
            return self.step_batch_in_place(engine, seqs);
        }
        let names = &self.spec.names;
        let (b, heads, hd) = (seqs.len(), self.layout.heads, self.layout.head_dim);
        let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len() - 1).collect();
        let kept = self.batch.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (longest, caches) = match kept {
            Some(kept) => (kept.total, kept.caches),
            None => {
                let longest = lens.iter().copied().max().unwrap_or(0);
                let rows = self.layout.rows();
                let caches = (0..2 * self.layout.layers)
                    .map(|i| {
                        let own: Vec<&[f32]> = seqs
                            .iter()
                            .map(|s| match &s.past[i].data {
                                TensorData::F32(v) => v.as_slice(),
                                _ => &[],
                            })
                            .collect();
                        rows.pack(&own, &lens, longest)
                    })
                    .collect();
                seqs.iter_mut().for_each(|s| s.past.clear());
                (longest, caches)
            }
        };
        let fail = |e: InferError| (0..b).map(|_| Err(e.clone())).collect();
        let mut inputs = match self.step_inputs(&seqs.iter().map(|s| s.feed[0]).collect::<Vec<_>>(), &lens, longest) {
            Ok(inputs) => inputs,
            Err(e) => return fail(e),
        };
        for (i, data) in caches.into_iter().enumerate() {
            inputs.push((
                self.cache_name(&names.past, i),
                Tensor { shape: vec![b, heads, longest, hd], data: TensorData::F32(data) },
            ));
        }
        let (all, vocab, outputs) = match self.run(engine, inputs, false) {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        if all.len() != b * vocab {
            return fail(InferError::internal(format!("the logits are {} values for {b} rows of {vocab}", all.len())));
        }
        let mut presents: Vec<Vec<f32>> = Vec::with_capacity(outputs.len());
        for (i, t) in outputs.into_iter().enumerate() {
            match t {
                Tensor { shape, data: TensorData::F32(v) } if shape == [b, heads, longest + 1, hd] => presents.push(v),
                t => return fail(InferError::internal(format!("cache output {i} has shape {:?}", t.shape))),
            }
        }
        let ids = seqs.iter().map(|s| s.id).collect();
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Batch::of_tensors(ids, longest + 1, presents));
        seqs.iter_mut().enumerate().map(|(row, s)| self.next_token(s, &all[row * vocab..(row + 1) * vocab])).collect()
    }

    /// [`Generator::step_batch`] of sequences whose caches are in the
    /// engine's buffers: the batch's buffers (made by packing each row's
    /// positions, left-aligned, when the group is new) are written in place
    /// by each step and kept for the same group's next step.
    fn step_batch_in_place(
        &self,
        engine: &mut dyn InferenceBackend,
        seqs: &mut [&mut Sequence],
    ) -> Vec<Result<(), InferError>> {
        let names = &self.spec.names;
        let (n, heads, hd) = (seqs.len(), self.layout.heads, self.layout.head_dim);
        let fail = |e: InferError| (0..n).map(|_| Err(e.clone())).collect();
        let kept = self.batch.lock().unwrap_or_else(|e| e.into_inner()).take();
        // The rows: the kept batch's (a sequence that left keeps its row, idle), or these sequences in order.
        let (ids, state) = match kept.and_then(Batch::into_state) {
            Some((ids, state)) => (ids, Some(state)),
            None => (seqs.iter().map(|s| s.id).collect(), None),
        };
        let at: Vec<Option<usize>> = ids.iter().map(|id| seqs.iter().position(|s| s.id == *id)).collect();
        // An idle row is fed one token at position 0 (its length 0): it writes only its own first column.
        let lens: Vec<usize> = at.iter().map(|a| a.map_or(0, |i| seqs[i].tokens.len() - 1)).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let b = ids.len();
        let mut state = match state {
            Some(state) if state.shape()[2] > longest => state,
            _ => {
                let room = seqs.iter_mut().map(|s| s.state.as_mut().map_or(0, |st| st.shape()[2])).max().unwrap_or(0);
                let mut state = match engine.new_state(2 * self.layout.layers, &[b, heads, room.max(longest + 1), hd]) {
                    Some(Ok(state)) => state,
                    Some(Err(e)) => return fail(e.into()),
                    None => {
                        return fail(InferError::internal("the engine kept buffers for one sequence, not for a batch"));
                    }
                };
                let (rows, batch_room) = (self.layout.rows(), state.shape()[2]);
                for (row, i) in at.iter().enumerate() {
                    let Some(own) = i.and_then(|i| seqs[i].state.as_mut()) else { continue };
                    let own_room = own.shape()[2];
                    for k in 0..2 * self.layout.layers {
                        rows.copy_row((own.buffer(k), 0, own_room), (state.buffer(k), row, batch_room), lens[row]);
                    }
                }
                state
            }
        };
        let pad = self.eos.first().copied().unwrap_or(0);
        let tokens: Vec<u32> = at.iter().map(|a| a.map_or(pad, |i| seqs[i].feed[0])).collect();
        let inputs = match self.step_inputs(&tokens, &lens, longest) {
            Ok(inputs) => inputs,
            Err(e) => return fail(e),
        };
        let outputs =
            engine.run_in_place(inputs, state.as_mut(), &self.bindings(), std::slice::from_ref(&names.logits), false);
        let (all, vocab) = match outputs.map_err(InferError::from).and_then(|mut o| take_logits(&mut o, &names.logits))
        {
            Ok((all, vocab)) if all.len() == b * vocab => (all, vocab),
            Ok((all, vocab)) => {
                return fail(InferError::internal(format!(
                    "the logits are {} values for {b} rows of {vocab}",
                    all.len()
                )));
            }
            Err(e) => return fail(e),
        };
        let alive = at.iter().map(Option::is_some).collect();
        *self.batch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Batch::in_place(ids, alive, longest + 1, state));
        let mut results: Vec<Result<(), InferError>> = (0..n).map(|_| Ok(())).collect();
        for (row, i) in at.iter().enumerate() {
            if let Some(i) = *i {
                results[i] = self.next_token(seqs[i], &all[row * vocab..(row + 1) * vocab]);
            }
        }
        results
    }

    /// Takes a step's outcome into `seq`: its new cache, and the next token picked from `logits`.
    fn absorb(&self, seq: &mut Sequence, logits: &[f32], presents: Vec<Tensor>) -> Result<(), InferError> {
        check_cache(&presents, seq.tokens.len())?;
        seq.past = presents;
        self.next_token(seq, logits)
    }

    /// Picks the next token of `seq` from `logits` and ends the sequence when it should.
    fn next_token(&self, seq: &mut Sequence, logits: &[f32]) -> Result<(), InferError> {
        if seq.max_tokens == 0 {
            // A prompt scored (echo), nothing generated.
            return self.end(seq, FinishReason::Length);
        }
        let next = seq.chooser.choose(logits, || self.lexicon.vocab())?;
        if let Some(top) = seq.scores.as_ref().map(|s| s.asked.top) {
            let entry = self.logprob_of(logits, next, top);
            seq.scores.as_mut().expect("checked").out.completion.push(entry);
        }
        seq.tokens.push(next);
        seq.feed = vec![next];
        let generated = seq.tokens.len() - seq.prompt_tokens;
        if self.eos.contains(&next) {
            seq.tokens.pop(); // the end token is not part of the text
            if let Some(scores) = seq.scores.as_mut() {
                scores.out.completion.pop();
            }
            return self.end(seq, FinishReason::Stop);
        }
        let text = self.lexicon.decode(&seq.tokens[seq.prompt_tokens..])?;
        if seq.out.update(text) || seq.chooser.is_complete() {
            return self.end(seq, FinishReason::Stop);
        }
        if generated >= seq.max_tokens || seq.tokens.len() >= self.spec.context_length {
            return self.end(seq, FinishReason::Length);
        }
        Ok(())
    }

    /// Ends `seq`: its text settled (decoded whole when cut by length, and
    /// a JSON value closed), streamed to its end, its cache let go.
    fn end(&self, seq: &mut Sequence, reason: FinishReason) -> Result<(), InferError> {
        let decoded = if reason == FinishReason::Length || seq.out.is_empty() {
            Some(self.lexicon.decode(&seq.tokens[seq.prompt_tokens..])?)
        } else {
            None
        };
        seq.out.finish(decoded, seq.chooser.closing());
        seq.finish = Some(reason);
        seq.past.clear();
        seq.state = None;
        Ok(())
    }

    /// The answer of a finished sequence.
    pub fn result(&self, mut seq: Sequence) -> JobResult {
        let completion = seq.tokens.len() - seq.prompt_tokens;
        JobResult::Generation {
            text: seq.out.take(),
            finish_reason: seq.finish.unwrap_or(FinishReason::Length),
            usage: Usage {
                prompt_tokens: seq.prompt_tokens,
                completion_tokens: completion,
                total_tokens: seq.prompt_tokens + completion,
            },
            tokens: seq.tokens[seq.prompt_tokens..].to_vec(),
            logprobs: seq.scores.take().map(|s| Box::new(s.out)),
        }
    }

    /// Runs a started sequence to its end (no interleaving).
    pub fn run_to_end(&self, engine: &mut dyn InferenceBackend, mut seq: Sequence) -> Result<JobResult, InferError> {
        while !seq.is_done() {
            if seq.is_abandoned() {
                return Err(InferError::bad_input("the client went away"));
            }
            self.step(engine, &mut seq)?;
        }
        if seq.tokens.len() > self.spec.prefill_chunk {
            self.release(engine);
        }
        Ok(self.result(seq))
    }
}

/// Checks that every cache output holds `fed` positions.
fn check_cache(presents: &[Tensor], fed: usize) -> Result<(), InferError> {
    for (i, present) in presents.iter().enumerate() {
        if present.shape.get(2) != Some(&fed) {
            return Err(InferError::internal(format!(
                "cache output {i} has shape {:?}; expected {fed} positions",
                present.shape
            )));
        }
    }
    Ok(())
}

/// Removes the output `name` from `outputs`.
/// The logits among `outputs` (f32, at least one row) and their last dimension (the vocabulary).
fn take_logits(outputs: &mut NamedTensors, name: &str) -> Result<(Vec<f32>, usize), InferError> {
    let logits = take_output(outputs, name)?;
    let vocab = *logits.shape.last().unwrap_or(&0);
    let TensorData::F32(all) = logits.data else {
        return Err(InferError::internal("the logits are not f32"));
    };
    if vocab == 0 || all.len() < vocab {
        return Err(InferError::internal(format!("the logits have shape {:?}", logits.shape)));
    }
    Ok((all, vocab))
}

fn take_output(outputs: &mut NamedTensors, name: &str) -> Result<Tensor, InferError> {
    let i = outputs
        .iter()
        .position(|(n, _)| n == name)
        .ok_or_else(|| InferError::internal(format!("the model gave no output '{name}'")))?;
    Ok(outputs.swap_remove(i).1)
}
