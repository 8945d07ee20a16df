//! The expert-provider boundary: the one place model code gets routed-expert weights from.
//!
//! Owns: the `ExpertProvider` trait (asked once per MoE layer step for every expert that step
//! routes to) and `ResidentExperts`, the simplest provider: each expert is read from the
//! memory-mapped checkpoint the first time it is routed to (kept as a view of the mapping
//! where the CPU computes it as stored, else decoded to its compute form), then kept.
//! Does not own: routing (see `router`) or the arithmetic (see `deepseek_v3`).
//!
//! - `resident` — every expert kept once used (no budget);
//! - `tiered` — the tiered store: budgets, eviction, prefetch, placement, policy swaps.

use anyhow::Result;
use std::sync::Arc;

mod resident;
pub mod tiered;

pub use crate::weights::ffn::{expert_prefix, ExpertBytes, FfnWeights, OwnedTensor};
pub use resident::ResidentExperts;

/// A routed expert's weights for one layer step, as the expert provider hands them out.
#[derive(Clone)]
pub enum ExpertWeights {
    /// Compute form: the device tier (or a resident expert).
    Compute(Arc<FfnWeights>),
    /// Storage form, run where it lives (hybrid execution: placement chose not to fetch it).
    Stored(Arc<ExpertBytes>),
    /// Compute form in GPU memory (the CUDA device tier).
    Gpu(Arc<crate::gpu::GpuExpert>),
}

impl ExpertWeights {
    /// The expert's output for `[t, hidden]` inputs; the same bits either way.
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) -> Result<()> {
        match self {
            ExpertWeights::Compute(w) => w.forward(x, hidden, out),
            ExpertWeights::Stored(b) => b.forward(x, hidden, out)?,
            ExpertWeights::Gpu(g) => g.forward(x, hidden, out)?,
        }
        Ok(())
    }

    /// Whether the weights live in GPU memory.
    pub fn on_gpu(&self) -> bool {
        matches!(self, ExpertWeights::Gpu(_))
    }

    /// Each job's output, `jobs[i] = (expert, x [t_i, hidden])`, the same bits as `forward`
    /// one by one. Experts in GPU memory run together, with one host round trip in all
    /// (`gpu::forward_experts`), while the others run on the CPU ([`both_sides`]), in parallel
    /// when `parallel`: the step waits for the slower side only.
    pub fn forward_all(
        jobs: &[(&ExpertWeights, &[f32])],
        hidden: usize,
        parallel: bool,
    ) -> Result<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        let run = |&(w, x): &(&ExpertWeights, &[f32])| -> Result<Vec<f32>> {
            let mut y = vec![0f32; x.len()];
            w.forward(x, hidden, &mut y)?;
            Ok(y)
        };
        let mut out = vec![Vec::new(); jobs.len()];
        let (gpu, jobs): (Vec<_>, Vec<_>) =
            jobs.iter().enumerate().partition(|(_, (w, _))| w.on_gpu());
        let group: Vec<_> = gpu
            .iter()
            .map(|(_, (w, x))| match w {
                ExpertWeights::Gpu(g) => (&**g, *x),
                _ => unreachable!("partitioned above"),
            })
            .collect();
        let device = || crate::gpu::forward_experts(&group, hidden);
        let host = || -> Result<Vec<Vec<f32>>> {
            if parallel {
                jobs.par_iter()
                    .map(|(_, job)| crate::kernels::as_task(|| run(job)))
                    .collect()
            } else {
                jobs.iter().map(|(_, job)| run(job)).collect()
            }
        };
        let (gpu_out, cpu_out) = if group.is_empty() || jobs.is_empty() {
            (device(), host())
        } else {
            both_sides(device, host)
        };
        for ((n, _), y) in gpu.iter().zip(gpu_out?) {
            out[*n] = y;
        }
        for ((n, _), y) in jobs.iter().zip(cpu_out?) {
            out[*n] = y;
        }
        Ok(out)
    }

    /// The FFN at `prefix` (a routed or shared expert, a dense MLP) for the CPU: a view of the
    /// mapped checkpoint where the CPU computes it as stored (`ExpertBytes::runs_stored`), its
    /// compute form otherwise. The same bits either way.
    pub fn for_cpu(
        ckpt: &crate::weights::checkpoint::Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let mapped = ExpertBytes::map_prefix(ckpt, prefix)?;
        if mapped.runs_stored(hidden, intermediate) {
            return Ok(ExpertWeights::Stored(Arc::new(mapped)));
        }
        let w = FfnWeights::load(ckpt, prefix, hidden, intermediate)?;
        Ok(ExpertWeights::Compute(Arc::new(w)))
    }

    /// Bytes this form occupies where it lives.
    pub fn bytes(&self) -> usize {
        match self {
            ExpertWeights::Compute(w) => w.compute_bytes(),
            ExpertWeights::Stored(b) => b.storage_bytes(),
            ExpertWeights::Gpu(g) => g.device_bytes(),
        }
    }
}

/// `device` on this thread (the one whose GPU context is current) while `host` runs on a
/// thread of its own (which spreads its work over the pool): both sides of a MoE layer step at
/// once, the step as long as the slower one.
pub fn both_sides<A: Send, B: Send>(
    device: impl FnOnce() -> A,
    host: impl FnOnce() -> B + Send,
) -> (A, B) {
    std::thread::scope(|s| {
        let host = s.spawn(host);
        let a = device();
        let b = host
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (a, b)
    })
}

/// One MoE layer step as the model hands it to its expert provider: what the step routes to,
/// and the speculative routing a prefetcher may ask for.
pub struct LayerStep<'a> {
    /// Decoder layer.
    pub layer: usize,
    /// Rows (tokens) in the step.
    pub tokens: usize,
    /// The distinct experts the step routes to, ascending.
    pub experts: &'a [u32],
    /// How many rows go to each of `experts` (placement weighs it).
    pub rows: &'a [u32],
    /// The next MoE layers' selection scores from their gates applied to this step's input,
    /// computed only when asked: `outlook(n)` gives the next `n` (fewer at the end of the
    /// model) as `(decoder layer, [tokens x experts])`.
    pub outlook: &'a dyn Fn(usize) -> Vec<(usize, Vec<f32>)>,
}

/// Where routed experts come from. The model asks once per MoE layer step for that step's
/// experts (`step`) and nothing else: what to prefetch, evict or keep is the provider's.
/// Implementations must return exactly one weight set per requested id, in the order asked,
/// and must be safe to call from any thread. Layers are decoder-layer indices.
pub trait ExpertProvider: Send + Sync {
    /// Weights of `step.experts` of decoder layer `step.layer` for one layer step; the
    /// provider may answer with compute-form or storage-form weights.
    fn step(&self, step: &LayerStep<'_>) -> Result<Vec<ExpertWeights>>;

    /// A forward pass begins (a safe point to switch policies).
    fn begin_step(&self) {}

    /// A selection policy's choice for `tokens` rows of the model's selection scores
    /// (`Gate::selection_scores`: sigmoid + bias, groups outside the `topk_group` best at 0.0),
    /// `k` per token; `None` keeps the model's exact top-k. Routing is the model's;
    /// substitution, when a policy makes it, is the policy's.
    fn select(
        &self,
        _layer: usize,
        _tokens: usize,
        _k: usize,
        _biased: &[f32],
    ) -> Option<Vec<u32>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::time::Duration;

    /// The two sides of a step run at once: each waits to hear from the other, which only
    /// works if neither waits for the other to finish first.
    #[test]
    fn both_sides_of_a_step_run_at_once() {
        let (to_host, from_device) = channel();
        let (to_device, from_host) = channel();
        let wait = Duration::from_secs(20);
        let (a, b) = super::both_sides(
            || {
                to_host.send(()).unwrap();
                from_host.recv_timeout(wait).is_ok()
            },
            move || {
                to_device.send(()).unwrap();
                from_device.recv_timeout(wait).is_ok()
            },
        );
        assert!(a && b, "one side ran after the other");
    }
}
