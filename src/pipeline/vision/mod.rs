//! The `vision-language` task: image + text → text on the three-graph
//! SmolVLM / Idefics3 layout that the onnx-community exports ship (and
//! transformers.js runs):
//!
//! - `parts.vision` — `vision_encoder.onnx`: `pixel_values`
//!   `[batch, views, 3, tile, tile]` (+ bool `pixel_attention_mask`
//!   `[batch, views, tile, tile]`) → `image_features` `[views, image_seq_len, hidden]`;
//! - `parts.embed` — `embed_tokens.onnx`: `input_ids` → `inputs_embeds`;
//! - `file` — `decoder_model_merged.onnx`: `inputs_embeds`, `attention_mask`,
//!   `position_ids`, `past_key_values.*` → `logits`, `present.*`.
//!
//! A chat is rendered by the model's own Jinja chat template (text
//! generation's, [`super::generate::template`]: an image part becomes the
//! image token), each image is cut into views by
//! [`processor::ImageProcessor`] (on the decode threads) and becomes a typed
//! prompt chunk: the views' prompt text, and the views themselves, which the
//! prompt step embeds at the positions of that text's image tokens. From
//! there it is text generation's loop, reused as it is (sampling, stop
//! strings, streaming, structured output, sequences stepped together).
//! An image's features are kept by the hash of its bytes (bounded), so a
//! follow-up turn about the same image skips the vision encoder.

pub mod processor;

use super::generate::{
    Admission, ChatPatterns, ChatTemplateSpec, Chunk, Content, Embedder, GeneratePipeline, GenerationSpec, Generator,
    Placed, request_of,
};
use super::{Graph, MakePreparer, Part, Pipeline, Prepare, Prepared, Section, SpecProblem, TaskSpec};
use crate::backend::InferenceBackend;
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{InputKind, JobInput, Prompt};
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use processor::ImageProcessor;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The models.json section of a `vision-language` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionLanguageSpec {
    /// The language half: tokenizer, context, limits (as `text-generation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSpec>,
    /// The image half: chat template, image processor, graph names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionSpec>,
}

impl Section for VisionLanguageSpec {
    const TASK: &'static str = "vision-language";
}

/// models.json `vision`: SmolVLM's processor settings (its
/// preprocessor_config.json and processor_config.json) and the chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionSpec {
    /// The model's Jinja chat template: the same as `generation.chat_template`
    /// (the older place for it; one of the two names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    /// Images are resized so that their longest edge is this (`size.longest_edge`).
    #[serde(default = "default_longest_edge")]
    pub longest_edge: u32,
    /// The side of a view (`max_image_size.longest_edge`).
    #[serde(default = "default_tile")]
    pub tile: u32,
    /// Image tokens (features) per view.
    #[serde(default = "default_image_seq_len")]
    pub image_seq_len: usize,
    #[serde(default = "default_half")]
    pub mean: [f32; 3],
    #[serde(default = "default_half")]
    pub std: [f32; 3],
    /// The token the template writes for an image and the features replace.
    #[serde(default = "default_image_token")]
    pub image_token: String,
    #[serde(default)]
    pub names: VisionNames,
    /// Memory for the features of recent images, kept by the hash of their bytes.
    #[serde(default = "default_feature_cache_mb")]
    pub feature_cache_mb: u64,
    /// Views the vision encoder takes in one run (its working memory grows with them).
    #[serde(default = "default_max_views_per_run")]
    pub max_views_per_run: usize,
}

fn default_longest_edge() -> u32 {
    2048
}
fn default_tile() -> u32 {
    512
}
fn default_image_seq_len() -> usize {
    64
}
fn default_half() -> [f32; 3] {
    [0.5; 3]
}
fn default_image_token() -> String {
    "<image>".into()
}
fn default_feature_cache_mb() -> u64 {
    64
}
fn default_max_views_per_run() -> usize {
    4
}

/// The tensor names of the vision encoder and token embedding graphs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VisionNames {
    pub pixel_values: String,
    /// Fed (all true: every view is a whole tile) when the encoder has it.
    pub pixel_attention_mask: String,
    pub image_features: String,
    pub input_ids: String,
    pub inputs_embeds: String,
}

impl Default for VisionNames {
    fn default() -> Self {
        VisionNames {
            pixel_values: "pixel_values".into(),
            pixel_attention_mask: "pixel_attention_mask".into(),
            image_features: "image_features".into(),
            input_ids: "input_ids".into(),
            inputs_embeds: "inputs_embeds".into(),
        }
    }
}

impl TaskSpec for VisionLanguageSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        (&[InputKind::Prompt, InputKind::Text], "a chat with images: POST /v1/chat/completions")
    }

    fn reads_images(&self) -> bool {
        true
    }

    fn files(&self) -> Vec<(String, &Path)> {
        let mut files: Vec<(String, &Path)> = self.generation.iter().flat_map(GenerationSpec::files).collect();
        let alias = self.vision.iter().flat_map(|v| v.chat_template.as_deref());
        files.extend(alias.map(|t| (".vision.chat_template".to_string(), t)));
        files
    }

    fn parts(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&["vision", "embed"], &[])
    }

    fn validate(&self) -> Vec<SpecProblem> {
        let mut p = match &self.generation {
            Some(g) => g.validate(),
            None => {
                vec![SpecProblem::new(".generation", "vision-language needs a 'generation' spec with its tokenizer")]
            }
        };
        match &self.vision {
            None => p.push(SpecProblem::new(".vision", "vision-language needs a 'vision' spec")),
            Some(v) => {
                let in_generation = self.generation.as_ref().and_then(|g| g.chat_template.as_ref());
                match (in_generation, &v.chat_template) {
                    (Some(ChatTemplateSpec::File(_)), None) | (None, Some(_)) => {}
                    (Some(_), Some(_)) => p.push(SpecProblem::new(
                        ".vision.chat_template",
                        "the chat template is named twice: keep generation.chat_template",
                    )),
                    (Some(ChatTemplateSpec::Patterns(_)), None) | (None, None) => p.push(SpecProblem::new(
                        ".generation.chat_template",
                        "vision-language needs the model's Jinja chat template (a .jinja or chat_template.json file)",
                    )),
                }
                if !(1..=8192).contains(&v.tile) {
                    p.push(SpecProblem::new(".vision.tile", "must be 1..=8192"));
                }
                if v.longest_edge < v.tile || v.longest_edge > 4096 * 4 {
                    p.push(SpecProblem::new(".vision.longest_edge", "must be at least the tile and at most 16384"));
                }
                if !(1..=4096).contains(&v.image_seq_len) {
                    p.push(SpecProblem::new(".vision.image_seq_len", "must be 1..=4096"));
                }
                if v.std.iter().any(|s| !s.is_finite() || *s == 0.0) || v.mean.iter().any(|m| !m.is_finite()) {
                    p.push(SpecProblem::new(".vision.std", "mean and std must be finite, std non-zero"));
                }
                if v.image_token.is_empty() {
                    p.push(SpecProblem::new(".vision.image_token", "must not be empty"));
                }
                if !(1..=64).contains(&v.max_views_per_run) {
                    p.push(SpecProblem::new(".vision.max_views_per_run", "must be 1..=64"));
                }
            }
        }
        p
    }

    fn check_io(&self, _dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        self.generation.as_ref().map(|g| g.check_against(inputs, outputs, true)).unwrap_or_default()
    }

    fn check_part(&self, role: &str, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let Some(v) = &self.vision else { return Vec::new() };
        let why = match role {
            "vision" => vision_interface(v, inputs, outputs).err(),
            "embed" => embed_interface(&v.names, inputs, outputs).err(),
            _ => Some(format!("a vision-language model has no '{role}' part (parts: vision, embed)")),
        };
        why.map(|w| vec![SpecProblem::new(&format!(".parts.{role}"), w)]).unwrap_or_default()
    }

    fn many_short_runs(&self) -> bool {
        true
    }

    /// The decoder's KV cache (as text generation) and the image feature cache.
    fn working_memory(&self, file: &Path) -> Option<(u64, String)> {
        let (kv, what) = self.generation.as_ref()?.working_memory(file)?;
        let features = self.vision.as_ref().map_or(0, |v| v.feature_cache_mb);
        Some((kv + (features << 20), format!("{what} ({} MiB) and {features} MiB of cached image features", kv >> 20)))
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let (mut encoder, mut embed) = (None, None);
        for part in graph.parts {
            match part.role.as_str() {
                "vision" => encoder = Some(part),
                "embed" => embed = Some(part),
                _ => {}
            }
        }
        let (Some(encoder), Some(embed)) = (encoder, embed) else {
            return Err(InferError::unavailable("a vision-language variant needs parts 'vision' and 'embed'"));
        };
        let preparer = self.preparer(graph.dir, graph.limits)?;
        let embedder = Arc::new(VisionEmbedder::new(preparer.vision.clone(), encoder, embed)?);
        let generation = self.generation.clone().expect("checked by the preparer");
        let lexicon = preparer.admission.lexicon().clone();
        let generator =
            Generator::new(generation, lexicon, graph.inputs, graph.optional_inputs, graph.outputs, Some(embedder))?;
        Ok(Box::new(GeneratePipeline::new(Arc::new(generator), Arc::new(preparer))))
    }

    fn spec_preparer(&self, dir: &Path, limits: &Limits) -> Option<MakePreparer> {
        let (me, dir, limits) = (self.clone(), dir.to_path_buf(), limits.clone());
        Some(Box::new(move || Ok(Arc::new(me.preparer(&dir, &limits)?) as Arc<dyn Prepare>)))
    }
}

impl VisionLanguageSpec {
    /// What makes its requests ready: the template, the tokenizer, the image processor.
    fn preparer(&self, dir: &Path, limits: &Limits) -> Result<VisionPreparer, InferError> {
        let (Some(generation), Some(spec)) = (&self.generation, &self.vision) else {
            return Err(InferError::unavailable("vision-language needs 'generation' and 'vision' specs"));
        };
        // The template in its older place is generation's, with the stop strings it had there.
        let mut generation = generation.clone();
        if let Some(template) = &spec.chat_template {
            generation.chat_template = Some(ChatTemplateSpec::File(template.clone()));
            generation.chat_stop.get_or_insert_with(|| ChatPatterns::default().stop);
        }
        let admission = Admission::new(&generation, dir, limits.max_text_bytes)?;
        let image_token = admission.lexicon().token_id(&spec.image_token).ok_or_else(|| {
            InferError::unavailable(format!(
                "the image token '{}' is not in the tokenizer's vocabulary",
                spec.image_token
            ))
        })?;
        let vision = Arc::new(Vision::new(spec.clone(), limits.clone()));
        Ok(VisionPreparer { vision, admission: Arc::new(admission), image_token })
    }
}

/// Checks the vision encoder's interface; says whether it takes the pixel mask.
fn vision_interface(v: &VisionSpec, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Result<bool, String> {
    let names = &v.names;
    let pixels = inputs.iter().find(|i| i.name == names.pixel_values).ok_or_else(|| {
        format!("the vision encoder has no input '{}' (inputs: {})", names.pixel_values, list(inputs))
    })?;
    let t = v.tile as usize;
    let fits = |d: &Option<usize>| d.is_none_or(|d| d == t);
    match pixels.shape.as_slice() {
        [_, _, c, h, w] if c.is_none_or(|c| c == 3) && fits(h) && fits(w) && pixels.dtype == Some(DType::F32) => {}
        _ => {
            let dtype = pixels.dtype.map_or("of a type inferd does not carry".to_string(), |d| d.to_string());
            return Err(format!(
                "input '{}' is {dtype} {}; expected f32 [batch, views, 3, {t}, {t}] (vision.tile)",
                pixels.name,
                pixels.shape_text()
            ));
        }
    }
    let mask = inputs.iter().find(|i| i.name == names.pixel_attention_mask);
    if let Some(m) = mask
        && m.dtype != Some(DType::Bool)
    {
        return Err(format!("input '{}' must be bool", m.name));
    }
    if inputs.len() > 1 + mask.is_some() as usize {
        return Err(format!(
            "the vision encoder takes inputs inferd does not feed (inputs: {}; fed: {}, {})",
            list(inputs),
            names.pixel_values,
            names.pixel_attention_mask
        ));
    }
    if !outputs.iter().any(|o| o.name == names.image_features) {
        return Err(format!(
            "the vision encoder has no output '{}' (outputs: {})",
            names.image_features,
            list(outputs)
        ));
    }
    Ok(mask.is_some())
}

/// Checks the token embedding graph's interface.
fn embed_interface(names: &VisionNames, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Result<(), String> {
    match inputs {
        [i] if i.name == names.input_ids && i.dtype == Some(DType::I64) => {}
        _ => {
            return Err(format!(
                "the embedding graph must take only '{}' (i64); it takes {}",
                names.input_ids,
                list(inputs)
            ));
        }
    }
    if !outputs.iter().any(|o| o.name == names.inputs_embeds) {
        return Err(format!(
            "the embedding graph has no output '{}' (outputs: {})",
            names.inputs_embeds,
            list(outputs)
        ));
    }
    Ok(())
}

fn list(infos: &[TensorInfo]) -> String {
    infos.iter().map(|i| i.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// What the preparer and the embedder share: the processor and the
/// features of recent images.
struct Vision {
    spec: VisionSpec,
    processor: ImageProcessor,
    cache: Mutex<FeatureCache>,
    limits: Limits,
}

impl Vision {
    fn new(spec: VisionSpec, limits: Limits) -> Vision {
        let processor =
            ImageProcessor { longest_edge: spec.longest_edge, tile: spec.tile, mean: spec.mean, std: spec.std };
        let cache = Mutex::new(FeatureCache { entries: VecDeque::new(), bytes: 0, max: spec.feature_cache_mb << 20 });
        Vision { spec, processor, cache, limits }
    }

    /// Refuses text that spells the image token (it stands for an image in this model's prompts).
    fn no_image_token(&self, text: &str, how: &str) -> Result<(), InferError> {
        let token = &self.spec.image_token;
        if text.contains(token.as_str()) {
            return Err(InferError::bad_input(format!(
                "the text contains '{token}', which stands for an image in this model's prompts: {how}"
            )));
        }
        Ok(())
    }

    /// An image's views, or its cached features (then it is not decoded).
    fn image(&self, bytes: &[u8]) -> Result<ImageIn, InferError> {
        use sha2::Digest;
        let key: [u8; 32] = sha2::Sha256::digest(bytes).into();
        if let Some(f) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(ImageIn { key, rows: f.rows, cols: f.cols, views: Vec::new(), features: Some(f) });
        }
        let image = super::image::decode(bytes, &self.limits)?;
        let views = self.processor.views(&image).map_err(InferError::bad_input)?;
        Ok(ImageIn { key, rows: views.rows, cols: views.cols, views: views.views, features: None })
    }
}

/// One image of a request, as the prompt step needs it.
struct ImageIn {
    key: [u8; 32],
    rows: usize,
    cols: usize,
    /// Its views as 8-bit RGB (a quarter of their values' size while the
    /// job waits), none when the features were cached.
    views: Vec<image::RgbImage>,
    features: Option<Arc<Features>>,
}

/// An image's features, `[views × image_seq_len × hidden]`.
struct Features {
    rows: usize,
    cols: usize,
    views: usize,
    values: Vec<f32>,
}

impl Features {
    fn bytes(&self) -> u64 {
        (self.values.len() * std::mem::size_of::<f32>()) as u64
    }
}

/// Features of recent images by the hash of their bytes, least recently used out first.
struct FeatureCache {
    entries: VecDeque<([u8; 32], Arc<Features>)>,
    bytes: u64,
    max: u64,
}

impl FeatureCache {
    fn get(&mut self, key: &[u8; 32]) -> Option<Arc<Features>> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(at)?;
        let features = entry.1.clone();
        self.entries.push_back(entry);
        Some(features)
    }

    fn put(&mut self, key: [u8; 32], features: Arc<Features>) {
        let size = features.bytes();
        if size > self.max || self.entries.iter().any(|(k, _)| *k == key) {
            return;
        }
        while self.bytes + size > self.max {
            let Some((_, old)) = self.entries.pop_front() else { break };
            self.bytes -= old.bytes();
        }
        self.bytes += size;
        self.entries.push_back((key, features));
    }
}

/// Makes a chat with images ready: rendered by the template, each image
/// decoded and cut into views (on the decode threads) and put in the prompt
/// as a typed chunk.
struct VisionPreparer {
    vision: Arc<Vision>,
    admission: Arc<Admission>,
    /// The id of the image token (the slots an image's features fill).
    image_token: u32,
}

impl Prepare for VisionPreparer {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        let mut request = request_of(input)?;
        let v = &self.vision;
        let (chunks, chat) = match &mut request.prompt {
            Prompt::Text(t) => {
                v.no_image_token(t, "send images in a chat")?;
                self.admission.within_text_limit(t)?;
                (vec![Chunk::Text(t.clone())], false)
            }
            Prompt::Chat(messages) => {
                for m in messages.iter() {
                    v.no_image_token(&m.content, "send images as image_url parts")?;
                }
                let rendered = self.admission.render(messages, Content::Parts)?;
                // The limit is on what the client wrote: an image's tokens come on top.
                self.admission.within_text_limit(&rendered)?;
                let mut images = Vec::new();
                for m in messages.iter_mut() {
                    for (_, bytes) in std::mem::take(&mut m.images) {
                        let n = images.len() + 1;
                        images.push(
                            v.image(&bytes).map_err(|e| InferError::bad_input(format!("image {n}: {}", e.message)))?,
                        );
                    }
                }
                (chunks(&rendered, &v.spec, images, self.image_token)?, true)
            }
        };
        Ok(Prepared::new(self.admission.ready(request, chunks, chat)?))
    }

    fn off_worker(&self) -> bool {
        true
    }
}

/// The prompt as chunks: the template's text, and each image token it wrote
/// as the image's chunk (its views' prompt text, the views to embed).
fn chunks(rendered: &str, spec: &VisionSpec, images: Vec<ImageIn>, slot: u32) -> Result<Vec<Chunk>, InferError> {
    let pieces: Vec<&str> = rendered.split(spec.image_token.as_str()).collect();
    if pieces.len() - 1 != images.len() {
        return Err(InferError::bad_input(format!(
            "the chat template placed {} images; the messages have {}",
            pieces.len() - 1,
            images.len()
        )));
    }
    let mut images = images.into_iter();
    let mut out = Vec::with_capacity(2 * pieces.len());
    for piece in pieces {
        if !piece.is_empty() {
            out.push(Chunk::Text(piece.to_string()));
        }
        if let Some(image) = images.next() {
            let text = processor::image_prompt(image.rows, image.cols, spec.image_seq_len);
            out.push(Chunk::Embedded { text, slot, item: Box::new(image) });
        }
    }
    Ok(out)
}

/// Feeds the decoder: token embeddings from the `embed` graph, and for the
/// prompt step the images' features (from the `vision` graph, or cached) in
/// place of the image tokens.
struct VisionEmbedder {
    vision: Arc<Vision>,
    encoder: Mutex<Box<dyn InferenceBackend>>,
    /// Whether the encoder takes `pixel_attention_mask`.
    mask: bool,
    embed: Mutex<Box<dyn InferenceBackend>>,
}

impl VisionEmbedder {
    fn new(vision: Arc<Vision>, encoder: Part, embed: Part) -> Result<VisionEmbedder, InferError> {
        let mask = vision_interface(&vision.spec, encoder.engine.inputs(), encoder.engine.outputs())
            .map_err(|e| InferError::unavailable(format!("part 'vision': {e}")))?;
        embed_interface(&vision.spec.names, embed.engine.inputs(), embed.engine.outputs())
            .map_err(|e| InferError::unavailable(format!("part 'embed': {e}")))?;
        Ok(VisionEmbedder { vision, encoder: Mutex::new(encoder.engine), mask, embed: Mutex::new(embed.engine) })
    }

    /// The features of `image`: cached, or from the vision encoder (then cached).
    fn features(&self, image: ImageIn) -> Result<Arc<Features>, InferError> {
        if let Some(f) = image.features {
            return Ok(f);
        }
        let spec = &self.vision.spec;
        let n = image.views.len();
        let started = std::time::Instant::now();
        let mut values = Vec::new();
        // A few views per run: each view is encoded on its own, and the
        // encoder's working memory grows with the views of one run.
        for views in image.views.chunks(spec.max_views_per_run) {
            values.extend(self.encode(views)?);
        }
        tracing::debug!(views = n, ms = started.elapsed().as_secs_f64() * 1000.0, "vision encoder");
        let f = Arc::new(Features { rows: image.rows, cols: image.cols, views: n, values });
        self.vision.cache.lock().unwrap_or_else(|e| e.into_inner()).put(image.key, f.clone());
        Ok(f)
    }
}

impl VisionEmbedder {
    /// One run of the vision encoder: the features of `views`.
    fn encode(&self, views: &[image::RgbImage]) -> Result<Vec<f32>, InferError> {
        let spec = &self.vision.spec;
        let (n, t) = (views.len(), spec.tile as usize);
        let names = &spec.names;
        let mut pixels = Vec::with_capacity(n * 3 * t * t);
        for view in views {
            pixels.extend(self.vision.processor.pixel_values(view));
        }
        let mut inputs =
            vec![(names.pixel_values.clone(), Tensor { shape: vec![1, n, 3, t, t], data: TensorData::F32(pixels) })];
        if self.mask {
            inputs.push((
                names.pixel_attention_mask.clone(),
                Tensor { shape: vec![1, n, t, t], data: TensorData::Bool(vec![true; n * t * t]) },
            ));
        }
        let outputs = self.encoder.lock().unwrap_or_else(|e| e.into_inner()).run(inputs)?;
        let features = outputs
            .into_iter()
            .find(|(name, _)| *name == names.image_features)
            .ok_or_else(|| InferError::internal(format!("the vision encoder gave no '{}'", names.image_features)))?
            .1;
        let TensorData::F32(values) = features.data else {
            return Err(InferError::internal("the image features are not f32"));
        };
        if features.shape.len() != 3 || features.shape[0] * features.shape[1] != n * spec.image_seq_len {
            return Err(InferError::internal(format!(
                "the vision encoder gave features {:?} for {n} views of {} tokens (vision.image_seq_len)",
                features.shape, spec.image_seq_len
            )));
        }
        Ok(values)
    }
}

impl Embedder for VisionEmbedder {
    fn embed(&self, tokens: &[u32], placed: Vec<Placed>) -> Result<Vec<f32>, InferError> {
        let names = &self.vision.spec.names;
        let ids =
            Tensor { shape: vec![1, tokens.len()], data: TensorData::I64(tokens.iter().map(|&t| t as i64).collect()) };
        let outputs = self.embed.lock().unwrap_or_else(|e| e.into_inner()).run(vec![(names.input_ids.clone(), ids)])?;
        let embeds = outputs
            .into_iter()
            .find(|(name, _)| *name == names.inputs_embeds)
            .ok_or_else(|| InferError::internal(format!("the embedding graph gave no '{}'", names.inputs_embeds)))?
            .1;
        let TensorData::F32(mut values) = embeds.data else {
            return Err(InferError::internal("the token embeddings are not f32"));
        };
        let width = values.len() / tokens.len().max(1);
        for (n, placed) in placed.into_iter().enumerate() {
            let image =
                placed.item.downcast::<ImageIn>().map_err(|_| InferError::internal("embedded for another task"))?;
            let features = self.features(*image)?;
            let rows = features.views * self.vision.spec.image_seq_len;
            if features.values.len() != rows * width || placed.positions.len() != rows {
                return Err(InferError::internal(format!(
                    "image {}: {} feature values of width {width} for {} image tokens ({} per view)",
                    n + 1,
                    features.values.len(),
                    placed.positions.len(),
                    self.vision.spec.image_seq_len
                )));
            }
            for (feature, &at) in features.values.chunks(width).zip(&placed.positions) {
                let Some(slot) = values.get_mut(at * width..(at + 1) * width) else {
                    return Err(InferError::internal(format!("image {}: position {at} is past the prompt", n + 1)));
                };
                slot.copy_from_slice(feature);
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ChatMessage;
    use serde_json::Value;

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm/model")
    }

    fn view_count(image: &ImageIn) -> usize {
        image.features.as_ref().map_or(image.views.len(), |f| f.views)
    }

    /// The fixture's preparer, as models.json declares it.
    fn fixture() -> VisionPreparer {
        fixture_spec().preparer(&model_dir(), &Limits::default()).unwrap()
    }

    /// The fixture's section in models.json.
    fn fixture_spec() -> VisionLanguageSpec {
        let registry: Value = serde_json::from_slice(&std::fs::read(model_dir().join("models.json")).unwrap()).unwrap();
        let model = &registry["models"][0];
        serde_json::from_value(serde_json::json!({"generation": model["generation"], "vision": model["vision"]}))
            .unwrap()
    }

    fn fixture_vision() -> Vision {
        let spec = VisionSpec {
            chat_template: None,
            longest_edge: 192,
            tile: 64,
            image_seq_len: 4,
            mean: [0.5; 3],
            std: [0.5; 3],
            image_token: "<image>".into(),
            names: VisionNames::default(),
            feature_cache_mb: 1,
            max_views_per_run: 4,
        };
        Vision::new(spec, Limits::default())
    }

    fn ask(messages: Vec<ChatMessage>) -> JobInput {
        JobInput::Generate(crate::job::GenerateRequest { prompt: Prompt::Chat(messages), ..Default::default() })
    }

    /// The prompt the template renders, the pixel values (within 1e-6) and
    /// the token ids after expansion equal transformers' SmolVLMProcessor's
    /// for every recorded case (scripts/make_vlm_fixture_model.py), one image
    /// or two per message.
    #[test]
    fn prompts_and_input_ids_equal_transformers() {
        let dir = model_dir();
        let reference: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
        let preparer = fixture();
        let vision = &preparer.vision;
        let pictures = dir.parent().unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert!(cases.len() >= 7);
        for case in cases {
            let names: Vec<&str> = case["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
            let images: Vec<(usize, Vec<u8>)> =
                names.iter().map(|n| (0, std::fs::read(pictures.join(n)).unwrap())).collect();
            let message =
                ChatMessage { role: "user".into(), content: case["question"].as_str().unwrap().into(), images };
            let rendered = preparer.admission.render(std::slice::from_ref(&message), Content::Parts).unwrap();
            assert_eq!(rendered, case["prompt"].as_str().unwrap(), "{names:?}");
            let prepared: Vec<ImageIn> = message.images.iter().map(|(_, b)| vision.image(b).unwrap()).collect();
            let views: usize = prepared.iter().map(view_count).sum();
            assert_eq!(views, case["pixel_values_shape"][1].as_u64().unwrap() as usize, "{names:?}");
            // pixel_values: every view's values within 1e-6 of transformers' (probed, and summed).
            let values: Vec<f32> =
                prepared.iter().flat_map(|i| i.views.iter().flat_map(|v| vision.processor.pixel_values(v))).collect();
            let stride = reference["probe"].as_u64().unwrap() as usize;
            let probe = case["pixel_values_probe"].as_array().unwrap();
            assert_eq!(probe.len(), values.len().div_ceil(stride), "{names:?}");
            for (k, want) in probe.iter().enumerate() {
                let (got, want) = (values[k * stride], want.as_f64().unwrap());
                assert!((got as f64 - want).abs() <= 1e-6, "{names:?} value {}: {got} vs {want}", k * stride);
            }
            let sum: f64 = values.iter().map(|&v| v as f64).sum();
            let want = case["pixel_values_sum"].as_f64().unwrap();
            assert!((sum - want).abs() <= 1e-6 * values.len() as f64, "{names:?}: sum {sum} vs {want}");
            // The whole request made ready: transformers' input_ids, and each
            // image's features placed exactly where its image tokens are.
            let ready = preparer.prepare(ask(vec![message])).unwrap().take::<super::super::generate::Ready>().unwrap();
            let ids: Vec<u64> = ready.tokens().iter().map(|&i| i as u64).collect();
            let want: Vec<u64> = case["input_ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
            assert_eq!(ids, want, "{names:?}");
            let image_positions: Vec<usize> =
                (0..ids.len()).filter(|&i| ids[i] == u64::from(preparer.image_token)).collect();
            let placed: Vec<usize> = ready.placed().iter().flat_map(|p| p.positions.iter().copied()).collect();
            assert_eq!(placed, image_positions, "{names:?}");
            let per_image: Vec<usize> = ready.placed().iter().map(|p| p.positions.len()).collect();
            let want: Vec<usize> = prepared.iter().map(|i| view_count(i) * 4).collect();
            assert_eq!(per_image, want, "{names:?}: each image fills its own views' tokens");
        }
    }

    #[test]
    fn text_and_images_interleave_in_the_parts_the_template_sees() {
        let preparer = fixture();
        let render = |m: ChatMessage| preparer.admission.render(&[m], Content::Parts);
        let m =
            ChatMessage { role: "user".into(), content: "Left.Right.".into(), images: vec![(5, vec![]), (11, vec![])] };
        assert_eq!(render(m).unwrap(), "<|im_start|>User: Left.<image>Right.<image><end_of_utterance>\nAssistant:");
        let text = ChatMessage { role: "user".into(), content: "Hi".into(), images: vec![] };
        assert_eq!(render(text).unwrap(), "<|im_start|>User: Hi<end_of_utterance>\nAssistant:");
        let sneaky = ChatMessage { role: "user".into(), content: "a <image> b".into(), images: vec![] };
        let refused = preparer.prepare(ask(vec![sneaky])).err().unwrap();
        assert!(refused.message.contains("stands for an image"), "{refused:?}");
        let bad = preparer.vision.image(b"not an image").err().unwrap();
        assert_eq!(bad.kind, crate::error::ErrorKind::BadInput, "{bad:?}");
    }

    #[test]
    fn an_image_seen_before_comes_with_its_features_and_is_not_decoded_again() {
        let vision = fixture_vision();
        let bytes = std::fs::read(model_dir().parent().unwrap().join("images/odd.png")).unwrap();
        let first = vision.image(&bytes).unwrap();
        assert!(first.features.is_none() && first.views.iter().all(|v| v.dimensions() == (64, 64)));
        let n = first.views.len();
        let features = Features { rows: first.rows, cols: first.cols, views: n, values: vec![0.5; n * 4 * 64] };
        vision.cache.lock().unwrap().put(first.key, Arc::new(features));
        let again = vision.image(&bytes).unwrap();
        assert!(again.features.is_some() && again.views.is_empty());
        assert_eq!((again.rows, again.cols, view_count(&again)), (first.rows, first.cols, n));
        let other = vision.image(&std::fs::read(model_dir().parent().unwrap().join("images/tiny.png")).unwrap());
        assert!(other.unwrap().features.is_none(), "another image is its own");
    }

    #[test]
    fn a_vision_encoder_for_another_tile_size_is_refused_with_the_numbers() {
        let mut spec = fixture_vision().spec;
        let info = |name: &str, dtype, shape: &[Option<usize>]| TensorInfo {
            name: name.into(),
            dtype: Some(dtype),
            shape: shape.to_vec(),
        };
        let inputs = [
            info("pixel_values", DType::F32, &[None, None, Some(3), Some(64), Some(64)]),
            info("pixel_attention_mask", DType::Bool, &[None, None, Some(64), Some(64)]),
        ];
        let outputs = [info("image_features", DType::F32, &[None, Some(4), Some(64)])];
        assert_eq!(vision_interface(&spec, &inputs, &outputs), Ok(true));
        spec.tile = 32;
        let why = vision_interface(&spec, &inputs, &outputs).unwrap_err();
        assert_eq!(
            why,
            "input 'pixel_values' is f32 [?, ?, 3, 64, 64]; expected f32 [batch, views, 3, 32, 32] (vision.tile)"
        );
        let ids = [info("input_ids", DType::I64, &[None, None])];
        assert!(embed_interface(&spec.names, &ids, &outputs).unwrap_err().contains("no output 'inputs_embeds'"));
    }

    #[test]
    fn templates_written_for_python_jinja_render() {
        // Python string methods and raise_exception, as Hugging Face templates use them.
        let template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}\
            {{ m['role'].upper() }}:{% for p in m['content'] %}{% if p['type'] == 'text' %} {{ p['text'].strip() }}\
            {% else %}<image>{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}";
        let dir = std::env::temp_dir().join(format!("inferd-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t.jinja"), template).unwrap();
        std::fs::copy(model_dir().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        let mut spec = fixture_spec();
        spec.generation.as_mut().unwrap().chat_template = Some(ChatTemplateSpec::File("t.jinja".into()));
        let preparer = spec.preparer(&dir, &Limits::default()).unwrap();
        let m = ChatMessage { role: "user".into(), content: "  Gate?  ".into(), images: vec![(0, vec![])] };
        assert_eq!(preparer.admission.render(&[m], Content::Parts).unwrap(), "USER:<image> Gate?\nASSISTANT:");
        let system = ChatMessage { role: "system".into(), content: "x".into(), images: vec![] };
        let e = preparer.admission.render(&[system], Content::Parts).unwrap_err();
        assert!(e.kind == crate::error::ErrorKind::BadInput && e.message.contains("no system messages"), "{e:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_feature_cache_keeps_the_recent_images_within_its_bytes() {
        let f = |n: usize| Arc::new(Features { rows: 0, cols: 0, views: 1, values: vec![0.0; n] });
        let mut c = FeatureCache { entries: VecDeque::new(), bytes: 0, max: 1000 };
        c.put([1; 32], f(100)); // 400 bytes
        c.put([2; 32], f(100));
        assert!(c.get(&[1; 32]).is_some(), "a hit makes 1 the most recent");
        c.put([3; 32], f(100)); // 1200 > 1000: the least recent (2) goes
        assert!(c.get(&[2; 32]).is_none() && c.get(&[1; 32]).is_some() && c.get(&[3; 32]).is_some());
        assert!(c.bytes <= c.max);
        c.put([4; 32], f(1000)); // larger than the whole cache: not kept, nothing evicted
        assert!(c.get(&[4; 32]).is_none() && c.get(&[3; 32]).is_some());
    }
}
