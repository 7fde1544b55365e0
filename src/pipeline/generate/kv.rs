//! The KV cache of sequences that step together: how their rows are packed
//! into one batch, the attention mask that says which positions are real,
//! and how a row is taken back out. Pure arithmetic on `f32` buffers
//! `[rows, heads, width, head_dim]`, with table tests; the generator
//! decides when to pack, step and release.
//!
//! Two layouts, by what the graph does with a step's new key and value:
//! - [`Align::Right`]: graphs of standard ops append them at the end
//!   (`Concat`) and take a mask that may hide any position, so every row ends
//!   at the last column: shorter rows are padded (masked) on the left. Their
//!   `position_ids` say each row's true positions.
//! - [`Align::Left`]: graphs whose attention writes the new entries where each
//!   row's length says (ONNX Runtime's `GroupQueryAttention`, which reads the
//!   lengths from the mask: its ones first, then zeros) keep each row's
//!   positions first; the columns after a row's length are unused.

/// Where a row's positions sit in a batch wider than the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    /// Positions end at the last column (masked padding before them).
    Right,
    /// Positions start at column 0 (unused columns after them).
    Left,
}

/// The shape of one cache tensor's rows: heads and head size.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rows {
    pub heads: usize,
    pub head_dim: usize,
    pub align: Align,
}

impl Rows {
    /// First column of a row of `len` positions in a batch `width` wide.
    fn start(&self, len: usize, width: usize) -> usize {
        match self.align {
            Align::Right => width - len,
            Align::Left => 0,
        }
    }

    /// One cache tensor of several sequences as a batch `width` wide: row
    /// `r` is `caches[r]` (`[1, heads, lens[r], head_dim]`), unused columns zero.
    pub fn pack(&self, caches: &[&[f32]], lens: &[usize], width: usize) -> Vec<f32> {
        let (heads, hd) = (self.heads, self.head_dim);
        let mut data = vec![0f32; caches.len() * heads * width * hd];
        for (row, (src, &len)) in caches.iter().zip(lens).enumerate() {
            let at = self.start(len, width);
            for h in 0..heads {
                let to = ((row * heads + h) * width + at) * hd;
                data[to..to + len * hd].copy_from_slice(&src[h * len * hd..(h + 1) * len * hd]);
            }
        }
        data
    }

    /// Row `row` of a batch `width` wide, its `keep` positions as a
    /// `[1, heads, keep, head_dim]` cache of its own.
    pub fn unpack(&self, batch: &[f32], row: usize, width: usize, keep: usize) -> Vec<f32> {
        let (heads, hd) = (self.heads, self.head_dim);
        let at = self.start(keep, width);
        let mut out = Vec::with_capacity(heads * keep * hd);
        for h in 0..heads {
            let from = ((row * heads + h) * width + at) * hd;
            out.extend_from_slice(&batch[from..from + keep * hd]);
        }
        out
    }

    /// Copies the `len` positions of row `from.1` of `from.0` (`from.2` wide)
    /// to row `to.1` of `to.0` (`to.2` wide), where the layout puts them in
    /// each: a row moving between a sequence's own buffers and a batch's.
    pub fn copy_row(&self, from: (&[f32], usize, usize), to: (&mut [f32], usize, usize), len: usize) {
        let ((src, from_row, from_width), (dst, to_row, to_width)) = (from, to);
        let (heads, hd) = (self.heads, self.head_dim);
        let (a, b) = (self.start(len, from_width), self.start(len, to_width));
        for h in 0..heads {
            let f = ((from_row * heads + h) * from_width + a) * hd;
            let t = ((to_row * heads + h) * to_width + b) * hd;
            dst[t..t + len * hd].copy_from_slice(&src[f..f + len * hd]);
        }
    }

    /// The attention mask of one decoding step: rows of `lens[r]` cached
    /// positions plus the token fed, `width + 1` columns (the cache's width
    /// and the new token's).
    pub fn step_mask(&self, lens: &[usize], width: usize) -> Vec<i64> {
        let cols = width + 1;
        let mut mask = vec![0i64; lens.len() * cols];
        for (row, &len) in lens.iter().enumerate() {
            let line = &mut mask[row * cols..(row + 1) * cols];
            match self.align {
                Align::Right => line[width - len..].fill(1),
                Align::Left => line[..=len].fill(1),
            }
        }
        mask
    }
}

/// The KV caches of sequences that stepped together, kept for the same
/// group's next step (no copy into and out of per-sequence caches): as the
/// model returned them (`2 × layers` tensors `[rows, heads, total,
/// head_dim]`, rows right-aligned), or in the engine's own buffers, written
/// in place by each step (`[rows, heads, room, head_dim]`, rows left-aligned).
pub(super) struct Batch {
    /// The sequence of each row.
    ids: Vec<u64>,
    /// Rows whose sequence still exists: the batch goes once none does.
    alive: Vec<bool>,
    /// Positions of the widest row (tensors).
    pub total: usize,
    pub caches: Vec<Vec<f32>>,
    pub state: Option<Box<dyn crate::backend::State>>,
}

impl Batch {
    /// The caches a step returned for the sequences `ids`, row by row.
    pub fn of_tensors(ids: Vec<u64>, total: usize, caches: Vec<Vec<f32>>) -> Batch {
        let alive = vec![true; ids.len()];
        Batch { ids, alive, total, caches, state: None }
    }

    /// The engine's buffers holding the rows of `ids` (`alive`: whose sequence still steps).
    pub fn in_place(ids: Vec<u64>, alive: Vec<bool>, total: usize, state: Box<dyn crate::backend::State>) -> Batch {
        Batch { ids, alive, total, caches: Vec::new(), state: Some(state) }
    }

    /// The row of sequence `id`.
    pub fn row_of(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Whether the batch can take the next step of the sequences `ids`: the
    /// same group, in the same rows (tensors); any of its rows (buffers in
    /// place: rows whose sequence left or pauses stay idle, nothing moves).
    pub fn serves(&self, ids: &[u64]) -> bool {
        match self.state {
            Some(_) => ids.iter().all(|id| self.ids.contains(id)),
            None => self.ids == ids,
        }
    }

    /// Releases the row of sequence `id` (gone); true when no row is used any more.
    pub fn release(&mut self, id: u64) -> bool {
        if let Some(row) = self.row_of(id) {
            self.alive[row] = false;
        }
        !self.alive.contains(&true)
    }

    /// Its rows' sequences and the engine's buffers, when it keeps its cache there.
    pub fn into_state(self) -> Option<(Vec<u64>, Box<dyn crate::backend::State>)> {
        Some((self.ids, self.state?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[1, heads, len, head_dim]` cache whose values name their place: 100·head + position (+0.5 per dim).
    fn cache(heads: usize, len: usize, hd: usize, tag: f32) -> Vec<f32> {
        let mut v = Vec::new();
        for h in 0..heads {
            for p in 0..len {
                for d in 0..hd {
                    v.push(tag + 100.0 * h as f32 + p as f32 + 0.5 * d as f32);
                }
            }
        }
        v
    }

    #[test]
    fn rows_pack_and_come_back_out_unchanged_in_both_layouts() {
        for align in [Align::Right, Align::Left] {
            let rows = Rows { heads: 2, head_dim: 3, align };
            let (a, b) = (cache(2, 4, 3, 0.0), cache(2, 1, 3, 1000.0));
            let batch = rows.pack(&[&a, &b], &[4, 1], 5);
            assert_eq!(batch.len(), 2 * 2 * 5 * 3);
            assert_eq!(rows.unpack(&batch, 0, 5, 4), a, "{align:?}");
            assert_eq!(rows.unpack(&batch, 1, 5, 1), b, "{align:?}");
            // Unused columns are zero, on the side the layout says.
            let head0_row1 = &batch[(2 * 5) * 3..(2 * 5 + 5) * 3];
            let (used, unused) = match align {
                Align::Right => (&head0_row1[4 * 3..], &head0_row1[..4 * 3]),
                Align::Left => (&head0_row1[..3], &head0_row1[3..]),
            };
            assert!(unused.iter().all(|&x| x == 0.0), "{align:?}: {head0_row1:?}");
            assert_eq!(used, &b[..3], "{align:?}");
        }
    }

    #[test]
    fn a_row_keeps_its_positions_after_a_step_widened_the_batch() {
        // A step returns the batch one column wider with the new token's entry
        // at the end of each row (right) or right after its positions (left).
        let left = Rows { heads: 1, head_dim: 1, align: Align::Left };
        let stepped = vec![1.0, 2.0, 3.0, /* row 1: */ 7.0, 8.0, 0.0];
        assert_eq!(left.unpack(&stepped, 1, 3, 2), vec![7.0, 8.0]);
        let right = Rows { heads: 1, head_dim: 1, align: Align::Right };
        let stepped = vec![1.0, 2.0, 3.0, /* row 1: */ 0.0, 7.0, 8.0];
        assert_eq!(right.unpack(&stepped, 1, 3, 2), vec![7.0, 8.0]);
    }

    #[test]
    fn a_row_copied_between_buffers_of_other_widths_keeps_its_positions() {
        for align in [Align::Right, Align::Left] {
            let rows = Rows { heads: 2, head_dim: 3, align };
            let own = cache(2, 3, 3, 0.0);
            // Into row 1 of a batch 5 wide, then back out into a buffer of its own 4 wide.
            let mut batch = vec![0f32; 2 * 2 * 5 * 3];
            rows.copy_row((&own, 0, 3), (&mut batch, 1, 5), 3);
            assert_eq!(rows.unpack(&batch, 1, 5, 3), own, "{align:?}");
            let mut back = vec![0f32; 2 * 4 * 3];
            rows.copy_row((&batch, 1, 5), (&mut back, 0, 4), 3);
            assert_eq!(rows.unpack(&back, 0, 4, 3), own, "{align:?}");
        }
    }

    #[test]
    fn a_batch_serves_its_own_group_and_goes_when_its_last_row_is_released() {
        let mut tensors = Batch::of_tensors(vec![7, 8, 9], 5, Vec::new());
        assert!(tensors.serves(&[7, 8, 9]));
        assert!(!tensors.serves(&[7, 9]), "tensors: a smaller group is repacked");
        assert!(!tensors.serves(&[9, 8, 7]), "tensors: rows in another order are another batch");
        assert!(!tensors.serves(&[7, 8, 9, 10]), "a newcomer is packed in");
        assert_eq!((tensors.row_of(8), tensors.row_of(10)), (Some(1), None));
        assert!(!tensors.release(8) && !tensors.release(10) && !tensors.release(7));
        assert!(tensors.release(9), "the last row released: nothing is left to keep");
        assert!(tensors.into_state().is_none());

        // Buffers in the engine: any of its rows step again, the others idle; a newcomer is packed in.
        struct Buffers(Vec<usize>);
        impl crate::backend::State for Buffers {
            fn shape(&self) -> &[usize] {
                &self.0
            }
            fn count(&self) -> usize {
                0
            }
            fn buffer(&mut self, _: usize) -> &mut [f32] {
                &mut []
            }
            fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
                self
            }
        }
        let mut in_place = Batch::in_place(vec![7, 8, 9], vec![true, false, true], 5, Box::new(Buffers(vec![3])));
        assert!(in_place.serves(&[7, 8, 9]) && in_place.serves(&[9]) && in_place.serves(&[7, 9]));
        assert!(!in_place.serves(&[7, 10]));
        assert!(!in_place.release(7), "row 9 still steps");
        assert!(in_place.release(9));
        let (ids, state) = in_place.into_state().unwrap();
        assert_eq!((ids, state.shape()), (vec![7, 8, 9], &[3][..]));
    }

    #[test]
    fn the_step_mask_marks_each_rows_positions_and_the_new_token() {
        let right = Rows { heads: 1, head_dim: 1, align: Align::Right };
        assert_eq!(right.step_mask(&[3, 1, 0], 3), vec![1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1]);
        let left = Rows { heads: 1, head_dim: 1, align: Align::Left };
        assert_eq!(left.step_mask(&[3, 1, 0], 3), vec![1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]);
        // The row's length is what GroupQueryAttention reads: ones = cached + 1.
        for (row, len) in [3usize, 1, 0].into_iter().enumerate() {
            let ones = left.step_mask(&[3, 1, 0], 3)[row * 4..(row + 1) * 4].iter().sum::<i64>();
            assert_eq!(ones as usize, len + 1);
        }
    }
}
