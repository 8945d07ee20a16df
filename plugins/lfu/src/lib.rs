//! Least frequently used, with aging: every access adds 1 to the expert's count, and all
//! counts are halved every `period` accesses (4 x the device tier's slots), so the counts
//! follow the recent working set. Among the experts resident in the tier (minus the excluded
//! ones), evict the lowest count; ties go to the least recently used.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use common::{decode_event, event, tier, Marks, ResidentSet};

/// The halving period, in accesses, per cache slot of the device tier. Tuned on the tiny-k2
/// decode trace (plugins/tools/evict_sim.py --lfu): 1x follows LRU too closely, 16x and more
/// keep a stale set.
pub const PERIOD_PER_SLOT: u64 = 4;

pub struct Lfu {
    /// Count per expert-id as of its `epoch`; the current count is `count >> (now - epoch)`.
    count: Vec<u32>,
    epoch: Vec<u32>,
    /// Last access/insert time per expert-id (tie-break).
    stamp: Vec<u64>,
    clock: u64,
    accesses: u64,
    period: u64,
    now: u32,
    /// The residents of the device and host tiers, as the events tell them.
    residents: [ResidentSet; tier::CACHED],
    experts_per_layer: u32,
    excluded: Marks,
    /// Reused per request: (count, stamp, id) of each candidate.
    keyed: Vec<((u32, u64), u32)>,
}

impl Lfu {
    /// Expert-ids `0..layers x experts_per_layer`; `cache_slots`: the device tier's slots (sets
    /// the aging period); `resident`: `(expert-id, tier code)` pairs, inserted in list order.
    pub fn new(
        layers: u32,
        experts_per_layer: u32,
        cache_slots: u32,
        resident: impl IntoIterator<Item = (u32, u8)>,
    ) -> Self {
        let experts = common::Slots::new(layers, experts_per_layer).len();
        let mut lfu = Lfu {
            count: vec![0; experts],
            epoch: vec![0; experts],
            stamp: vec![0; experts],
            clock: 0,
            accesses: 0,
            period: PERIOD_PER_SLOT * u64::from(cache_slots.max(1)),
            now: 0,
            residents: [ResidentSet::new(experts), ResidentSet::new(experts)],
            experts_per_layer: experts_per_layer.max(1),
            excluded: Marks::new(experts),
            keyed: Vec::new(),
        };
        for (e, t) in resident {
            lfu.insert(e, t);
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

    pub fn access(&mut self, e: u32) {
        let s = e as usize;
        if s >= self.count.len() {
            return;
        }
        self.count[s] = self.current(s).saturating_add(1);
        self.epoch[s] = self.now;
        self.clock += 1;
        self.stamp[s] = self.clock;
        self.accesses += 1;
        if self.accesses.is_multiple_of(self.period) {
            self.now += 1;
        }
    }

    /// The expert became resident in tier `t`: refreshes its recency (any tier) and adds it
    /// to the tier's residents (device, host).
    pub fn insert(&mut self, e: u32, t: u8) {
        let s = e as usize;
        if s >= self.stamp.len() {
            return;
        }
        self.clock += 1;
        self.stamp[s] = self.clock;
        if let Some(set) = self.residents.get_mut(t as usize) {
            set.insert(e);
        }
    }

    pub fn remove(&mut self, e: u32, t: u8) {
        if let Some(set) = self.residents.get_mut(t as usize) {
            set.remove(e);
        }
    }

    /// Applies packed events in order; malformed ones are ignored.
    pub fn on_events(&mut self, events: &[u32]) {
        for &ev in events {
            let (kind, t, e) = decode_event(ev);
            if t > tier::DISK {
                continue;
            }
            match kind {
                event::ACCESS => self.access(e),
                event::INSERT => self.insert(e, t),
                event::REMOVE => self.remove(e, t),
                _ => {}
            }
        }
    }

    /// Appends to `out` up to `count` victims among tier `t`'s residents (of MoE layer
    /// `only_layer` when set) minus `excluded`: lowest count first, then least recent, then
    /// lower id. The victims leave the tier's residents at once (the host evicts them; its
    /// remove events come later). O(residents + excluded), no allocation once the buffers are
    /// grown.
    pub fn victims(
        &mut self,
        t: u8,
        count: usize,
        excluded: &[u32],
        only_layer: Option<u32>,
        out: &mut Vec<u32>,
    ) {
        let Some(set) = self.residents.get(t as usize) else {
            return;
        };
        self.excluded.start();
        for &e in excluded {
            self.excluded.mark(e as usize);
        }
        let mut keyed = core::mem::take(&mut self.keyed);
        let epl = self.experts_per_layer;
        for &e in set.members() {
            if !self.excluded.contains(e as usize) && only_layer.is_none_or(|l| e / epl == l) {
                let s = e as usize;
                keyed.push(((self.current(s), self.stamp[s]), e));
            }
        }
        let start = out.len();
        common::take_smallest(&mut keyed, count, out);
        self.keyed = keyed;
        for &e in &out[start..] {
            self.residents[t as usize].remove(e);
        }
    }
}

#[cfg(target_arch = "wasm32")]
mod guest {
    use super::*;
    use alloc::string::ToString;
    use common::Global;

    wit_bindgen::generate!({
        world: "eviction-policy",
        path: "../../wit/policy.wit",
    });

    use exports::moehost::policy::eviction::{Guest, StepFacts, VictimRequest};
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, Tier, TierCapacity};

    static STATE: Global<Option<Lfu>> = Global::new(None);

    fn pick(lfu: &mut Lfu, request: &VictimRequest) -> Vec<u32> {
        let mut out = Vec::with_capacity(request.count.min(1 << 16) as usize);
        lfu.victims(
            request.tier as u8,
            request.count as usize,
            &request.excluded,
            request.only_layer,
            &mut out,
        );
        out
    }

    struct LfuPolicy;

    impl Guest for LfuPolicy {
        fn init(
            shape: ModelShape,
            capacities: Vec<TierCapacity>,
            resident: ResidentSet,
        ) -> PolicyInfo {
            let device_slots = capacities
                .iter()
                .find(|c| matches!(c.tier, Tier::Device))
                .map_or(shape.moe_layers.saturating_mul(shape.top_k), |c| c.slots);
            let pairs = resident
                .experts
                .iter()
                .zip(&resident.tiers)
                .map(|(&e, &t)| (e, t));
            let lfu = Lfu::new(
                shape.moe_layers,
                shape.experts_per_layer,
                device_slots,
                pairs,
            );
            STATE.with(|s| *s = Some(lfu));
            PolicyInfo {
                name: "lfu".to_string(),
                description: "least frequently used; counts halved every 4 x device-slots accesses"
                    .to_string(),
            }
        }

        fn on_step(facts: StepFacts, request: Option<VictimRequest>) -> Vec<u32> {
            STATE.with(|s| {
                let Some(lfu) = s.as_mut() else {
                    return Vec::new();
                };
                lfu.on_events(&facts.events);
                request.map_or_else(Vec::new, |r| pick(lfu, &r))
            })
        }

        fn victims(request: VictimRequest) -> Vec<u32> {
            STATE.with(|s| s.as_mut().map_or_else(Vec::new, |lfu| pick(lfu, &request)))
        }
    }

    export!(LfuPolicy);
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::encode_event;

    fn victims(lfu: &mut Lfu, t: u8, count: usize, excluded: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        lfu.victims(t, count, excluded, None, &mut out);
        out
    }

    #[test]
    fn lowest_count_then_least_recent() {
        let mut lfu = Lfu::new(1, 4, 100, [(0, 0), (1, 0), (2, 0), (3, 0)]);
        for _ in 0..3 {
            lfu.access(0);
        }
        lfu.access(1);
        lfu.access(2);
        lfu.insert(1, 2); // 1 now more recent than 2 (an insert anywhere refreshes)
        assert_eq!(victims(&mut lfu, 0, 4, &[]), vec![3, 2, 1, 0]);
    }

    #[test]
    fn counts_age() {
        let mut lfu = Lfu::new(1, 2, 1, [(0, 0), (1, 0)]); // period: 4 accesses
        for _ in 0..3 {
            lfu.access(0); // count 3 after 3 accesses
        }
        lfu.access(1); // 4th access: epoch 1, count(0) = 1
        lfu.access(1); // count(1) = 2
        assert_eq!(victims(&mut lfu, 0, 1, &[]), vec![0]);
    }

    #[test]
    fn candidates_are_the_tier_residents_minus_excluded() {
        let mut lfu = Lfu::new(2, 4, 100, [(1, 0), (2, 0), (3, 1)]);
        lfu.on_events(&[
            encode_event(event::ACCESS, 0, 1),
            encode_event(event::INSERT, 0, 5),
            encode_event(event::REMOVE, 0, 2),
            encode_event(event::ACCESS, 0, 99), // out of range: ignored
            encode_event(event::INSERT, 3, 6),  // bad tier: ignored
        ]);
        // device: 1 (count 1), 5 (count 0)
        assert_eq!(victims(&mut lfu, 0, 5, &[7]), vec![5, 1]);
        // the victims left the view at once
        assert!(victims(&mut lfu, 0, 5, &[]).is_empty());
        let mut lfu = Lfu::new(2, 4, 100, [(1, 0), (2, 0), (4, 0), (6, 0)]);
        let mut out = Vec::new();
        lfu.victims(0, 5, &[], Some(1), &mut out);
        assert_eq!(out, vec![4, 6]);
        lfu.victims(0, 5, &[], Some(2), &mut out); // no such layer: nothing
        assert_eq!(out, vec![4, 6]);
        assert_eq!(victims(&mut lfu, 0, 2, &[1]), vec![2]);
        assert_eq!(victims(&mut lfu, 1, 2, &[]), Vec::<u32>::new());
        assert_eq!(victims(&mut lfu, 2, 2, &[]), Vec::<u32>::new());
    }
}
