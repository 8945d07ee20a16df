//! Least recently used: among the experts resident in the tier (minus the excluded ones),
//! evict those whose last access or insertion is oldest. The built-in policy's rule, as a
//! plugin (a baseline to compare others with).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec::Vec;
use common::{decode_event, event, tier, Marks, Recency};

/// One cached tier's residents in recency order: all of them, and each MoE layer's (for
/// requests limited to one layer).
struct TierLists {
    all: Recency,
    by_layer: Recency,
}

/// Recency lists per cached tier (device, host), over dense expert-ids.
///
/// Equivalent to a stamp per expert (bumped by every access and insert event, in delivery
/// order, and by `init`'s residency in list order), with each tier's residents ordered by
/// stamp: a touch moves the expert to the most recent end of every list holding it.
pub struct Lru {
    tiers: [TierLists; tier::CACHED],
    layers: u32,
    experts_per_layer: u32,
    excluded: Marks,
}

impl Lru {
    /// Fresh state for `layers x experts_per_layer` expert-ids; `resident` pairs
    /// `(expert-id, tier code)` are inserted in list order.
    pub fn new(
        layers: u32,
        experts_per_layer: u32,
        resident: impl IntoIterator<Item = (u32, u8)>,
    ) -> Self {
        let n = common::Slots::new(layers, experts_per_layer).len();
        let lists = || TierLists {
            all: Recency::new(n),
            by_layer: Recency::with_lists(n, layers as usize),
        };
        let mut lru = Lru {
            tiers: [lists(), lists()],
            layers,
            experts_per_layer,
            excluded: Marks::new(n),
        };
        for (e, t) in resident {
            lru.insert(e, t);
        }
        lru
    }

    fn layer_of(&self, e: u32) -> u32 {
        e / self.experts_per_layer.max(1)
    }

    /// An access: the expert becomes the most recent wherever it is resident.
    pub fn touch(&mut self, e: u32) {
        self.touch_in(e, None);
    }

    /// [`Lru::touch`], with tier `t` (a list index) made to hold `e` first when given.
    fn touch_in(&mut self, e: u32, t: Option<usize>) {
        let layer = self.layer_of(e);
        for (i, lists) in self.tiers.iter_mut().enumerate() {
            if Some(i) == t || lists.all.contains(e) {
                lists.all.touch(e);
                lists.by_layer.push(layer, e);
            }
        }
    }

    /// The expert became resident in tier `t` (disk: only a touch).
    pub fn insert(&mut self, e: u32, t: u8) {
        let cached = (t as usize) < self.tiers.len() && self.tiers[0].all.in_range(e);
        self.touch_in(e, cached.then_some(t as usize));
    }

    /// The expert left tier `t` (nothing when it was not there).
    pub fn remove(&mut self, e: u32, t: u8) {
        if let Some(t) = self.tiers.get_mut(t as usize) {
            t.all.remove(e);
            t.by_layer.remove(e);
        }
    }

    /// Applies packed events in order; malformed ones (kind 3, tier 3, id out of range) are
    /// ignored.
    pub fn on_events(&mut self, events: &[u32]) {
        for &ev in events {
            let (kind, t, e) = decode_event(ev);
            if t > tier::DISK || !self.tiers[0].all.in_range(e) {
                continue;
            }
            match kind {
                event::ACCESS => self.touch(e),
                event::INSERT => self.insert(e, t),
                event::REMOVE => self.remove(e, t),
                _ => {}
            }
        }
    }

    /// Appends to `out` up to `count` victims of tier `t` (of MoE layer `only_layer` when
    /// set), least recent first, skipping `excluded`, and takes them out of the tier at once
    /// (the host evicts every victim named; its remove events, arriving later, then find
    /// nothing). O(count + excluded).
    pub fn victims(
        &mut self,
        t: u8,
        count: usize,
        excluded: &[u32],
        only_layer: Option<u32>,
        out: &mut Vec<u32>,
    ) {
        let Some(lists) = self.tiers.get_mut(t as usize) else {
            return;
        };
        if only_layer.is_some_and(|l| l >= self.layers) {
            return;
        }
        let start = out.len();
        self.excluded.start();
        for &e in excluded {
            self.excluded.mark(e as usize);
        }
        let marks = &self.excluded;
        let keep = |e: &u32| !marks.contains(*e as usize);
        match only_layer {
            Some(l) => out.extend(lists.by_layer.iter_list(l).filter(keep).take(count)),
            None => out.extend(lists.all.iter().filter(keep).take(count)),
        }
        for &e in &out[start..] {
            lists.all.remove(e);
            lists.by_layer.remove(e);
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
    use moehost::policy::types::{ModelShape, PolicyInfo, ResidentSet, TierCapacity};

    static STATE: Global<Option<Lru>> = Global::new(None);

    fn pick(lru: &mut Lru, request: &VictimRequest) -> Vec<u32> {
        let mut out = Vec::with_capacity(request.count.min(1 << 16) as usize);
        lru.victims(
            request.tier as u8,
            request.count as usize,
            &request.excluded,
            request.only_layer,
            &mut out,
        );
        out
    }

    struct LruPolicy;

    impl Guest for LruPolicy {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, resident: ResidentSet) -> PolicyInfo {
            let pairs = resident
                .experts
                .iter()
                .zip(&resident.tiers)
                .map(|(&e, &t)| (e, t));
            let lru = Lru::new(shape.moe_layers, shape.experts_per_layer, pairs);
            STATE.with(|s| *s = Some(lru));
            PolicyInfo {
                name: "lru".to_string(),
                description: "least recently used (access or insert)".to_string(),
            }
        }

        fn on_step(facts: StepFacts, request: Option<VictimRequest>) -> Vec<u32> {
            STATE.with(|s| {
                let Some(lru) = s.as_mut() else {
                    return Vec::new();
                };
                lru.on_events(&facts.events);
                request.map_or_else(Vec::new, |r| pick(lru, &r))
            })
        }

        fn victims(request: VictimRequest) -> Vec<u32> {
            STATE.with(|s| s.as_mut().map_or_else(Vec::new, |lru| pick(lru, &request)))
        }
    }

    export!(LruPolicy);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use common::encode_event;
    use std::collections::BTreeSet;

    const A: u8 = event::ACCESS;
    const I: u8 = event::INSERT;
    const R: u8 = event::REMOVE;

    fn victims(lru: &mut Lru, t: u8, count: usize, excluded: &[u32]) -> Vec<u32> {
        let mut out = Vec::new();
        lru.victims(t, count, excluded, None, &mut out);
        out
    }

    #[test]
    fn evicts_least_recent_skips_excluded_and_forgets_victims() {
        // 2 layers x 4 experts: ids 0..8. Device holds 7, 0, 2, 5 (that order); host holds 3.
        let mut lru = Lru::new(2, 4, [(7, 0), (0, 0), (3, 1), (2, 0), (5, 0)]);
        lru.on_events(&[
            encode_event(A, 0, 0),
            encode_event(A, 1, 3),
            encode_event(A, 2, 6), // not resident: no effect on the lists
            encode_event(7, 0, 1), // garbage kind (3): ignored
            encode_event(A, 0, 100),
        ]);
        // device, least recent first: 7, 2, 5, 0
        assert_eq!(victims(&mut lru, 0, 2, &[7, 42]), vec![2, 5]);
        // 2 and 5 are gone from the view: a second request in the same step cannot name them.
        assert_eq!(victims(&mut lru, 0, 5, &[]), vec![7, 0]);
        assert!(victims(&mut lru, 0, 1, &[]).is_empty());
        // The late remove events are no-ops.
        lru.on_events(&[encode_event(R, 0, 2), encode_event(R, 0, 5)]);
        assert_eq!(victims(&mut lru, 1, 3, &[]), vec![3]);
        assert!(victims(&mut lru, 2, 3, &[]).is_empty());
        assert!(victims(&mut lru, 3, 3, &[]).is_empty());
    }

    #[test]
    fn a_touch_counts_in_every_tier() {
        // 5 in device and host, 1 in both too; an access to 5 makes it the most recent in both.
        let mut lru = Lru::new(2, 4, [(5, 0), (5, 1), (1, 0), (1, 1)]);
        lru.on_events(&[encode_event(A, 0, 5)]);
        assert_eq!(victims(&mut lru, 1, 1, &[]), vec![1]);
        // insert into host refreshes 5's device position too
        lru.on_events(&[encode_event(I, 1, 5)]);
        assert_eq!(victims(&mut lru, 0, 2, &[]), vec![1, 5]);
    }

    #[test]
    fn only_layer_limits_the_candidates() {
        // 3 layers x 4 experts; device, oldest first: 8 (layer 2), 1 (0), 5 (1), 6 (1), 2 (0)
        let mut lru = Lru::new(3, 4, [(8, 0), (1, 0), (5, 0), (6, 0), (2, 0)]);
        let mut out = Vec::new();
        lru.victims(0, 5, &[5], Some(1), &mut out);
        assert_eq!(out, vec![6]);
        lru.victims(0, 1, &[], Some(0), &mut out);
        assert_eq!(out, vec![6, 1]);
        lru.victims(0, 1, &[], Some(3), &mut out); // no such layer
        assert_eq!(out, vec![6, 1]);
        out.clear();
        lru.victims(0, 5, &[], None, &mut out);
        assert_eq!(out, vec![8, 5, 2]);
    }

    /// The reference: a stamp per expert; victims = the oldest stamps among the tier's
    /// residents (as this view knows them), minus the excluded.
    struct Stamps {
        stamp: Vec<u64>,
        clock: u64,
        tiers: [BTreeSet<u32>; 2],
    }

    impl Stamps {
        fn touch(&mut self, e: u32) {
            self.clock += 1;
            self.stamp[e as usize] = self.clock;
        }
        fn event(&mut self, kind: u8, t: u8, e: u32) {
            if e as usize >= self.stamp.len() || t > 2 {
                return;
            }
            match kind {
                0 => self.touch(e),
                1 => {
                    if t < 2 {
                        self.tiers[t as usize].insert(e);
                    }
                    self.touch(e)
                }
                2 if t < 2 => {
                    self.tiers[t as usize].remove(&e);
                }
                _ => {}
            }
        }
        fn victims(
            &mut self,
            t: u8,
            count: usize,
            excluded: &[u32],
            only_layer: Option<u32>,
        ) -> Vec<u32> {
            let Some(set) = self.tiers.get(t as usize) else {
                return Vec::new();
            };
            let mut c: Vec<u32> = set
                .iter()
                .copied()
                .filter(|e| !excluded.contains(e) && only_layer.is_none_or(|l| e / 8 == l))
                .collect();
            c.sort_by_key(|&e| (self.stamp[e as usize], e));
            c.truncate(count);
            for e in &c {
                self.tiers[t as usize].remove(e);
            }
            c
        }
    }

    #[test]
    fn matches_a_stamp_lru_on_a_random_trace() {
        let n = 64u32; // 8 layers x 8 experts
        let mut x: u32 = 2024;
        let mut rnd = |m: u32| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 8) % m
        };
        let init: Vec<(u32, u8)> = (0..30).map(|_| (rnd(n), rnd(2) as u8)).collect();
        let mut lru = Lru::new(8, 8, init.iter().copied());
        let mut reference = Stamps {
            stamp: vec![0; n as usize],
            clock: 0,
            tiers: [BTreeSet::new(), BTreeSet::new()],
        };
        for &(e, t) in &init {
            reference.event(1, t, e);
        }
        for _ in 0..3000 {
            let events: Vec<u32> = (0..rnd(6))
                .map(|_| {
                    let e = if rnd(20) == 0 { n + rnd(5) } else { rnd(n) };
                    encode_event(rnd(4) as u8, rnd(4) as u8, e)
                })
                .collect();
            lru.on_events(&events);
            for &ev in &events {
                let (k, t, e) = decode_event(ev);
                reference.event(k, t, e);
            }
            for _ in 0..rnd(3) {
                let t = rnd(3) as u8;
                let count = rnd(5) as usize;
                let excluded: Vec<u32> = (0..rnd(6)).map(|_| rnd(n + 3)).collect();
                let only_layer = [None, Some(rnd(9))][rnd(2) as usize];
                let mut got = Vec::new();
                lru.victims(t, count, &excluded, only_layer, &mut got);
                assert_eq!(got, reference.victims(t, count, &excluded, only_layer));
            }
        }
    }
}
