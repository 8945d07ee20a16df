//! The expert-provider boundary: the one place model code gets routed-expert weights from.
//!
//! Owns: the `ExpertProvider` trait (asked once per MoE layer step for every expert that step
//! routes to) and `ResidentExperts`, the simplest provider: each expert is read from the
//! memory-mapped checkpoint and dequantized to f32 the first time it is routed to, then kept.
//! Does not own: routing (see `router`) or the arithmetic (see `deepseek_v3`). Tiered memory
//! with budgets, eviction and prefetch plugs in here by implementing `ExpertProvider`.

use anyhow::{Context, Result};
use std::sync::{Arc, OnceLock};

use crate::checkpoint::Checkpoint;

/// A SwiGLU feed-forward block in compute form: `down(silu(gate(x)) * up(x))`.
/// Used for routed experts, shared experts and dense MLP layers alike.
pub struct FfnWeights {
    /// `gate_proj` rows then `up_proj` rows: `[2 * intermediate, hidden]`.
    pub gate_up: Vec<f32>,
    /// `down_proj`: `[hidden, intermediate]`.
    pub down: Vec<f32>,
    pub intermediate: usize,
}

impl FfnWeights {
    /// Reads `{prefix}.{gate,up,down}_proj.weight` with the given widths.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let mut gate_up = ckpt.read_f32(
            &format!("{prefix}.gate_proj.weight"),
            &[intermediate, hidden],
        )?;
        gate_up
            .extend(ckpt.read_f32(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?);
        let down = ckpt.read_f32(
            &format!("{prefix}.down_proj.weight"),
            &[hidden, intermediate],
        )?;
        Ok(Self {
            gate_up,
            down,
            intermediate,
        })
    }

    /// Bytes this block occupies in compute form.
    pub fn compute_bytes(&self) -> usize {
        (self.gate_up.len() + self.down.len()) * std::mem::size_of::<f32>()
    }
}

/// Where routed experts come from, and the hooks a memory manager needs around each MoE
/// layer step. Implementations must return exactly one weight set per requested id, in the
/// order asked, and must be safe to call from any thread. Layers are decoder-layer indices.
pub trait ExpertProvider: Send + Sync {
    /// Weights of `experts` (distinct, ascending) of decoder layer `layer`, for one layer step.
    fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Vec<Arc<FfnWeights>>>;

    /// A forward pass begins (a safe point to switch policies).
    fn begin_step(&self) {}

    /// A selection policy's choice for `tokens` rows of `biased` scores (sigmoid + bias),
    /// `k` per token; `None` keeps the model's exact top-k.
    fn select(
        &self,
        _layer: usize,
        _tokens: usize,
        _k: usize,
        _biased: &[f32],
    ) -> Option<Vec<u32>> {
        None
    }

    /// How many following MoE layers of speculative scores `routed` wants.
    fn lookahead(&self) -> usize {
        0
    }

    /// After layer `layer` is routed: its distinct experts, and for the next `lookahead()` MoE
    /// layers `(decoder layer, biased scores [tokens x experts])` from their gates applied to
    /// the current hidden state.
    fn routed(
        &self,
        _layer: usize,
        _tokens: usize,
        _experts: &[u32],
        _outlook: &[(usize, Vec<f32>)],
    ) {
    }
}

/// Checkpoint tensor prefix of routed expert `expert` of decoder layer `layer`.
pub fn expert_prefix(layer: usize, expert: u32) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}")
}

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
    pub fn new(ckpt: Arc<Checkpoint>, cfg: &crate::config::ModelConfig) -> Self {
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
    fn fetch(&self, layer: usize, experts: &[u32]) -> Result<Vec<Arc<FfnWeights>>> {
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
                let w = Arc::new(FfnWeights::load(
                    &self.ckpt,
                    &expert_prefix(layer, e),
                    self.hidden,
                    self.intermediate,
                )?);
                Ok(slot.get_or_init(|| w).clone())
            })
            .collect()
    }
}

/// One stored tensor, copied out of the checkpoint (the host-RAM tier's storage format).
pub struct OwnedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
    /// FP8 block scales or int8/int4 group scales, when the tensor has them.
    pub scales: Option<Vec<f32>>,
}

/// A routed expert in storage format (e.g. FP8 bytes + scales): what the host tier holds.
pub struct ExpertBytes {
    /// gate, up, down.
    pub tensors: [OwnedTensor; 3],
    fp8_block: Option<[usize; 2]>,
}

impl ExpertBytes {
    /// Copies expert `expert` of decoder layer `layer` out of the memory-mapped checkpoint.
    pub fn read(ckpt: &Checkpoint, layer: usize, expert: u32) -> Result<Self> {
        let prefix = expert_prefix(layer, expert);
        let one = |proj: &str| -> Result<OwnedTensor> {
            let raw = ckpt.raw(&format!("{prefix}.{proj}.weight"))?;
            let scales = ckpt.scales(&raw)?;
            Ok(OwnedTensor {
                name: raw.name.to_owned(),
                dtype: raw.dtype,
                shape: raw.shape.to_vec(),
                bytes: raw.bytes.to_vec(),
                scales,
            })
        };
        Ok(Self {
            tensors: [one("gate_proj")?, one("up_proj")?, one("down_proj")?],
            fp8_block: ckpt.fp8_block(),
        })
    }

    /// Bytes held (weights and scales).
    pub fn storage_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.bytes.len() + t.scales.as_ref().map_or(0, |s| s.len() * 4))
            .sum()
    }

    /// The compute form: the same f32 values `FfnWeights::load` produces from the checkpoint.
    pub fn to_ffn(&self) -> Result<FfnWeights> {
        let decode = |t: &OwnedTensor| {
            let raw = crate::checkpoint::RawTensor {
                name: &t.name,
                dtype: t.dtype,
                shape: &t.shape,
                bytes: &t.bytes,
            };
            crate::checkpoint::decode_f32(&raw, t.scales.as_deref(), self.fp8_block)
        };
        let mut gate_up = decode(&self.tensors[0])?;
        gate_up.extend(decode(&self.tensors[1])?);
        Ok(FfnWeights {
            gate_up,
            down: decode(&self.tensors[2])?,
            intermediate: crate::quant::logical_shape(
                self.tensors[0].dtype,
                &self.tensors[0].shape,
            )[0],
        })
    }
}
