//! The `ocr` task: PP-OCR's three graphs run as one model. The variant's
//! `file` is the text detector (DB), `parts.rec` the recogniser (CTC) and
//! the optional `parts.cls` the angle classifier. A job goes: decode →
//! scale into bounds (longest side ≤ `max_side`) → black bands above and below short or
//! very wide images → detector at the shorter side `det_limit_side`, multiples of 32 → DB boxes in
//! reading order → straightened crops → angle classifier (turns upside-down lines) →
//! recogniser in batches of similar width → CTC greedy → lines under
//! `text_score` dropped → boxes mapped back to the original image. The
//! defaults and steps are those of RapidOCR, the reference the accuracy
//! tests compare with; `det_max_side` is inferd's own bound on memory.

pub mod ctc;
pub mod db;
pub mod imgops;

use super::{Graph, Part, Pipeline, Prepare, Prepared, Section, SpecProblem, TaskSpec};
use crate::backend::InferenceBackend;
use crate::config::Limits;
use crate::error::InferError;
use crate::job::{InputKind, JobInput, JobOptions, JobResult, TextLine, Timings};
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use db::Quad;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// The models.json section of an `ocr` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcrTaskSpec {
    /// Detection, recognition and angle settings; RapidOCR's defaults when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ocr: Option<OcrSpec>,
}

impl Section for OcrTaskSpec {
    const TASK: &'static str = "ocr";
}

impl TaskSpec for OcrTaskSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        super::AN_IMAGE
    }

    fn parts(&self) -> (&'static [&'static str], &'static [&'static str]) {
        (&PARTS[..1], &PARTS[1..])
    }

    fn validate(&self) -> Vec<SpecProblem> {
        self.ocr.as_ref().map(OcrSpec::validate).unwrap_or_default()
    }

    fn check_io(&self, _dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        check_detector(inputs, outputs)
    }

    fn check_part(&self, role: &str, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        check_part(role, inputs, outputs)
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        Ok(Box::new(OcrPipeline::new(self.ocr.clone().unwrap_or_default(), graph.parts, graph.limits)?))
    }
}

/// Decodes a job's image into pixels, on the decode threads.
struct Decode {
    limits: Limits,
}

impl Prepare for Decode {
    fn prepare(&self, input: JobInput) -> Result<Prepared, InferError> {
        let JobInput::Image(bytes) = input else { return Err(InferError::bad_input("ocr takes an image")) };
        Ok(Prepared::new(super::image::decode(&bytes, &self.limits)?))
    }

    fn off_worker(&self) -> bool {
        true
    }
}

/// How the detector's input size is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitType {
    /// The shorter side is scaled up to `det_limit_side` (PP-OCR mobile default).
    Min,
    /// The longer side is scaled down to `det_limit_side`.
    Max,
}

/// models.json `ocr`: every knob of the OCR pipeline, with RapidOCR's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OcrSpec {
    /// Images with a longer side over this many px are scaled down first.
    pub max_side: u32,
    /// Images with a shorter side under this many px are scaled up first.
    pub min_side: u32,
    /// Images this short, or wider than `max_aspect` × their height, get black bands above and below.
    pub min_height: u32,
    pub max_aspect: f32,
    /// Detector input: see `det_limit`; then rounded to multiples of 32.
    pub det_limit_side: u32,
    pub det_limit: LimitType,
    /// Detector input never exceeds this many px on its longer side (bounds memory on extreme aspect ratios).
    pub det_max_side: u32,
    /// Per-channel normalisation of the detector input, B G R: `(v/255 − mean) / std`.
    pub det_mean: [f32; 3],
    pub det_std: [f32; 3],
    /// Probability above which a map pixel is text.
    pub det_threshold: f32,
    /// Boxes with a lower mean probability are dropped.
    pub box_threshold: f32,
    /// How far boxes grow beyond the shrunk text kernel (DB's unclip ratio).
    pub unclip_ratio: f32,
    /// At most this many boxes per image.
    pub max_boxes: usize,
    /// Grow the binary map by a pixel before finding boxes.
    pub dilate: bool,
    /// Run the angle classifier when the variant has one.
    pub use_angle_classifier: bool,
    /// A line is turned when the classifier says 180° with more than this score.
    pub angle_threshold: f32,
    /// Lines recognised with a lower confidence are dropped.
    pub text_score: f32,
    /// Crops per recogniser / classifier run.
    pub batch: usize,
    /// The narrowest recogniser input (px); wider lines widen their batch.
    pub rec_min_width: u32,
}

impl Default for OcrSpec {
    fn default() -> Self {
        OcrSpec {
            max_side: 2000,
            min_side: 30,
            min_height: 30,
            max_aspect: 8.0,
            det_limit_side: 736,
            det_limit: LimitType::Min,
            det_max_side: 6144,
            det_mean: [0.5; 3],
            det_std: [0.5; 3],
            det_threshold: 0.3,
            box_threshold: 0.5,
            unclip_ratio: 1.6,
            max_boxes: 1000,
            dilate: true,
            use_angle_classifier: true,
            angle_threshold: 0.9,
            text_score: 0.5,
            batch: 6,
            rec_min_width: 320,
        }
    }
}

impl OcrSpec {
    /// Checks ranges; paths are relative to the model (`.ocr.batch`).
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        let mut need = |ok: bool, field: &str, what: &str| {
            if !ok {
                p.push(SpecProblem::new(&format!(".ocr.{field}"), what));
            }
        };
        need(self.max_side >= 32, "max_side", "must be at least 32");
        need(self.min_side >= 1 && self.min_side <= self.max_side, "min_side", "must be 1..=max_side");
        need(self.max_aspect > 0.0, "max_aspect", "must be above 0");
        need((32..=self.det_max_side).contains(&self.det_limit_side), "det_limit_side", "must be 32..=det_max_side");
        need(self.det_max_side <= 16384, "det_max_side", "must be at most 16384");
        need(self.det_std.iter().all(|s| *s != 0.0), "det_std", "must not contain 0");
        for (field, v) in [
            ("det_threshold", self.det_threshold),
            ("box_threshold", self.box_threshold),
            ("angle_threshold", self.angle_threshold),
            ("text_score", self.text_score),
        ] {
            need((0.0..=1.0).contains(&v), field, "must be between 0 and 1");
        }
        need(self.unclip_ratio > 0.0, "unclip_ratio", "must be above 0");
        need((1..=100_000).contains(&self.max_boxes), "max_boxes", "must be 1..=100000");
        need((1..=64).contains(&self.batch), "batch", "must be 1..=64");
        need(self.rec_min_width >= 8, "rec_min_width", "must be at least 8");
        p
    }

    fn db(&self) -> db::DbParams {
        db::DbParams {
            threshold: self.det_threshold,
            box_threshold: self.box_threshold,
            unclip_ratio: self.unclip_ratio,
            max_candidates: self.max_boxes,
            dilate: self.dilate,
        }
    }
}

/// The parts an OCR variant may have besides its detector `file`.
pub const PARTS: [&str; 2] = ["rec", "cls"];

/// Checks the detector's declared input: `[batch, 3, height, width]` f32.
pub fn check_detector(inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
    let mut p = Vec::new();
    if let Err(m) = image_input(inputs, "the detector") {
        p.push(SpecProblem::new(".variants", m));
    }
    if outputs.first().is_none_or(|o| o.shape.len() != 4) {
        p.push(SpecProblem::new(".variants", "the detector must output a [batch, 1, height, width] probability map"));
    }
    p
}

/// Checks a part's declared inputs and outputs (`rec`, `cls`).
pub fn check_part(role: &str, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
    let at = format!(".parts.{role}");
    let mut p = Vec::new();
    if let Err(m) = image_input(inputs, &format!("the '{role}' part")) {
        p.push(SpecProblem::new(&at, m));
    }
    let first = outputs.first().map(|o| &o.shape[..]);
    let fits = match role {
        // [batch, steps, classes]
        "rec" => matches!(first, Some([_, _, _])),
        // [batch, 2]: 0° and 180°
        "cls" => matches!(first, Some([_, Some(2) | None])),
        _ => return vec![SpecProblem::new(&at, format!("an ocr model has no '{role}' part (parts: rec, cls)"))],
    };
    if !fits {
        let want = if role == "rec" { "[batch, steps, classes] (a CTC recogniser)" } else { "[batch, 2] (0°, 180°)" };
        p.push(SpecProblem::new(&at, format!("the '{role}' part must output {want}")));
    }
    p
}

/// The `[batch, 3, height, width]` f32 input of an OCR graph, or why not.
fn image_input<'a>(inputs: &'a [TensorInfo], what: &str) -> Result<&'a TensorInfo, String> {
    match inputs {
        [i] if i.shape.len() == 4 && i.shape[1].is_none_or(|c| c == 3) && i.dtype.is_none_or(|d| d == DType::F32) => {
            Ok(i)
        }
        _ => Err(format!(
            "{what} must take one f32 [batch, 3, height, width] image input, it declares {}",
            inputs.iter().map(|i| format!("'{}' {}", i.name, i.shape_text())).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A graph run on a batch of crops with a fixed height (recogniser, classifier).
struct CropGraph {
    engine: Box<dyn InferenceBackend>,
    input: String,
    height: u32,
    /// Fixed input width (classifier), or none (recogniser: per batch).
    width: Option<u32>,
    lut: imgops::Lut,
}

impl CropGraph {
    fn new(part: Part, default_height: u32) -> Result<CropGraph, InferError> {
        let info = image_input(part.engine.inputs(), &format!("the '{}' part", part.role))
            .map_err(InferError::unavailable)?
            .clone();
        Ok(CropGraph {
            height: info.shape[2].map_or(default_height, |h| h as u32),
            width: info.shape[3].map(|w| w as u32),
            input: info.name,
            engine: part.engine,
            lut: imgops::crop_lut(),
        })
    }

    /// Runs `crops` (all as wide as `width` after padding) and returns the first output.
    fn run(&mut self, crops: &[&RgbImage], width: u32, infer_ms: &mut f64) -> Result<Tensor, InferError> {
        let (h, w) = (self.height as usize, width as usize);
        let mut data = vec![0f32; crops.len() * 3 * h * w];
        for (crop, slot) in crops.iter().zip(data.chunks_exact_mut(3 * h * w)) {
            let ratio = crop.width() as f64 / crop.height() as f64;
            let rw = ((self.height as f64 * ratio).ceil() as u32).clamp(1, width);
            let resized = imgops::resize_linear(crop, rw, self.height);
            imgops::write_bgr_planes(&resized, slot, w, &self.lut);
        }
        let tensor = Tensor { shape: vec![crops.len(), 3, h, w], data: TensorData::F32(data) };
        let t = Instant::now();
        let outputs = self.engine.run(vec![(self.input.clone(), tensor)])?;
        *infer_ms += t.elapsed().as_secs_f64() * 1000.0;
        outputs.into_iter().next().map(|(_, t)| t).ok_or_else(|| InferError::backend("the graph returned no output"))
    }
}

/// Indices of `crops` sorted by width/height ratio (stable), in batches of `batch`.
fn batches_by_ratio(crops: &[RgbImage], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..crops.len()).collect();
    let ratio = |i: usize| crops[i].width() as f64 / crops[i].height() as f64;
    order.sort_by(|&a, &b| ratio(a).total_cmp(&ratio(b)));
    order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

/// Image → text lines (the `ocr` task).
pub struct OcrPipeline {
    spec: OcrSpec,
    decode: Arc<Decode>,
    det_lut: imgops::Lut,
    rec: CropGraph,
    classes: Vec<String>,
    cls: Option<CropGraph>,
}

impl OcrPipeline {
    /// Builds the pipeline from the recogniser part (its `character` metadata
    /// is the dictionary) and the optional angle classifier.
    pub fn new(spec: OcrSpec, parts: Vec<Part>, limits: &Limits) -> Result<OcrPipeline, InferError> {
        let (mut rec, mut cls) = (None, None);
        for part in parts {
            match part.role.as_str() {
                "rec" => rec = Some(part),
                "cls" => cls = Some(part),
                other => return Err(InferError::unavailable(format!("an ocr model has no '{other}' part"))),
            }
        }
        let rec = rec.ok_or_else(|| InferError::unavailable("the ocr variant has no 'rec' part"))?;
        let meta = crate::backend::onnx_file::metadata(&rec.file).map_err(InferError::unavailable)?;
        let character = meta.get("character").ok_or_else(|| {
            InferError::unavailable(format!(
                "the recogniser {} has no 'character' metadata (its dictionary)",
                rec.file.display()
            ))
        })?;
        let classes = ctc::paddle_classes(character);
        let rec = CropGraph::new(rec, 48)?;
        let cls = match cls {
            Some(c) if spec.use_angle_classifier => Some(CropGraph::new(c, 48)?),
            _ => None,
        };
        let det_lut = imgops::det_lut(spec.det_mean, spec.det_std);
        let decode = Arc::new(Decode { limits: limits.clone() });
        Ok(OcrPipeline { det_lut, spec, decode, rec, classes, cls })
    }

    /// Scales `img` into `min_side..=max_side` (sides multiples of 32, as
    /// RapidOCR); returns it with the original/scaled ratios.
    fn bound(&self, img: RgbImage) -> (RgbImage, f64, f64) {
        let (w, h) = img.dimensions();
        let scale = if w.max(h) > self.spec.max_side {
            self.spec.max_side as f64 / w.max(h) as f64
        } else if w.min(h) < self.spec.min_side {
            self.spec.min_side as f64 / w.min(h) as f64
        } else {
            return (img, 1.0, 1.0);
        };
        let (nw, nh) = (round32(w as f64 * scale), round32(h as f64 * scale));
        let out = imgops::resize_linear(&img, nw, nh);
        (out, w as f64 / nw as f64, h as f64 / nh as f64)
    }

    /// Black bands above and below short or very wide images, so the
    /// detector sees text at a usable scale; returns the band height.
    fn pad(&self, img: RgbImage) -> (RgbImage, u32) {
        let (w, h) = img.dimensions();
        if h > self.spec.min_height && (w as f32 / h as f32) <= self.spec.max_aspect {
            return (img, 0);
        }
        let new_h = ((w as f32 / self.spec.max_aspect) as u32).max(self.spec.min_height) * 2;
        let band = new_h.abs_diff(h) / 2;
        let mut out = RgbImage::new(w, h + 2 * band);
        image::imageops::replace(&mut out, &img, 0, band.into());
        (out, band)
    }

    /// The detector's input size for a `w`×`h` image: `det_limit` applied,
    /// multiples of 32, capped at `det_max_side`; `None` when it rounds to nothing.
    fn det_size(&self, w: u32, h: u32) -> Option<(u32, u32)> {
        let s = &self.spec;
        let (short, long) = (w.min(h) as f64, w.max(h) as f64);
        let mut ratio = match s.det_limit {
            LimitType::Min if short < s.det_limit_side as f64 => s.det_limit_side as f64 / short,
            LimitType::Max if long > s.det_limit_side as f64 => s.det_limit_side as f64 / long,
            _ => 1.0,
        };
        if long * ratio > s.det_max_side as f64 {
            ratio = s.det_max_side as f64 / long;
        }
        let round = |v: f64| ((v.trunc() / 32.0).round_ties_even() * 32.0) as u32;
        let (dw, dh) = (round(w as f64 * ratio), round(h as f64 * ratio));
        (dw > 0 && dh > 0).then_some((dw, dh))
    }

    /// Text boxes in `img`, in reading order, in its pixels.
    fn detect(
        &self,
        det: &mut dyn InferenceBackend,
        img: &RgbImage,
        infer_ms: &mut f64,
    ) -> Result<Vec<Quad>, InferError> {
        let (w, h) = img.dimensions();
        let Some((dw, dh)) = self.det_size(w, h) else { return Ok(Vec::new()) };
        let resized = imgops::resize_linear(img, dw, dh);
        let mut data = vec![0f32; 3 * dw as usize * dh as usize];
        imgops::write_bgr_planes(&resized, &mut data, dw as usize, &self.det_lut);
        let name = det.inputs()[0].name.clone();
        let t = Instant::now();
        let outputs =
            det.run(vec![(name, Tensor { shape: vec![1, 3, dh as usize, dw as usize], data: TensorData::F32(data) })])?;
        *infer_ms += t.elapsed().as_secs_f64() * 1000.0;
        let (name, map) =
            outputs.into_iter().next().ok_or_else(|| InferError::backend("the detector returned nothing"))?;
        let (TensorData::F32(prob), [1, 1, mh, mw]) = (&map.data, &map.shape[..]) else {
            return Err(InferError::backend(format!(
                "detector output '{name}' is not f32 [1, 1, h, w]: {:?}",
                map.shape
            )));
        };
        let mut quads: Vec<Quad> = db::boxes(prob, *mw, *mh, w, h, &self.spec.db())
            .into_iter()
            .filter_map(|(q, _)| db::clip_box(&q, w, h))
            .collect();
        db::reading_order(&mut quads, |q| q[0]);
        Ok(quads)
    }

    /// Turns crops the classifier reads as upside down.
    fn straighten(&mut self, crops: &mut [RgbImage], infer_ms: &mut f64) -> Result<(), InferError> {
        let Some(cls) = self.cls.as_mut() else { return Ok(()) };
        let width = cls.width.unwrap_or(192);
        for batch in batches_by_ratio(crops, self.spec.batch) {
            let out = cls.run(&batch.iter().map(|&i| &crops[i]).collect::<Vec<_>>(), width, infer_ms)?;
            let (TensorData::F32(probs), [n, 2]) = (&out.data, &out.shape[..]) else {
                return Err(InferError::backend(format!("angle classifier output is not f32 [n, 2]: {:?}", out.shape)));
            };
            if *n != batch.len() {
                return Err(InferError::backend("angle classifier answered for another number of crops"));
            }
            for (k, &i) in batch.iter().enumerate() {
                let (p0, p180) = (probs[2 * k], probs[2 * k + 1]);
                if p180 > p0 && p180 > self.spec.angle_threshold {
                    crops[i] = image::imageops::rotate180(&crops[i]);
                }
            }
        }
        Ok(())
    }

    /// Recognises each crop: its text and confidence, in the crops' order.
    fn recognise(&mut self, crops: &[RgbImage], infer_ms: &mut f64) -> Result<Vec<(String, f32)>, InferError> {
        let mut out = vec![(String::new(), 0.0); crops.len()];
        let h = self.rec.height as f64;
        for batch in batches_by_ratio(crops, self.spec.batch) {
            let widest = batch.iter().map(|&i| crops[i].width() as f64 / crops[i].height() as f64).fold(0.0, f64::max);
            let ratio = widest.max(self.spec.rec_min_width as f64 / h);
            let width = (h * ratio) as u32;
            let probs = self.rec.run(&batch.iter().map(|&i| &crops[i]).collect::<Vec<_>>(), width, infer_ms)?;
            let (TensorData::F32(p), [n, steps, classes]) = (&probs.data, &probs.shape[..]) else {
                return Err(InferError::backend(format!(
                    "recogniser output is not f32 [n, steps, classes]: {:?}",
                    probs.shape
                )));
            };
            if *n != batch.len() || *classes != self.classes.len() {
                return Err(InferError::backend(format!(
                    "recogniser output {:?} does not fit {} crops and its dictionary of {} classes",
                    probs.shape,
                    batch.len(),
                    self.classes.len()
                )));
            }
            for (k, &i) in batch.iter().enumerate() {
                out[i] = ctc::greedy(&p[k * steps * classes..][..steps * classes], &self.classes)
                    .map_err(InferError::backend)?;
            }
        }
        Ok(out)
    }
}

/// `v` rounded to a multiple of 32, at least 32 (RapidOCR rounds half to even).
fn round32(v: f64) -> u32 {
    (((v.trunc() / 32.0).round_ties_even() as u32) * 32).max(32)
}

impl Pipeline for OcrPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.decode.clone()
    }

    fn run(
        &mut self,
        det: &mut dyn InferenceBackend,
        input: Prepared,
        _options: &JobOptions,
        timings: &mut Timings,
    ) -> Result<JobResult, InferError> {
        let lines = self.read(det, input, timings)?;
        Ok(JobResult::Ocr { lines })
    }
}

impl OcrPipeline {
    /// Reads the text lines of a prepared image (tasks built on OCR call this,
    /// then make their own answer), adding where the time went to `timings`.
    pub fn read(
        &mut self,
        det: &mut dyn InferenceBackend,
        input: Prepared,
        timings: &mut Timings,
    ) -> Result<Vec<TextLine>, InferError> {
        let started = Instant::now();
        let img: RgbImage = input.take()?;
        let mut infer_ms = 0.0;
        let (raw_w, raw_h) = img.dimensions();
        let (img, rx, ry) = self.bound(img);
        let (img, band) = self.pad(img);
        let pre_ms = started.elapsed().as_secs_f64() * 1000.0;
        let quads = self.detect(det, &img, &mut infer_ms)?;
        let mut crops = Vec::with_capacity(quads.len());
        let mut kept = Vec::with_capacity(quads.len());
        for q in quads {
            if let Some(c) = imgops::crop_quad(&img, &q) {
                crops.push(c);
                kept.push(q);
            }
        }
        self.straighten(&mut crops, &mut infer_ms)?;
        let texts = self.recognise(&crops, &mut infer_ms)?;
        let back = |p: [f32; 2]| {
            [
                ((p[0] as f64 * rx).clamp(0.0, raw_w as f64)) as f32,
                (((p[1] as f64 - band as f64) * ry).clamp(0.0, raw_h as f64)) as f32,
            ]
        };
        let lines: Vec<TextLine> = kept
            .into_iter()
            .zip(texts)
            .filter(|(_, (_, score))| *score >= self.spec.text_score)
            .map(|(q, (text, confidence))| TextLine { text, confidence, quad: q.map(back) })
            .collect();
        let total = started.elapsed().as_secs_f64() * 1000.0;
        timings.pre_ms += pre_ms;
        timings.infer_ms += infer_ms;
        timings.post_ms += (total - pre_ms - infer_ms).max(0.0);
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_is_valid_and_bad_values_are_named() {
        assert!(OcrSpec::default().validate().is_empty());
        let bad = OcrSpec { batch: 0, text_score: 2.0, ..Default::default() };
        let paths: Vec<String> = bad.validate().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, vec![".ocr.text_score", ".ocr.batch"]);
    }

    #[test]
    fn sides_round_to_multiples_of_32_like_the_reference() {
        assert_eq!(round32(736.0), 736);
        assert_eq!(round32(48.0), 64); // 1.5 → 2
        assert_eq!(round32(80.0), 64); // 2.5 → 2 (half to even)
        assert_eq!(round32(3.0), 32);
    }
}
