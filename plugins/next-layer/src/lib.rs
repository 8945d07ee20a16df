//! The next layer's likely experts, from every signal a prefetch policy gets, each weighed by
//! how well it has predicted on this model so far:
//! - the gate outlook (the next layer's router on the current hidden state), when the host
//!   gives one: the expert's best rank over the step's tokens;
//! - learned layer-to-layer transitions (`common::transitions`): how often the expert followed
//!   the experts this layer step routed to;
//! - recent use: whether the expert was used at its layer's last visits.
//!
//! Each expert of the next layer falls in one cell of those bucketed signals; a cell's hit rate
//! ("used at that visit") is learned online from every prediction made, over all the layer's
//! experts, so no weight is tuned to one model. The experts of the best cells are named, best
//! first: [`RANKED`] times as many as the step routed distinct experts, so the host, which skips
//! resident experts and loads one layer step's worth, loads the best guesses that are missing;
//! a guest keeps only those whose learned hit rate reaches its [`Threshold`].
//!
//! This crate is the predictor and a [`guest!`] macro; the bundled components are the crates
//! `next-layer-blend` ([`CONFIDENT`]: at least 0.5) and `next-layer-fill` (better than chance:
//! at least top-k / experts-per-layer).
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

use alloc::vec;
use alloc::vec::Vec;
pub use common;
use common::transitions::{follows, TransitionTable};

/// Upper edges of the transition-probability buckets (one more bucket above the last).
pub const TRANSITION_EDGES: [f32; 8] = [0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8];
const TRANSITION_BUCKETS: usize = TRANSITION_EDGES.len() + 1;
/// Recent use of the expert in its layer: used at the last visit and at least once more in the
/// 3 before it; used at the last visit only; used in the 7 before it only; not in the last 8.
const RECENCY_BUCKETS: usize = 4;
/// Upper edges of the two-layer transition buckets (layer L-1 -> L+1, one more above the last).
pub const SKIP_EDGES: [f32; 4] = [0.05, 0.15, 0.3, 0.5];
const SKIP_BUCKETS: usize = SKIP_EDGES.len() + 1;
/// Best rank in the outlook over the step's tokens: within top-k; within top-2k; below; no
/// outlook for this layer.
const GATE_BUCKETS: usize = 4;
const CELLS: usize = TRANSITION_BUCKETS * SKIP_BUCKETS * RECENCY_BUCKETS * GATE_BUCKETS;
/// Experts named per call, as a multiple of the step's distinct experts (at least top-k): the
/// host skips resident ones and loads at most one layer step's worth, so a ranking longer than
/// that lets it fill its quota with the best non-resident guesses (FLAME, layer-cycle, 25%
/// resident: hit rate 0.551 naming 1x, 0.634 naming 2x, 0.649 naming 4x or all).
pub const RANKED: usize = 4;
/// `next-layer-blend`'s threshold: name an expert only when its cell was used at least half the
/// time, so a prefetch is more often used than wasted. On a link-bound GPU a wasted prefetch
/// costs a transfer for nothing, and this keeps the replay's tokens/s ceiling level with no
/// prefetch while raising the hit rate.
pub const CONFIDENT: Threshold = Threshold::AtLeast(0.5);

/// How sure a guess must be to be named.
#[derive(Clone, Copy, Debug)]
pub enum Threshold {
    /// Its cell's learned hit rate is at least this.
    AtLeast(f32),
    /// Its cell's learned hit rate is at least this many times an expert's chance of being
    /// routed to (top-k / experts-per-layer).
    Chance(f32),
}
/// A cell's counts are halved when it has seen this many predictions: its rate follows the
/// model (and a change of workload) within a few thousand layer steps.
pub const HALVE_AT: f32 = 4096.0;

/// One cell: predictions made (`n`) and how many were used (`y`).
#[derive(Clone, Copy)]
struct Cell {
    n: f32,
    y: f32,
}

fn transition_bucket(p: f32) -> usize {
    TRANSITION_EDGES
        .iter()
        .take_while(|&&edge| p >= edge)
        .count()
}

/// `bits`: bit j = used at the layer's visit `j` before the coming one.
fn recency_bucket(bits: u8) -> usize {
    match (bits & 1 == 1, (bits & 0x0e).count_ones()) {
        (true, n) if n > 0 => 0,
        (true, _) => 1,
        (false, _) if bits != 0 => 2,
        _ => 3,
    }
}

fn skip_bucket(p: f32) -> usize {
    SKIP_EDGES.iter().take_while(|&&edge| p >= edge).count()
}

fn cell_index(transition: usize, skip: usize, recency: usize, gate: usize) -> usize {
    ((transition * SKIP_BUCKETS + skip) * RECENCY_BUCKETS + recency) * GATE_BUCKETS + gate
}

/// The starting guess of a cell (weight one prediction): the most hopeful of its signals.
fn prior(transition: usize, skip: usize, recency: usize, gate: usize) -> f32 {
    let by_transition = match transition {
        0 => 0.0,
        t => TRANSITION_EDGES[t - 1],
    };
    let by_recency = [0.5, 0.3, 0.15, 0.02][recency];
    let by_gate = [0.7, 0.3, 0.02, 0.0][gate];
    let by_skip = match skip {
        0 => 0.0,
        s => SKIP_EDGES[s - 1],
    };
    by_transition.max(by_skip).max(by_recency).max(by_gate)
}

/// A prediction made for one layer step, waiting for that step's routing.
struct Pending {
    step: u64,
    layer: u32,
    /// Cell of each expert of the layer.
    cells: Vec<u16>,
}

pub struct Blend {
    /// Name only experts whose cell's hit rate is at least this.
    min_p: f32,
    layers: u32,
    experts: u32,
    top_k: u32,
    /// `None` when the model is too large for the table: transitions then say nothing.
    table: Option<TransitionTable>,
    /// Two layers ahead: expert f of layer L, then e of layer L+2 (row layer L).
    skip: Option<TransitionTable>,
    cells: [Cell; CELLS],
    /// Per expert-id: visits of its layer ago it was used (bit j = j visits before the last
    /// one seen, aligned by `last`), and its layer's visit count at `last`.
    hist: Vec<u8>,
    last: Vec<u64>,
    /// Visits seen per layer.
    visits: Vec<u64>,
    /// The previous routed layer step, for learning transitions: (step, layer, experts).
    prev: Option<(u64, u32, Vec<u32>)>,
    /// The one before it, when it directly preceded `prev`.
    prev2: Option<(u64, u32, Vec<u32>)>,
    pending: Option<Pending>,
    /// Scratch: transition scores, each expert's best gate rank, the ranking.
    score: Vec<f32>,
    skip_score: Vec<f32>,
    gate: Vec<u8>,
    best: Vec<u32>,
    keyed: Vec<((u32, u32), u32)>,
}

impl Blend {
    pub fn new(layers: u32, experts: u32, top_k: u32, threshold: Threshold) -> Self {
        let min_p = match threshold {
            Threshold::AtLeast(p) => p,
            Threshold::Chance(times) => times * top_k as f32 / experts.max(1) as f32,
        };
        let n = layers as usize * experts as usize;
        let mut cells = [Cell { n: 1.0, y: 0.0 }; CELLS];
        for t in 0..TRANSITION_BUCKETS {
            for k in 0..SKIP_BUCKETS {
                for r in 0..RECENCY_BUCKETS {
                    for g in 0..GATE_BUCKETS {
                        cells[cell_index(t, k, r, g)].y = prior(t, k, r, g);
                    }
                }
            }
        }
        Blend {
            min_p,
            layers,
            experts,
            top_k,
            table: TransitionTable::new(layers, experts),
            skip: TransitionTable::new(layers, experts),
            cells,
            hist: vec![0; n],
            last: vec![0; n],
            visits: vec![0; layers as usize],
            prev: None,
            prev2: None,
            skip_score: vec![0.0; experts as usize],
            pending: None,
            score: vec![0.0; experts as usize],
            gate: vec![0; experts as usize],
            best: Vec::new(),
            keyed: Vec::new(),
        }
    }

    pub fn experts(&self) -> u32 {
        self.experts
    }

    /// The layer step after `layer` (the last layer leads to layer 0 of the next step).
    pub fn next_layer(&self, layer: u32) -> u32 {
        common::transitions::next_layer(self.layers, layer)
    }

    /// Whether the transition table fits (the policy still predicts from the rest if not).
    pub fn has_transitions(&self) -> bool {
        self.table.is_some()
    }

    /// Recent-use bits of expert-id `id` seen from its layer's visit `v` (bit j: used at visit
    /// `v - j`; 0 beyond 8 visits).
    fn history(&self, id: usize, v: u64) -> u8 {
        let age = v - self.last[id];
        if self.last[id] == 0 || age >= 8 {
            0
        } else {
            self.hist[id] << age
        }
    }

    /// One routed layer step: learns from it, then predicts the next layer step. `outlook` is
    /// the next layer's speculative scores, row-major [tokens x experts], when given. Returns
    /// the next layer and its requests (expert within the layer, priority), best first.
    pub fn on_routed(
        &mut self,
        step: u64,
        layer: u32,
        tokens: u32,
        experts: &[u32],
        outlook: Option<&[f32]>,
    ) -> (u32, Vec<(u32, u32)>) {
        if layer >= self.layers {
            return (0, Vec::new());
        }
        let e_max = self.experts;
        let used: Vec<u32> = experts.iter().copied().filter(|&e| e < e_max).collect();
        self.learn(step, layer, &used);
        let next = self.next_layer(layer);
        let want = (RANKED * used.len().max(self.top_k as usize)).min(e_max as usize);
        let guess = self.predict(step, layer, next, tokens, &used, outlook, want);
        let prev = self.prev.take();
        self.prev2 = prev.filter(|p| follows(self.layers, p.0, p.1, step, layer));
        self.prev = Some((step, layer, used));
        (next, guess)
    }

    fn learn(&mut self, step: u64, layer: u32, used: &[u32]) {
        let e_max = self.experts as usize;
        // The pending prediction for this layer step: each expert's cell learns whether it
        // was used.
        if let Some(p) = self.pending.take() {
            if p.layer == layer && p.step == step {
                let mut hit = vec![false; e_max];
                used.iter().for_each(|&e| hit[e as usize] = true);
                for (&c, &h) in p.cells.iter().zip(&hit) {
                    let cell = &mut self.cells[c as usize];
                    cell.n += 1.0;
                    cell.y += f32::from(u8::from(h));
                    if cell.n >= HALVE_AT {
                        cell.n *= 0.5;
                        cell.y *= 0.5;
                    }
                }
            }
        }
        if let (Some(table), Some((pstep, player, prev))) = (self.table.as_mut(), &self.prev) {
            if follows(self.layers, *pstep, *player, step, layer) {
                table.learn(*player, prev, used);
                if let (Some(skip), Some((_, layer2, prev2))) = (self.skip.as_mut(), &self.prev2) {
                    skip.learn(*layer2, prev2, used);
                }
            }
        }
        // A new visit of the layer (a repeated call for the same step adds to the visit).
        let l = layer as usize;
        let repeat = self
            .prev
            .as_ref()
            .is_some_and(|p| p.0 == step && p.1 == layer);
        if !repeat {
            self.visits[l] += 1;
        }
        let v = self.visits[l];
        for &e in used {
            let id = (layer * self.experts + e) as usize;
            self.hist[id] = self.history(id, v) | 1;
            self.last[id] = v;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn predict(
        &mut self,
        step: u64,
        layer: u32,
        next: u32,
        tokens: u32,
        used: &[u32],
        outlook: Option<&[f32]>,
        want: usize,
    ) -> Vec<(u32, u32)> {
        let e_max = self.experts as usize;
        let mut score = core::mem::take(&mut self.score);
        // All zero without a table (never written) or without counts (`predict` clears it).
        if let Some(t) = &self.table {
            t.predict(layer, used, self.top_k as f32, &mut score);
        }
        // Two layers back -> next: `prev` is the step before this one when it directly
        // preceded it (`on_routed` keeps only such a `prev2`).
        let mut skip_score = core::mem::take(&mut self.skip_score);
        match (&self.skip, &self.prev) {
            (Some(t), Some((pstep, player, prev)))
                if follows(self.layers, *pstep, *player, step, layer) =>
            {
                t.predict(*player, prev, self.top_k as f32, &mut skip_score);
            }
            _ => skip_score.iter_mut().for_each(|s| *s = 0.0),
        }
        // Best outlook rank bucket of each expert over the tokens (3 = no outlook).
        let mut gate = core::mem::take(&mut self.gate);
        let tokens = tokens.max(1) as usize;
        match outlook.filter(|o| o.len() == tokens * e_max) {
            Some(o) => {
                gate.iter_mut().for_each(|g| *g = 2);
                let k = self.top_k as usize;
                for row in o.chunks_exact(e_max) {
                    self.best.clear();
                    common::top_k_into(row, 2 * k, &mut self.best);
                    for (rank, &e) in self.best.iter().enumerate() {
                        let g = &mut gate[e as usize];
                        *g = (*g).min(u8::from(rank >= k));
                    }
                }
            }
            None => gate.iter_mut().for_each(|g| *g = 3),
        }
        let mut cells = vec![0u16; e_max];
        let mut keyed = core::mem::take(&mut self.keyed);
        keyed.clear();
        for e in 0..e_max {
            let t = transition_bucket(score[e]);
            let k = skip_bucket(skip_score[e]);
            let id = (next * self.experts) as usize + e;
            let r = recency_bucket(self.history(id, self.visits[next as usize]));
            let c = cell_index(t, k, r, gate[e] as usize);
            cells[e] = c as u16;
            let cell = self.cells[c];
            let p = cell.y / cell.n;
            // Best cell first; within a cell, the stronger transition.
            let key = (
                u32::MAX - common::ordered_bits(p),
                u32::MAX - common::ordered_bits(score[e]),
            );
            keyed.push((key, e as u32));
        }
        let mut best = Vec::with_capacity(want);
        common::take_smallest(&mut keyed, want, &mut best);
        let guess = best
            .iter()
            .filter_map(|&e| {
                let cell = self.cells[cells[e as usize] as usize];
                let p = cell.y / cell.n;
                (p >= self.min_p).then(|| (e, (p.clamp(0.0, 1.0) * 1e6) as u32))
            })
            .collect();
        self.pending = Some(Pending {
            step: if next == 0 { step + 1 } else { step },
            layer: next,
            cells,
        });
        self.score = score;
        self.skip_score = skip_score;
        self.gate = gate;
        self.keyed = keyed;
        guess
    }
}

/// Makes the invoking crate the prefetch component `$name` (world `prefetch-policy`,
/// lookahead 1) around [`Blend`] with `$threshold`, a [`Threshold`]. The crate depends on
/// `wit-bindgen` and this crate, and its root has `extern crate alloc;`.
#[macro_export]
macro_rules! guest {
    ($name:literal, $description:literal, $threshold:expr) => {
        #[cfg(target_arch = "wasm32")]
        mod guest {
            use alloc::string::ToString;
            use alloc::vec::Vec;
            use $crate::common::Global;
            use $crate::Blend;

            wit_bindgen::generate!({
                world: "prefetch-policy",
                path: "../../wit/policy.wit",
            });

            use exports::moehost::policy::prefetch::{
                Guest, PrefetchInfo, PrefetchRequest, RoutedStep,
            };
            use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, Tier, TierCapacity};

            static STATE: Global<Option<Blend>> = Global::new(None);

            struct Policy;

            impl Guest for Policy {
                fn init(shape: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> PrefetchInfo {
                    let state =
                        Blend::new(shape.moe_layers, shape.experts_per_layer, shape.top_k, $threshold);
                    let description = if state.has_transitions() {
                        $description
                    } else {
                        concat!($description, " (no transitions: the table would not fit)")
                    };
                    STATE.with(|s| *s = Some(state));
                    PrefetchInfo {
                        info: PolicyInfo {
                            name: $name.to_string(),
                            description: description.to_string(),
                        },
                        lookahead: 1,
                    }
                }

                fn on_routed(step: RoutedStep) -> Vec<PrefetchRequest> {
                    STATE.with(|s| {
                        let Some(b) = s.as_mut() else {
                            return Vec::new();
                        };
                        let outlook = step
                            .outlook
                            .iter()
                            .find(|o| o.layer == b.next_layer(step.layer))
                            .map(|o| o.scores.as_slice());
                        let (next, guess) =
                            b.on_routed(step.step, step.layer, step.tokens, &step.experts, outlook);
                        let base = next * b.experts();
                        guess
                            .into_iter()
                            .map(|(expert, priority)| PrefetchRequest {
                                expert: base + expert,
                                tier: Tier::Device,
                                priority,
                            })
                            .collect()
                    })
                }
            }

            export!(Policy);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(guess: &[(u32, u32)]) -> Vec<u32> {
        guess.iter().map(|g| g.0).collect()
    }

    #[test]
    fn learns_a_path_and_wraps_to_the_next_step() {
        let mut b = Blend::new(2, 8, 1, Threshold::AtLeast(0.0));
        for step in 0..20 {
            b.on_routed(step, 0, 1, &[1], None);
            b.on_routed(step, 1, 1, &[step as u32 % 2 + 4], None);
        }
        // After layer 0's expert 1, layer 1 has routed 4 and 5 in turn: both lead.
        let (next, guess) = b.on_routed(20, 0, 1, &[1], None);
        assert_eq!(next, 1);
        assert_eq!(guess.len(), RANKED);
        let mut top: Vec<u32> = ids(&guess)[..2].to_vec();
        top.sort();
        assert_eq!(top, vec![4, 5]);
        // The last layer leads to layer 0 of the next step, where expert 1 always ran.
        let (next, guess) = b.on_routed(20, 1, 1, &[4], None);
        assert_eq!((next, guess[0].0), (0, 1));
        assert!(
            guess[0].1 > 500_000,
            "a sure guess has a high priority: {guess:?}"
        );
    }

    #[test]
    fn weighs_signals_by_what_they_predicted() {
        // One layer of 16 experts, top-2. The gate outlook names experts 0 and 1, but the step
        // always routes 8 and 9: the outlook's cells learn they miss and the experts that were
        // used at the last visits rank first.
        let mut b = Blend::new(1, 16, 2, Threshold::AtLeast(0.0));
        let mut outlook = vec![0.0f32; 16];
        outlook[0] = 1.0;
        outlook[1] = 0.9;
        let mut guess = Vec::new();
        for step in 0..300 {
            guess = b.on_routed(step, 0, 1, &[8, 9], Some(&outlook)).1;
        }
        let mut top = ids(&guess)[..2].to_vec();
        top.sort();
        assert_eq!(top, vec![8, 9]);
        // And an outlook that is right wins over stale history once its cells learn it.
        let mut b = Blend::new(1, 16, 2, Threshold::AtLeast(0.0));
        for step in 0..300 {
            let e = (step % 7) as u32 + 2;
            let mut outlook = vec![0.0f32; 16];
            outlook[e as usize] = 1.0;
            outlook[((e + 1) % 16) as usize] = 0.5;
            // The step routes what the previous call's outlook named.
            let routed = if step == 0 {
                vec![0, 1]
            } else {
                vec![e - 1, e]
            };
            guess = b.on_routed(step, 0, 1, &routed, Some(&outlook)).1;
        }
        // step 299: e = 299 % 7 + 2 = 7, outlook names 7 then 8.
        assert_eq!(ids(&guess)[..2], [7, 8]);
    }

    #[test]
    fn counts_stay_bounded() {
        let mut b = Blend::new(3, 8, 2, Threshold::AtLeast(0.0));
        for step in 0..5000 {
            for l in 0..3 {
                b.on_routed(step, l, 1, &[(step % 8) as u32, 7], None);
            }
        }
        assert!(b.cells.iter().all(|c| c.n < HALVE_AT && c.y <= c.n));
        assert!(Blend::new(60, 384, 8, Threshold::AtLeast(0.0)).has_transitions());
        assert!(!Blend::new(64, 4096, 8, Threshold::AtLeast(0.0)).has_transitions());
    }

    #[test]
    fn ignores_bad_input() {
        let mut b = Blend::new(2, 4, 1, Threshold::AtLeast(0.0));
        assert_eq!(b.on_routed(0, 9, 1, &[1], None), (0, Vec::new()));
        // Out-of-range experts are dropped; an outlook of the wrong size is ignored.
        let (next, guess) = b.on_routed(0, 0, 2, &[1, 99], Some(&[1.0; 3]));
        assert_eq!(next, 1);
        assert!(guess.iter().all(|&(e, _)| e < 4));
        // A model too large for transitions still predicts from recent use.
        let mut big = Blend::new(1, 70_000, 8, Threshold::AtLeast(0.0));
        assert!(!big.has_transitions());
        big.on_routed(0, 0, 1, &[5], None);
        let (_, guess) = big.on_routed(1, 0, 1, &[5], None);
        assert_eq!(guess.len(), RANKED * 8);
        assert_eq!(guess[0].0, 5, "the expert used at the last visits leads");
    }
}
