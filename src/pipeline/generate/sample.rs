//! Picking the next token: greedy, or sampled with temperature, top-k and
//! top-p from a seeded generator.

use crate::error::InferError;
use crate::job::GenerationParams;

/// Picks the next token from logits: greedy, or sampled with temperature,
/// top-k and top-p from a seeded generator (the same seed, the same tokens).
pub(super) struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: SplitMix64,
}

impl Sampler {
    pub(super) fn new(r: &GenerationParams) -> Result<Sampler, InferError> {
        let temperature = r.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(InferError::bad_input("temperature must be 0..=2"));
        }
        let top_p = r.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(InferError::bad_input("top_p must be in (0, 1]"));
        }
        let seed = r.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Sampler { temperature, top_k: r.top_k.unwrap_or(0), top_p, rng: SplitMix64(seed) })
    }

    /// True when the pick is the likeliest token.
    pub(super) fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    pub(super) fn pick(&mut self, logits: &[f32]) -> usize {
        let argmax = || argmax(logits);
        if self.is_greedy() {
            return argmax();
        }
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
        if order.is_empty() {
            return argmax();
        }
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.top_k > 0 {
            order.truncate(self.top_k);
        }
        let top = logits[order[0]];
        let mut probs: Vec<f64> =
            order.iter().map(|&i| (((logits[i] - top) / self.temperature) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p;
                    acc >= self.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let sum: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let mut u = self.rng.next_f64();
        for (k, p) in probs.iter().enumerate() {
            if u < *p {
                return order[k];
            }
            u -= p;
        }
        order[probs.len() - 1]
    }
}

/// The index of the largest finite logit (the first of equals; 0 when none is finite).
pub(super) fn argmax(logits: &[f32]) -> usize {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

/// A small, fast generator with a fixed sequence per seed (Steele et al.'s SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> GenerationParams {
        GenerationParams {
            temperature: Some(temperature),
            top_k: Some(top_k),
            top_p: Some(top_p),
            seed: Some(seed),
            ..Default::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_and_top_k_one_too() {
        let logits = [0.1, 2.0, 1.9, -1.0];
        assert_eq!(Sampler::new(&request(0.0, 0, 1.0, 1)).unwrap().pick(&logits), 1);
        assert_eq!(Sampler::new(&request(1.5, 1, 1.0, 1)).unwrap().pick(&logits), 1);
    }

    #[test]
    fn the_same_seed_samples_the_same_tokens_and_top_k_bounds_the_choice() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(&request(1.0, 5, 1.0, seed)).unwrap();
            (0..200).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let mut top5: Vec<usize> = (0..50).collect();
        top5.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        top5.truncate(5);
        assert!(draw(7).iter().all(|t| top5.contains(t)), "only the 5 best tokens are drawn");
    }

    #[test]
    fn top_p_keeps_the_smallest_set_over_p() {
        // Probabilities ~0.64, 0.24, 0.09, 0.03: top_p 0.7 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(&request(1.0, 0, 0.7, 3)).unwrap();
        let drawn: std::collections::BTreeSet<usize> = (0..500).map(|_| s.pick(&logits)).collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn out_of_range_sampling_settings_are_refused() {
        assert!(Sampler::new(&request(2.5, 0, 1.0, 0)).is_err());
        assert!(Sampler::new(&request(1.0, 0, 0.0, 0)).is_err());
    }
}
