//! `moehost profile`: run calibration text through the model and record, per layer, how much
//! it changes the hidden state (block influence, 1 - cosine(hidden in, hidden out), averaged
//! over tokens: ShortGPT's layer importance), and per routed expert its activation count,
//! mean routing weight and total routed mass (the sum of its normalised routing weights).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::engine::Engine;
use crate::model::deepseek_v3::Logits;

pub const FORMAT: &str = "moehost-profile/1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    /// `moehost-profile/1`.
    pub format: String,
    /// The profiled model's `num_hidden_layers` and `n_routed_experts` (checked by `convert`).
    pub num_hidden_layers: usize,
    pub n_routed_experts: usize,
    pub tokens: u64,
    pub layers: Vec<LayerStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerStats {
    pub layer: usize,
    pub moe: bool,
    /// Mean over tokens of 1 - cosine(hidden in, hidden out): higher = more important.
    pub block_influence: f64,
    /// Per expert (MoE layers only; empty for dense ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub experts: Vec<ExpertStats>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExpertStats {
    /// Tokens routed to it.
    pub count: u64,
    /// Mean normalised routing weight when routed to.
    pub mean_weight: f64,
    /// Sum of its normalised routing weights.
    pub mass: f64,
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read profile {}", path.display()))?;
        let p: Profile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a moehost profile", path.display()))?;
        anyhow::ensure!(
            p.format == FORMAT,
            "{}: format is {:?}, expected {FORMAT:?}",
            path.display(),
            p.format
        );
        Ok(p)
    }
}

/// Profiles `engine` on the token windows (see `super::windows`).
pub fn run(engine: &Engine, windows: &[Vec<u32>], show_progress: bool) -> Result<Profile> {
    let cfg = engine.model.config();
    let n_layers = cfg.num_hidden_layers;
    let e = cfg.n_routed_experts;
    let moe_layers = cfg.moe_layers();
    let mut influence = vec![0f64; n_layers];
    let mut counts = vec![vec![0u64; e]; n_layers];
    let mut mass = vec![vec![0f64; e]; n_layers];
    let mut tokens = 0u64;
    let total: usize = windows.iter().map(Vec::len).sum();
    let bar = super::progress(total as u64, "profile");
    if !show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let h = cfg.hidden_size;
    for w in windows {
        let mut cache = engine.model.new_cache();
        let out = engine.model.forward_observed(
            w,
            &mut cache,
            Logits::Last,
            &mut |l, before, after| {
                for (a, b) in before.chunks_exact(h).zip(after.chunks_exact(h)) {
                    influence[l] += 1.0 - cosine(a, b);
                }
            },
        )?;
        for (r, &l) in out.routing.iter().zip(&moe_layers) {
            for (&x, &wt) in r.experts.iter().zip(&r.weights) {
                counts[l][x as usize] += 1;
                mass[l][x as usize] += f64::from(wt);
            }
        }
        tokens += w.len() as u64;
        bar.inc(w.len() as u64);
    }
    bar.finish_and_clear();
    let layers = (0..n_layers)
        .map(|l| {
            let moe = moe_layers.contains(&l);
            LayerStats {
                layer: l,
                moe,
                block_influence: influence[l] / tokens.max(1) as f64,
                experts: if moe {
                    (0..e)
                        .map(|x| ExpertStats {
                            count: counts[l][x],
                            mean_weight: mass[l][x] / counts[l][x].max(1) as f64,
                            mass: mass[l][x],
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            }
        })
        .collect();
    Ok(Profile {
        format: FORMAT.into(),
        num_hidden_layers: n_layers,
        n_routed_experts: e,
        tokens,
        layers,
    })
}

/// Cosine similarity in f64 (1 for two zero vectors: an unchanged state).
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return if aa == bb { 1.0 } else { 0.0 };
    }
    ab / (aa.sqrt() * bb.sqrt())
}
