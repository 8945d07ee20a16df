//! `moehost bench --experts`: one Kimi-K2-width MoE layer step computed on the CPU from each
//! storage format, against this machine's read bandwidth measured the same way.
//!
//! Per format, a pool of synthetic experts at Kimi-K2's shape (7168 x 2048), together far
//! larger than the last-level cache. Each step routes `top_k` distinct experts of the pool,
//! none of the previous two steps' (so its bytes come from memory, not from cache), `rows`
//! tokens each, through `ExpertWeights::forward_all` as the MoE layer runs them, after one
//! untimed compute of every expert. The baseline
//! is every thread summing its share of the same pool's bytes (read only, nothing written),
//! measured in rounds alternating with the steps'. GB/s counts stored bytes (weights and
//! scales) per second of wall time; each figure is the best of its rounds.

use anyhow::{ensure, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::weights::format::WeightFormat;

/// What to measure.
pub struct ExpertBenchOptions {
    pub formats: Vec<WeightFormat>,
    pub hidden: usize,
    pub intermediate: usize,
    /// Experts a step routes to.
    pub top_k: usize,
    /// Synthetic experts per format.
    pub pool: usize,
    /// Tokens each routed expert computes (1: decode).
    pub rows: usize,
    /// Alternating rounds (read-only sum, then `steps` layer steps).
    pub rounds: usize,
    pub steps: usize,
}

impl Default for ExpertBenchOptions {
    /// Kimi-K2: hidden 7168, expert width 2048, top-8; a pool of 40 (1.8 GB in FP8).
    fn default() -> Self {
        Self {
            formats: vec![
                WeightFormat::Fp8,
                WeightFormat::Int4,
                WeightFormat::Int8,
                WeightFormat::Bf16,
            ],
            hidden: 7168,
            intermediate: 2048,
            top_k: 8,
            pool: 40,
            rows: 1,
            rounds: 3,
            steps: 6,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ExpertBenchReport {
    pub threads: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub top_k: usize,
    pub rows: usize,
    pub pool: usize,
    /// Whether the AVX-512 kernels (`weights::stored_dot`) ran; otherwise rows are decoded
    /// to f32 first.
    pub avx512_kernels: bool,
    pub formats: Vec<FormatFigures>,
}

#[derive(Debug, Serialize)]
pub struct FormatFigures {
    pub format: WeightFormat,
    /// One expert's stored bytes (weights and scales).
    pub expert_bytes: usize,
    /// One layer step (`top_k` experts), best round.
    pub step_ms: f64,
    /// Stored bytes the step read, per second.
    pub weights_gbps: f64,
    /// The read-only sum over the pool, best round.
    pub read_gbps: f64,
    /// `weights_gbps / read_gbps`.
    pub of_read_bandwidth: f64,
}

/// Runs the benchmark.
pub fn run(o: &ExpertBenchOptions) -> Result<ExpertBenchReport> {
    ensure!(
        o.pool >= 3 * o.top_k,
        "a pool of {} experts cannot give {} distinct experts per step, none of the previous two \
         steps' (at least {} needed)",
        o.pool,
        o.top_k,
        3 * o.top_k
    );
    ensure!(
        o.rows > 0 && o.rounds > 0 && o.steps > 0,
        "rows, rounds and steps must be positive"
    );
    let formats = o
        .formats
        .iter()
        .map(|&f| measure(o, f))
        .collect::<Result<_>>()?;
    Ok(ExpertBenchReport {
        threads: rayon::current_num_threads(),
        hidden: o.hidden,
        intermediate: o.intermediate,
        top_k: o.top_k,
        rows: o.rows,
        pool: o.pool,
        avx512_kernels: crate::weights::stored_dot::cpu_has_avx512(),
        formats,
    })
}

fn measure(o: &ExpertBenchOptions, format: WeightFormat) -> Result<FormatFigures> {
    ensure!(
        matches!(
            format,
            WeightFormat::Fp8 | WeightFormat::Int4 | WeightFormat::Int8 | WeightFormat::Bf16
        ),
        "--experts measures fp8, int4, int8 and bf16 experts, not {}",
        format.name()
    );
    let pool: Vec<Arc<ExpertBytes>> = (0..o.pool)
        .into_par_iter()
        .map(|i| {
            let mut state = 0x9e37_79b9_u32 ^ (i as u32).wrapping_mul(0x85eb_ca6b) | 1;
            Arc::new(ExpertBytes::synthetic(
                format,
                o.hidden,
                o.intermediate,
                &mut state,
            ))
        })
        .collect();
    let expert_bytes = pool[0].storage_bytes();
    let slices: Vec<&[u8]> = pool
        .iter()
        .flat_map(|e| e.tensors.iter().map(|t| &t.bytes[..]))
        .collect();
    let pool: Vec<ExpertWeights> = pool.iter().cloned().map(ExpertWeights::Stored).collect();
    let x: Vec<f32> = (0..o.rows * o.hidden)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut picker = Picker::new(o.pool, o.top_k);
    let mut step = || -> Result<()> {
        let ids = picker.next();
        let jobs: Vec<(&ExpertWeights, &[f32])> = ids.iter().map(|&i| (&pool[i], &x[..])).collect();
        let out = ExpertWeights::forward_all(&jobs, o.hidden, o.rows > 1)?;
        std::hint::black_box(out);
        Ok(())
    };
    // Warm up: every expert computed once (its first compute checks FP8 codes for NaN, as a
    // host-tier expert's does), the threads started.
    for e in &pool {
        ExpertWeights::forward_all(&[(e, &x[..])], o.hidden, o.rows > 1)?;
    }
    let (mut read_s, mut step_s) = (f64::INFINITY, f64::INFINITY);
    let pool_bytes: usize = slices.iter().map(|s| s.len()).sum();
    for _ in 0..o.rounds {
        let t0 = Instant::now();
        std::hint::black_box(read_sum(&slices));
        read_s = read_s.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        for _ in 0..o.steps {
            step()?;
        }
        step_s = step_s.min(t0.elapsed().as_secs_f64() / o.steps as f64);
    }
    // Bytes read: weights only in the sum (the scales are a small share, read by the step).
    let weights_gbps = (o.top_k * expert_bytes) as f64 / step_s / 1e9;
    let read_gbps = pool_bytes as f64 / read_s / 1e9;
    Ok(FormatFigures {
        format,
        expert_bytes,
        step_ms: step_s * 1e3,
        weights_gbps,
        read_gbps,
        of_read_bandwidth: weights_gbps / read_gbps,
    })
}

/// Distinct experts per step, none of the previous two steps' (xorshift32, fixed seed).
struct Picker {
    pool: usize,
    top_k: usize,
    recent: std::collections::VecDeque<Vec<usize>>,
    state: u32,
}

impl Picker {
    fn new(pool: usize, top_k: usize) -> Self {
        Self {
            pool,
            top_k,
            recent: Default::default(),
            state: 0x2545_f491,
        }
    }

    fn next(&mut self) -> Vec<usize> {
        let mut ids: Vec<usize> = Vec::with_capacity(self.top_k);
        while ids.len() < self.top_k {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 17;
            self.state ^= self.state << 5;
            let e = self.state as usize % self.pool;
            if !ids.contains(&e) && !self.recent.iter().any(|r| r.contains(&e)) {
                ids.push(e);
            }
        }
        if self.recent.len() == 2 {
            self.recent.pop_front();
        }
        self.recent.push_back(ids.clone());
        ids.sort_unstable();
        ids
    }
}

/// Every byte of `slices` read once, in 4 MiB pieces spread over the threads, summed as
/// 64-bit words: the machine's read bandwidth as a kernel that only reads sees it.
pub fn read_sum(slices: &[&[u8]]) -> u64 {
    slices
        .par_iter()
        .flat_map(|s| s.par_chunks(4 << 20))
        .map(sum_words)
        .reduce(|| 0, u64::wrapping_add)
}

fn sum_words(b: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if crate::weights::stored_dot::cpu_has_avx512() {
        // SAFETY: AVX-512F is there (checked).
        return unsafe { sum_words_avx512(b) };
    }
    sum_words_portable(b)
}

/// Little-endian 64-bit words of `b` (the last one zero-padded), summed with wrap-around.
fn sum_words_portable(b: &[u8]) -> u64 {
    b.chunks(8).fold(0u64, |s, w| {
        let mut v = [0u8; 8];
        v[..w.len()].copy_from_slice(w);
        s.wrapping_add(u64::from_le_bytes(v))
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_words_avx512(b: &[u8]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let blocks = b.len() / 256;
    let p = b.as_ptr();
    for i in 0..blocks {
        for (j, a) in acc.iter_mut().enumerate() {
            let v = _mm512_loadu_si512(p.add(256 * i + 64 * j) as *const __m512i);
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let all = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    let tail = sum_words_portable(&b[blocks * 256..]);
    (_mm512_reduce_add_epi64(all) as u64).wrapping_add(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_route_distinct_experts_none_of_the_last_two_steps() {
        let mut p = Picker::new(24, 8);
        let steps: Vec<Vec<usize>> = (0..50).map(|_| p.next()).collect();
        for (i, s) in steps.iter().enumerate() {
            let mut d = s.clone();
            d.dedup();
            assert_eq!(d.len(), 8);
            for prev in &steps[i.saturating_sub(2)..i] {
                assert!(s.iter().all(|e| !prev.contains(e)), "step {i}");
            }
        }
    }

    /// A small layer step per format runs through the MoE's own path and reports its figures.
    #[test]
    fn every_format_is_timed_against_the_read_sum() {
        let o = ExpertBenchOptions {
            hidden: 256,
            intermediate: 128,
            pool: 12,
            top_k: 4,
            rounds: 1,
            steps: 2,
            ..Default::default()
        };
        let r = run(&o).unwrap();
        assert_eq!(r.formats.len(), 4);
        for f in &r.formats {
            assert!(f.step_ms > 0.0 && f.weights_gbps > 0.0 && f.read_gbps > 0.0);
            assert!((f.of_read_bandwidth - f.weights_gbps / f.read_gbps).abs() < 1e-12);
        }
        let sizes: Vec<usize> = r.formats.iter().map(|f| f.expert_bytes).collect();
        // fp8 (+ f32 block scales), int4 and int8 (+ f16 group scales, as stored), bf16.
        assert_eq!(
            sizes,
            [
                3 * 256 * 128 + 3 * 2 * 4,
                3 * 256 * 64 + 3 * 1024 * 2,
                3 * 256 * 128 + 3 * 1024 * 2,
                3 * 256 * 128 * 2
            ]
        );
        assert!(run(&ExpertBenchOptions { pool: 11, ..o }).is_err());
    }

    #[test]
    fn the_read_sum_reads_every_byte() {
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b = vec![1u8; 300];
        let want = sum_words_portable(&a).wrapping_add(sum_words_portable(&b));
        assert_eq!(read_sum(&[&a, &b]), want);
    }
}
