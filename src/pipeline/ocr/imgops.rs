//! The image operations of PP-OCR's reference pipeline, as OpenCV does
//! them, on RGB buffers: bilinear resize (`INTER_LINEAR`, no
//! anti-aliasing), the perspective crop of a text box (bicubic, replicated
//! border, turned upright when tall), and the BGR planar tensor layout.

use super::db::Quad;
use image::RgbImage;

/// Resizes like `cv2.resize(.., INTER_LINEAR)`: each output pixel centre
/// maps back to the source and blends its 2×2 neighbours.
pub fn resize_linear(src: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = src.dimensions();
    if (sw, sh) == (w, h) {
        return src.clone();
    }
    // (index, weight of index+1) per output column / row.
    let taps = |dst: u32, size: u32| -> Vec<(usize, f32)> {
        let scale = size as f64 / dst as f64;
        (0..dst)
            .map(|d| {
                let f = (d as f64 + 0.5) * scale - 0.5;
                let i = f.floor();
                let a = f - i;
                if i < 0.0 {
                    (0, 0.0)
                } else if i as u32 >= size - 1 {
                    (size as usize - 1, 0.0)
                } else {
                    (i as usize, a as f32)
                }
            })
            .collect()
    };
    let (xs, ys) = (taps(w, sw), taps(h, sh));
    let px = src.as_raw();
    let stride = sw as usize * 3;
    let mut out = vec![0u8; w as usize * h as usize * 3];
    for (y, &(y0, fy)) in ys.iter().enumerate() {
        let y1 = (y0 + 1).min(sh as usize - 1);
        let (r0, r1) = (&px[y0 * stride..][..stride], &px[y1 * stride..][..stride]);
        for (x, &(x0, fx)) in xs.iter().enumerate() {
            let x1 = (x0 + 1).min(sw as usize - 1);
            for c in 0..3 {
                let top = r0[x0 * 3 + c] as f32 * (1.0 - fx) + r0[x1 * 3 + c] as f32 * fx;
                let bottom = r1[x0 * 3 + c] as f32 * (1.0 - fx) + r1[x1 * 3 + c] as f32 * fx;
                out[(y * w as usize + x) * 3 + c] = (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8;
            }
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

/// Writes `img` into `out`, a `[3, img.height(), width]` plane set, as BGR
/// with `(v / 255 − mean[c]) / std[c]`; columns past the image stay as they are (zero padding).
pub fn write_bgr_planes(img: &RgbImage, out: &mut [f32], width: usize, mean: [f32; 3], std: [f32; 3]) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    debug_assert!(w <= width && out.len() == 3 * h * width);
    let px = img.as_raw();
    for c in 0..3 {
        let src = 2 - c; // BGR from RGB
        let plane = &mut out[c * h * width..][..h * width];
        for y in 0..h {
            for x in 0..w {
                plane[y * width + x] = (px[(y * w + x) * 3 + src] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_resize_matches_opencv_on_a_small_ramp() {
        // cv2.resize(np.array([[0, 100, 200, 250]]) as 3 channels, (8, 1)) → 0 13 38 63 113 163 206 244? (see below)
        let src = RgbImage::from_fn(4, 1, |x, _| image::Rgb([[0, 100, 200, 250][x as usize]; 3]));
        let out = resize_linear(&src, 8, 1);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        // Output centres map to -0.25, 0.25, 0.75, ... 3.25 (ends clamp).
        assert_eq!(row, vec![0, 25, 75, 125, 175, 213, 238, 250]);
        let down = resize_linear(&src, 2, 1);
        assert_eq!(down.pixels().map(|p| p[0]).collect::<Vec<_>>(), vec![50, 225]);
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
        write_bgr_planes(&img, &mut out, 3, [0.5; 3], [0.5; 3]);
        assert_eq!(out, vec![-0.6, -0.6, 0.0, -1.0, -1.0, 0.0, 1.0, 1.0, 0.0]);
    }
}
