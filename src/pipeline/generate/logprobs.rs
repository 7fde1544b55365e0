//! Log-probabilities of tokens from a row of logits: the model's own
//! distribution (log-softmax of the raw logits, before temperature, top-k/p
//! or a grammar), as OpenAI's and llama.cpp's servers report them.

/// `log p(token)` for every token of interest in one row of logits.
pub(super) struct Row<'a> {
    logits: &'a [f32],
    /// The largest logit, and log Σ exp(logit - max): log p = (logit - max) - that,
    /// without subtracting two large numbers.
    max: f32,
    log_sum: f32,
}

impl<'a> Row<'a> {
    pub fn new(logits: &'a [f32]) -> Row<'a> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        Row { logits, max, log_sum: sum.ln() as f32 }
    }

    /// `log p(token)`.
    pub fn of(&self, token: usize) -> f32 {
        (self.logits[token] - self.max) - self.log_sum
    }

    /// The `k` likeliest tokens with their log-probabilities, likeliest first
    /// (ties: the lower id first).
    pub fn top(&self, k: usize) -> Vec<(usize, f32)> {
        if k == 0 {
            return Vec::new();
        }
        let mut ids: Vec<usize> = (0..self.logits.len()).collect();
        let by = |a: &usize, b: &usize| self.logits[*b].total_cmp(&self.logits[*a]).then(a.cmp(b));
        let k = k.min(ids.len());
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, by);
            ids.truncate(k);
        }
        ids.sort_by(by);
        ids.into_iter().map(|t| (t, self.of(t))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_a_normalised_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0, 3.0];
        let row = Row::new(&logits);
        let total: f32 = (0..4).map(|t| row.of(t).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let e: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let want = (e[2] / e.iter().sum::<f64>()).ln() as f32;
        assert!((row.of(2) - want).abs() < 1e-6);
        // Large logits do not overflow.
        let big = [1000.0f32, 999.0];
        let row = Row::new(&big);
        assert!((row.of(0) - (-(1.0f32 + (-1.0f32).exp()).ln())).abs() < 1e-5, "{}", row.of(0));
    }

    #[test]
    fn the_likeliest_come_first_and_ties_by_id() {
        let logits = [0.5f32, 3.0, -1.0, 3.0, 2.0];
        let row = Row::new(&logits);
        let top: Vec<usize> = row.top(3).into_iter().map(|(t, _)| t).collect();
        assert_eq!(top, vec![1, 3, 4]);
        assert_eq!(row.top(0), vec![]);
        assert_eq!(row.top(9).len(), 5, "at most the vocabulary");
        let (t, lp) = row.top(1)[0];
        assert_eq!((t, lp), (1, row.of(1)));
    }
}
