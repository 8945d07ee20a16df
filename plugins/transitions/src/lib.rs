//! Learned layer-to-layer transitions: counts of "expert f routed at layer L, then expert e at
//! layer L+1 in the same forward pass" (the last layer leads to layer 0 of the next pass),
//! learned online; after each routed layer step, request the next layer's k most likely
//! experts. Needs no lookahead scores, so it costs the host nothing to feed.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

/// A row (one layer-L expert's counts towards layer L+1) is halved when one of its counts
/// reaches CAP: the counts forget quickly and follow loops. Tuned on the tiny-k2 decode trace:
/// the precision of the top-6 guess is 0.66 with CAP 8, 0.60 with 32, 0.56 without decay.
pub const CAP: u8 = 8;
/// Largest count table kept (bytes, one per count): 64 MiB. Kimi-K2 needs
/// 60 x 384 x 384 = 8.8 MB; a larger model turns the policy off rather than hit the host's
/// memory limit.
pub const MAX_TABLE: usize = 64 << 20;

pub struct Transitions {
    layers: u32,
    experts: u32,
    top_k: u32,
    /// `counts[(L * E + f) * E + e]`.
    counts: Vec<u8>,
    /// Sum of each row (`L * E + f`).
    totals: Vec<u32>,
    /// The previous routed layer step: (step, layer, experts).
    prev: Option<(u64, u32, Vec<u32>)>,
}

impl Transitions {
    /// `None` when the table would exceed [`MAX_TABLE`] (or the shape is empty).
    pub fn new(layers: u32, experts: u32, top_k: u32) -> Option<Self> {
        let rows = layers as usize * experts as usize;
        let size = rows.checked_mul(experts as usize)?;
        if size == 0 || size > MAX_TABLE {
            return None;
        }
        Some(Transitions {
            layers,
            experts,
            top_k,
            counts: vec![0; size],
            totals: vec![0; rows],
            prev: None,
        })
    }

    fn row(&self, layer: u32, f: u32) -> usize {
        layer as usize * self.experts as usize + f as usize
    }

    /// Whether `(step, layer)` directly follows `(pstep, player)` in the layer cycle.
    fn follows(&self, pstep: u64, player: u32, step: u64, layer: u32) -> bool {
        if player + 1 < self.layers {
            step == pstep && layer == player + 1
        } else {
            step > pstep && layer == 0
        }
    }

    /// Learns from one routed layer step, then returns the next layer and its most likely
    /// experts with their priority (mean transition probability x 1e6), best first.
    pub fn on_routed(&mut self, step: u64, layer: u32, experts: &[u32]) -> (u32, Vec<(u32, u32)>) {
        let e_max = self.experts;
        let used: Vec<u32> = experts.iter().copied().filter(|&e| e < e_max).collect();
        if layer >= self.layers {
            return (0, Vec::new());
        }
        if let Some((pstep, player, prev)) = self.prev.take() {
            if self.follows(pstep, player, step, layer) {
                for &f in &prev {
                    self.learn(player, f, &used);
                }
            }
        }
        let next = (layer + 1) % self.layers;
        let guess = self.predict(layer, &used);
        self.prev = Some((step, layer, used));
        (next, guess)
    }

    fn learn(&mut self, layer: u32, f: u32, to: &[u32]) {
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

    fn predict(&self, layer: u32, from: &[u32]) -> Vec<(u32, u32)> {
        let e_max = self.experts as usize;
        let mut score = vec![0f32; e_max];
        let mut rows = 0usize;
        for &f in from {
            let r = self.row(layer, f);
            let total = self.totals[r];
            if total == 0 {
                continue;
            }
            rows += 1;
            // P(e at the next layer | f here) ~ count / visits of f; the row total counts
            // ~k per visit, so multiply by k to keep it a probability.
            let scale = self.top_k as f32 / total as f32;
            let base = r * e_max;
            for (s, &c) in score.iter_mut().zip(&self.counts[base..base + e_max]) {
                *s += c as f32 * scale;
            }
        }
        if rows == 0 {
            return Vec::new();
        }
        let mut best = Vec::new();
        common::top_k_filtered_into(
            &score,
            self.top_k as usize,
            |e| score[e as usize] > 0.0,
            &mut best,
        );
        best.into_iter()
            .map(|e| {
                let p = (score[e as usize] / rows as f32).min(1.0);
                (e, (p * 1e6) as u32)
            })
            .collect()
    }
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;
    use common::Global;

    wit_bindgen::generate!({
        world: "prefetch-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::prefetch::{Guest, PrefetchInfo, PrefetchRequest, RoutedStep};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, Tier, TierCapacity};

    static STATE: Global<Option<Transitions>> = Global::new(None);

    struct TransitionsPolicy;

    impl Guest for TransitionsPolicy {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> PrefetchInfo {
            let state = Transitions::new(shape.moe_layers, shape.experts_per_layer, shape.top_k);
            let description = if state.is_some() {
                "prefetch the next layer's likely experts from learned layer-to-layer transitions"
            } else {
                "off: the transition table would not fit (layers x experts^2 > 64 MiB)"
            };
            STATE.with(|s| *s = state);
            PrefetchInfo {
                info: PolicyInfo {
                    name: "transitions".to_string(),
                    description: description.to_string(),
                },
                lookahead: 0,
            }
        }

        fn on_routed(step: RoutedStep) -> Vec<PrefetchRequest> {
            STATE.with(|s| {
                let Some(t) = s.as_mut() else {
                    return Vec::new();
                };
                let (next, guess) = t.on_routed(step.step, step.layer, &step.experts);
                let base = next * t.experts;
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

    export!(TransitionsPolicy);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_repeated_path_and_wraps() {
        let mut t = Transitions::new(2, 4, 1).unwrap();
        for step in 0..5 {
            t.on_routed(step, 0, &[1]);
            t.on_routed(step, 1, &[3]);
        }
        // After layer 0 routed expert 1, layer 1 expert 3 follows.
        let (next, guess) = t.on_routed(5, 0, &[1]);
        assert_eq!(next, 1);
        assert_eq!(guess.len(), 1);
        assert_eq!(guess[0].0, 3);
        assert!(guess[0].1 > 900_000);
        // After the last layer: layer 0 of the next step, expert 1.
        let (next, guess) = t.on_routed(5, 1, &[3]);
        assert_eq!((next, guess[0].0), (0, 1));
    }

    #[test]
    fn nothing_learned_nothing_requested() {
        let mut t = Transitions::new(3, 4, 2).unwrap();
        assert_eq!(t.on_routed(0, 0, &[0, 1]), (1, Vec::new()));
        // Not consecutive (layer 2 after layer 0): no learning.
        t.on_routed(0, 2, &[2]);
        assert!(t.on_routed(1, 0, &[0, 1]).1.is_empty());
        // Out-of-range ids and layers are ignored.
        assert_eq!(t.on_routed(1, 7, &[9]), (0, Vec::new()));
    }

    #[test]
    fn counts_stay_bounded() {
        let mut t = Transitions::new(2, 2, 1).unwrap();
        for step in 0..1000 {
            t.on_routed(step, 0, &[0, 1]);
            t.on_routed(step, 1, &[0, 1]);
        }
        assert!(t.counts.iter().all(|&c| c < CAP));
        assert!(Transitions::new(60, 384, 8).is_some());
        assert!(Transitions::new(64, 4096, 8).is_none());
    }
}
