//! models.json's `generation` section (tokenizer, limits, the decoder's
//! tensor names, the chat template) and what a decoder graph looks like
//! ([`Layout`]: layers, cache shape, which inputs it takes), read from its
//! declared interface.

use super::SpecProblem;
use super::kv;
use super::template::ChatTemplateSpec;
use crate::tensor::{DType, TensorInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// models.json `generation`: the tokenizer, the graph's names and the limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationSpec {
    /// A tokenizer.json (Hugging Face `tokenizers`), relative to models.json.
    pub tokenizer: PathBuf,
    /// Most tokens (prompt and generated) a sequence may hold.
    pub context_length: usize,
    /// Tokens that end a sequence, as the tokenizer spells them (`<|endoftext|>`).
    #[serde(default)]
    pub eos_tokens: Vec<String>,
    /// Most new tokens one request may ask for; also the default `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// Sequences one session advances side by side (their steps interleave).
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Input and output names, `{layer}` and `{kv}` (`key`, `value`) filled in.
    #[serde(default)]
    pub names: GenerationNames,
    /// How chat messages become the prompt: the model's Jinja chat template
    /// (a `.jinja` file, or JSON with a `chat_template` string, relative to
    /// models.json), or the inline patterns; none: `User: …` / `Assistant:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<ChatTemplateSpec>,
    /// Stop strings every chat request gets (default: the inline patterns'
    /// `stop`; none with a template file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_stop: Option<Vec<String>>,
    /// Tokens of context whose KV cache the choice of variant leaves room
    /// for (default the context length, at most 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_context: Option<usize>,
    /// Most prompt tokens one engine call reads (a longer prompt is read in
    /// chunks, other sequences stepping between them).
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
}

fn default_max_tokens() -> usize {
    256
}
fn default_prefill_chunk() -> usize {
    512
}
fn default_parallel() -> usize {
    4
}

/// The decoder graph's tensor names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationNames {
    pub input_ids: String,
    /// Fed instead of `input_ids` by decoders that take embeddings.
    pub inputs_embeds: String,
    /// Fed when the model has it.
    pub attention_mask: String,
    /// Fed when the model has it.
    pub position_ids: String,
    pub past: String,
    pub present: String,
    pub logits: String,
    /// How many of the last positions get logits (fed when a prompt is scored; optional).
    pub logits_to_keep: String,
}

impl Default for GenerationNames {
    fn default() -> Self {
        GenerationNames {
            input_ids: "input_ids".into(),
            inputs_embeds: "inputs_embeds".into(),
            attention_mask: "attention_mask".into(),
            position_ids: "position_ids".into(),
            past: "past_key_values.{layer}.{kv}".into(),
            present: "present.{layer}.{kv}".into(),
            logits: "logits".into(),
            logits_to_keep: "logits_to_keep".into(),
        }
    }
}

impl GenerationSpec {
    /// The files the spec names (tokenizer, chat template), with their JSON paths.
    pub fn files(&self) -> Vec<(String, &Path)> {
        let mut files = vec![(".generation.tokenizer".to_string(), self.tokenizer.as_path())];
        if let Some(ChatTemplateSpec::File(path)) = &self.chat_template {
            files.push((".generation.chat_template".to_string(), path.as_path()));
        }
        files
    }

    /// The KV cache of `reserve_context` tokens of the decoder at `file`,
    /// twice over as a step holds the cache it feeds and the one it gets back
    /// (as a request is admitted).
    pub fn working_memory(&self, file: &Path) -> Option<(u64, String)> {
        let per_position = bytes_per_position(&self.names, file)?;
        let tokens = self.reserve_context();
        Some((2 * tokens as u64 * per_position, format!("the KV cache of {tokens} tokens of context")))
    }

    /// Tokens of context the variant choice leaves KV-cache room for.
    pub fn reserve_context(&self) -> usize {
        self.reserve_context.unwrap_or(self.context_length.min(2048))
    }

    /// Checks the spec on its own.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        if self.prefill_chunk == 0 {
            p.push(SpecProblem::new(".generation.prefill_chunk", "must be 1 or more"));
        }
        if self.reserve_context.is_some_and(|r| r == 0 || r > self.context_length) {
            p.push(SpecProblem::new(".generation.reserve_context", "must be 1..=context_length"));
        }
        if !(2..=1 << 20).contains(&self.context_length) {
            p.push(SpecProblem::new(".generation.context_length", "must be 2..=1048576"));
        }
        if self.max_tokens == 0 || self.max_tokens > self.context_length {
            p.push(SpecProblem::new(".generation.max_tokens", "must be 1..=context_length"));
        }
        if !(1..=64).contains(&self.parallel) {
            p.push(SpecProblem::new(".generation.parallel", "must be 1..=64"));
        }
        for (field, pattern) in [("past", &self.names.past), ("present", &self.names.present)] {
            if !pattern.contains("{layer}") || !pattern.contains("{kv}") {
                p.push(SpecProblem::new(
                    &format!(".generation.names.{field}"),
                    "must contain {layer} and {kv} (as in past_key_values.{layer}.{kv})",
                ));
            }
        }
        p
    }

    /// Compares the spec with the model's declared inputs and outputs; the
    /// decoder must take embeddings when `embeds` says so, else token ids.
    pub fn check_against(&self, inputs: &[TensorInfo], outputs: &[TensorInfo], embeds: bool) -> Vec<SpecProblem> {
        match Layout::read(&self.names, inputs, outputs).and_then(|l| l.feeds(&self.names, embeds)) {
            Ok(()) => Vec::new(),
            Err(why) => vec![SpecProblem::new(".generation.names", why)],
        }
    }
}

/// What the graph looks like: layers, cache shape, optional inputs.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub attention_mask: bool,
    pub position_ids: bool,
    /// Where a row's positions sit in a batch: a graph with a mask and no
    /// position ids reads each row's positions from its mask, ones first
    /// (ONNX Runtime's `GroupQueryAttention`), so rows are left-aligned.
    pub align: kv::Align,
    /// The width of `inputs_embeds` when the decoder takes embeddings instead of ids.
    pub embeds: Option<usize>,
    /// The logits' last dimension, when the graph fixes it.
    pub vocab: Option<usize>,
    /// The graph takes `logits_to_keep` (logits of more than the last
    /// position, to score a prompt): `Some(true)` when it must always be fed.
    pub keep: Option<bool>,
}

pub(super) fn kv_name(pattern: &str, layer: usize, kv: &str) -> String {
    pattern.replace("{layer}", &layer.to_string()).replace("{kv}", kv)
}

impl Layout {
    /// How one cache tensor's rows are laid out in a batch.
    pub(super) fn rows(&self) -> kv::Rows {
        kv::Rows { heads: self.heads, head_dim: self.head_dim, align: self.align }
    }

    /// Whether sequences of different lengths can step together in one call.
    pub(super) fn batchable(&self) -> bool {
        self.attention_mask
    }

    /// Bytes one position of the cache takes: a key and a value per layer, f32.
    pub(super) fn bytes_per_position(&self) -> u64 {
        (2 * self.layers * self.heads * self.head_dim * 4) as u64
    }

    /// Says whether the decoder is fed as the task feeds it: embeddings or token ids.
    pub(super) fn feeds(&self, names: &GenerationNames, embeds: bool) -> Result<(), String> {
        match (self.embeds.is_some(), embeds) {
            (true, false) => Err(format!(
                "the decoder takes '{}' (embeddings), not token ids: serve it as a vision-language model",
                names.inputs_embeds
            )),
            (false, true) => Err(format!(
                "the decoder takes '{}' (token ids); this task feeds it '{}' (embeddings)",
                names.input_ids, names.inputs_embeds
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn read(
        names: &GenerationNames,
        inputs: &[TensorInfo],
        outputs: &[TensorInfo],
    ) -> Result<Layout, String> {
        let input = |n: &str| inputs.iter().find(|i| i.name == n);
        let list = |infos: &[TensorInfo]| infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ");
        let embeds = match (input(&names.input_ids), input(&names.inputs_embeds)) {
            (Some(ids), _) if ids.dtype != Some(DType::I64) => return Err(format!("input '{}' must be i64", ids.name)),
            (Some(_), _) => None,
            (None, Some(e)) => match (e.dtype, e.shape.as_slice()) {
                (Some(DType::F32), [_, _, Some(width)]) => Some(*width),
                _ => {
                    return Err(format!(
                        "input '{}' has shape {}; expected f32 [batch, sequence, hidden] with hidden fixed",
                        e.name,
                        e.shape_text()
                    ));
                }
            },
            (None, None) => {
                return Err(format!(
                    "the model has no input '{}' or '{}' (inputs: {})",
                    names.input_ids,
                    names.inputs_embeds,
                    list(inputs)
                ));
            }
        };
        if !outputs.iter().any(|o| o.name == names.logits) {
            return Err(format!("the model has no output '{}' (outputs: {})", names.logits, list(outputs)));
        }
        let layers = (0..).take_while(|&l| input(&kv_name(&names.past, l, "key")).is_some()).count();
        if layers == 0 {
            return Err(format!(
                "the model has no cache input '{}' (inputs: {}): export it with past key/values",
                kv_name(&names.past, 0, "key"),
                list(inputs)
            ));
        }
        let first = input(&kv_name(&names.past, 0, "key")).expect("counted above");
        let (heads, head_dim) = match first.shape.as_slice() {
            [_, Some(h), _, Some(d)] => (*h, *d),
            _ => {
                return Err(format!(
                    "cache input '{}' has shape {}; expected [batch, heads, past, head_dim] with heads and head_dim fixed",
                    first.name,
                    first.shape_text()
                ));
            }
        };
        for l in 0..layers {
            for kv in ["key", "value"] {
                let past = kv_name(&names.past, l, kv);
                match input(&past) {
                    Some(i) if i.dtype == Some(DType::F32) => {}
                    Some(i) => return Err(format!("cache input '{}' must be f32 (got {:?})", i.name, i.dtype)),
                    None => return Err(format!("the model has no cache input '{past}'")),
                }
                let present = kv_name(&names.present, l, kv);
                if !outputs.iter().any(|o| o.name == present) {
                    return Err(format!("the model has no cache output '{present}' (outputs: {})", list(outputs)));
                }
            }
        }
        let (attention_mask, position_ids) =
            (input(&names.attention_mask).is_some(), input(&names.position_ids).is_some());
        Ok(Layout {
            layers,
            heads,
            head_dim,
            attention_mask,
            position_ids,
            align: if attention_mask && !position_ids { kv::Align::Left } else { kv::Align::Right },
            embeds,
            vocab: outputs.iter().find(|o| o.name == names.logits).and_then(|o| o.shape.last().copied().flatten()),
            keep: input(&names.logits_to_keep).map(|_| true),
        })
    }
}

/// The cache bytes per position of the decoder at `file`, read from its
/// declared interface once per file (and again when the file changes).
pub(super) fn bytes_per_position(names: &GenerationNames, file: &Path) -> Option<u64> {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static SEEN: std::sync::Mutex<Vec<(Key, Option<u64>)>> = std::sync::Mutex::new(Vec::new());
    let meta = std::fs::metadata(file).ok()?;
    let key = (file.to_path_buf(), meta.len(), meta.modified().ok());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, bytes)) = seen.iter().find(|(k, _)| *k == key) {
        return *bytes;
    }
    let bytes = crate::backend::onnx_file::declared_interface(file)
        .ok()
        .and_then(|(inputs, outputs)| Layout::read(names, &inputs, &outputs).ok())
        .map(|l| l.bytes_per_position());
    seen.retain(|(k, _)| k.0 != key.0);
    seen.push((key, bytes));
    bytes
}
