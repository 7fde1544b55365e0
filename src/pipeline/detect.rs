//! The `object-detection` task: letterboxed image in, YOLO output decoded
//! (v5 `[1, N, 5 + C]` or v8 `[1, 4 + C, N]`, as models.json declares),
//! confidence filter, class-wise non-maximum suppression, and boxes mapped
//! back to the original image's pixels.

use super::image::{ImageInputSpec, ResizeMode};
use super::{Context, Graph, ImagePreparer, Pipeline, Prepare, Section, SingleGraph, SpecProblem, TaskSpec};
use crate::backend::NamedTensors;
use crate::error::InferError;
use crate::job::{Detection, InputKind, JobOptions, JobResult};
use crate::tensor::{DType, TensorData, TensorInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The models.json section of an `object-detection` model.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionTaskSpec {
    /// How images become the input tensor (letterbox or stretch: boxes are mapped back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ImageInputSpec>,
    /// How the YOLO output is decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<DetectionSpec>,
    /// A text file with one label per line, relative to models.json.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
}

impl Section for DetectionTaskSpec {
    const TASK: &'static str = "object-detection";
}

impl TaskSpec for DetectionTaskSpec {
    super::section_names!();

    fn takes(&self) -> (&'static [InputKind], &'static str) {
        super::AN_IMAGE
    }

    fn files(&self) -> Vec<(String, &Path)> {
        super::label_file(&self.labels)
    }

    fn batches(&self) -> bool {
        true
    }

    fn validate(&self) -> Vec<SpecProblem> {
        let mut problems = Vec::new();
        match &self.input {
            Some(input) => {
                problems.extend(input.validate());
                if input.resize == ResizeMode::CenterCrop {
                    problems.push(SpecProblem::new(
                        ".input.resize",
                        "object-detection needs letterbox or stretch (boxes are mapped back)",
                    ));
                }
            }
            None => problems.push(SpecProblem::new(".input", "object-detection needs an 'input' spec")),
        }
        match &self.detection {
            Some(d) => problems.extend(d.validate()),
            None => problems
                .push(SpecProblem::new(".detection", "object-detection needs a 'detection' spec with the YOLO layout")),
        }
        problems
    }

    fn check_io(&self, dir: &Path, inputs: &[TensorInfo], outputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let Some(input) = &self.input else { return Vec::new() };
        let labels = self.labels.as_ref().and_then(|l| super::read_labels(&dir.join(l)).ok());
        let mut problems = input.check_against(inputs);
        problems.extend(self.detection.iter().flat_map(|d| d.check_outputs(outputs, labels.as_deref())));
        problems
    }

    fn build(&self, graph: Graph<'_>) -> Result<Box<dyn Pipeline>, InferError> {
        let input =
            self.input.clone().ok_or_else(|| InferError::unavailable("object-detection needs an 'input' spec"))?;
        let detection = self
            .detection
            .clone()
            .ok_or_else(|| InferError::unavailable("object-detection needs a 'detection' spec"))?;
        Ok(Box::new(DetectPipeline {
            prepare: Arc::new(ImagePreparer { spec: input, limits: graph.limits.clone() }),
            detection,
            labels: super::labels_at(graph.dir, self.labels.as_ref())?,
        }))
    }
}

/// How a YOLO model lays out its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YoloLayout {
    /// `[1, N, 5 + C]`: cx, cy, w, h, objectness, class scores per row.
    Yolov5,
    /// `[1, 4 + C, N]`: cx, cy, w, h, class scores per column, no objectness.
    Yolov8,
}

/// models.json `detection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectionSpec {
    pub layout: YoloLayout,
    /// The output tensor; default the model's first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    /// Detections scoring below this are dropped.
    #[serde(default = "default_confidence")]
    pub confidence: f32,
    /// Boxes of one class overlapping more than this (IoU) are suppressed.
    #[serde(default = "default_iou")]
    pub iou: f32,
    #[serde(default = "default_max")]
    pub max_detections: usize,
}

fn default_confidence() -> f32 {
    0.25
}
fn default_iou() -> f32 {
    0.45
}
fn default_max() -> usize {
    100
}

impl DetectionSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        if !(0.0..=1.0).contains(&self.confidence) {
            p.push(SpecProblem::new(".detection.confidence", "must be within 0..1"));
        }
        if !(0.0..=1.0).contains(&self.iou) {
            p.push(SpecProblem::new(".detection.iou", "must be within 0..1"));
        }
        if self.max_detections == 0 {
            p.push(SpecProblem::new(".detection.max_detections", "must be at least 1"));
        }
        p
    }

    /// Compares the spec with the model's declared outputs (and label count).
    pub fn check_outputs(&self, outputs: &[TensorInfo], labels: Option<&[String]>) -> Vec<SpecProblem> {
        let info = match &self.tensor {
            Some(name) => outputs.iter().find(|o| &o.name == name),
            None => outputs.first(),
        };
        let Some(info) = info else {
            return vec![SpecProblem::new(".detection.tensor", "the model has no such output")];
        };
        let mut p = Vec::new();
        if info.dtype != Some(DType::F32) || info.shape.len() != 3 {
            p.push(SpecProblem::new(
                ".detection.tensor",
                format!("output '{}' {} must be f32 with 3 dims for a YOLO layout", info.name, info.shape_text()),
            ));
            return p;
        }
        let k = match self.layout {
            YoloLayout::Yolov5 => info.shape[2].map(|k| k.checked_sub(5)),
            YoloLayout::Yolov8 => info.shape[1].map(|k| k.checked_sub(4)),
        };
        match (k, labels) {
            (Some(None), _) => p.push(SpecProblem::new(
                ".detection.layout",
                format!("output {} is too small for {:?}", info.shape_text(), self.layout),
            )),
            (Some(Some(classes)), Some(labels)) if labels.len() != classes => p.push(SpecProblem::new(
                ".labels",
                format!("{} labels, but output {} has {classes} classes", labels.len(), info.shape_text()),
            )),
            _ => {}
        }
        p
    }
}

/// One decoded box in input-tensor pixels: corners, score and class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawBox {
    pub x1: f32,
    pub y1: f32,
    pub x2: f32,
    pub y2: f32,
    pub score: f32,
    pub class: usize,
}

fn iou(a: &RawBox, b: &RawBox) -> f32 {
    let ix = (a.x2.min(b.x2) - a.x1.max(b.x1)).max(0.0);
    let iy = (a.y2.min(b.y2) - a.y1.max(b.y1)).max(0.0);
    let inter = ix * iy;
    let union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Decodes a YOLO output of `shape` in `layout`: best class per candidate,
/// confidence filter, class-wise NMS, best first, at most `max` boxes.
pub fn decode(
    data: &[f32],
    shape: &[usize],
    layout: YoloLayout,
    conf: f32,
    iou_max: f32,
    max: usize,
) -> Result<Vec<RawBox>, String> {
    let [1, a, b] = shape[..] else {
        return Err(format!("expected a [1, _, _] output, got {shape:?}"));
    };
    let (n, k) = match layout {
        YoloLayout::Yolov5 => (a, b),
        YoloLayout::Yolov8 => (b, a),
    };
    let first_class = if layout == YoloLayout::Yolov5 { 5 } else { 4 };
    if k <= first_class || data.len() != n * k {
        return Err(format!("output {shape:?} does not fit the {layout:?} layout"));
    }
    let at = |i: usize, j: usize| match layout {
        YoloLayout::Yolov5 => data[i * k + j],
        YoloLayout::Yolov8 => data[j * n + i],
    };
    let mut cands = Vec::new();
    for i in 0..n {
        let obj = if layout == YoloLayout::Yolov5 { at(i, 4) } else { 1.0 };
        let (mut best, mut score) = (0, f32::NEG_INFINITY);
        for c in first_class..k {
            let s = obj * at(i, c);
            if s > score {
                (best, score) = (c - first_class, s);
            }
        }
        if score.is_nan() || score < conf {
            continue;
        }
        let (cx, cy, w, h) = (at(i, 0), at(i, 1), at(i, 2), at(i, 3));
        cands.push(RawBox {
            x1: cx - w / 2.0,
            y1: cy - h / 2.0,
            x2: cx + w / 2.0,
            y2: cy + h / 2.0,
            score,
            class: best,
        });
    }
    cands.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<RawBox> = Vec::new();
    for c in cands {
        if kept.iter().all(|k| k.class != c.class || iou(k, &c) <= iou_max) {
            kept.push(c);
            if kept.len() == max {
                break;
            }
        }
    }
    Ok(kept)
}

/// Image → labelled boxes.
struct DetectPipeline {
    prepare: Arc<ImagePreparer>,
    detection: DetectionSpec,
    labels: Vec<String>,
}

impl SingleGraph for DetectPipeline {
    fn preparer(&self) -> Arc<dyn Prepare> {
        self.prepare.clone()
    }

    fn finish(&self, outputs: NamedTensors, ctx: &Context, _options: &JobOptions) -> Result<JobResult, InferError> {
        let (name, tensor) = super::take_output(outputs, self.detection.tensor.as_deref(), "detection")?;
        let TensorData::F32(data) = &tensor.data else {
            return Err(InferError::backend(format!("output '{name}' is not f32")));
        };
        let d = &self.detection;
        let boxes = decode(data, &tensor.shape, d.layout, d.confidence, d.iou, d.max_detections)
            .map_err(InferError::backend)?;
        let (w, h) = ctx.image_size.ok_or_else(|| InferError::internal("no image size recorded"))?;
        let map = self.prepare.spec.inverse_mapping(w, h);
        let detections = boxes
            .into_iter()
            .map(|b| {
                let (x1, y1) = map(b.x1, b.y1);
                let (x2, y2) = map(b.x2, b.y2);
                Detection {
                    index: b.class,
                    label: self.labels.get(b.class).cloned(),
                    score: b.score,
                    bbox: [x1, y1, x2, y2],
                }
            })
            .collect();
        Ok(JobResult::Detections { detections })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v5_row(cx: f32, cy: f32, w: f32, h: f32, obj: f32, cls: [f32; 2]) -> Vec<f32> {
        vec![cx, cy, w, h, obj, cls[0], cls[1]]
    }

    #[test]
    fn nms_is_class_wise_and_filters_by_confidence() {
        let rows = [
            v5_row(10.0, 10.0, 10.0, 10.0, 1.0, [0.9, 0.1]),
            v5_row(11.0, 10.0, 10.0, 10.0, 1.0, [0.8, 0.1]), // same class, overlapping: suppressed
            v5_row(10.0, 10.0, 10.0, 10.0, 1.0, [0.1, 0.7]), // other class: kept
            v5_row(50.0, 50.0, 4.0, 4.0, 0.2, [0.9, 0.1]),   // 0.18 < 0.25: dropped
        ];
        let data: Vec<f32> = rows.concat();
        let got = decode(&data, &[1, 4, 7], YoloLayout::Yolov5, 0.25, 0.45, 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].class, got[1].class), (0, 1));
        assert_eq!((got[0].x1, got[0].y2), (5.0, 15.0));
    }

    #[test]
    fn v8_reads_columns_and_a_wrong_shape_is_an_error() {
        // two candidates, 2 classes: K = 6 rows, N = 2 columns
        let data = [10.0, 40.0, 10.0, 40.0, 4.0, 6.0, 4.0, 6.0, 0.9, 0.1, 0.2, 0.6];
        let got = decode(&data, &[1, 6, 2], YoloLayout::Yolov8, 0.25, 0.45, 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].class, got[0].score), (0, 0.9));
        assert_eq!((got[1].class, got[1].x1), (1, 37.0));
        assert!(decode(&data, &[1, 5, 2], YoloLayout::Yolov8, 0.25, 0.45, 10).is_err());
        assert!(decode(&data, &[6, 2], YoloLayout::Yolov8, 0.25, 0.45, 10).is_err());
    }
}
