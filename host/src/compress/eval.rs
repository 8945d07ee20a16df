//! `moehost eval`: perplexity of the model over a text (next-token cross-entropy over the
//! token windows, every position but each window's first predicted from the ones before it),
//! and the forward pass's tokens per second.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

use crate::engine::Engine;
use crate::model::deepseek_v3::Logits;

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Predicted tokens.
    pub tokens: u64,
    /// Mean negative log-likelihood, nats per token.
    pub nll: f64,
    pub perplexity: f64,
    pub tokens_per_s: f64,
}

pub fn run(engine: &Engine, windows: &[Vec<u32>], show_progress: bool) -> Result<EvalReport> {
    let v = engine.model.config().vocab_size;
    let bar = super::progress(windows.len() as u64, "eval");
    if !show_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let (mut nll, mut predicted, mut seen) = (0f64, 0u64, 0u64);
    let t0 = Instant::now();
    for w in windows {
        let mut cache = engine.model.new_cache();
        let out = engine.model.forward(w, &mut cache, Logits::All, false)?;
        for (row, &next) in out.logits.chunks_exact(v).zip(&w[1..]) {
            nll += log_sum_exp(row) - f64::from(row[next as usize]);
            predicted += 1;
        }
        seen += w.len() as u64;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    anyhow::ensure!(predicted > 0, "the text is too short to predict any token");
    let mean = nll / predicted as f64;
    Ok(EvalReport {
        tokens: predicted,
        nll: mean,
        perplexity: mean.exp(),
        tokens_per_s: seen as f64 / secs,
    })
}

fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    f64::from(max) + s.ln()
}
