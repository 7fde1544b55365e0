//! DB (Differentiable Binarization) post-processing for PP-OCR text
//! detection: the probability map is thresholded and dilated, each
//! 8-connected region becomes its minimum-area rectangle, regions whose mean
//! probability is under the box threshold are dropped, the rest are grown
//! ("unclipped") by `area × ratio / perimeter` and scaled to the image.
//! Mirrors PaddleOCR's `DBPostProcess` (fast score mode), with the region's
//! convex hull standing in for OpenCV's contour, which has the same
//! minimum-area rectangle.

/// A text box: four corners `[top-left, top-right, bottom-right, bottom-left]`, `[x, y]` each.
pub type Quad = [[f32; 2]; 4];

/// The knobs of DB post-processing (models.json `ocr`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbParams {
    /// Pixels with probability above this are text.
    pub threshold: f32,
    /// Regions with a lower mean probability are dropped.
    pub box_threshold: f32,
    /// How much a region grows: by `area × ratio / perimeter` on each side.
    pub unclip_ratio: f32,
    /// At most this many regions are considered.
    pub max_candidates: usize,
    /// Grow the binary map by one pixel right and down before finding regions.
    pub dilate: bool,
}

/// Regions smaller than this (short side, in map pixels) are noise.
const MIN_SIZE: f64 = 3.0;

/// Finds text boxes in the `w`×`h` probability map `prob`, scaled to a
/// `dest_w`×`dest_h` image (integer corners, as PaddleOCR), each with its score.
pub fn boxes(prob: &[f32], w: usize, h: usize, dest_w: u32, dest_h: u32, p: &DbParams) -> Vec<(Quad, f32)> {
    if w == 0 || h == 0 || prob.len() != w * h {
        return Vec::new();
    }
    let mut bitmap: Vec<bool> = prob.iter().map(|&v| v > p.threshold).collect();
    if p.dilate {
        bitmap = dilate(&bitmap, w, h);
    }
    let mut out = Vec::new();
    for points in regions(&bitmap, w, h).into_iter().take(p.max_candidates) {
        let rect = min_area_rect(&points, 0.0);
        if rect.short_side() < MIN_SIZE {
            continue;
        }
        let quad = rect.ordered();
        let score = box_score(prob, w, h, &quad);
        if score < p.box_threshold as f64 {
            continue;
        }
        // PaddleOCR grows the rectangle with pyclipper (integer-truncated
        // corners, round joins) and takes the minimum rectangle of that.
        let truncated: Vec<(i64, i64)> = quad.iter().map(|c| (c[0] as i64, c[1] as i64)).collect();
        let distance = rect.area() * p.unclip_ratio as f64 / rect.perimeter();
        let grown = min_area_rect(&offset_round(&truncated, distance), 0.0);
        if grown.short_side() < MIN_SIZE + 2.0 {
            continue;
        }
        let scale = |c: [f64; 2]| {
            [
                (c[0] / w as f64 * dest_w as f64).round_ties_even().clamp(0.0, dest_w as f64) as f32,
                (c[1] / h as f64 * dest_h as f64).round_ties_even().clamp(0.0, dest_h as f64) as f32,
            ]
        };
        let g = grown.ordered();
        out.push(([scale(g[0]), scale(g[1]), scale(g[2]), scale(g[3])], score as f32));
    }
    out
}

/// `out[y][x]` is set when any of `(x, y)`, `(x-1, y)`, `(x, y-1)`, `(x-1, y-1)` is (OpenCV's 2×2 dilation).
fn dilate(b: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            let at = |xx: usize, yy: usize| b[yy * w + xx];
            out[y * w + x] =
                at(x, y) || (x > 0 && at(x - 1, y)) || (y > 0 && at(x, y - 1)) || (x > 0 && y > 0 && at(x - 1, y - 1));
        }
    }
    out
}

/// The 8-connected regions of `bitmap` in raster order of their first
/// pixel, each as the pixels at the left and right ends of its row runs
/// (enough for the convex hull).
fn regions(bitmap: &[bool], w: usize, h: usize) -> Vec<Vec<(f64, f64)>> {
    let mut seen = vec![false; w * h];
    let mut out = Vec::new();
    let mut stack = Vec::new();
    let set = |x: usize, y: usize| bitmap[y * w + x];
    for start in 0..w * h {
        if !bitmap[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut points = Vec::new();
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            if x == 0 || !set(x - 1, y) || x + 1 == w || !set(x + 1, y) {
                points.push((x as f64, y as f64));
            }
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if bitmap[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        out.push(points);
    }
    out
}

/// A rotated rectangle: its corners (in order around it) and side lengths.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub corners: [[f64; 2]; 4],
    pub width: f64,
    pub height: f64,
}

impl Rect {
    fn short_side(&self) -> f64 {
        self.width.min(self.height)
    }

    fn area(&self) -> f64 {
        self.width * self.height
    }

    fn perimeter(&self) -> f64 {
        2.0 * (self.width + self.height)
    }

    /// The corners as `[top-left, top-right, bottom-right, bottom-left]`:
    /// the two leftmost (by x) give the left side, the upper of each side comes first.
    pub fn ordered(&self) -> [[f64; 2]; 4] {
        let mut c = self.corners;
        c.sort_by(|a, b| a[0].total_cmp(&b[0]));
        let (tl, bl) = if c[1][1] > c[0][1] { (c[0], c[1]) } else { (c[1], c[0]) };
        let (tr, br) = if c[3][1] > c[2][1] { (c[2], c[3]) } else { (c[3], c[2]) };
        [tl, tr, br, bl]
    }
}

/// The minimum-area rectangle around `points`, grown by `grow` on every
/// side (the rectangle around the points offset by a disc of that radius).
pub fn min_area_rect(points: &[(f64, f64)], grow: f64) -> Rect {
    let hull = convex_hull(points);
    let directions: Vec<(f64, f64)> = match hull.len() {
        0 => return Rect { corners: [[0.0; 2]; 4], width: 0.0, height: 0.0 },
        1 => vec![(1.0, 0.0)],
        n => (0..n)
            .filter_map(|i| {
                let (a, b) = (hull[i], hull[(i + 1) % n]);
                let (dx, dy) = (b.0 - a.0, b.1 - a.1);
                let len = dx.hypot(dy);
                (len > 0.0).then(|| (dx / len, dy / len))
            })
            .collect(),
    };
    let mut best: Option<(f64, Rect)> = None;
    for (ux, uy) in directions {
        let (vx, vy) = (-uy, ux);
        let (mut u0, mut u1, mut v0, mut v1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in &hull {
            let (u, v) = (x * ux + y * uy, x * vx + y * vy);
            u0 = u0.min(u);
            u1 = u1.max(u);
            v0 = v0.min(v);
            v1 = v1.max(v);
        }
        let (u0, u1, v0, v1) = (u0 - grow, u1 + grow, v0 - grow, v1 + grow);
        let area = (u1 - u0) * (v1 - v0);
        if best.as_ref().is_none_or(|(a, _)| area < *a - 1e-9) {
            let at = |u: f64, v: f64| [u * ux + v * vx, u * uy + v * vy];
            let rect =
                Rect { corners: [at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)], width: u1 - u0, height: v1 - v0 };
            best = Some((area, rect));
        }
    }
    best.map(|(_, r)| r).expect("at least one direction")
}

/// Andrew's monotone chain; collinear points dropped, counter-clockwise.
fn convex_hull(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    p.dedup();
    if p.len() < 3 {
        return p;
    }
    let cross = |o: (f64, f64), a: (f64, f64), b: (f64, f64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(2 * p.len());
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(f64, f64)>> =
            if pass == 0 { Box::new(p.iter()) } else { Box::new(p.iter().rev()) };
        for &q in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], q) <= 0.0 {
                hull.pop();
            }
            hull.push(q);
        }
        hull.pop();
    }
    hull
}

/// Mean probability inside `quad`, over the pixels OpenCV's `fillPoly`
/// would paint for its corners truncated to pixels (PaddleOCR's fast score):
/// the interior plus the 8-connected lines of its edges.
fn box_score(prob: &[f32], w: usize, h: usize, quad: &[[f64; 2]; 4]) -> f64 {
    let clampi = |v: f64, hi: usize| (v as i64).clamp(0, hi as i64 - 1);
    let xmin = clampi(quad.iter().map(|c| c[0]).fold(f64::MAX, f64::min).floor(), w);
    let xmax = clampi(quad.iter().map(|c| c[0]).fold(f64::MIN, f64::max).ceil(), w);
    let ymin = clampi(quad.iter().map(|c| c[1]).fold(f64::MAX, f64::min).floor(), h);
    let ymax = clampi(quad.iter().map(|c| c[1]).fold(f64::MIN, f64::max).ceil(), h);
    let (mw, mh) = ((xmax - xmin + 1) as usize, (ymax - ymin + 1) as usize);
    let poly: Vec<(i64, i64)> =
        quad.iter().map(|c| ((c[0] - xmin as f64) as i64, (c[1] - ymin as f64) as i64)).collect();
    let mut mask = vec![false; mw * mh];
    let mut paint = |x: i64, y: i64| {
        if (0..mw as i64).contains(&x) && (0..mh as i64).contains(&y) {
            mask[y as usize * mw + x as usize] = true;
        }
    };
    for i in 0..poly.len() {
        line(poly[i], poly[(i + 1) % poly.len()], &mut paint);
    }
    let fpoly: Vec<(f64, f64)> = poly.iter().map(|&(x, y)| (x as f64, y as f64)).collect();
    let (mut sum, mut n) = (0f64, 0usize);
    for y in 0..mh {
        for x in 0..mw {
            if mask[y * mw + x] || inside(&fpoly, x as f64, y as f64) {
                sum += prob[(y + ymin as usize) * w + x + xmin as usize] as f64;
                n += 1;
            }
        }
    }
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Calls `paint` for each pixel of the 8-connected (Bresenham) line from `a` to `b`.
fn line(a: (i64, i64), b: (i64, i64), paint: &mut impl FnMut(i64, i64)) {
    let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
    let (sx, sy) = ((b.0 - a.0).signum(), (b.1 - a.1).signum());
    let (mut x, mut y, mut err) = (a.0, a.1, dx + dy);
    loop {
        paint(x, y);
        if (x, y) == b {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Whether `(x, y)` lies strictly inside the convex polygon `poly` (either winding).
fn inside(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let (mut pos, mut neg) = (false, false);
    for i in 0..poly.len() {
        let (a, b) = (poly[i], poly[(i + 1) % poly.len()]);
        let c = (b.0 - a.0) * (y - a.1) - (b.1 - a.1) * (x - a.0);
        pos |= c >= 0.0;
        neg |= c <= 0.0;
    }
    !(pos && neg)
}

/// Grows the closed polygon `poly` by `delta` with round joins and integer
/// output, step for step as Clipper 6 (pyclipper's `PyclipperOffset`,
/// arc tolerance 0.25) does; the points, unordered, of the grown outline.
fn offset_round(poly: &[(i64, i64)], delta: f64) -> Vec<(f64, f64)> {
    let mut src: Vec<(i64, i64)> = Vec::with_capacity(poly.len());
    for &p in poly {
        if src.last() != Some(&p) {
            src.push(p);
        }
    }
    while src.len() > 1 && src.first() == src.last() {
        src.pop();
    }
    if src.len() < 3 || delta <= 0.0 {
        return src.iter().map(|&(x, y)| (x as f64, y as f64)).collect();
    }
    // Clipper makes the outer polygon's orientation positive (its Area ≥ 0).
    let area: f64 = (0..src.len())
        .map(|i| {
            let (j, k) = (src[(i + src.len() - 1) % src.len()], src[i]);
            (j.0 as f64 + k.0 as f64) * (j.1 as f64 - k.1 as f64)
        })
        .sum::<f64>()
        * -0.5;
    if area < 0.0 {
        src.reverse();
    }
    let n = src.len();
    let normal = |a: (i64, i64), b: (i64, i64)| {
        let (dx, dy) = ((b.0 - a.0) as f64, (b.1 - a.1) as f64);
        if dx == 0.0 && dy == 0.0 {
            return (0.0, 0.0);
        }
        let f = 1.0 / (dx * dx + dy * dy).sqrt();
        (dy * f, -dx * f)
    };
    let normals: Vec<(f64, f64)> = (0..n).map(|j| normal(src[j], src[(j + 1) % n])).collect();
    let tolerance = if 0.25 > delta * 0.25 { delta * 0.25 } else { 0.25 };
    let mut steps = std::f64::consts::PI / (1.0 - tolerance / delta).acos();
    if steps > delta * std::f64::consts::PI {
        steps = delta * std::f64::consts::PI;
    }
    let (sin, cos) = (std::f64::consts::TAU / steps).sin_cos();
    let steps_per_rad = steps / std::f64::consts::TAU;
    let round = |v: f64| if v < 0.0 { (v - 0.5).trunc() } else { (v + 0.5).trunc() };
    let at = |p: (i64, i64), nx: f64, ny: f64| (round(p.0 as f64 + nx * delta), round(p.1 as f64 + ny * delta));
    let mut out = Vec::new();
    let mut k = n - 1;
    for j in 0..n {
        let (nk, nj, p) = (normals[k], normals[j], src[j]);
        let mut sin_a = nk.0 * nj.1 - nj.0 * nk.1;
        let cos_a = nk.0 * nj.0 + nk.1 * nj.1;
        if (sin_a * delta).abs() < 1.0 && cos_a > 0.0 {
            out.push(at(p, nk.0, nk.1));
            k = j;
            continue;
        }
        sin_a = sin_a.clamp(-1.0, 1.0);
        if sin_a * delta < 0.0 {
            out.push(at(p, nk.0, nk.1));
            out.push((p.0 as f64, p.1 as f64));
            out.push(at(p, nj.0, nj.1));
        } else {
            let a = sin_a.atan2(cos_a);
            let count = (round(steps_per_rad * a.abs()) as i64).max(1);
            let (mut x, mut y) = nk;
            for _ in 0..count {
                out.push(at(p, x, y));
                (x, y) = (x * cos - sin * y, x * sin + y * cos);
            }
            out.push(at(p, nj.0, nj.1));
        }
        k = j;
    }
    out
}

/// Puts boxes in reading order as PaddleOCR does: by the top-left corner's
/// y then x, then a box moves before its predecessor while they are on the
/// same line (tops within 10 px) and it is further left.
pub fn reading_order<T>(items: &mut [T], top_left: impl Fn(&T) -> [f32; 2]) {
    items.sort_by(|a, b| {
        let (a, b) = (top_left(a), top_left(b));
        a[1].total_cmp(&b[1]).then(a[0].total_cmp(&b[0]))
    });
    for i in 0..items.len().saturating_sub(1) {
        for j in (0..=i).rev() {
            let (a, b) = (top_left(&items[j]), top_left(&items[j + 1]));
            if (b[1] - a[1]).abs() < 10.0 && b[0] < a[0] {
                items.swap(j, j + 1);
            } else {
                break;
            }
        }
    }
}

/// PaddleOCR's `filter_tag_det_res`: corners re-ordered clockwise from the
/// top-left, clipped to the `w`×`h` image as whole pixels; `None` when
/// either side is 3 px or less.
pub fn clip_box(quad: &Quad, w: u32, h: u32) -> Option<Quad> {
    let mut c = *quad;
    c.sort_by(|a, b| a[0].total_cmp(&b[0]));
    let by_y = |a: [f32; 2], b: [f32; 2]| if b[1] < a[1] { (b, a) } else { (a, b) };
    let (tl, bl) = by_y(c[0], c[1]);
    let (tr, br) = by_y(c[2], c[3]);
    let clip = |p: [f32; 2]| {
        [p[0].clamp(0.0, w.saturating_sub(1) as f32).trunc(), p[1].clamp(0.0, h.saturating_sub(1) as f32).trunc()]
    };
    let q = [clip(tl), clip(tr), clip(br), clip(bl)];
    let dist = |a: [f32; 2], b: [f32; 2]| (a[0] - b[0]).hypot(a[1] - b[1]);
    (dist(q[0], q[1]) as u32 > 3 && dist(q[0], q[3]) as u32 > 3).then_some(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DbParams {
        DbParams { threshold: 0.3, box_threshold: 0.5, unclip_ratio: 1.6, max_candidates: 1000, dilate: false }
    }

    fn map_with(w: usize, h: usize, rects: &[(usize, usize, usize, usize, f32)]) -> Vec<f32> {
        let mut m = vec![0.0; w * h];
        for &(x0, y0, x1, y1, v) in rects {
            for y in y0..=y1 {
                for x in x0..=x1 {
                    m[y * w + x] = v;
                }
            }
        }
        m
    }

    #[test]
    fn a_rectangle_region_is_found_grown_and_scaled() {
        // Region x 10..=49, y 20..=29: rect 39×9 through the pixel centres.
        let m = map_with(100, 60, &[(10, 20, 49, 29, 0.9)]);
        let found = boxes(&m, 100, 60, 200, 120, &params());
        assert_eq!(found.len(), 1);
        let (q, score) = found[0];
        assert!((score - 0.9).abs() < 1e-4, "{score}");
        // d = 39*9*1.6/(2*48) = 5.85 → x 4.15..54.85, y 14.15..34.85, ×2 and rounded.
        assert_eq!(q, [[8.0, 28.0], [110.0, 28.0], [110.0, 70.0], [8.0, 70.0]]);
    }

    #[test]
    fn faint_and_tiny_regions_are_dropped() {
        let m = map_with(100, 60, &[(10, 10, 60, 20, 0.4), (70, 40, 71, 41, 0.95)]);
        let mut p = params();
        assert!(boxes(&m, 100, 60, 100, 60, &p).is_empty());
        p.box_threshold = 0.35;
        assert_eq!(boxes(&m, 100, 60, 100, 60, &p).len(), 1);
    }

    #[test]
    fn the_minimum_rectangle_of_a_rotated_region_follows_it() {
        // A 40×10 rectangle rotated by 30°.
        let (c, s) = (30f64.to_radians().cos(), 30f64.to_radians().sin());
        let mut pts = Vec::new();
        for i in 0..=40 {
            for j in 0..=10 {
                let (u, v) = (i as f64, j as f64);
                pts.push((50.0 + u * c - v * s, 20.0 + u * s + v * c));
            }
        }
        let r = min_area_rect(&pts, 0.0);
        assert!((r.width.max(r.height) - 40.0).abs() < 1e-6 && (r.width.min(r.height) - 10.0).abs() < 1e-6, "{r:?}");
        let g = min_area_rect(&pts, 2.0);
        assert!((g.area() - 44.0 * 14.0).abs() < 1e-6);
    }

    #[test]
    fn round_offset_grows_a_rectangle_by_the_distance_like_clipper() {
        // pyclipper: PyclipperOffset().AddPath([[10,20],[49,20],[49,29],[10,29]], JT_ROUND, ET_CLOSEDPOLYGON);
        // Execute(5.85) answers these 16 points.
        let mut grown = offset_round(&[(10, 20), (49, 20), (49, 29), (10, 29)], 5.85);
        grown.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        grown.dedup();
        let mut want = vec![
            (52, 15),
            (54, 18),
            (55, 20),
            (55, 29),
            (54, 32),
            (51, 34),
            (49, 35),
            (10, 35),
            (7, 34),
            (5, 31),
            (4, 29),
            (4, 20),
            (5, 17),
            (8, 15),
            (10, 14),
            (49, 14),
        ];
        want.sort();
        assert_eq!(grown, want.into_iter().map(|(x, y)| (x as f64, y as f64)).collect::<Vec<_>>());
    }

    #[test]
    fn reading_order_is_lines_top_down_then_left_to_right() {
        // (x, y) of top-left corners: two lines, the second line's tops jitter by a few px.
        let mut items = vec![[300.0, 52.0], [10.0, 50.0], [150.0, 5.0], [10.0, 8.0], [160.0, 47.0]];
        reading_order(&mut items, |p| *p);
        assert_eq!(items, vec![[10.0, 8.0], [150.0, 5.0], [10.0, 50.0], [160.0, 47.0], [300.0, 52.0]]);
    }

    #[test]
    fn clipped_boxes_keep_inside_and_thin_ones_go() {
        let q = [[-5.0, 2.0], [120.0, 2.0], [120.0, 30.0], [-5.0, 30.0]];
        assert_eq!(clip_box(&q, 100, 50), Some([[0.0, 2.0], [99.0, 2.0], [99.0, 30.0], [0.0, 30.0]]));
        assert_eq!(clip_box(&[[0.0, 0.0], [50.0, 0.0], [50.0, 3.0], [0.0, 3.0]], 100, 50), None);
    }

    #[test]
    fn dilation_grows_right_and_down() {
        let mut b = vec![false; 9];
        b[4] = true;
        let d = dilate(&b, 3, 3);
        assert_eq!(d, vec![false, false, false, false, true, true, false, true, true]);
    }
}
