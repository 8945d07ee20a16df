//! Placement by admission control: an expert earns a device slot by being used, not by being
//! asked for once. Each expert has a use count (tokens routed to it, halved every
//! `HALF_LIFE` visits of its layer); a missing expert is fetched into the device tier when it
//! is hot (count >= `HOT`) or when a device slot is free, and otherwise runs where it lives, so
//! one-off experts never evict the device tier's regulars. This is the "frequency-gated
//! admission" idea of TinyLFU applied to hybrid CPU/GPU execution: the cost model decides per
//! step, this policy remembers across steps.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;

/// Tokens within the recent past that make an expert worth a device slot.
pub const HOT: u32 = 3;
/// Layer visits after which counts halve.
pub const HALF_LIFE: u32 = 32;

/// The policy's state: use counts per model-wide expert id, visits per layer.
#[derive(Default)]
pub struct HotFetch {
    experts_per_layer: u32,
    counts: Vec<u32>,
    visits: Vec<u32>,
}

impl HotFetch {
    pub fn new(moe_layers: u32, experts_per_layer: u32) -> Self {
        Self {
            experts_per_layer,
            counts: vec![0; (moe_layers * experts_per_layer) as usize],
            visits: vec![0; moe_layers as usize],
        }
    }

    /// One code per expert: 0 = fetch, 1 = run where it lives.
    pub fn place(&mut self, layer: u32, experts: &[u32], tokens: &[u32], free: u32) -> Vec<u8> {
        self.age(layer);
        let mut free = free;
        experts
            .iter()
            .zip(tokens)
            .map(|(&id, &t)| {
                let hot = match self.counts.get_mut(id as usize) {
                    Some(c) => {
                        *c = c.saturating_add(t);
                        *c >= HOT
                    }
                    None => false,
                };
                if free > 0 {
                    free -= 1;
                    0
                } else if hot {
                    0
                } else {
                    1
                }
            })
            .collect()
    }

    fn age(&mut self, layer: u32) {
        let Some(v) = self.visits.get_mut(layer as usize) else {
            return;
        };
        *v += 1;
        if *v % HALF_LIFE == 0 {
            let e = self.experts_per_layer as usize;
            let start = layer as usize * e;
            for c in &mut self.counts[start..start + e] {
                *c /= 2;
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;
    use common::Global;

    wit_bindgen::generate!({
        world: "placement-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::placement::{Guest, PlacementRequest};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, TierCapacity};

    static STATE: Global<Option<HotFetch>> = Global::new(None);

    struct Policy;

    impl Guest for Policy {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, _: ResidentSet) -> PolicyInfo {
            STATE.with(|s| *s = Some(HotFetch::new(shape.moe_layers, shape.experts_per_layer)));
            PolicyInfo {
                name: "hot-fetch".to_string(),
                description: "fetch experts used often, run one-off experts where they live"
                    .to_string(),
            }
        }

        fn place(r: PlacementRequest) -> Vec<u8> {
            STATE.with(|s| match s {
                Some(p) => p.place(r.layer, &r.experts, &r.tokens, r.free_device_slots),
                None => vec![0; r.experts.len()],
            })
        }
    }

    export!(Policy);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_experts_stay_on_the_host_until_hot() {
        let mut p = HotFetch::new(2, 8);
        // A free slot is always taken.
        assert_eq!(p.place(0, &[1, 2], &[1, 1], 1), vec![0, 1]);
        // Expert 2 reaches HOT tokens and is fetched; expert 3 is new and cold.
        assert_eq!(p.place(0, &[2, 3], &[2, 1], 0), vec![0, 1]);
        // Counts halve every HALF_LIFE visits of the layer.
        for _ in 0..HALF_LIFE * 4 {
            p.place(1, &[], &[], 0);
            p.place(0, &[], &[], 0);
        }
        assert_eq!(p.place(0, &[2], &[1], 0), vec![1]);
    }
}
