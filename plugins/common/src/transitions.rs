//! Learned layer-to-layer transitions: how often expert `e` of MoE layer `L+1` was routed in
//! the same forward pass as expert `f` of layer `L` (the last layer leads to layer 0 of the
//! next pass). Shared by the prefetch guests that predict the next layer without speculative
//! scores. Owns the counts and their forgetting; not what to do with a prediction.

use alloc::vec;
use alloc::vec::Vec;

/// A row (one layer-L expert's counts towards layer L+1) is halved when one of its counts
/// reaches CAP: the counts forget quickly and follow loops. Tuned on the tiny-k2 decode trace:
/// the precision of the top-6 guess is 0.66 with CAP 8, 0.60 with 32, 0.56 without decay.
pub const CAP: u8 = 8;
/// Largest count table kept (bytes, one per count): 64 MiB. Kimi-K2 needs
/// 60 x 384 x 384 = 8.8 MB; a larger model gets no table rather than hit the host's memory
/// limit.
pub const MAX_TABLE: usize = 64 << 20;

/// The layer step after `layer` in a cycle of `layers` MoE layers (the last layer leads to
/// layer 0 of the next forward step).
pub fn next_layer(layers: u32, layer: u32) -> u32 {
    (layer + 1) % layers.max(1)
}

/// Whether `(step, layer)` directly follows `(pstep, player)` in a cycle of `layers` MoE layers.
pub fn follows(layers: u32, pstep: u64, player: u32, step: u64, layer: u32) -> bool {
    if player + 1 < layers {
        step == pstep && layer == player + 1
    } else {
        step > pstep && layer == 0
    }
}

pub struct TransitionTable {
    layers: u32,
    experts: u32,
    /// `counts[(L * E + f) * E + e]`.
    counts: Vec<u8>,
    /// Sum of each row (`L * E + f`).
    totals: Vec<u32>,
}

impl TransitionTable {
    /// `None` when the table would exceed [`MAX_TABLE`] (or the shape is empty).
    pub fn new(layers: u32, experts: u32) -> Option<Self> {
        let rows = layers as usize * experts as usize;
        let size = rows.checked_mul(experts as usize)?;
        if size == 0 || size > MAX_TABLE {
            return None;
        }
        Some(TransitionTable {
            layers,
            experts,
            counts: vec![0; size],
            totals: vec![0; rows],
        })
    }

    pub fn layers(&self) -> u32 {
        self.layers
    }

    fn row(&self, layer: u32, f: u32) -> usize {
        layer as usize * self.experts as usize + f as usize
    }

    /// Layer `layer` routed `from`, then its successor routed `to` (ids within the layers, in
    /// range).
    pub fn learn(&mut self, layer: u32, from: &[u32], to: &[u32]) {
        for &f in from {
            let r = self.row(layer, f);
            let base = r * self.experts as usize;
            let row = &mut self.counts[base..base + self.experts as usize];
            let mut halve = false;
            for &e in to {
                let c = &mut row[e as usize];
                *c += 1;
                halve |= *c >= CAP;
            }
            if halve {
                row.iter_mut().for_each(|c| *c /= 2);
                self.totals[r] = row.iter().map(|&c| u32::from(c)).sum();
            } else {
                self.totals[r] += to.len() as u32;
            }
        }
    }

    /// After layer `layer` routed `from` (in range): `score[e]` = the mean over the rows with
    /// any counts of "P(e at the successor | f here)", where a row's total counts about
    /// `per_visit` experts per visit (a mean of probabilities that may exceed 1 when rows count
    /// fewer). Returns how many rows had counts (0: no guess).
    pub fn predict(&self, layer: u32, from: &[u32], per_visit: f32, score: &mut [f32]) -> usize {
        let e_max = self.experts as usize;
        score.iter_mut().for_each(|s| *s = 0.0);
        let mut rows = 0usize;
        for &f in from {
            let r = self.row(layer, f);
            let total = self.totals[r];
            if total == 0 {
                continue;
            }
            rows += 1;
            let scale = per_visit / total as f32;
            let base = r * e_max;
            for (s, &c) in score.iter_mut().zip(&self.counts[base..base + e_max]) {
                *s += c as f32 * scale;
            }
        }
        if rows > 0 {
            let n = rows as f32;
            score.iter_mut().for_each(|s| *s /= n);
        }
        rows
    }

    /// The largest count (for tests: it stays below [`CAP`]).
    pub fn max_count(&self) -> u8 {
        self.counts.iter().copied().max().unwrap_or(0)
    }
}
