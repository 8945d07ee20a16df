//! The MoE gate of DeepSeek-V3 / Kimi-K2 (transformers' `DeepseekV3TopkRouter` and
//! `DeepseekV3MoE.route_tokens_to_experts`): sigmoid scores, selection on
//! `score + e_score_correction_bias` with group-limited top-k (`noaux_tc`), weights from the
//! unbiased scores, normalised, later scaled by `routed_scaling_factor`.
//!
//! Owns: turning router logits into (experts, weights) per token. Does not own: running
//! experts (see `experts`) or where they live. Selection is a separate step so a selection
//! policy can replace it: the group limit is applied first (`selection_scores`), so a policy
//! ranks exactly what the model's top-k ranks; the weights always come from the model's own
//! scores.

use crate::kernels::{linear, sigmoid};
use std::borrow::Cow;

/// One MoE layer's router.
pub struct Gate {
    /// `[n_routed_experts, hidden]`.
    pub weight: Vec<f32>,
    /// `e_score_correction_bias`, `[n_routed_experts]`.
    pub bias: Vec<f32>,
    pub n_group: usize,
    pub topk_group: usize,
    pub top_k: usize,
    pub norm_topk_prob: bool,
}

/// Router scores of a batch of tokens, `[tokens, experts]` each.
pub struct RouterScores {
    pub n_experts: usize,
    /// `sigmoid(logits)`: the weights are taken from these.
    pub sigmoid: Vec<f32>,
    /// `sigmoid(logits) + e_score_correction_bias`: selection ranks these.
    pub biased: Vec<f32>,
}

impl RouterScores {
    pub fn tokens(&self) -> usize {
        self.sigmoid.len() / self.n_experts
    }
}

/// The routing of a batch of tokens at one layer: `top_k` experts per token, in selection order
/// (highest biased score first), and their normalised weights (before `routed_scaling_factor`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerRouting {
    pub top_k: usize,
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Gate {
    pub fn n_experts(&self) -> usize {
        self.bias.len()
    }

    /// Router logits in f32 (`F.linear(h.float(), weight.float())`) turned into scores.
    pub fn scores(&self, xn: &[f32], hidden: usize) -> RouterScores {
        let e = self.n_experts();
        let t = xn.len() / hidden;
        let mut logits = vec![0f32; t * e];
        linear(xn, &self.weight, hidden, &mut logits);
        let sigmoid: Vec<f32> = logits.iter().map(|&x| sigmoid(x)).collect();
        let biased = sigmoid
            .chunks_exact(e)
            .flat_map(|row| row.iter().zip(&self.bias).map(|(s, b)| s + b))
            .collect();
        RouterScores {
            n_experts: e,
            sigmoid,
            biased,
        }
    }

    /// The scores the model's top-k ranks (transformers' `scores_for_choice` after group
    /// masking): the biased scores where groups are off (`n_group` 1, or every group kept), else
    /// each token's `topk_group` best groups (a group scores the sum of its two best) keep theirs
    /// and every other expert's is 0.0 (`masked_fill(~mask, 0.0)`). Exact top-k over these rows
    /// is the model's selection; these are what selection policies are given.
    pub fn selection_scores<'a>(&self, scores: &'a RouterScores) -> Cow<'a, [f32]> {
        let e = scores.n_experts;
        if self.n_group <= 1 || self.topk_group >= self.n_group {
            return Cow::Borrowed(&scores.biased);
        }
        let group_size = e / self.n_group;
        let mut masked = vec![0f32; scores.biased.len()];
        for (row, out) in scores
            .biased
            .chunks_exact(e)
            .zip(masked.chunks_exact_mut(e))
        {
            let group_scores: Vec<f32> = row
                .chunks_exact(group_size)
                .map(|g| {
                    let top = top_k_indices(g, 2);
                    g[top[0] as usize] + g[top[1] as usize]
                })
                .collect();
            for g in top_k_indices(&group_scores, self.topk_group) {
                let r = g as usize * group_size..(g as usize + 1) * group_size;
                out[r.clone()].copy_from_slice(&row[r]);
            }
        }
        Cow::Owned(masked)
    }

    /// The model's own selection: exact top-k of [`Gate::selection_scores`] per token, highest
    /// first. Ties go to the lower expert id.
    pub fn select_topk(&self, scores: &RouterScores) -> Vec<u32> {
        self.top_k_rows(&self.selection_scores(scores))
    }

    /// Exact top-k of each row of `[tokens x experts]` selection scores.
    pub fn top_k_rows(&self, choice: &[f32]) -> Vec<u32> {
        choice
            .chunks_exact(self.n_experts())
            .flat_map(|row| top_k_indices(row, self.top_k))
            .collect()
    }

    /// Weights of the selected experts: the unbiased sigmoid scores, normalised to sum 1 when
    /// `norm_topk_prob` (denominator + 1e-20 as in the reference).
    pub fn weights_for(&self, scores: &RouterScores, experts: &[u32]) -> Vec<f32> {
        let e = scores.n_experts;
        let k = self.top_k;
        let mut w = Vec::with_capacity(experts.len());
        for (row, ids) in scores.sigmoid.chunks_exact(e).zip(experts.chunks_exact(k)) {
            let picked: Vec<f32> = ids.iter().map(|&i| row[i as usize]).collect();
            if self.norm_topk_prob {
                let denom = picked.iter().sum::<f32>() + 1e-20;
                w.extend(picked.iter().map(|p| p / denom));
            } else {
                w.extend(picked);
            }
        }
        w
    }

    /// Scores, exact selection and weights in one call.
    pub fn route(&self, xn: &[f32], hidden: usize) -> (RouterScores, LayerRouting) {
        let scores = self.scores(xn, hidden);
        let experts = self.select_topk(&scores);
        let weights = self.weights_for(&scores, &experts);
        (
            scores,
            LayerRouting {
                top_k: self.top_k,
                experts,
                weights,
            },
        )
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index; NaN ranks last.
pub fn top_k_indices(v: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        let (x, y) = (v[*a as usize], v[*b as usize]);
        let key = |f: f32| if f.is_nan() { f32::NEG_INFINITY } else { f };
        key(y).total_cmp(&key(x)).then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(n_group: usize, topk_group: usize, top_k: usize, bias: Vec<f32>) -> Gate {
        Gate {
            weight: vec![],
            bias,
            n_group,
            topk_group,
            top_k,
            norm_topk_prob: true,
        }
    }

    fn scores(sig: Vec<f32>, bias: &[f32]) -> RouterScores {
        let biased = sig.iter().zip(bias).map(|(s, b)| s + b).collect();
        RouterScores {
            n_experts: sig.len(),
            sigmoid: sig,
            biased,
        }
    }

    #[test]
    fn top_k_breaks_ties_low_first() {
        assert_eq!(top_k_indices(&[0.5, 0.9, 0.5, 0.9], 3), vec![1, 3, 0]);
    }

    #[test]
    fn bias_selects_but_does_not_weigh() {
        let bias = vec![0.0, 0.0, 0.75, 0.0];
        let g = gate(1, 1, 2, bias.clone());
        let s = scores(vec![0.9, 0.8, 0.1, 0.2], &bias);
        let ids = g.select_topk(&s);
        assert_eq!(ids, vec![0, 2]); // 0.9 and 0.1 + 0.75 beat 0.8
        let w = g.weights_for(&s, &ids);
        assert!((w[0] - 0.9).abs() < 1e-6 && (w[1] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn group_limit_masks_to_zero_like_the_reference() {
        // Two groups of 3; group 1 wins on its top-2 sum; masked experts score 0.0, so a
        // negative biased score inside the kept group ranks below them.
        let bias = vec![0.0, 0.0, 0.0, 0.0, 0.0, -0.9];
        let g = gate(2, 1, 3, bias.clone());
        let s = scores(vec![0.5, 0.1, 0.1, 0.6, 0.6, 0.3], &bias);
        assert_eq!(g.select_topk(&s), vec![3, 4, 0]);
    }
}
