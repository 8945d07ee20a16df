//! Learned layer-to-layer transitions: counts of "expert f routed at layer L, then expert e at
//! layer L+1 in the same forward pass" (the last layer leads to layer 0 of the next pass),
//! learned online; after each routed layer step, request the next layer's k most likely
//! experts. Needs no lookahead scores, so it costs the host nothing to feed.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

use common::transitions::{follows, next_layer, TransitionTable};

pub struct Transitions {
    experts: u32,
    top_k: u32,
    table: TransitionTable,
    /// The previous routed layer step: (step, layer, experts).
    prev: Option<(u64, u32, Vec<u32>)>,
    score: Vec<f32>,
}

impl Transitions {
    /// `None` when the table would exceed [`common::transitions::MAX_TABLE`] (or the shape is
    /// empty).
    pub fn new(layers: u32, experts: u32, top_k: u32) -> Option<Self> {
        Some(Transitions {
            experts,
            top_k,
            table: TransitionTable::new(layers, experts)?,
            prev: None,
            score: vec![0.0; experts as usize],
        })
    }

    /// Learns from one routed layer step, then returns the next layer and its most likely
    /// experts with their priority (mean transition probability x 1e6), best first.
    pub fn on_routed(&mut self, step: u64, layer: u32, experts: &[u32]) -> (u32, Vec<(u32, u32)>) {
        let e_max = self.experts;
        let used: Vec<u32> = experts.iter().copied().filter(|&e| e < e_max).collect();
        if layer >= self.table.layers() {
            return (0, Vec::new());
        }
        if let Some((pstep, player, prev)) = self.prev.take() {
            if follows(self.table.layers(), pstep, player, step, layer) {
                self.table.learn(player, &prev, &used);
            }
        }
        let next = next_layer(self.table.layers(), layer);
        let mut score = core::mem::take(&mut self.score);
        // P(e at the next layer | f here) ~ count / visits of f; a row's total counts ~k per
        // visit.
        let rows = self
            .table
            .predict(layer, &used, self.top_k as f32, &mut score);
        let mut guess = Vec::new();
        if rows > 0 {
            let mut best = Vec::new();
            common::top_k_filtered_into(
                &score,
                self.top_k as usize,
                |e| score[e as usize] > 0.0,
                &mut best,
            );
            guess = best
                .into_iter()
                .map(|e| (e, (score[e as usize].min(1.0) * 1e6) as u32))
                .collect();
        }
        self.score = score;
        self.prev = Some((step, layer, used));
        (next, guess)
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
        assert!(t.table.max_count() < common::transitions::CAP);
        assert!(Transitions::new(60, 384, 8).is_some());
        assert!(Transitions::new(64, 4096, 8).is_none());
    }
}
