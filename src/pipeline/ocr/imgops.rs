//! The image operations of PP-OCR's reference pipeline, as OpenCV does
//! them, on RGB buffers: bilinear resize (`INTER_LINEAR`, no
//! anti-aliasing), the perspective crop of a text box (bicubic, replicated
//! border, turned upright when tall), and the BGR planar tensor layout.

use super::db::Quad;
use image::RgbImage;

/// Resizes bit-exactly as `cv2.resize(.., INTER_LINEAR)` does for 8-bit
/// images: each output centre maps back to the source (f32 fractions),
/// 11-bit fixed-point weights, columns clamped with their weight, rows
/// clamped without, and OpenCV's vectorised rounding of the vertical pass.
/// The reference pipeline's detector and recogniser inputs come from it,
/// and a one-level difference can flip a marginal space.
pub fn resize_linear(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) {
        return src.clone();
    }
    // (first index, second index, weights) per output column / row.
    let taps = |dst: u32, size: u32, clamp_weights: bool| -> Vec<(usize, usize, i32, i32)> {
        let scale = 1.0 / (dst as f64 / size as f64);
        (0..dst)
            .map(|d| {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let mut i = f.floor();
                let mut a = f - i;
                if clamp_weights {
                    if i < 0.0 {
                        (i, a) = (0.0, 0.0);
                    }
                    if i >= (size - 1) as f32 {
                        (i, a) = ((size - 1) as f32, 0.0);
                    }
                }
                let last = size as i64 - 1;
                let i = i as i64;
                (
                    i.clamp(0, last) as usize,
                    (i + 1).clamp(0, last) as usize,
                    ((1.0 - a) * 2048.0).round_ties_even() as i32,
                    (a * 2048.0).round_ties_even() as i32,
                )
            })
            .collect()
    };
    let (xs, ys) = (taps(w, sw, true), taps(h, sh, false));
    let px = src.as_raw();
    let stride = sw as usize * 3;
    // Horizontal pass of every source row once, scaled by 2048.
    let hpass = |row: usize| -> Vec<i32> {
        let r = &px[row * stride..][..stride];
        let mut out = Vec::with_capacity(w as usize * 3);
        for &(x0, x1, a0, a1) in &xs {
            for c in 0..3 {
                out.push(r[x0 * 3 + c] as i32 * a0 + r[x1 * 3 + c] as i32 * a1);
            }
        }
        out
    };
    // Source rows only move down, so the last two horizontal passes are all that is needed.
    let mut cache: [(usize, Vec<i32>); 2] = [(usize::MAX, Vec::new()), (usize::MAX, Vec::new())];
    let mut out = vec![0u8; w as usize * h as usize * 3];
    for (y, &(y0, y1, b0, b1)) in ys.iter().enumerate() {
        for r in [y0, y1] {
            if cache[0].0 != r && cache[1].0 != r {
                cache.swap(0, 1);
                cache[1] = (r, hpass(r));
            }
        }
        let row = |r: usize| if cache[0].0 == r { &cache[0].1 } else { &cache[1].1 };
        let dst = &mut out[y * w as usize * 3..][..w as usize * 3];
        for ((d, &t), &b) in dst.iter_mut().zip(row(y0)).zip(row(y1)) {
            let v = (((b0 * (t >> 4)) >> 16) + ((b1 * (b >> 4)) >> 16) + 2) >> 2;
            *d = v.clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer sized for the image")
}

/// Cuts the text box `quad` out of `img`, straightened to a rectangle as
/// long and tall as its longest sides (PaddleOCR's `get_rotate_crop_image`);
/// a crop at least 1.5 times taller than wide is turned a quarter
/// counter-clockwise, so vertical text reads left to right.
pub fn crop_quad(img: &RgbImage, quad: &Quad) -> Option<RgbImage> {
    let d = |a: [f32; 2], b: [f32; 2]| ((a[0] - b[0]) as f64).hypot((a[1] - b[1]) as f64);
    let cw = d(quad[0], quad[1]).max(d(quad[2], quad[3])) as u32;
    let ch = d(quad[0], quad[3]).max(d(quad[1], quad[2])) as u32;
    if cw == 0 || ch == 0 {
        return None;
    }
    let dst = [[0.0, 0.0], [cw as f64, 0.0], [cw as f64, ch as f64], [0.0, ch as f64]];
    let src = quad.map(|p| [p[0] as f64, p[1] as f64]);
    let m = homography(&dst, &src)?;
    let (iw, ih) = (img.width() as i64, img.height() as i64);
    let px = img.as_raw();
    let at = |x: i64, y: i64, c: usize| px[((y.clamp(0, ih - 1) * iw + x.clamp(0, iw - 1)) * 3) as usize + c] as f64;
    let mut out = RgbImage::new(cw, ch);
    for y in 0..ch {
        for x in 0..cw {
            let (fx, fy) = (x as f64, y as f64);
            let wz = m[6] * fx + m[7] * fy + 1.0;
            let sx = (m[0] * fx + m[1] * fy + m[2]) / wz;
            let sy = (m[3] * fx + m[4] * fy + m[5]) / wz;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (kx, ky) = (cubic_weights(sx - x0), cubic_weights(sy - y0));
            let (x0, y0) = (x0 as i64, y0 as i64);
            let mut rgb = [0u8; 3];
            for (c, slot) in rgb.iter_mut().enumerate() {
                let mut v = 0.0;
                for (j, wy) in ky.iter().enumerate() {
                    for (i, wx) in kx.iter().enumerate() {
                        v += at(x0 + i as i64 - 1, y0 + j as i64 - 1, c) * wx * wy;
                    }
                }
                *slot = v.round().clamp(0.0, 255.0) as u8;
            }
            out.put_pixel(x, y, image::Rgb(rgb));
        }
    }
    if ch as f64 / cw as f64 >= 1.5 { Some(image::imageops::rotate270(&out)) } else { Some(out) }
}

/// OpenCV's bicubic weights (A = −0.75) for the four taps around a point at fraction `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let w2 = ((A + 2.0) * (1.0 - t) - (A + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0;
    [w0, w1, w2, 1.0 - w0 - w1 - w2]
}

/// The projective map taking each `from` point to its `to` point, as the
/// eight coefficients `[a b c d e f g h]` of `((ax+by+c)/(gx+hy+1), (dx+ey+f)/(gx+hy+1))`.
fn homography(from: &[[f64; 2]; 4], to: &[[f64; 2]; 4]) -> Option<[f64; 8]> {
    let mut a = [[0f64; 9]; 8];
    for k in 0..4 {
        let ([x, y], [u, v]) = (from[k], to[k]);
        a[2 * k] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * u, -y * u, u];
        a[2 * k + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * v, -y * v, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for row in 0..8 {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col];
                for (v, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                    *v -= f * p;
                }
            }
        }
    }
    let mut m = [0f64; 8];
    for (i, slot) in m.iter_mut().enumerate() {
        *slot = a[i][8] / a[i][i];
    }
    Some(m)
}

/// Per-channel (B, G, R) lookup from an 8-bit value to the tensor value.
pub type Lut = [[f32; 256]; 3];

/// The recogniser's and classifier's normalisation, in f32 as the
/// reference computes it: `(v / 255 − 0.5) / 0.5`.
pub fn crop_lut() -> Lut {
    let mut lut = [[0f32; 256]; 3];
    for table in &mut lut {
        for (v, slot) in table.iter_mut().enumerate() {
            *slot = (v as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    lut
}

/// The detector's normalisation as the reference computes it: `v × (1/255)`
/// in f32, then `(x − mean) / std` in f64, stored as f32.
pub fn det_lut(mean: [f32; 3], std: [f32; 3]) -> Lut {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, slot) in table.iter_mut().enumerate() {
            let x = v as f32 * (1.0f64 / 255.0) as f32;
            *slot = ((x as f64 - mean[c] as f64) / std[c] as f64) as f32;
        }
    }
    lut
}

/// Writes `img` into `out`, a `[3, img.height(), width]` plane set, as BGR
/// through `lut`; columns past the image stay as they are (zero padding).
pub fn write_bgr_planes(img: &RgbImage, out: &mut [f32], width: usize, lut: &Lut) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    debug_assert!(w <= width && out.len() == 3 * h * width);
    let px = img.as_raw();
    for (c, table) in lut.iter().enumerate() {
        let src = 2 - c; // BGR from RGB
        let plane = &mut out[c * h * width..][..h * width];
        for y in 0..h {
            for x in 0..w {
                plane[y * width + x] = table[px[(y * w + x) * 3 + src] as usize];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_resize_matches_opencv_on_a_small_ramp() {
        // What cv2.resize answers for this row (OpenCV 5.0).
        let src = RgbImage::from_fn(4, 1, |x, _| image::Rgb([[0, 100, 200, 250][x as usize]; 3]));
        let out = resize_linear(&src, 8, 1);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        // Output centres map to -0.25, 0.25, 0.75, ... 3.25 (ends clamp).
        assert_eq!(row, vec![0, 25, 75, 125, 175, 213, 238, 250]);
        let down = resize_linear(&src, 2, 1);
        assert_eq!(down.pixels().map(|p| p[0]).collect::<Vec<_>>(), vec![50, 225]);
        // A 7×5 ramp to 4×9 (down across, up along), green channel, as OpenCV answers.
        let ramp = RgbImage::from_fn(7, 5, |x, y| {
            let base = ((y * 7 + x) * 3 * 2) as u8;
            image::Rgb([base, base + 2, base + 4])
        });
        let out = resize_linear(&ramp, 4, 9);
        let green: Vec<u8> = out.pixels().map(|p| p[1]).collect();
        let want: Vec<u8> = vec![
            4, 15, 25, 36, 18, 29, 39, 50, 41, 52, 63, 73, 65, 75, 86, 96, 88, 99, 109, 120, 111, 122, 133, 143, 135,
            145, 156, 166, 158, 169, 179, 190, 172, 183, 193, 204,
        ];
        assert_eq!(green, want);
    }

    #[test]
    fn an_axis_aligned_box_crops_exactly_and_tall_crops_turn() {
        let img = RgbImage::from_fn(20, 10, |x, y| image::Rgb([(x * 10) as u8, (y * 20) as u8, 7]));
        let crop = crop_quad(&img, &[[2.0, 1.0], [12.0, 1.0], [12.0, 5.0], [2.0, 5.0]]).unwrap();
        assert_eq!(crop.dimensions(), (10, 4));
        assert_eq!(crop.get_pixel(0, 0), img.get_pixel(2, 1));
        assert_eq!(crop.get_pixel(9, 3), img.get_pixel(11, 4));
        let tall = crop_quad(&img, &[[2.0, 0.0], [5.0, 0.0], [5.0, 9.0], [2.0, 9.0]]).unwrap();
        assert_eq!(tall.dimensions(), (9, 3));
        // Turned counter-clockwise: the crop's top-right pixel is now top-left.
        assert_eq!(tall.get_pixel(0, 0), img.get_pixel(4, 0));
    }

    #[test]
    fn planes_are_bgr_normalised_and_padded() {
        let img = RgbImage::from_pixel(2, 1, image::Rgb([255, 0, 51]));
        let mut out = vec![0f32; 3 * 3];
        write_bgr_planes(&img, &mut out, 3, &crop_lut());
        let want = [-0.6, -0.6, 0.0, -1.0, -1.0, 0.0, 1.0, 1.0, 0.0];
        assert!(out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{out:?}");
        assert_eq!(det_lut([0.5; 3], [0.5; 3])[0][255], 1.0);
    }
}
