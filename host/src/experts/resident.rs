//! The simplest expert provider: each expert is read from the memory-mapped checkpoint and
//! dequantized the first time it is routed to, then kept.

use anyhow::{Context, Result};
use std::sync::{Arc, OnceLock};

use crate::weights::checkpoint::Checkpoint;

use super::{expert_prefix, ExpertProvider, ExpertWeights, FfnWeights, LayerStep};

/// Every expert stays resident once used: read and dequantized on first use.
pub struct ResidentExperts {
    ckpt: Arc<Checkpoint>,
    hidden: usize,
    intermediate: usize,
    n_experts: usize,
    /// `slots[layer][expert]`, allocated for MoE layers only.
    slots: Vec<Vec<OnceLock<Arc<FfnWeights>>>>,
}

impl ResidentExperts {
    pub fn new(ckpt: Arc<Checkpoint>, cfg: &crate::model::config::ModelConfig) -> Self {
        let slots = (0..cfg.num_hidden_layers)
            .map(|l| {
                let n = if cfg.is_moe_layer(l) {
                    cfg.n_routed_experts
                } else {
                    0
                };
                (0..n).map(|_| OnceLock::new()).collect()
            })
            .collect();
        Self {
            ckpt,
            hidden: cfg.hidden_size,
            intermediate: cfg.moe_intermediate_size,
            n_experts: cfg.n_routed_experts,
            slots,
        }
    }
}

impl ExpertProvider for ResidentExperts {
    fn step(&self, step: &LayerStep<'_>) -> Result<Vec<ExpertWeights>> {
        self.fetch(step.layer, step.experts)
    }
}

impl ResidentExperts {
    /// Weights of `experts` of decoder layer `layer`, read on first use.
    pub fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Vec<ExpertWeights>> {
        let slots = self
            .slots
            .get(layer)
            .filter(|s| !s.is_empty())
            .with_context(|| format!("layer {layer} has no routed experts"))?;
        experts
            .iter()
            .map(|&e| {
                anyhow::ensure!(
                    (e as usize) < self.n_experts,
                    "expert {e} out of range (layer {layer} has {})",
                    self.n_experts
                );
                let slot = &slots[e as usize];
                if let Some(w) = slot.get() {
                    return Ok(ExpertWeights::Compute(w.clone()));
                }
                let w = Arc::new(FfnWeights::load(
                    &self.ckpt,
                    &expert_prefix(layer, e),
                    self.hidden,
                    self.intermediate,
                )?);
                Ok(ExpertWeights::Compute(slot.get_or_init(|| w).clone()))
            })
            .collect()
    }
}
