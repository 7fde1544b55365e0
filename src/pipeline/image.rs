//! Images to tensors: decode JPEG/PNG under hard limits (dimensions are
//! checked from the header, before any pixel buffer is allocated), resize
//! (stretch, letterbox or center-crop) with a SIMD resizer, then lay out and
//! normalise into the model's input tensor.

use super::SpecProblem;
use crate::config::Limits;
use crate::error::InferError;
use crate::tensor::{DType, Tensor, TensorData, TensorInfo};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer, images::Image as FirImage};
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// Where channels sit in the input tensor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    #[default]
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// How an image of another size is brought to the input size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Scale both sides to the input size; the aspect ratio may change.
    #[default]
    Stretch,
    /// Keep the aspect ratio and pad with `pad_value`.
    Letterbox,
    /// Keep the aspect ratio, cover the input and cut the overflow evenly.
    CenterCrop,
}

/// The order of colour channels the model expects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelOrder {
    #[default]
    #[serde(rename = "RGB")]
    Rgb,
    #[serde(rename = "BGR")]
    Bgr,
}

/// Element type of the image tensor: `f32` is normalised, `u8` is raw pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDType {
    #[default]
    F32,
    U8,
}

/// models.json `input` for image tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInputSpec {
    /// Name of the model's image input tensor.
    pub tensor: String,
    #[serde(default)]
    pub layout: Layout,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub resize: ResizeMode,
    #[serde(default)]
    pub channels: ChannelOrder,
    /// Pixels (0-255) are multiplied by this first; default 1/255.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Subtracted per channel after scaling, in the model's channel order.
    #[serde(default = "default_mean")]
    pub mean: Vec<f32>,
    /// Divides per channel after the mean, in the model's channel order.
    #[serde(default = "default_std")]
    pub std: Vec<f32>,
    #[serde(default)]
    pub dtype: ImageDType,
    /// Fill for letterbox padding (0-255).
    #[serde(default = "default_pad")]
    pub pad_value: u8,
}

fn default_scale() -> f32 {
    1.0 / 255.0
}
fn default_mean() -> Vec<f32> {
    vec![0.0; 3]
}
fn default_std() -> Vec<f32> {
    vec![1.0; 3]
}
fn default_pad() -> u8 {
    114
}

/// The largest input side a spec may declare.
const MAX_INPUT_SIDE: u32 = 8192;

impl ImageInputSpec {
    /// Checks the spec on its own.
    pub fn validate(&self) -> Vec<SpecProblem> {
        let mut p = Vec::new();
        if self.tensor.is_empty() {
            p.push(SpecProblem::new(".input.tensor", "must name the model's image input"));
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || v > MAX_INPUT_SIDE {
                p.push(SpecProblem::new(&format!(".input.{field}"), format!("must be 1..={MAX_INPUT_SIDE}, got {v}")));
            }
        }
        for (field, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 3 {
                p.push(SpecProblem::new(
                    &format!(".input.{field}"),
                    format!("needs 3 values (one per channel), got {}", v.len()),
                ));
            }
        }
        if self.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            p.push(SpecProblem::new(".input.std", "values must be finite and not 0"));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            p.push(SpecProblem::new(".input.scale", "must be finite and not 0"));
        }
        p
    }

    /// Compares the spec with the model's declared inputs.
    pub fn check_against(&self, inputs: &[TensorInfo]) -> Vec<SpecProblem> {
        let Some(info) = inputs.iter().find(|i| i.name == self.tensor) else {
            let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
            return vec![SpecProblem::new(
                ".input.tensor",
                format!("the model has no input '{}' (inputs: {})", self.tensor, names.join(", ")),
            )];
        };
        let mut p = Vec::new();
        if inputs.len() > 1 {
            let others: Vec<&str> = inputs.iter().filter(|i| i.name != self.tensor).map(|i| i.name.as_str()).collect();
            p.push(SpecProblem::new(
                ".input.tensor",
                format!("the model also needs inputs this task cannot feed: {}", others.join(", ")),
            ));
        }
        let want = match self.dtype {
            ImageDType::F32 => DType::F32,
            ImageDType::U8 => DType::U8,
        };
        if info.dtype != Some(want) {
            let got = info.dtype.map_or("an unsupported type".to_string(), |d| d.to_string());
            p.push(SpecProblem::new(
                ".input.dtype",
                format!("spec says {want}, the model's input '{}' is {got}", info.name),
            ));
        }
        if info.shape.len() != 4 {
            p.push(SpecProblem::new(
                ".input.tensor",
                format!("input '{}' has shape {}, an image input needs 4 dims", info.name, info.shape_text()),
            ));
            return p;
        }
        let (c, h, w) = match self.layout {
            Layout::Nchw => (info.shape[1], info.shape[2], info.shape[3]),
            Layout::Nhwc => (info.shape[3], info.shape[1], info.shape[2]),
        };
        if c.is_some_and(|c| c != 3) {
            p.push(SpecProblem::new(
                ".input.layout",
                format!(
                    "with layout {:?} the channel dim of {} is {}, not 3",
                    self.layout,
                    info.name,
                    info.shape_text()
                ),
            ));
        }
        for (field, declared, spec) in [("height", h, self.height), ("width", w, self.width)] {
            if let Some(d) = declared
                && d != spec as usize
            {
                p.push(SpecProblem::new(
                    &format!(".input.{field}"),
                    format!("spec says {spec}, the model's input '{}' {} has {d}", info.name, info.shape_text()),
                ));
            }
        }
        p
    }

    /// Decodes `bytes` under `limits` and builds the input tensor (batch of
    /// one); also returns the original width and height.
    pub fn tensor_and_size(&self, bytes: &[u8], limits: &Limits) -> Result<(Tensor, (u32, u32)), InferError> {
        let rgb = decode(bytes, limits)?;
        let size = rgb.dimensions();
        Ok((self.tensor_of(rgb)?, size))
    }

    /// The input tensor (batch of one) of decoded pixels: resized, laid out, normalised.
    pub fn tensor_of(&self, rgb: RgbImage) -> Result<Tensor, InferError> {
        Ok(self.to_tensor(&self.resize(rgb)?))
    }

    /// Maps a point in input-tensor pixels back to the original `w`×`h`
    /// image, undoing the letterbox or stretch, clamped to the image.
    pub fn inverse_mapping(&self, w: u32, h: u32) -> impl Fn(f32, f32) -> (f32, f32) + use<> {
        let (fw, fh, ftw, fth) = (w as f64, h as f64, self.width as f64, self.height as f64);
        let (sx, sy, px, py) = match self.resize {
            ResizeMode::Letterbox => {
                let scale = (ftw / fw).min(fth / fh);
                let nw = ((fw * scale).round() as u32).clamp(1, self.width);
                let nh = ((fh * scale).round() as u32).clamp(1, self.height);
                (scale, scale, ((self.width - nw) / 2) as f64, ((self.height - nh) / 2) as f64)
            }
            _ => (ftw / fw, fth / fh, 0.0, 0.0),
        };
        move |x: f32, y: f32| {
            let ox = ((x as f64 - px) / sx).clamp(0.0, fw);
            let oy = ((y as f64 - py) / sy).clamp(0.0, fh);
            (ox as f32, oy as f32)
        }
    }

    fn resize(&self, img: RgbImage) -> Result<RgbImage, InferError> {
        let (w, h) = img.dimensions();
        let (tw, th) = (self.width, self.height);
        if (w, h) == (tw, th) {
            return Ok(img);
        }
        let (fw, fh, ftw, fth) = (w as f64, h as f64, tw as f64, th as f64);
        match self.resize {
            ResizeMode::Stretch => resize_rgb(img, tw, th, None),
            ResizeMode::CenterCrop => {
                let scale = (ftw / fw).max(fth / fh);
                let (cw, ch) = (ftw / scale, fth / scale);
                resize_rgb(img, tw, th, Some(((fw - cw) / 2.0, (fh - ch) / 2.0, cw, ch)))
            }
            ResizeMode::Letterbox => {
                let scale = (ftw / fw).min(fth / fh);
                let nw = ((fw * scale).round() as u32).clamp(1, tw);
                let nh = ((fh * scale).round() as u32).clamp(1, th);
                let inner = resize_rgb(img, nw, nh, None)?;
                let mut out = RgbImage::from_pixel(tw, th, image::Rgb([self.pad_value; 3]));
                image::imageops::replace(&mut out, &inner, ((tw - nw) / 2).into(), ((th - nh) / 2).into());
                Ok(out)
            }
        }
    }

    fn to_tensor(&self, img: &RgbImage) -> Tensor {
        let (w, h) = (self.width as usize, self.height as usize);
        let order: [usize; 3] = match self.channels {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        let px = img.as_raw();
        let shape = match self.layout {
            Layout::Nchw => vec![1, 3, h, w],
            Layout::Nhwc => vec![1, h, w, 3],
        };
        // Index in the tensor of channel c at pixel i.
        let at = |c: usize, i: usize| match self.layout {
            Layout::Nchw => c * w * h + i,
            Layout::Nhwc => i * 3 + c,
        };
        let data = match self.dtype {
            ImageDType::U8 => {
                let mut out = vec![0u8; 3 * w * h];
                for i in 0..w * h {
                    for (c, &src) in order.iter().enumerate() {
                        out[at(c, i)] = px[i * 3 + src];
                    }
                }
                TensorData::U8(out)
            }
            ImageDType::F32 => {
                let mut lut = [[0f32; 256]; 3];
                for (c, table) in lut.iter_mut().enumerate() {
                    for (v, slot) in table.iter_mut().enumerate() {
                        *slot = (v as f32 * self.scale - self.mean[c]) / self.std[c];
                    }
                }
                let mut out = vec![0f32; 3 * w * h];
                for i in 0..w * h {
                    for (c, &src) in order.iter().enumerate() {
                        out[at(c, i)] = lut[c][px[i * 3 + src] as usize];
                    }
                }
                TensorData::F32(out)
            }
        };
        Tensor { shape, data }
    }
}

/// Decodes a JPEG or PNG to RGB under `limits`. Dimensions are read from the
/// header and checked before the pixel buffer is allocated.
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<RgbImage, InferError> {
    if bytes.is_empty() {
        return Err(InferError::bad_input("the image is empty (0 bytes)"));
    }
    if bytes.len() > limits.max_image_bytes {
        return Err(InferError::bad_input(format!(
            "the image is {} bytes, over the limit of {}",
            bytes.len(),
            limits.max_image_bytes
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| InferError::bad_input(format!("cannot read the image: {e}")))?;
    let Some(format) = reader.format() else {
        return Err(InferError::bad_input("not a JPEG or PNG image (unrecognised format)"));
    };
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(InferError::bad_input(
            "truncated JPEG image: no end-of-image marker after the last scan (the file was cut short)",
        ));
    }
    #[cfg(feature = "libjpeg-turbo")]
    if format == image::ImageFormat::Jpeg {
        return super::jpeg::decode(bytes, limits);
    }
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_image_side);
    decoder_limits.max_image_height = Some(limits.max_image_side);
    decoder_limits.max_alloc = Some(limits.max_image_pixels.saturating_mul(4).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    let fmt_name = format!("{format:?}").to_uppercase();
    let bad = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => InferError::bad_input(format!(
            "the {fmt_name} image is over the decoder limits ({l}; max side {} px, max {} pixels)",
            limits.max_image_side, limits.max_image_pixels
        )),
        image::ImageError::Unsupported(u) => InferError::bad_input(format!("unsupported {fmt_name} image: {u}")),
        other => InferError::bad_input(format!("corrupt or truncated {fmt_name} image: {other}")),
    };
    let mut decoder = reader.into_decoder().map_err(bad)?;
    // A tag that cannot be read leaves the pixels as stored (as Pillow does).
    let orientation = match limits.exif_orientation {
        true => decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms),
        false => image::metadata::Orientation::NoTransforms,
    };
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_image_pixels {
        return Err(InferError::bad_input(format!(
            "the {fmt_name} image is {w}x{h} = {pixels} pixels, over the limit of {}",
            limits.max_image_pixels
        )));
    }
    if pixels == 0 {
        return Err(InferError::bad_input(format!("the {fmt_name} image has no pixels ({w}x{h})")));
    }
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(to_rgb8(img))
}

/// 8-bit RGB as Pillow's `convert("RGB")` makes it (the reference pipelines
/// read images so): 16-bit samples keep their high byte (the image crate's
/// own conversion rounds, `(v + 128) / 257`, a level apart for about one
/// value in five; for 16-bit gray, which Pillow clips white, this is the PNG
/// standard's scaling); alpha is dropped, not composited, as transformers'
/// `load_image` does; low bit depths, palettes and tRNS as Pillow expands them.
fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => {
            let wide = img.into_rgb16();
            let (w, h) = wide.dimensions();
            let narrow = wide.into_raw().into_iter().map(|v| (v >> 8) as u8).collect();
            RgbImage::from_raw(w, h, narrow).expect("as many values as the 16-bit image")
        }
        other => other.into_rgb8(),
    }
}

/// A complete JPEG ends its last scan with an EOI marker (`FF D9`). Entropy-coded
/// data never contains `FF D9` (a data `FF` is stuffed as `FF 00`), and a
/// thumbnail's EOI comes before the main image's scans, so the last EOI
/// must follow the last SOS (`FF DA`). The decoder itself pads a cut-short
/// scan with grey instead of failing.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

fn resize_rgb(img: RgbImage, w: u32, h: u32, crop: Option<(f64, f64, f64, f64)>) -> Result<RgbImage, InferError> {
    let (sw, sh) = img.dimensions();
    let src = FirImage::from_vec_u8(sw, sh, img.into_raw(), PixelType::U8x3)
        .map_err(|e| InferError::new(crate::error::ErrorKind::Internal, format!("resize source: {e}")))?;
    let mut dst = FirImage::new(w, h, PixelType::U8x3);
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
    if let Some((l, t, cw, ch)) = crop {
        options = options.crop(l, t, cw, ch);
    }
    Resizer::new()
        .resize(&src, &mut dst, &options)
        .map_err(|e| InferError::new(crate::error::ErrorKind::Internal, format!("resize: {e}")))?;
    RgbImage::from_raw(w, h, dst.into_vec())
        .ok_or_else(|| InferError::new(crate::error::ErrorKind::Internal, "resize produced a short buffer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PNGs of every bit depth and colour type (scripts/make_png_fixtures.py) read as Pillow's
    /// `convert("RGB")` reads them, value for value (16-bit gray: by the PNG standard, where Pillow
    /// clips it white).
    #[test]
    fn every_png_depth_and_colour_type_reads_as_pillow_converts_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/png");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.ends_with(".rgb.png"))
            .collect();
        names.sort();
        assert_eq!(names.len(), 21, "{names:?}");
        let limits = Limits::default();
        let mut wrong = Vec::new();
        for name in &names {
            let got = decode(&std::fs::read(dir.join(name)).unwrap(), &limits).unwrap();
            let want = decode(&std::fs::read(dir.join(name.replace(".png", ".rgb.png"))).unwrap(), &limits).unwrap();
            assert_eq!(got.dimensions(), want.dimensions(), "{name}");
            let differ = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
            if differ > 0 {
                wrong.push(format!("{name}: {differ} of {} values differ", got.as_raw().len()));
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// Every EXIF orientation tag, PNG (eXIf) and JPEG (APP1), turned as
    /// Pillow's `ImageOps.exif_transpose` turns it (scripts/make_orientation_fixtures.py):
    /// the same pixels, value for value; with the switch off, the pixels as stored.
    #[test]
    fn every_exif_orientation_is_turned_upright_as_pillow_turns_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/orientation");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let on = Limits::default();
        let off = Limits { exif_orientation: false, ..Limits::default() };
        let plain = |name: &str| decode(&read(name), &on).unwrap();
        for tag in 1..=8 {
            for ext in ["png", "jpg"] {
                let file = format!("tag-{tag}.{ext}");
                let got = decode(&read(&file), &on).unwrap();
                let want = plain(&format!("upright-{tag}.{ext}.png"));
                assert_eq!(got.dimensions(), want.dimensions(), "{file}");
                // Without libjpeg-turbo (a foreign-target type-check build) JPEG pixels are a few levels off.
                let exact = ext == "png" || cfg!(feature = "libjpeg-turbo");
                let most = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
                assert!(most <= if exact { 0 } else { 12 }, "{file}: pixels differ by up to {most}");
                let stored = decode(&read(&file), &off).unwrap();
                let turned = if tag >= 5 { (want.height(), want.width()) } else { want.dimensions() };
                assert_eq!(stored.dimensions(), turned, "{file}: with the switch off, as stored");
                if tag > 1 {
                    assert_ne!(stored, got, "{file}: the switch changes what is read");
                }
            }
        }
    }

    /// The JPEG corpus (scripts/make_jpeg_fixtures.py: Pillow, libjpeg's cjpeg and TurboJPEG
    /// wrote baseline, progressive and arithmetic files of every subsampling, gray, RGB, CMYK and
    /// YCCK, restart markers, ICC, sizes 1×1 to 4097 pixels, truncated and corrupt ones) reads as
    /// Pillow's `Image.open(f).convert("RGB")` reads it, value for value, and what Pillow refuses
    /// is refused with a typed error.
    #[cfg(feature = "libjpeg-turbo")]
    #[test]
    fn every_jpeg_of_the_corpus_reads_as_pillow_reads_it() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg");
        let manifest: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        assert!(manifest.len() >= 45, "{} files", manifest.len());
        // Pillow reads a baseline file cut just before its end marker when its decoder happened not
        // to read ahead past the data, and refuses most such files; inferd refuses every JPEG
        // without an end marker after its last scan (docs/api.md "JPEG").
        let refused_by_rule = ["bad-truncated-no-eoi"];
        let limits = Limits::default();
        let (mut wrong, mut values) = (Vec::new(), 0usize);
        for (name, entry) in &manifest {
            let got = decode(&std::fs::read(dir.join(format!("{name}.jpg"))).unwrap(), &limits);
            match (entry.get("pillow_refuses"), got) {
                (Some(_), Err(e)) => assert_eq!(e.kind, crate::error::ErrorKind::BadInput, "{name}: {e}"),
                (Some(why), Ok(_)) => wrong.push(format!("{name}: Pillow refuses it ({why}), inferd reads it")),
                (None, Err(e)) if refused_by_rule.contains(&name.as_str()) => {
                    assert!(e.message.contains("truncated JPEG"), "{name}: {e}")
                }
                (None, Err(e)) => wrong.push(format!("{name}: Pillow reads it, inferd refuses it: {e}")),
                (None, Ok(_)) if refused_by_rule.contains(&name.as_str()) => {
                    wrong.push(format!("{name}: read, though it has no end marker"))
                }
                (None, Ok(got)) => {
                    // OpenCV's imread (rapidocr's reader) gave Pillow's pixels too, except for CMYK
                    // (its own conversion), when the corpus was made: so these are OpenCV's as well.
                    if entry["pillow_mode"] != "CMYK" {
                        assert_eq!(entry["opencv"], "same", "{name}: OpenCV and Pillow disagree");
                    }
                    let want = decode(&std::fs::read(dir.join(format!("{name}.rgb.png"))).unwrap(), &limits).unwrap();
                    assert_eq!(got.dimensions(), want.dimensions(), "{name}");
                    values += got.as_raw().len();
                    let differ = got.as_raw().iter().zip(want.as_raw()).filter(|(a, b)| a != b).count();
                    if differ > 0 {
                        let most = got.as_raw().iter().zip(want.as_raw()).map(|(a, b)| a.abs_diff(*b)).max();
                        wrong.push(format!(
                            "{name}: {differ} of {} values differ (by up to {most:?})",
                            got.as_raw().len()
                        ));
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
        assert!(values > 100_000, "{values} values compared");
    }

    fn spec(w: u32, h: u32, resize: ResizeMode) -> ImageInputSpec {
        serde_json::from_value(
            serde_json::json!({"tensor": "x", "width": w, "height": h, "resize": resize, "scale": 1.0}),
        )
        .unwrap()
    }

    fn solid(w: u32, h: u32, rgb: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb(rgb))
    }

    #[test]
    fn a_jpeg_is_complete_only_with_an_end_marker_after_its_last_scan() {
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg).encode_image(&solid(32, 32, [9, 99, 199])).unwrap();
        assert!(jpeg_is_complete(&jpeg));
        assert!(!jpeg_is_complete(&jpeg[..jpeg.len() - 40]));
        let limits = Limits::default();
        assert!(decode(&jpeg, &limits).is_ok());
        let err = decode(&jpeg[..jpeg.len() - 2], &limits).unwrap_err();
        assert!(err.message.contains("truncated JPEG"), "{err}");
    }

    #[test]
    fn letterbox_keeps_aspect_and_pads_with_the_fill_value() {
        let s = spec(8, 8, ResizeMode::Letterbox);
        let out = s.resize(solid(16, 8, [200, 0, 0])).unwrap();
        assert_eq!(out.dimensions(), (8, 8));
        assert_eq!(out.get_pixel(0, 0).0, [114; 3], "top rows are padding");
        assert_eq!(out.get_pixel(4, 4).0, [200, 0, 0], "middle rows are the image");
    }

    #[test]
    fn center_crop_cuts_the_overflow_evenly() {
        let s = spec(4, 4, ResizeMode::CenterCrop);
        let mut img = solid(12, 4, [0, 0, 255]);
        for y in 0..4 {
            for x in 4..8 {
                img.put_pixel(x, y, image::Rgb([0, 255, 0]));
            }
        }
        let out = s.resize(img).unwrap();
        assert!(out.pixels().all(|p| p.0 == [0, 255, 0]), "only the green middle survives");
    }

    #[test]
    fn layout_channel_order_and_normalisation_are_applied() {
        let mut s = spec(2, 1, ResizeMode::Stretch);
        s.mean = vec![1.0, 2.0, 3.0];
        s.std = vec![2.0, 2.0, 2.0];
        s.channels = ChannelOrder::Bgr;
        let mut img = solid(2, 1, [10, 20, 30]);
        img.put_pixel(1, 0, image::Rgb([40, 50, 60]));
        let t = s.to_tensor(&img);
        assert_eq!(t.shape, vec![1, 3, 1, 2]);
        // channel 0 is blue: (30-1)/2, (60-1)/2; channel 2 is red: (10-3)/2, (40-3)/2
        assert_eq!(t.data, TensorData::F32(vec![14.5, 29.5, 9.0, 24.0, 3.5, 18.5]));
        s.layout = Layout::Nhwc;
        s.dtype = ImageDType::U8;
        assert_eq!(s.to_tensor(&img).data, TensorData::U8(vec![30, 20, 10, 60, 50, 40]));
    }
}
