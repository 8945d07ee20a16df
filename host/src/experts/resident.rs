//! The simplest expert provider: each expert is taken from the memory-mapped checkpoint the
//! first time it is routed to, then kept. Where the CPU computes it straight from its stored
//! bytes (`ExpertBytes::runs_stored`: fp8, int4, int8 or bf16 with the AVX-512 kernels), it
//! stays a view of the mapping, so RAM holds each expert once, as stored; otherwise it is
//! decoded to its compute form.

use anyhow::{Context, Result};
use std::sync::{Arc, OnceLock};

use crate::weights::checkpoint::Checkpoint;

use super::{expert_prefix, ExpertProvider, ExpertWeights, LayerStep};

/// Every expert stays resident once used: mapped (or decoded) on first use.
pub struct ResidentExperts {
    ckpt: Arc<Checkpoint>,
    hidden: usize,
    intermediate: usize,
    n_experts: usize,
    /// `slots[layer][expert]`, allocated for MoE layers only.
    slots: Vec<Vec<OnceLock<ExpertWeights>>>,
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
                    return Ok(w.clone());
                }
                let w = ExpertWeights::for_cpu(
                    &self.ckpt,
                    &expert_prefix(layer, e),
                    self.hidden,
                    self.intermediate,
                )?;
                Ok(slot.get_or_init(|| w).clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::FfnWeights;

    /// On a CPU whose kernels compute the bundled (bf16) model's experts as stored, a resident
    /// expert is a view of the mapped checkpoint, not a copy, and computes the bits of its
    /// compute form at decode and batch row counts.
    #[test]
    fn resident_experts_are_views_of_the_mapping_with_the_compute_forms_bits() {
        let dir = crate::engine::bundled_model_dir();
        let cfg = crate::model::config::ModelConfig::from_dir(&dir).unwrap();
        let ckpt = Arc::new(Checkpoint::open(&dir, cfg.quantization()).unwrap());
        let layer = cfg.moe_layers()[0];
        let experts = ResidentExperts::new(ckpt.clone(), &cfg);
        let [w] = <[ExpertWeights; 1]>::try_from(experts.fetch(layer, &[5]).unwrap())
            .ok()
            .unwrap();
        if !crate::weights::stored_dot::cpu_has_avx512() {
            assert!(matches!(w, ExpertWeights::Compute(_)));
            eprintln!("no AVX-512 here: the compute form is kept");
            return;
        }
        let ExpertWeights::Stored(b) = &w else {
            panic!("a bf16 expert should run as stored on this CPU")
        };
        assert!(b.tensors.iter().all(|t| t.bytes.is_mapped()));
        let reference = FfnWeights::load(
            &ckpt,
            &expert_prefix(layer, 5),
            cfg.hidden_size,
            cfg.moe_intermediate_size,
        )
        .unwrap();
        crate::weights::ffn::tests::streams_with_the_bits_of(
            b,
            &reference,
            cfg.hidden_size,
            &[1, 3, 8, 80],
        );
    }
}
