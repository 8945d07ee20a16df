//! `moehost forward`: one prefill, written as safetensors in the layout of the golden files,
//! so any run can be compared with the reference tensor by tensor.
//!
//! `logits` f32 `[T, vocab]`; `routed_experts` i32 `[T, moe_layers, top_k]` (each token's experts
//! in ascending id order); `routed_weights` f32 `[T, moe_layers, top_k]` aligned with them,
//! normalised, before `routed_scaling_factor`.

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

use crate::model::deepseek_v3::{DeepseekV3, Logits};
use crate::model::router::LayerRouting;

/// A prefill's logits and routing in `[token, moe_layer, k]` order, experts ascending.
pub struct ForwardDump {
    pub tokens: usize,
    pub vocab: usize,
    pub moe_layers: usize,
    pub top_k: usize,
    pub logits: Vec<f32>,
    pub routed_experts: Vec<i32>,
    pub routed_weights: Vec<f32>,
}

/// Runs one prefill of `ids` on a fresh cache.
pub fn run(model: &DeepseekV3, ids: &[u32]) -> Result<ForwardDump> {
    let mut cache = model.new_cache();
    let out = model.forward(ids, &mut cache, Logits::All, true)?;
    let cfg = model.config();
    let (routed_experts, routed_weights) = token_major(&out.routing, ids.len());
    Ok(ForwardDump {
        tokens: ids.len(),
        vocab: cfg.vocab_size,
        moe_layers: out.routing.len(),
        top_k: cfg.num_experts_per_tok,
        logits: out.logits,
        routed_experts,
        routed_weights,
    })
}

/// Reorders per-layer routing `[layer][token * k]` into `[token][layer][k]`, experts ascending.
pub fn token_major(routing: &[LayerRouting], tokens: usize) -> (Vec<i32>, Vec<f32>) {
    let mut experts = Vec::new();
    let mut weights = Vec::new();
    for t in 0..tokens {
        for layer in routing {
            let k = layer.top_k;
            let mut pairs: Vec<(u32, f32)> = layer.experts[t * k..(t + 1) * k]
                .iter()
                .copied()
                .zip(layer.weights[t * k..(t + 1) * k].iter().copied())
                .collect();
            pairs.sort_by_key(|p| p.0);
            experts.extend(pairs.iter().map(|p| p.0 as i32));
            weights.extend(pairs.iter().map(|p| p.1));
        }
    }
    (experts, weights)
}

impl ForwardDump {
    /// Writes the dump to `path` (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let logits = f32_bytes(&self.logits);
        let weights = f32_bytes(&self.routed_weights);
        let experts: Vec<u8> = self
            .routed_experts
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let route_shape = vec![self.tokens, self.moe_layers, self.top_k];
        let tensors = vec![
            (
                "logits",
                TensorView::new(Dtype::F32, vec![self.tokens, self.vocab], &logits)?,
            ),
            (
                "routed_experts",
                TensorView::new(Dtype::I32, route_shape.clone(), &experts)?,
            ),
            (
                "routed_weights",
                TensorView::new(Dtype::F32, route_shape, &weights)?,
            ),
        ];
        safetensors::serialize_to_file(tensors, None, path)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}
