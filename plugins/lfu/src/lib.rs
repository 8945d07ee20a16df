//! Least frequently used, with aging: every access adds 1 to the expert's count, and all
//! counts are halved every `period` accesses (4 x the device tier's slots), so the counts
//! follow the recent working set. Among the candidates, evict the lowest count; ties go to the
//! least recently used.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use common::{Dedup, Slots};

/// The halving period, in accesses, per cache slot of the device tier. Tuned on the tiny-k2
/// decode trace (plugins/tools/evict_sim.py --lfu): 1x follows LRU too closely, 16x and more
/// keep a stale set.
pub const PERIOD_PER_SLOT: u64 = 4;

pub struct Lfu {
    slots: Slots,
    /// Count per slot as of its `epoch`; the current count is `count >> (now - epoch)`.
    count: Vec<u32>,
    epoch: Vec<u32>,
    /// Last access/insert time per slot (tie-break).
    stamp: Vec<u64>,
    clock: u64,
    accesses: u64,
    period: u64,
    now: u32,
    dedup: Dedup,
}

impl Lfu {
    /// `cache_slots`: the device tier's slots (sets the aging period).
    pub fn new(
        layers: u32,
        experts: u32,
        cache_slots: u32,
        resident: impl IntoIterator<Item = (u32, u32)>,
    ) -> Self {
        let slots = Slots::new(layers, experts);
        let mut lfu = Lfu {
            slots,
            count: vec![0; slots.len()],
            epoch: vec![0; slots.len()],
            stamp: vec![0; slots.len()],
            clock: 0,
            accesses: 0,
            period: PERIOD_PER_SLOT * u64::from(cache_slots.max(1)),
            now: 0,
            dedup: Dedup::new(slots.len()),
        };
        for (l, e) in resident {
            lfu.insert(l, e);
        }
        lfu
    }

    fn current(&self, s: usize) -> u32 {
        let age = self.now - self.epoch[s];
        if age >= 32 {
            0
        } else {
            self.count[s] >> age
        }
    }

    pub fn access(&mut self, layer: u32, expert: u32) {
        let Some(s) = self.slots.index(layer, expert) else {
            return;
        };
        self.count[s] = self.current(s).saturating_add(1);
        self.epoch[s] = self.now;
        self.clock += 1;
        self.stamp[s] = self.clock;
        self.accesses += 1;
        if self.accesses.is_multiple_of(self.period) {
            self.now += 1;
        }
    }

    pub fn insert(&mut self, layer: u32, expert: u32) {
        if let Some(s) = self.slots.index(layer, expert) {
            self.clock += 1;
            self.stamp[s] = self.clock;
        }
    }

    /// Indices into `candidates` of up to `count` distinct victims: lowest count first, then
    /// least recent, then lower (layer, expert).
    pub fn victims(&mut self, candidates: &[(u32, u32)], count: usize) -> Vec<usize> {
        let slots = self.slots;
        let mut dedup = core::mem::take(&mut self.dedup);
        let key = |&(l, e): &(u32, u32)| match slots.index(l, e) {
            Some(s) => (self.current(s), self.stamp[s], l, e),
            None => (0, 0, l, e),
        };
        let picked = common::pick_smallest(
            candidates,
            count,
            |&(l, e)| slots.index(l, e),
            key,
            &mut dedup,
        );
        self.dedup = dedup;
        picked
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
    use moehost::policy::types::{
        ExpertRef, ModelShape, PolicyInfo, Residency, Tier, TierCapacity,
    };

    static STATE: Global<Option<Lfu>> = Global::new(None);

    fn pick(lfu: &mut Lfu, request: &VictimRequest) -> Vec<ExpertRef> {
        let cands: Vec<(u32, u32)> = request
            .candidates
            .iter()
            .map(|c| (c.layer, c.expert))
            .collect();
        lfu.victims(&cands, request.count as usize)
            .into_iter()
            .map(|i| request.candidates[i])
            .collect()
    }

    struct LfuPolicy;

    impl Guest for LfuPolicy {
        fn init(
            shape: ModelShape,
            capacities: Vec<TierCapacity>,
            resident: Vec<Residency>,
        ) -> PolicyInfo {
            let device_slots = capacities
                .iter()
                .find(|c| matches!(c.tier, Tier::Device))
                .map_or(shape.moe_layers * shape.top_k, |c| c.slots);
            let resident = resident.iter().map(|r| (r.expert.layer, r.expert.expert));
            let lfu = Lfu::new(
                shape.moe_layers,
                shape.experts_per_layer,
                device_slots,
                resident,
            );
            STATE.with(|s| *s = Some(lfu));
            PolicyInfo {
                name: "lfu".to_string(),
                description: "least frequently used; counts halved every 4 x device-slots accesses"
                    .to_string(),
            }
        }

        fn on_step(facts: StepFacts, request: Option<VictimRequest>) -> Vec<ExpertRef> {
            STATE.with(|s| {
                let Some(lfu) = s.as_mut() else {
                    return Vec::new();
                };
                for ev in &facts.events {
                    match ev.kind {
                        EventKind::Access => lfu.access(ev.expert.layer, ev.expert.expert),
                        EventKind::Insert => lfu.insert(ev.expert.layer, ev.expert.expert),
                        EventKind::Remove => {}
                    }
                }
                request.map_or_else(Vec::new, |r| pick(lfu, &r))
            })
        }

        fn victims(request: VictimRequest) -> Vec<ExpertRef> {
            STATE.with(|s| s.as_mut().map_or_else(Vec::new, |lfu| pick(lfu, &request)))
        }
    }

    export!(LfuPolicy);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_count_then_least_recent() {
        let mut lfu = Lfu::new(1, 4, 100, []);
        for _ in 0..3 {
            lfu.access(0, 0);
        }
        lfu.access(0, 1);
        lfu.access(0, 2);
        lfu.insert(0, 1); // (0,1) now more recent than (0,2)
        let cands = [(0, 0), (0, 1), (0, 2), (0, 3)];
        assert_eq!(lfu.victims(&cands, 4), vec![3, 2, 1, 0]);
    }

    #[test]
    fn counts_age() {
        let mut lfu = Lfu::new(1, 2, 1, []); // period: 4 accesses
        for _ in 0..3 {
            lfu.access(0, 0); // count 3 after 3 accesses
        }
        lfu.access(0, 1); // 4th access: epoch 1, count(0,0) = 1
        lfu.access(0, 1); // count(0,1) = 2
        assert_eq!(lfu.victims(&[(0, 0), (0, 1)], 1), vec![0]);
    }
}
