//! SmolVLM's image processor and prompt expansion, as transformers'
//! `SmolVLMImageProcessor` (Idefics3's) and `processing_smolvlm` do them:
//!
//! 1. the longest edge is resized to `longest_edge` (up or down), the other
//!    side keeping the aspect ratio, rounded to an even number (and nothing
//!    over 4096);
//! 2. each side is then resized up to a multiple of the tile (`tile`, 512
//!    for SmolVLM), the height following the width's aspect for landscape
//!    images and the other way round;
//! 3. the image is cut into `rows × cols` tiles in reading order, and a
//!    global view (the whole image resized to one tile) comes last; an image
//!    no larger than a tile is its own single view (`rows = cols = 0`);
//! 4. each view becomes `(v / 255 - mean) / std`, channels first.
//!
//! Every resize is PIL's Lanczos filter on 8-bit RGB (what transformers
//! calls through `PIL.Image.resize`), reproduced here to the bit: the same
//! coefficients, the same 22-bit fixed point, the horizontal pass first.
//! The prompt gives each tile `<fake_token_around_image><row_r_col_c>` and
//! `image_seq_len` image tokens, then the global view
//! `<fake_token_around_image><global-img>…<fake_token_around_image>`.

use image::RgbImage;

/// The largest side transformers lets an image reach.
const MAX_IMAGE_SIZE: u32 = 4096;

/// What the processor does to an image: the sizes of steps 1–3 and normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub longest_edge: u32,
    pub tile: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// An image's views: its tiles in reading order, then the global view.
#[derive(Debug, Clone)]
pub struct Views {
    pub views: Vec<RgbImage>,
    pub rows: usize,
    pub cols: usize,
}

impl ImageProcessor {
    /// Steps 1–3: the views of `image` (an error for an empty one). Step 1
    /// keeps each side at 1 or more, so step 2 makes each a whole tile or more.
    pub fn views(&self, image: &RgbImage) -> Result<Views, String> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err("the image is empty".into());
        }
        let (h1, w1) = longest_edge_size(h, w, self.longest_edge);
        let resized = resize(image, w1, h1);
        let (h2, w2) = tile_multiple_size(h1, w1, self.tile);
        let resized = resize(&resized, w2, h2);
        Ok(self.split(resized))
    }

    fn split(&self, image: RgbImage) -> Views {
        let (w, h) = image.dimensions();
        let t = self.tile;
        if h <= t && w <= t {
            return Views { views: vec![image], rows: 0, cols: 0 };
        }
        let (rows, cols) = (h.div_ceil(t), w.div_ceil(t));
        let (th, tw) = (h.div_ceil(rows), w.div_ceil(cols));
        let mut views = Vec::with_capacity((rows * cols + 1) as usize);
        for r in 0..rows {
            for c in 0..cols {
                let (x0, y0) = (c * tw, r * th);
                let (x1, y1) = ((x0 + tw).min(w), (y0 + th).min(h));
                views.push(image::imageops::crop_imm(&image, x0, y0, x1 - x0, y1 - y0).to_image());
            }
        }
        views.push(resize(&image, t, t));
        Views { views, rows: rows as usize, cols: cols as usize }
    }

    /// Step 4: a view as `[3, height, width]` values.
    pub fn pixel_values(&self, view: &RgbImage) -> Vec<f32> {
        let (w, h) = view.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in view.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (p.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// Step 1 (transformers' `get_resize_output_image_size`): `(height, width)`.
fn longest_edge_size(height: u32, width: u32, longest: u32) -> (u32, u32) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height as i64, width as i64);
    if w >= h {
        w = longest as i64;
        h = (w as f64 / aspect) as i64;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = longest as i64;
        w = (h as f64 * aspect) as i64;
        if w % 2 != 0 {
            w += 1;
        }
    }
    let (h, w) = (h.max(1), w.max(1));
    // Then below the absolute maximum, the aspect taken afresh.
    let aspect = w as f64 / h as f64;
    let max = MAX_IMAGE_SIZE as i64;
    let (h, w) = if w >= h && w > max {
        ((max as f64 / aspect) as i64, max)
    } else if h > w && h > max {
        (max, (max as f64 * aspect) as i64)
    } else {
        (h, w)
    };
    (h.max(1) as u32, w.max(1) as u32)
}

/// Step 2 (transformers' `resize_for_vision_encoder`): `(height, width)`.
fn tile_multiple_size(height: u32, width: u32, tile: u32) -> (u32, u32) {
    let aspect = width as f64 / height as f64;
    let t = tile as f64;
    let up = |v: f64| ((v / t).ceil() * t) as u32;
    if width >= height {
        let w = up(width as f64);
        let h = up(((w as f64 / aspect) as i64) as f64);
        (h, w)
    } else {
        let h = up(height as f64);
        let w = up(((h as f64 * aspect) as i64) as f64);
        (h, w)
    }
}

/// PIL's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const LANCZOS_SUPPORT: f64 = 3.0;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

fn lanczos(x: f64) -> f64 {
    if (-LANCZOS_SUPPORT..LANCZOS_SUPPORT).contains(&x) { sinc(x) * sinc(x / 3.0) } else { 0.0 }
}

/// PIL's `precompute_coeffs` and `normalize_coeffs_8bpc`: for each output
/// position, the first input position, how many are used, and their weights.
fn coefficients(in_size: u32, out_size: u32) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = LANCZOS_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut kk = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(xmax) {
            *w = lanczos((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *w;
        }
        for (x, w) in k.iter().enumerate().take(xmax) {
            let w = if ww != 0.0 { w / ww } else { *w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, kk)
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS) << 8 {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// `PIL.Image.resize((width, height), Image.LANCZOS)` of an RGB image, as
/// Pillow 13 does it: two 1-D passes through an 8-bit image between them,
/// the horizontal one first unless the height shrinks by more than twice as
/// many pixels as the width (Pillow PR 9549; earlier Pillows always go
/// horizontal first, which differs by a level or two where the rule applies).
pub fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = image.dimensions();
    if (w0, h0) == (width, height) {
        return image.clone();
    }
    let (need_h, need_v) = (width != w0, height != h0);
    let vertical_first = need_h && need_v && height < h0 && (h0 - height) as i64 > 2 * (w0 as i64 - width as i64);
    let src = image.as_raw();
    let out = if vertical_first {
        let (kv, bounds_v, kk_v) = coefficients(h0, height);
        let tall = vertical(src, w0 as usize, &bounds_v, &kk_v, kv);
        let (kh, bounds_h, kk_h) = coefficients(w0, width);
        horizontal(&tall, w0 as usize, 0..height as usize, &bounds_h, &kk_h, kh)
    } else {
        let (kv, mut bounds_v, kk_v) = coefficients(h0, height);
        let mut data = std::borrow::Cow::Borrowed(src.as_slice());
        let mut w = w0 as usize;
        if need_h {
            // Only the input rows the vertical pass reads.
            let first = bounds_v[0].0;
            let last = bounds_v[height as usize - 1].0 + bounds_v[height as usize - 1].1;
            bounds_v.iter_mut().for_each(|b| b.0 -= first);
            let (kh, bounds_h, kk_h) = coefficients(w0, width);
            data = std::borrow::Cow::Owned(horizontal(src, w, first..last, &bounds_h, &kk_h, kh));
            w = width as usize;
        }
        if need_v { vertical(&data, w, &bounds_v, &kk_v, kv) } else { data.into_owned() }
    };
    RgbImage::from_raw(width, height, out).expect("sizes match")
}

/// One horizontal pass over `rows` of an RGB image `width` pixels wide.
fn horizontal(
    src: &[u8],
    width: usize,
    rows: std::ops::Range<usize>,
    bounds: &[(usize, usize)],
    kk: &[i32],
    ksize: usize,
) -> Vec<u8> {
    use rayon::prelude::*;
    let out_w = bounds.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    // Rows are independent: split among the threads of the pool this runs on (the decode threads).
    out.par_chunks_mut(out_w * 3).enumerate().for_each(|(y, dst)| {
        let row = rows.start + y;
        let line = &src[row * width * 3..(row + 1) * width * 3];
        for (xx, &(xmin, xmax)) in bounds.iter().enumerate() {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &k) in kk[xx * ksize..xx * ksize + xmax].iter().enumerate() {
                let p = &line[(x + xmin) * 3..(x + xmin) * 3 + 3];
                for c in 0..3 {
                    ss[c] += p[c] as i32 * k;
                }
            }
            for c in 0..3 {
                dst[xx * 3 + c] = clip8(ss[c]);
            }
        }
    });
    out
}

/// One vertical pass over an RGB image `width` pixels wide.
fn vertical(src: &[u8], width: usize, bounds: &[(usize, usize)], kk: &[i32], ksize: usize) -> Vec<u8> {
    use rayon::prelude::*;
    let stride = width * 3;
    let mut out = vec![0u8; bounds.len() * stride];
    out.par_chunks_mut(stride).zip(bounds.par_iter()).enumerate().for_each(|(yy, (dst, &(ymin, ymax)))| {
        // The taps' rows in turn, each added across the whole output row (sequential reads).
        let mut ss = vec![1i32 << (PRECISION_BITS - 1); stride];
        for (y, &ky) in kk[yy * ksize..yy * ksize + ymax].iter().enumerate() {
            let line = &src[(y + ymin) * stride..(y + ymin + 1) * stride];
            for (acc, &v) in ss.iter_mut().zip(line) {
                *acc += v as i32 * ky;
            }
        }
        for (d, &acc) in dst.iter_mut().zip(&ss) {
            *d = clip8(acc);
        }
    });
    out
}

/// The prompt text that stands for an image of `rows × cols` tiles (0 × 0: one view).
pub fn image_prompt(rows: usize, cols: usize, image_seq_len: usize) -> String {
    const FAKE: &str = "<fake_token_around_image>";
    let tokens = "<image>".repeat(image_seq_len);
    let global = format!("{FAKE}<global-img>{tokens}{FAKE}");
    if rows == 0 && cols == 0 {
        return global;
    }
    let mut out = String::new();
    for r in 0..rows {
        for c in 0..cols {
            out.push_str(&format!("{FAKE}<row_{}_col_{}>{tokens}", r + 1, c + 1));
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&global);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::Path;

    fn fixtures() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm")
    }

    /// Every view, pixel for pixel, the grid and the prompt equal what
    /// transformers made of the same six images (scripts/make_vlm_fixtures.py).
    #[test]
    fn views_grid_and_prompt_equal_transformers() {
        let expected: Value =
            serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap();
        let processor = ImageProcessor {
            longest_edge: expected["longest_edge"].as_u64().unwrap() as u32,
            tile: expected["tile"].as_u64().unwrap() as u32,
            mean: [0.5; 3],
            std: [0.5; 3],
        };
        let t = processor.tile;
        let seq = expected["image_seq_len"].as_u64().unwrap() as usize;
        for case in expected["cases"].as_array().unwrap() {
            let name = case["image"].as_str().unwrap();
            let image = image::open(fixtures().join(name)).unwrap().to_rgb8();
            let got = processor.views(&image).unwrap();
            let (rows, cols) = (case["rows"].as_u64().unwrap() as usize, case["cols"].as_u64().unwrap() as usize);
            assert_eq!(
                (got.rows, got.cols, got.views.len()),
                (rows, cols, case["tiles"].as_u64().unwrap() as usize),
                "{name}"
            );
            let want = image::open(fixtures().join(case["tiles_png"].as_str().unwrap())).unwrap().to_rgb8();
            for (i, view) in got.views.iter().enumerate() {
                assert_eq!(view.dimensions(), (t, t), "{name} view {i}");
                let reference = image::imageops::crop_imm(&want, 0, i as u32 * t, t, t).to_image();
                let differ = view.as_raw().iter().zip(reference.as_raw()).filter(|(a, b)| a != b).count();
                assert_eq!(differ, 0, "{name} view {i}: {differ} of {} values differ from PIL's", t * t * 3);
            }
            assert_eq!(image_prompt(rows, cols, seq), case["prompt"].as_str().unwrap(), "{name}");
        }
    }

    #[test]
    fn pixel_values_are_channels_first_and_normalised() {
        let p = ImageProcessor { longest_edge: 8, tile: 4, mean: [0.5; 3], std: [0.5; 3] };
        let view = RgbImage::from_fn(4, 4, |x, y| image::Rgb([255, (x * 60) as u8, (y * 60) as u8]));
        let v = p.pixel_values(&view);
        assert_eq!(v.len(), 48);
        assert_eq!(v[0], 1.0, "red 255 → 1");
        assert_eq!(v[16 + 1], (60.0 / 255.0 - 0.5) / 0.5, "green plane, x = 1");
        assert_eq!(v[32 + 4], (60.0 / 255.0 - 0.5) / 0.5, "blue plane, y = 1");
    }

    #[test]
    fn extreme_and_empty_images() {
        let p = ImageProcessor { longest_edge: 192, tile: 64, mean: [0.5; 3], std: [0.5; 3] };
        // A 5000×1 strip: the short side never vanishes (transformers keeps it at 1, then a tile).
        let strip = p.views(&RgbImage::new(5000, 1)).map(|v| (v.rows, v.cols, v.views.len()));
        assert_eq!(strip, Ok((1, 3, 4)));
        assert_eq!(p.views(&RgbImage::new(10, 10)).map(|v| (v.rows, v.cols)), Ok((3, 3)));
        assert!(p.views(&RgbImage::new(0, 0)).is_err());
    }
}
