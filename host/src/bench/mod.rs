//! `moehost bench`: prefill and decode throughput of the engine on a model, on real text.
//!
//! Prefill: one forward pass over a prompt of `prompt_tokens` tokens, best of `repeats`.
//! Decode: `decode_tokens` single-token steps on the cache after a short prompt (greedy),
//! best of `repeats`. Batched decode (`batch` > 1): `batch` sequences with different short
//! prompts decode together, one batched forward pass per step (what the server's scheduler
//! runs), best of `repeats`; its speed-up is against the single stream of the same run. Each
//! figure is tokens per second of wall time. With a baseline model (`compare`), the two are
//! measured in alternating rounds and reported with their ratios.

pub mod experts;

use anyhow::{ensure, Result};
use serde::Serialize;
use std::time::Instant;

use crate::engine::Engine;
use crate::model::deepseek_v3::{Logits, Sequence};
use crate::model::sampling::argmax;

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: String,
    pub threads: usize,
    /// Where the weights computed: "cpu", or the GPU's name (`--device cuda`).
    pub device: String,
    pub prompt_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// Sequences decoding together in the batched figure (1: not measured).
    pub batch: usize,
    /// Tokens per second of all `batch` sequences together.
    pub batch_decode_tokens_per_s: Option<f64>,
    /// `batch_decode_tokens_per_s / decode_tokens_per_s`.
    pub batch_speedup: Option<f64>,
}

/// A model against a baseline (e.g. INT4 experts against the bf16 original), measured in
/// alternating rounds in one run.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub model: BenchReport,
    pub baseline: BenchReport,
    /// `model / baseline` tokens per second.
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
}

/// `rounds` alternating single-repeat runs of `engine` and `baseline`, best of each.
pub fn compare(
    engine: &Engine,
    baseline: &Engine,
    prompt_tokens: usize,
    decode_tokens: usize,
    rounds: usize,
) -> Result<Comparison> {
    let mut best: [Option<BenchReport>; 2] = [None, None];
    for _ in 0..rounds.max(1) {
        for (slot, e) in best.iter_mut().zip([engine, baseline]) {
            let r = run(e, "cpu".into(), prompt_tokens, decode_tokens, 1, 1)?;
            *slot = Some(match slot.take() {
                Some(b) => BenchReport {
                    prefill_tokens_per_s: b.prefill_tokens_per_s.max(r.prefill_tokens_per_s),
                    decode_tokens_per_s: b.decode_tokens_per_s.max(r.decode_tokens_per_s),
                    ..b
                },
                None => r,
            });
        }
    }
    let [Some(model), Some(baseline)] = best else {
        unreachable!("at least one round")
    };
    Ok(Comparison {
        prefill_ratio: model.prefill_tokens_per_s / baseline.prefill_tokens_per_s,
        decode_ratio: model.decode_tokens_per_s / baseline.decode_tokens_per_s,
        model,
        baseline,
    })
}

/// Token ids of real text: the bundled model card (models/tiny-k2/README.md), repeated until long enough.
pub fn text_ids(engine: &Engine, n: usize) -> Result<Vec<u32>> {
    const TEXT: &str = include_str!("../../models/tiny-k2/README.md");
    let mut ids = engine.bos_ids();
    let chunk = engine.encode(TEXT)?;
    ensure!(!chunk.is_empty(), "benchmark text encodes to no tokens");
    while ids.len() < n {
        ids.extend_from_slice(&chunk);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Benchmarks `engine`; `device` (where its weights compute) is reported as given.
pub fn run(
    engine: &Engine,
    device: String,
    prompt_tokens: usize,
    decode_tokens: usize,
    repeats: usize,
    batch: usize,
) -> Result<BenchReport> {
    let model = &engine.model;
    let max = model.config().max_position_embeddings;
    ensure!(
        prompt_tokens >= 1 && prompt_tokens <= max,
        "prompt_tokens must be in 1..={max}"
    );
    ensure!(
        decode_tokens >= 1 && 16 + decode_tokens <= max,
        "decode_tokens too large for the context"
    );
    let prompt = text_ids(engine, prompt_tokens)?;
    // Warm-up: touch every expert the prompt routes to, so timing excludes first-use loading.
    model.forward(&prompt, &mut model.new_cache(), Logits::Last, false)?;
    let mut best_prefill = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let mut cache = model.new_cache();
        let t0 = Instant::now();
        model.forward(&prompt, &mut cache, Logits::Last, false)?;
        best_prefill = best_prefill.min(t0.elapsed().as_secs_f64());
    }
    let short = &prompt[..prompt.len().min(16)];
    let mut best_decode = f64::INFINITY;
    for _ in 0..repeats.max(1) + 1 {
        let mut cache = model.new_cache();
        let mut next = argmax(
            &model
                .forward(short, &mut cache, Logits::Last, false)?
                .logits,
        );
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            next = argmax(
                &model
                    .forward(&[next], &mut cache, Logits::Last, false)?
                    .logits,
            );
        }
        best_decode = best_decode.min(t0.elapsed().as_secs_f64());
    }
    let decode_tokens_per_s = decode_tokens as f64 / best_decode;
    let batch_decode_tokens_per_s = (batch > 1)
        .then(|| batch_decode(engine, &prompt, batch, decode_tokens, repeats))
        .transpose()?;
    Ok(BenchReport {
        model: engine.dir.display().to_string(),
        threads: rayon::current_num_threads(),
        device,
        prompt_tokens,
        prefill_tokens_per_s: prompt_tokens as f64 / best_prefill,
        decode_tokens,
        decode_tokens_per_s,
        batch: batch.max(1),
        batch_decode_tokens_per_s,
        batch_speedup: batch_decode_tokens_per_s.map(|b| b / decode_tokens_per_s),
    })
}

/// Tokens per second of `batch` sequences decoding `decode_tokens` steps together (greedy),
/// best of `repeats`. Sequence i starts from its own 16 tokens of `text` (BOS + a window at
/// offset i), so the batch routes like distinct requests do.
pub fn batch_decode(
    engine: &Engine,
    text: &[u32],
    batch: usize,
    decode_tokens: usize,
    repeats: usize,
) -> Result<f64> {
    let model = &engine.model;
    let bos = engine.bos_ids();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| {
            let start = (1 + 7 * i) % text.len().saturating_sub(16).max(1);
            let mut p = bos.clone();
            p.extend(text.iter().skip(start).take(16 - bos.len().min(16)));
            p
        })
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
        let mut next = Vec::with_capacity(batch);
        for (p, cache) in prompts.iter().zip(&mut caches) {
            next.push(argmax(
                &model.forward(p, cache, Logits::Last, false)?.logits,
            ));
        }
        let t0 = Instant::now();
        for _ in 0..decode_tokens {
            let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut seqs: Vec<Sequence> = ids
                .iter()
                .zip(&mut caches)
                .map(|(ids, cache)| Sequence { ids, cache })
                .collect();
            let logits = model.forward_batch(&mut seqs)?;
            next = logits.iter().map(|l| argmax(l)).collect();
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok((batch * decode_tokens) as f64 / best)
}

/// Constrained decoding against free decoding, measured in one run.
#[derive(Debug, Serialize)]
pub struct StructuredReport {
    pub decode_tokens: usize,
    /// The schema every constrained token followed.
    pub schema: serde_json::Value,
    pub free_tokens_per_s: f64,
    pub constrained_tokens_per_s: f64,
    /// `constrained / free`.
    pub ratio: f64,
    /// Mean time of one token's mask and advance, microseconds (best round).
    pub mask_us_per_token: f64,
    /// Values completed (then restarted) during the best constrained round.
    pub values_completed: usize,
}

/// Greedy decode of `decode_tokens` tokens free and under a JSON schema (an object holding an
/// array of strings: a value the model can keep writing), in `repeats` alternating rounds,
/// best of each. A completed value starts a fresh constraint, so every token is constrained.
pub fn structured(
    engine: &Engine,
    decode_tokens: usize,
    repeats: usize,
) -> Result<StructuredReport> {
    let model = &engine.model;
    let max = model.config().max_position_embeddings;
    ensure!(
        decode_tokens >= 1 && 16 + decode_tokens <= max,
        "decode_tokens too large for the context"
    );
    let schema = serde_json::json!({"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "string"}}}, "required": ["items"]});
    let grammars = engine.grammars()?;
    let fresh = || grammars.constraint(crate::structured::json_schema(schema.clone()));
    let eos = engine.defaults.eos_token_ids.first().copied().unwrap_or(0);
    let prompt = text_ids(engine, 16)?;
    model.forward(&prompt, &mut model.new_cache(), Logits::Last, false)?;
    let (mut best_free, mut best_constrained) = (f64::INFINITY, f64::INFINITY);
    let (mut best_mask, mut values) = (f64::INFINITY, 0);
    for _ in 0..repeats.max(1) {
        for constrained in [false, true] {
            let mut cache = model.new_cache();
            let mut logits = model
                .forward(&prompt, &mut cache, Logits::Last, false)?
                .logits;
            let mut c = fresh()?;
            let (mut mask_s, mut done) = (0.0, 0);
            let t0 = Instant::now();
            for _ in 0..decode_tokens {
                let next = if constrained {
                    let t = Instant::now();
                    let mut masked = logits.clone();
                    c.mask(&mut masked)?;
                    let mut next = argmax(&masked);
                    if next == eos {
                        done += 1;
                        c = fresh()?;
                        masked.copy_from_slice(&logits);
                        c.mask(&mut masked)?;
                        next = argmax(&masked);
                    }
                    c.advance(next)?;
                    mask_s += t.elapsed().as_secs_f64();
                    next
                } else {
                    argmax(&logits)
                };
                logits = model
                    .forward(&[next], &mut cache, Logits::Last, false)?
                    .logits;
            }
            let s = t0.elapsed().as_secs_f64();
            if constrained {
                if s < best_constrained {
                    (best_mask, values) = (mask_s, done);
                }
                best_constrained = best_constrained.min(s);
            } else {
                best_free = best_free.min(s);
            }
        }
    }
    let free = decode_tokens as f64 / best_free;
    let constrained = decode_tokens as f64 / best_constrained;
    Ok(StructuredReport {
        decode_tokens,
        schema,
        free_tokens_per_s: free,
        constrained_tokens_per_s: constrained,
        ratio: constrained / free,
        mask_us_per_token: best_mask * 1e6 / decode_tokens as f64,
        values_completed: values,
    })
}
