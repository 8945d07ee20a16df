//! Choosing the next token from logits: greedy, or temperature + top-k + top-p with a seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick tokens. `temperature == 0` is greedy (argmax, lowest id on ties).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges an API user can get wrong.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be a number >= 0, got {}",
            self.temperature
        );
        anyhow::ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p must be in (0, 1], got {}",
            self.top_p
        );
        Ok(())
    }
}

/// A seeded sampler; the same seed and logits give the same tokens on every machine.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        if self.params.top_k == 0 && self.params.top_p >= 1.0 {
            return self.sample_full(logits, inv_t);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.params.top_k > 0 {
            cand.truncate(self.params.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand.iter().map(|c| ((c.1 - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            cand.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (c, p) in cand.iter().zip(&probs) {
            if r < *p {
                return c.0;
            }
            r -= p;
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }
}

impl Sampler {
    /// The whole distribution (no top-k, no top-p): nothing to rank, so tokens are walked in
    /// id order, O(vocab), no sort (a batch of 32 sequences sorted 32 vocabularies per step).
    fn sample_full(&mut self, logits: &[f32], inv_t: f32) -> u32 {
        let max = logits
            .iter()
            .filter(|l| !l.is_nan())
            .fold(f32::NEG_INFINITY, |m, &l| m.max(l * inv_t));
        if max == f32::NEG_INFINITY {
            return argmax(logits);
        }
        // f32 exp (every weight is in (0, 1]), summed in f64.
        let weight = |l: f32| {
            if l.is_nan() {
                0.0
            } else {
                f64::from((l * inv_t - max).exp())
            }
        };
        let total: f64 = logits.iter().map(|&l| weight(l)).sum();
        let mut r = self.rng.random::<f64>() * total;
        let mut last = None;
        for (i, &l) in logits.iter().enumerate() {
            let p = weight(l);
            if p > 0.0 {
                if r < p {
                    return i as u32;
                }
                r -= p;
                last = Some(i as u32);
            }
        }
        last.unwrap_or_else(|| argmax(logits))
    }
}

/// Index of the largest logit; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = (0..20)
            .scan(Sampler::new(p.clone()), |s, _| Some(s.sample(&logits)))
            .collect();
        let b: Vec<u32> = (0..20)
            .scan(Sampler::new(p), |s, _| Some(s.sample(&logits)))
            .collect();
        assert_eq!(a, b);
        // The three largest logits (6.0) are at ids 6, 13, 20.
        assert!(a.iter().all(|t| [6, 13, 20].contains(t)), "{a:?}");
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 1,
        });
        assert_eq!(s.sample(&[0.0, 5.0, 1.0]), 1);
    }

    #[test]
    fn full_distribution_follows_the_softmax_and_skips_nan() {
        let logits = [0.0, 2f32.ln(), f32::NAN, 4f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        });
        let n = 70_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        for (i, want) in [(0, 1.0 / 7.0), (1, 2.0 / 7.0), (3, 4.0 / 7.0)] {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }
}
