//! Rotary position embedding of DeepSeek-V3's MLA, with YaRN scaling.
//!
//! Mirrors transformers' `DeepseekV3RotaryEmbedding` + `_compute_yarn_parameters` (f32 as there)
//! and `apply_rotary_pos_emb_interleave`. The interleaved layout rotates the pairs
//! `(x[2i], x[2i+1])`; the reference then writes them de-interleaved, a permutation applied to
//! both queries and keys that leaves every dot product unchanged, so we rotate in place.

use crate::model::config::{yarn_get_mscale, ModelConfig};

/// Per-frequency inverse wavelengths and the attention factor applied to cos/sin.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
    interleave: bool,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        // pos_freqs = base ** (arange(0, dim, 2) / dim), computed in f32 by the reference.
        let pos_freqs: Vec<f32> = (0..half)
            .map(|i| base.powf((2 * i) as f64 / dim as f64) as f32)
            .collect();
        let (inv_freq, attention_factor) = match &cfg.rope_scaling {
            None => (pos_freqs.iter().map(|p| 1.0 / p).collect(), 1.0),
            Some(y) => {
                let factor = y.factor as f32;
                let attention_factor = match y.attention_factor {
                    Some(a) => a,
                    None if y.mscale != 0.0 && y.mscale_all_dim != 0.0 => {
                        yarn_get_mscale(y.factor, y.mscale)
                            / yarn_get_mscale(y.factor, y.mscale_all_dim)
                    }
                    None => yarn_get_mscale(y.factor, 1.0),
                };
                let correction_dim = |rotations: f64| {
                    (dim as f64
                        * (y.original_max_position_embeddings as f64
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) =
                    (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0) as f32;
                let mut high = high.min(dim as f64 - 1.0) as f32;
                if low == high {
                    high += 0.001;
                }
                let inv = pos_freqs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        let interp = 1.0 / (factor * p);
                        let extrap = 1.0 / p;
                        interp * (1.0 - extrapolation_factor) + extrap * extrapolation_factor
                    })
                    .collect();
                (inv, attention_factor as f32)
            }
        };
        Self {
            inv_freq,
            attention_factor,
            interleave: cfg.rope_interleave,
        }
    }

    /// cos and sin (times the attention factor) of each frequency at `pos`.
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = pos as f32 * f;
            *c = (angle as f64).cos() as f32 * self.attention_factor;
            *s = (angle as f64).sin() as f32 * self.attention_factor;
        }
    }

    /// Rotates one head's rope part `x` (len = qk_rope_head_dim) at the given cos/sin.
    #[inline]
    pub fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        if self.interleave {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        } else {
            // rotate_half layout: pairs (x[i], x[i + half]).
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }

    /// Whether pairs are `(2i, 2i + 1)` (else `(i, i + half)`).
    pub fn interleave(&self) -> bool {
        self.interleave
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }
}
