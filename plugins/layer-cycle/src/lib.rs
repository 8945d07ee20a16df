//! Evict the expert whose next use is furthest ahead, estimated from what an eviction policy
//! can know: the fixed cycle of MoE layers, each expert's recent usage rate in its layer, and
//! the loops that greedy decoding and repetitive text fall into. See README.md for the
//! reasoning and the measured hit rates; `plugins/tools/evict_sim.py` has the same algorithm in
//! Python (`LayerCycle`).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::collections::BinaryHeap;
use alloc::vec;
use alloc::vec::Vec;
use common::{decode_event, event, ordered_bits64, powi, tier, Marks, ResidentSet, Slots};
use core::cmp::Reverse;

/// Per-visit decay of an expert's usage rate in its layer (a visit = one step of that layer).
pub const DECAY: f32 = 0.97;
/// Lags (in visits of a layer) tried as loop periods: 1..=LAGS. Bounded by the 32-bit history.
pub const LAGS: usize = 31;
/// Per-visit decay of a lag's precision estimate.
pub const LAG_DECAY: f32 = 0.8;
/// A visit that uses more than BURST x the layer's running mean of distinct experts (and more
/// than 2 x top-k) is a burst, e.g. a prefill: a new context starts and usage rates restart.
pub const BURST: f32 = 2.0;
/// Lower bound of a usage rate in the estimate (an expert never used ranks by distance).
pub const FLOOR: f32 = 1e-6;

/// One expert's history.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// Decayed usage rate as of visit `last` (its layer's visit count).
    p: f32,
    /// Bit j: used at visit `last - j`.
    hist: u32,
    /// The visit of its last use (0 = never).
    last: u64,
}

/// One MoE layer's counters.
#[derive(Clone, Copy)]
struct Layer {
    /// Visits so far (the current one included once its accesses arrived).
    visits: u64,
    /// The step of the latest visit.
    last_step: Option<u64>,
    /// The visit that started the current context (usage before it is forgotten).
    reset_at: u64,
    /// Running mean of the distinct experts of a visit.
    mean_used: f32,
    /// `q[P]`: decayed fraction of the experts used P visits ago that were used again.
    q: [f32; LAGS + 1],
    /// Distinct experts used per visit, ring indexed by visit % (LAGS + 1); 0 = burst.
    sizes: [u32; LAGS + 1],
}

impl Layer {
    fn new(top_k: u32) -> Self {
        Layer {
            visits: 0,
            last_step: None,
            reset_at: 0,
            mean_used: top_k as f32,
            q: [0.0; LAGS + 1],
            sizes: [0; LAGS + 1],
        }
    }

    /// The lag whose loop prediction has been most precise, and its precision.
    fn best_lag(&self) -> (usize, f32) {
        let mut best = (1, self.q[1]);
        for p in 2..=LAGS {
            if self.q[p] > best.1 {
                best = (p, self.q[p]);
            }
        }
        best
    }
}

/// What a victim request needs of one layer; changes only at the layer's visits.
#[derive(Clone, Copy)]
struct LayerView {
    /// The best loop lag and its precision.
    lag: usize,
    qb: f32,
    /// `1 - DECAY^(visits since the context started)`: the rate's bias correction.
    denom: f32,
}

/// One (tier, layer)'s residents in victim order. Between two visits of a layer its experts'
/// estimates change only by the distance to the layer's next visit, the same for all of them,
/// so the order holds until the layer is visited or gains a resident; residents removed since
/// are skipped when met. A request then merges the layers' orders instead of scoring every
/// resident.
#[derive(Default)]
struct Ranked {
    /// (reversed key of the estimate beyond the distance, expert-id), ascending.
    order: Vec<(u32, u32)>,
    /// Entries before it have left the tier.
    start: usize,
    dirty: bool,
    /// Bumped at each re-sort: heap entries of an older order are dropped when met.
    version: u32,
}

/// `DECAY^n` for small `n`, exactly as [`powi`] computes it (most ages are small).
struct DecayTable([f32; 256]);

impl DecayTable {
    fn new() -> Self {
        let mut t = [0.0; 256];
        for (n, x) in t.iter_mut().enumerate() {
            *x = powi(DECAY, n as u64);
        }
        DecayTable(t)
    }

    #[inline]
    fn pow(&self, n: u64) -> f32 {
        match self.0.get(n as usize) {
            Some(&x) => x,
            None => powi(DECAY, n),
        }
    }
}

pub struct LayerCycle {
    slots: Slots,
    top_k: u32,
    layers: Vec<Layer>,
    experts: Vec<Slot>,
    /// The layer being served (from the latest step facts).
    current: u32,
    /// Layer steps served so far: `clock + distance(l)` is when layer `l` comes next, which
    /// stays put until `l` is served while the layers come in their cycle.
    clock: u64,
    /// Per cached tier: rebuild the heap before the next request.
    rekey: [bool; tier::CACHED],
    dedup: Marks,
    scratch: Vec<u32>,
    /// The residents of the device and host tiers, as the events tell them.
    residents: [ResidentSet; tier::CACHED],
    excluded: Marks,
    /// Reused buffers: one call's accesses, a request's excluded heap entries set aside.
    accesses: Vec<(u32, u32)>,
    aside: Vec<Entry>,
    /// Per cached tier: the heads of its layers' orders (and stale entries, dropped when met).
    heaps: [BinaryHeap<Entry>; tier::CACHED],
    /// Each layer's view, refreshed at its visits (all a request needs of the layer).
    views: Vec<LayerView>,
    /// Per cached tier and layer: the residents (numbered within the layer), and in victim
    /// order.
    layered: [Vec<ResidentSet>; tier::CACHED],
    ranked: [Vec<Ranked>; tier::CACHED],
    decay: DecayTable,
}

impl LayerCycle {
    pub fn new(layers: u32, experts: u32, top_k: u32) -> Self {
        let slots = Slots::new(layers, experts);
        LayerCycle {
            slots,
            top_k,
            layers: vec![Layer::new(top_k); layers as usize],
            experts: vec![Slot::default(); slots.len()],
            current: 0,
            clock: 0,
            rekey: [true; tier::CACHED],
            dedup: Marks::new(slots.len()),
            scratch: Vec::new(),
            residents: [ResidentSet::new(slots.len()), ResidentSet::new(slots.len())],
            excluded: Marks::new(slots.len()),
            accesses: Vec::new(),
            views: vec![
                LayerView {
                    lag: 1,
                    qb: 0.0,
                    denom: 0.0,
                };
                layers as usize
            ],
            aside: Vec::new(),
            heaps: [BinaryHeap::new(), BinaryHeap::new()],
            layered: [
                (0..layers)
                    .map(|_| ResidentSet::new(experts as usize))
                    .collect(),
                (0..layers)
                    .map(|_| ResidentSet::new(experts as usize))
                    .collect(),
            ],
            ranked: [
                (0..layers).map(|_| Ranked::default()).collect(),
                (0..layers).map(|_| Ranked::default()).collect(),
            ],
            decay: DecayTable::new(),
        }
    }

    /// Expert-id `e` became resident in tier `t` (device, host; others ignored).
    pub fn insert(&mut self, e: u32, t: u8) {
        let (Some(set), Some((l, x))) = (self.residents.get_mut(t as usize), self.slots.split(e))
        else {
            return;
        };
        if set.insert(e) {
            self.layered[t as usize][l as usize].insert(x);
            self.ranked[t as usize][l as usize].dirty = true;
        }
    }

    /// Expert-id `e` left tier `t`.
    pub fn remove(&mut self, e: u32, t: u8) {
        let (Some(set), Some((l, x))) = (self.residents.get_mut(t as usize), self.slots.split(e))
        else {
            return;
        };
        if set.remove(e) {
            self.layered[t as usize][l as usize].remove(x);
        }
    }

    /// One call's step facts: packed events in order. Inserts and removes update the tiers'
    /// residents; the accesses go to [`LayerCycle::on_step`]. Malformed events are ignored.
    pub fn on_events(&mut self, step: u64, layer: u32, events: &[u32]) {
        let mut accesses = core::mem::take(&mut self.accesses);
        accesses.clear();
        for &ev in events {
            let (kind, t, e) = decode_event(ev);
            if t > tier::DISK {
                continue;
            }
            match kind {
                event::ACCESS => accesses.extend(self.slots.split(e)),
                event::INSERT => self.insert(e, t),
                event::REMOVE => self.remove(e, t),
                _ => {}
            }
        }
        self.on_step(step, layer, &accesses);
        self.accesses = accesses;
    }

    /// History bits of slot `s` aligned at visit `v` (bit j: used at visit v - j).
    fn bits(&self, s: usize, v: u64) -> u32 {
        let slot = &self.experts[s];
        let age = v - slot.last.min(v);
        if slot.last == 0 || age >= 32 {
            0
        } else {
            slot.hist << age
        }
    }

    /// Usage rate of slot `s` (of `layer`) now, bias-corrected for the visits since the
    /// context started (`denom`: [`LayerView::denom`]).
    fn rate(&self, s: usize, layer: &Layer, denom: f32) -> f32 {
        let slot = &self.experts[s];
        if slot.last <= layer.reset_at {
            return 0.0;
        }
        let p = slot.p * self.decay.pow(layer.visits - slot.last);
        p / denom
    }

    /// The facts of one call: the layer being served and, in order, the experts accessed
    /// (layer, expert). Accesses for a layer at or before `layer` belong to `step`, those of a
    /// later layer to the previous step (a host that reports a step's accesses one call late).
    pub fn on_step(&mut self, step: u64, layer: u32, accesses: &[(u32, u32)]) {
        if layer < self.slots.layers {
            if layer != (self.current + 1) % self.slots.layers {
                // Out of turn: the layers passed over come next a cycle later, which the
                // heaps' keys cannot follow lazily.
                self.rekey = [true; tier::CACHED];
            }
            self.clock += self.distance(layer) as u64;
            self.current = layer;
        }
        let mut i = 0;
        while i < accesses.len() {
            // A run of accesses to one layer: that layer's visit.
            let l = accesses[i].0;
            let mut j = i + 1;
            while j < accesses.len() && accesses[j].0 == l {
                j += 1;
            }
            if l < self.slots.layers {
                let step_of = if l <= layer {
                    step
                } else {
                    step.saturating_sub(1)
                };
                self.visit(l, step_of, &accesses[i..j]);
            }
            i = j;
        }
    }

    fn visit(&mut self, l: u32, step: u64, accesses: &[(u32, u32)]) {
        let mut used = core::mem::take(&mut self.scratch);
        used.clear();
        self.dedup.start();
        for &(_, e) in accesses {
            if let Some(s) = self.slots.index(l, e) {
                if self.dedup.first(s) {
                    used.push(s as u32);
                }
            }
        }
        let mut layer = self.layers[l as usize];
        if layer.last_step != Some(step) {
            // A new visit: update the layer's statistics from the whole set.
            layer.last_step = Some(step);
            layer.visits += 1;
            let v = layer.visits;
            let n = used.len() as f32;
            let burst = n > BURST * layer.mean_used && n > 2.0 * self.top_k as f32;
            layer.mean_used = 0.9 * layer.mean_used + 0.1 * n;
            let ring = (v % (LAGS as u64 + 1)) as usize;
            if burst {
                layer.reset_at = v;
                layer.sizes[ring] = 0;
                self.layers[l as usize] = layer;
                self.refresh_view(l);
                self.scratch = used;
                return;
            }
            let mut inter = [0u32; LAGS + 1];
            for &s in &used {
                let b = self.bits(s as usize, v);
                for (p, count) in inter.iter_mut().enumerate().skip(1) {
                    *count += (b >> p) & 1;
                }
            }
            for (p, &hits) in inter.iter().enumerate().skip(1) {
                let size =
                    layer.sizes[((v + (LAGS as u64 + 1) - p as u64) % (LAGS as u64 + 1)) as usize];
                if v > p as u64 && size > 0 {
                    let precision = hits as f32 / size as f32;
                    layer.q[p] = LAG_DECAY * layer.q[p] + (1.0 - LAG_DECAY) * precision;
                }
            }
            layer.sizes[ring] = used.len() as u32;
        }
        let v = layer.visits;
        for &s in &used {
            let s = s as usize;
            let slot = self.experts[s];
            if slot.last == v {
                continue;
            }
            let p = if slot.last > layer.reset_at {
                slot.p * self.decay.pow(v - slot.last)
            } else {
                0.0
            };
            self.experts[s] = Slot {
                p: p + (1.0 - DECAY),
                hist: self.bits(s, v) | 1,
                last: v,
            };
        }
        self.layers[l as usize] = layer;
        self.refresh_view(l);
        self.scratch = used;
    }

    fn refresh_view(&mut self, l: u32) {
        for ranked in &mut self.ranked {
            ranked[l as usize].dirty = true;
        }
        let layer = &self.layers[l as usize];
        let (lag, qb) = layer.best_lag();
        self.views[l as usize] = LayerView {
            lag,
            qb,
            denom: 1.0 - self.decay.pow(layer.visits - layer.reset_at),
        };
    }

    /// Layer steps until layer `l` comes round again (the current layer: a full cycle).
    fn distance(&self, l: u32) -> u32 {
        // ((l - current - 1) mod layers) + 1, without a division.
        if l > self.current {
            l - self.current
        } else {
            l + self.slots.layers - self.current
        }
    }

    /// When layer `l` is served next, in layer steps since the start.
    fn next_visit(&self, l: u32) -> u64 {
        self.clock + u64::from(self.distance(l))
    }

    /// The estimated layer steps until expert `x` of `l` is used again, beyond the distance to
    /// its layer's next visit: fixed between two visits of the layer.
    fn beyond(&self, l: u32, x: u32) -> f32 {
        let Some(s) = self.slots.index(l, x) else {
            return f32::INFINITY;
        };
        let m = self.slots.layers as f32;
        let layer = &self.layers[l as usize];
        let LayerView { lag, qb, denom } = self.views[l as usize];
        let bits = self.bits(s, layer.visits);
        let p = self.rate(s, layer, denom);
        // Probability of a use at the next visit: the loop's guess, weighted by its precision.
        let loop_bit = ((bits >> (lag - 1)) & 1) as f32;
        let pn = qb * loop_bit + (1.0 - qb) * p;
        let by_rate = m * (1.0 - pn) / p.max(FLOOR);
        // The loop's next use: the first of the next `lag` visits that repeats a used one, i.e.
        // the highest set bit among the last `lag` visits (bit lag - 1 - t for t = 0, 1, ...).
        let window = bits & (u32::MAX >> (32 - lag));
        let est = if window != 0 {
            let t = lag - 1 - (31 - window.leading_zeros() as usize);
            qb * m * t as f32 + (1.0 - qb) * by_rate
        } else {
            by_rate
        };
        est.max(0.0)
    }

    /// Re-sorts tier `t`'s residents of layer `l` if they changed.
    fn rank(&mut self, t: usize, l: u32) {
        if !self.ranked[t][l as usize].dirty {
            return;
        }
        let mut order = core::mem::take(&mut self.ranked[t][l as usize].order);
        order.clear();
        let base = l * self.slots.experts;
        for &x in self.layered[t][l as usize].members() {
            order.push((u32::MAX - common::ordered_bits(self.beyond(l, x)), base + x));
        }
        order.sort_unstable();
        let version = self.ranked[t][l as usize].version.wrapping_add(1);
        self.ranked[t][l as usize] = Ranked {
            order,
            start: 0,
            dirty: false,
            version,
        };
        self.push_head(t, l, 0);
    }

    /// The first entry of layer `l`'s order at or after `from` that is still resident in tier
    /// `t` (entries before it that left the tier are skipped for good), as its position.
    fn next_resident(&mut self, t: usize, l: u32, from: usize) -> Option<usize> {
        let ranked = &mut self.ranked[t][l as usize];
        while ranked
            .order
            .get(ranked.start)
            .is_some_and(|&(_, e)| !self.residents[t].contains(e))
        {
            ranked.start += 1;
        }
        let ranked = &self.ranked[t][l as usize];
        (from.max(ranked.start)..ranked.order.len())
            .find(|&i| self.residents[t].contains(ranked.order[i].1))
    }

    /// The heap entry of position `i` of layer `l`'s order: the furthest next use first (an
    /// absolute time, so entries pushed at different calls compare), then the lower id.
    fn entry(&self, t: usize, l: u32, i: usize) -> Entry {
        let ranked = &self.ranked[t][l as usize];
        let (key, e) = ranked.order[i];
        let beyond = f32::from_bits((u32::MAX - key) & 0x7fff_ffff);
        let at = self.next_visit(l) as f64 + f64::from(beyond);
        Reverse((
            u64::MAX - ordered_bits64(at),
            e,
            l,
            i as u32,
            ranked.version,
        ))
    }

    /// Puts layer `l`'s first resident entry at or after `from` in tier `t`'s heap.
    fn push_head(&mut self, t: usize, l: u32, from: usize) {
        if let Some(i) = self.next_resident(t, l, from) {
            let entry = self.entry(t, l, i);
            self.heaps[t].push(entry);
        }
    }

    /// Appends to `out` up to `count` victims among tier `t`'s residents (of MoE layer
    /// `only_layer` when set) minus `excluded`: the furthest estimated next use first (ties:
    /// the lower expert-id, i.e. lower layer, then lower expert). The victims leave the tier's
    /// residents at once (the host evicts them; its remove events come later).
    /// Per request: re-sorting the layers visited or grown since the last one, then
    /// O((victims + skipped) x log layers); no allocation once the buffers are grown.
    pub fn victims(
        &mut self,
        t: u8,
        count: usize,
        excluded: &[u32],
        only_layer: Option<u32>,
        out: &mut Vec<u32>,
    ) {
        let t = t as usize;
        if t >= tier::CACHED {
            return;
        }
        self.excluded.start();
        for &e in excluded {
            self.excluded.mark(e as usize);
        }
        let m = self.slots.layers;
        for l in 0..m {
            self.rank(t, l);
        }
        if self.rekey[t] {
            self.rekey[t] = false;
            self.rebuild_heap(t);
        }
        match only_layer {
            None => self.pick_from_heap(t, count, out),
            Some(l) if l < m => {
                // One layer: its order is the victim order.
                let mut i = 0;
                while out.len() < count {
                    let Some(at) = self.next_resident(t, l, i) else {
                        break;
                    };
                    let e = self.ranked[t][l as usize].order[at].1;
                    if !self.excluded.contains(e as usize) {
                        out.push(e);
                        self.remove(e, t as u8);
                    }
                    i = at + 1;
                }
                // Its heap entry may now point at a victim: give the layer a fresh one.
                self.push_head(t, l, 0);
            }
            Some(_) => {}
        }
    }

    fn pick_from_heap(&mut self, t: usize, count: usize, out: &mut Vec<u32>) {
        let mut aside = core::mem::take(&mut self.aside);
        aside.clear();
        let mut taken = 0;
        while taken < count {
            let Some(entry) = self.heaps[t].pop() else {
                break;
            };
            let Reverse((_, e, l, i, version)) = entry;
            let i = i as usize;
            if version != self.ranked[t][l as usize].version {
                continue; // an older order of the layer: its current head is in the heap
            }
            if !self.residents[t].contains(e) {
                self.push_head(t, l, i + 1);
                continue;
            }
            if self.entry(t, l, i) != entry {
                self.push_head(t, l, i); // the layer's next visit moved: new key
                continue;
            }
            if self.excluded.contains(e as usize) {
                aside.push(entry);
                self.push_head(t, l, i + 1);
                continue;
            }
            out.push(e);
            taken += 1;
            self.remove(e, t as u8);
            self.push_head(t, l, i + 1);
        }
        // Excluded ones stay candidates for later requests.
        for entry in aside.drain(..) {
            self.heaps[t].push(entry);
        }
        self.aside = aside;
        // Entries dropped lazily pile up: rebuild from each layer's head now and then.
        if self.heaps[t].len() > 4 * self.slots.layers as usize + 64 {
            self.rebuild_heap(t);
        }
    }

    /// Tier `t`'s heap afresh: each layer's first resident entry, keyed as of now.
    fn rebuild_heap(&mut self, t: usize) {
        self.heaps[t].clear();
        for l in 0..self.slots.layers {
            self.push_head(t, l, 0);
        }
    }
}

/// A heap entry: (reversed estimate key, expert-id, layer, position in the layer's order,
/// the order's version); the smallest is the next victim.
type Entry = Reverse<(u64, u32, u32, u32, u32)>;

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

    static STATE: Global<Option<LayerCycle>> = Global::new(None);

    fn pick(policy: &mut LayerCycle, request: &VictimRequest) -> Vec<u32> {
        let mut out = Vec::with_capacity(request.count.min(1 << 16) as usize);
        policy.victims(
            request.tier as u8,
            request.count as usize,
            &request.excluded,
            request.only_layer,
            &mut out,
        );
        out
    }

    struct LayerCyclePolicy;

    impl Guest for LayerCyclePolicy {
        fn init(shape: ModelShape, _: Vec<TierCapacity>, resident: ResidentSet) -> PolicyInfo {
            // Residency carries no usage history: every expert starts unknown.
            let mut policy =
                LayerCycle::new(shape.moe_layers, shape.experts_per_layer, shape.top_k);
            for (&e, &t) in resident.experts.iter().zip(&resident.tiers) {
                policy.insert(e, t);
            }
            STATE.with(|s| *s = Some(policy));
            PolicyInfo {
                name: "layer-cycle".to_string(),
                description: "evict the furthest next use: layer cycle + decayed usage rate + \
                              loop detection"
                    .to_string(),
            }
        }

        fn on_step(facts: StepFacts, request: Option<VictimRequest>) -> Vec<u32> {
            STATE.with(|s| {
                let Some(policy) = s.as_mut() else {
                    return Vec::new();
                };
                policy.on_events(facts.step, facts.layer, &facts.events);
                request.map_or_else(Vec::new, |r| pick(policy, &r))
            })
        }

        fn victims(request: VictimRequest) -> Vec<u32> {
            STATE.with(|s| s.as_mut().map_or_else(Vec::new, |p| pick(p, &request)))
        }
    }

    export!(LayerCyclePolicy);
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::encode_event;

    trait Pick {
        /// The old candidate-list interface, for the tests: makes `cands` the device tier's
        /// residents and returns the indices into `cands` of the victims, in victim order.
        fn victims_of(&mut self, cands: &[(u32, u32)], count: usize) -> Vec<usize>;
    }

    impl Pick for LayerCycle {
        fn victims_of(&mut self, cands: &[(u32, u32)], count: usize) -> Vec<usize> {
            while let Some(&e) = self.residents[0].members().first() {
                self.remove(e, tier::DEVICE);
            }
            for &(l, e) in cands {
                if let Some(id) = self.slots.index(l, e) {
                    self.insert(id as u32, tier::DEVICE);
                }
            }
            let mut out = Vec::new();
            self.victims(tier::DEVICE, count, &[], None, &mut out);
            out.iter()
                .map(|&id| {
                    let key = self.slots.split(id).unwrap();
                    cands.iter().position(|&c| c == key).unwrap()
                })
                .collect()
        }
    }

    /// 2 layers x 4 experts, top-1.
    fn policy() -> LayerCycle {
        LayerCycle::new(2, 4, 1)
    }

    #[test]
    fn prefers_frequent_experts() {
        let mut p = policy();
        for step in 0..20 {
            let e = if step % 4 == 3 { 2 } else { 1 };
            p.on_step(step, 0, &[(0, e)]);
            p.on_step(step, 1, &[(1, 0)]);
        }
        // Serving layer 1: layer 0 expert 1 (3 of 4 visits) is kept over 2 (1 of 4) and 3 (never).
        let cands = [(0, 1), (0, 2), (0, 3)];
        assert_eq!(p.victims_of(&cands, 2), vec![2, 1]);
    }

    #[test]
    fn prefers_the_layer_that_comes_next() {
        let mut p = LayerCycle::new(3, 2, 1);
        for step in 0..10 {
            for l in 0..3 {
                p.on_step(step, l, &[(l, 0)]);
            }
        }
        // Serving layer 0: same history everywhere, so the layer needed last (0) goes first.
        p.on_step(10, 0, &[(0, 1)]);
        let cands = [(1, 0), (2, 0), (0, 0)];
        assert_eq!(p.victims_of(&cands, 3), vec![2, 1, 0]);
    }

    #[test]
    fn follows_a_loop() {
        let mut p = LayerCycle::new(1, 8, 1);
        // Period-3 loop: 0, 1, 2, 0, 1, 2, ... and expert 3 used once long ago.
        p.on_step(0, 0, &[(0, 3)]);
        for step in 1..40 {
            p.on_step(step, 0, &[(0, (step % 3) as u32)]);
        }
        // Step 39 used 0; next come 1, then 2: 2 is needed furthest ahead of the loop's experts,
        // and 3 furthest of all.
        let cands = [(0, 1), (0, 2), (0, 3)];
        assert_eq!(p.victims_of(&cands, 3), vec![2, 1, 0]);
    }

    #[test]
    fn burst_restarts_rates() {
        let mut p = LayerCycle::new(1, 16, 1);
        for step in 0..30 {
            p.on_step(step, 0, &[(0, 0)]);
        }
        let all: Vec<(u32, u32)> = (0..16).map(|e| (0, e)).collect();
        p.on_step(30, 0, &all); // a prefill: every expert
        for step in 31..34 {
            p.on_step(step, 0, &[(0, 5)]);
        }
        // Expert 0's old rate is forgotten; 5 is the only one used since the burst.
        let cands = [(0, 0), (0, 5)];
        assert_eq!(p.victims_of(&cands, 1), vec![0]);
    }

    #[test]
    fn ignores_bad_input() {
        let mut p = policy();
        p.on_step(0, 9, &[(7, 1), (0, 99), (0, 1), (0, 1)]);
        let cands = [(0, 1), (0, 1), (9, 9), (1, 3)];
        let got = p.victims_of(&cands, 4);
        assert_eq!(got.len(), 2);
        assert!(got.contains(&0) && got.contains(&3));
    }

    #[test]
    fn events_drive_residency_and_exclusion() {
        // 2 layers x 4 experts; serving layer 1, so layer 1's experts are needed furthest.
        let mut p = policy();
        let ev = |k, t, e| encode_event(k, t, e);
        p.on_events(
            0,
            1,
            &[
                ev(event::INSERT, 0, 1),
                ev(event::INSERT, 0, 5),
                ev(event::INSERT, 0, 6),
                ev(event::INSERT, 1, 2),
                ev(event::REMOVE, 0, 6),
                ev(event::ACCESS, 0, 5),
                ev(event::ACCESS, 0, 1000), // out of range
                ev(event::INSERT, 3, 7),    // bad tier
            ],
        );
        let mut out = Vec::new();
        p.victims(tier::DEVICE, 5, &[5, 9999], None, &mut out);
        assert_eq!(out, vec![1]);
        // gone from the view at once; a late remove is a no-op
        out.clear();
        p.victims(tier::DEVICE, 5, &[], Some(0), &mut out);
        assert!(out.is_empty());
        p.victims(tier::DEVICE, 5, &[], Some(1), &mut out);
        assert_eq!(out, vec![5]);
        p.on_events(1, 0, &[ev(event::REMOVE, 0, 1)]);
        out.clear();
        p.victims(tier::HOST, 5, &[], None, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        p.victims(tier::DISK, 5, &[], None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn ranked_orders_pick_what_scoring_every_resident_picks() {
        // Random steps, inserts, removes and requests on 4 layers x 8 experts: every answer
        // equals scoring every resident now (the furthest estimate first, ties to the lower id),
        // also when layers come out of turn.
        let mut p = LayerCycle::new(4, 8, 2);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for call in 0..3000u64 {
            // Mostly the layer cycle; now and then a layer out of turn (an aborted pass).
            let layer = if next(10) == 0 {
                next(4) as u32
            } else {
                (call % 4) as u32
            };
            let used: Vec<(u32, u32)> = (0..2).map(|_| (layer, next(8) as u32)).collect();
            p.on_step(call / 4, layer, &used);
            for _ in 0..3 {
                let e = next(32) as u32;
                match next(3) {
                    0 => p.remove(e, tier::DEVICE),
                    _ => p.insert(e, tier::DEVICE),
                }
            }
            let excluded: Vec<u32> = used.iter().map(|&(l, e)| l * 8 + e).collect();
            let only = (next(5) == 0).then(|| next(4) as u32);
            let mut want: Vec<(u64, u32)> = p.residents[0]
                .members()
                .iter()
                .copied()
                .filter(|e| !excluded.contains(e))
                .filter(|&e| only.is_none_or(|l| e / 8 == l))
                .map(|e| {
                    let est = f64::from(p.distance(e / 8)) + f64::from(p.beyond(e / 8, e % 8));
                    (u64::MAX - ordered_bits64(est), e)
                })
                .collect();
            want.sort_unstable();
            let count = next(5) as usize;
            let mut got = Vec::new();
            p.victims(tier::DEVICE, count, &excluded, only, &mut got);
            let want: Vec<u32> = want.iter().take(count).map(|&(_, e)| e).collect();
            assert_eq!(got, want, "call {call}");
            for e in got {
                assert!(!p.residents[0].contains(e));
            }
        }
    }
}
