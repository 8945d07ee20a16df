//! Least recently used: among the candidates, evict the experts whose last access or insertion
//! is oldest. The built-in policy's rule, as a plugin (a baseline to compare others with).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;
use common::{Dedup, Slots};

/// Recency stamps per expert key.
pub struct Lru {
    slots: Slots,
    /// Last access/insert time per slot; 0 = never seen (evicted first).
    stamp: Vec<u64>,
    clock: u64,
    dedup: Dedup,
}

impl Lru {
    /// Fresh state; `resident` experts (already in some tier) count as touched in list order.
    pub fn new(layers: u32, experts: u32, resident: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let slots = Slots::new(layers, experts);
        let mut lru = Lru {
            slots,
            stamp: alloc::vec![0; slots.len()],
            clock: 0,
            dedup: Dedup::new(slots.len()),
        };
        for (l, e) in resident {
            lru.touch(l, e);
        }
        lru
    }

    /// An access or an insert.
    pub fn touch(&mut self, layer: u32, expert: u32) {
        if let Some(s) = self.slots.index(layer, expert) {
            self.clock += 1;
            self.stamp[s] = self.clock;
        }
    }

    /// Indices into `candidates` of up to `count` distinct victims, least recent first (ties:
    /// lower layer, then lower expert).
    pub fn victims(&mut self, candidates: &[(u32, u32)], count: usize) -> Vec<usize> {
        let (slots, stamp) = (self.slots, &self.stamp);
        common::pick_smallest(
            candidates,
            count,
            |&(l, e)| slots.index(l, e),
            |&(l, e)| (slots.index(l, e).map_or(0, |s| stamp[s]), l, e),
            &mut self.dedup,
        )
    }
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;
    use common::Global;

    wit_bindgen::generate!({
        world: "eviction-policy",
        path: "../../wit",
    });

    use exports::moehost::policy::eviction::{EventKind, Guest, StepFacts, VictimRequest};
    use moehost::policy::types::{ExpertRef, ModelShape, PolicyInfo, Residency, TierCapacity};

    static STATE: Global<Option<Lru>> = Global::new(None);

    fn pick(lru: &mut Lru, request: &VictimRequest) -> Vec<ExpertRef> {
        let cands: Vec<(u32, u32)> = request
            .candidates
            .iter()
            .map(|c| (c.layer, c.expert))
            .collect();
        lru.victims(&cands, request.count as usize)
            .into_iter()
            .map(|i| request.candidates[i])
            .collect()
    }

    struct LruPolicy;

    impl Guest for LruPolicy {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, resident: Vec<Residency>) -> PolicyInfo {
            let resident = resident.iter().map(|r| (r.expert.layer, r.expert.expert));
            let lru = Lru::new(shape.moe_layers, shape.experts_per_layer, resident);
            STATE.with(|s| *s = Some(lru));
            PolicyInfo {
                name: "lru".to_string(),
                description: "least recently used (access or insert)".to_string(),
            }
        }

        fn on_step(facts: StepFacts, request: Option<VictimRequest>) -> Vec<ExpertRef> {
            STATE.with(|s| {
                let Some(lru) = s.as_mut() else {
                    return Vec::new();
                };
                for ev in &facts.events {
                    if matches!(ev.kind, EventKind::Access | EventKind::Insert) {
                        lru.touch(ev.expert.layer, ev.expert.expert);
                    }
                }
                request.map_or_else(Vec::new, |r| pick(lru, &r))
            })
        }

        fn victims(request: VictimRequest) -> Vec<ExpertRef> {
            STATE.with(|s| s.as_mut().map_or_else(Vec::new, |lru| pick(lru, &request)))
        }
    }

    export!(LruPolicy);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_and_dedups() {
        let mut lru = Lru::new(2, 4, [(1, 3), (0, 0)]);
        lru.touch(0, 1);
        lru.touch(1, 3);
        let cands = [(0, 1), (1, 3), (0, 0), (0, 0), (1, 2), (5, 5)];
        // (1,2) never seen, then (0,0), then (0,1), then (1,3); (5,5) is out of range.
        assert_eq!(lru.victims(&cands, 3), vec![4, 2, 0]);
        assert_eq!(lru.victims(&cands, 10), vec![4, 2, 0, 1]);
    }
}
