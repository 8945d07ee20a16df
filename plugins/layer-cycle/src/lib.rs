//! Evict the expert whose next use is furthest ahead, estimated from what an eviction policy
//! can know: the fixed cycle of MoE layers, each expert's recent usage rate in its layer, and
//! the loops that greedy decoding and repetitive text fall into. See README.md for the
//! reasoning and the measured hit rates; `plugins/tools/evict_sim.py` has the same algorithm in
//! Python (`LayerCycle`).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::vec;
use alloc::vec::Vec;
use common::{decode_event, event, ordered_bits64, powi, tier, Marks, ResidentSet, Slots};

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
    /// The lag whose loop prediction has been most precise (the first such), and its
    /// precision: kept as `q` changes.
    best: (usize, f32),
}

impl Slot {
    /// History bits aligned at visit `v` (bit j: used at visit v - j).
    #[inline]
    fn bits(&self, v: u64) -> u32 {
        let age = v - self.last.min(v);
        if self.last == 0 || age >= 32 {
            0
        } else {
            self.hist << age
        }
    }
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
            best: (1, 0.0),
        }
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
/// so the order holds until the layer is visited; a resident that joins meanwhile is put in
/// its place, and residents removed since are skipped when met. A request then merges the
/// layers' orders through their heads instead of scoring every resident.
struct Ranked {
    /// `(reversed key of the estimate beyond the distance) << 32 | expert-id`, ascending.
    order: Vec<u64>,
    /// Entries before it have left the tier.
    start: usize,
    /// The layer was visited: every estimate changed, re-score before the next request.
    dirty: bool,
    /// The order or the layer's next visit changed (or its head left): its head is stale
    /// and the layer is in its tier's `stale` list.
    stale: bool,
}

impl Ranked {
    fn stale() -> Self {
        Ranked {
            order: Vec::new(),
            start: 0,
            dirty: false,
            stale: true,
        }
    }
}

/// A winner tree over the layers' heads: the layer with the smallest `(key, id)` at the root,
/// and a changed head played up to it in log2(layers) matches (a victim costs that, not a
/// pass over every layer). A node is its winner packed as `key << 64 | id << 32 | layer`, so
/// a match is one comparison.
struct Tournament {
    /// Leaves at `leaves..2 * leaves` (layer `l` at `leaves + l`; padding leaves hold no
    /// candidate); node `i` holds the smaller of nodes `2i` and `2i + 1`.
    nodes: Vec<u128>,
    /// Per layer: its head's position in the layer's order.
    at: Vec<u32>,
    leaves: usize,
}

impl Tournament {
    fn new(layers: u32) -> Self {
        let leaves = (layers as usize).next_power_of_two().max(1);
        let mut nodes = vec![0; 2 * leaves];
        for (l, node) in nodes[leaves..].iter_mut().enumerate() {
            *node = pack(Head::default(), l as u32);
        }
        for i in (1..leaves).rev() {
            nodes[i] = nodes[2 * i].min(nodes[2 * i + 1]);
        }
        Tournament {
            nodes,
            at: vec![0; layers as usize],
            leaves,
        }
    }

    /// The layer whose head is the next victim, and that head (`key` `u64::MAX`: none).
    fn winner(&self) -> (u32, Head) {
        let l = self.nodes[1] as u32;
        (l, self.head(l))
    }

    /// Sets layer `l`'s head and replays the matches on its path.
    fn set(&mut self, l: u32, head: Head) {
        self.at[l as usize] = head.at;
        let mut i = self.leaves + l as usize;
        let mut winner = pack(head, l);
        let nodes = &mut self.nodes[..];
        nodes[i] = winner;
        while i > 1 {
            // The running winner is node i's new value: one load per match.
            let sibling = nodes[i ^ 1];
            if sibling < winner {
                winner = sibling;
            }
            i /= 2;
            nodes[i] = winner;
        }
    }

    /// Layer `l`'s head.
    fn head(&self, l: u32) -> Head {
        let node = self.nodes[self.leaves + l as usize];
        Head {
            key: (node >> 64) as u64,
            id: (node >> 32) as u32,
            at: self.at.get(l as usize).copied().unwrap_or(0),
        }
    }
}

fn pack(head: Head, l: u32) -> u128 {
    u128::from(head.key) << 64 | u128::from(head.id) << 32 | u128::from(l)
}

/// A layer's candidate victim, the first resident of its order (not excluded, during a
/// request): the smallest `(key, id)` over the layers is the next victim.
#[derive(Clone, Copy)]
struct Head {
    /// `u64::MAX - ordered_bits64(layer steps from the start until the next use)`: the
    /// furthest next use has the smallest key; `u64::MAX`: the layer has no candidate.
    key: u64,
    id: u32,
    /// Its position in the layer's order.
    at: u32,
}

impl Default for Head {
    fn default() -> Self {
        Head {
            key: u64::MAX,
            id: u32::MAX,
            at: 0,
        }
    }
}

/// An order entry: sorting these sorts by the estimate, furthest first, then by expert-id.
#[inline]
fn order_entry(beyond: f32, e: u32) -> u64 {
    u64::from(u32::MAX - common::ordered_bits(beyond)) << 32 | u64::from(e)
}

#[inline]
fn entry_id(entry: u64) -> u32 {
    entry as u32
}

/// A layer's estimate of the next use of its experts, beyond the distance to its next visit.
struct Scorer<'a> {
    decay: &'a DecayTable,
    visits: u64,
    reset_at: u64,
    view: LayerView,
    /// MoE layers: layer steps per visit.
    m: f32,
}

impl Scorer<'_> {
    /// Usage rate of `slot` now, bias-corrected for the visits since the context started.
    #[inline]
    fn rate(&self, slot: &Slot) -> f32 {
        if slot.last <= self.reset_at {
            return 0.0;
        }
        let p = slot.p * self.decay.pow(self.visits - slot.last);
        p / self.view.denom
    }

    #[inline]
    fn beyond(&self, slot: &Slot) -> f32 {
        let LayerView { lag, qb, .. } = self.view;
        let m = self.m;
        let bits = slot.bits(self.visits);
        let p = self.rate(slot);
        // Probability of a use at the next visit: the loop's guess, weighted by its precision.
        let loop_bit = ((bits >> (lag - 1)) & 1) as i32 as f32;
        let pn = qb * loop_bit + (1.0 - qb) * p;
        // Comparisons, not `f32::max`: WebAssembly has no instruction with its NaN rule, so
        // `max` is a call there. Same values (a NaN rate or estimate gives the bound).
        let by_rate = m * (1.0 - pn) / if p > FLOOR { p } else { FLOOR };
        // The loop's next use: the first of the next `lag` visits that repeats a used one, i.e.
        // the highest set bit among the last `lag` visits (bit lag - 1 - t for t = 0, 1, ...).
        let window = bits & (u32::MAX >> (32 - lag));
        let est = if window != 0 {
            let t = lag - 1 - (31 - window.leading_zeros() as usize);
            qb * m * t as i32 as f32 + (1.0 - qb) * by_rate
        } else {
            by_rate
        };
        if est > 0.0 {
            est
        } else {
            0.0
        }
    }
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
    dedup: Marks,
    scratch: Vec<u32>,
    /// The residents of the device and host tiers, as the events tell them.
    residents: [ResidentSet; tier::CACHED],
    excluded: Marks,
    /// Reused buffers: one call's accesses; a request's layers that hold excluded experts.
    accesses: Vec<(u32, u32)>,
    excluded_layers: Vec<u32>,
    /// Per cached tier: the layers whose head is stale.
    stale: [Vec<u32>; tier::CACHED],
    /// Per cached tier: its layers' heads, in a tournament for the next victim.
    heads: [Tournament; tier::CACHED],
    /// Each layer's view, refreshed at its visits (all a request needs of the layer).
    views: Vec<LayerView>,
    /// Per cached tier and layer: the residents in victim order.
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
            excluded_layers: Vec::new(),
            stale: [(0..layers).collect(), (0..layers).collect()],
            heads: [Tournament::new(layers), Tournament::new(layers)],
            ranked: [
                (0..layers).map(|_| Ranked::stale()).collect(),
                (0..layers).map(|_| Ranked::stale()).collect(),
            ],
            decay: DecayTable::new(),
        }
    }

    /// Expert-id `e` became resident in tier `t` (device, host; others ignored).
    pub fn insert(&mut self, e: u32, t: u8) {
        let (Some(set), Some((l, _))) = (self.residents.get_mut(t as usize), self.slots.split(e))
        else {
            return;
        };
        if set.insert(e) {
            if self.ranked[t as usize][l as usize].dirty {
                // Scored and put in place by the re-sort to come.
                self.ranked[t as usize][l as usize].order.push(u64::from(e));
            } else {
                // Its estimate is what a re-sort would give it: put it in its place.
                let entry = order_entry(self.scorer(l).beyond(&self.experts[e as usize]), e);
                // Entries before `start` have left the tier: the order from `start` on is the
                // one kept sorted.
                let ranked = &mut self.ranked[t as usize][l as usize];
                let at =
                    ranked.start + ranked.order[ranked.start..].partition_point(|&o| o < entry);
                ranked.order.insert(at, entry);
            }
            if self.ranked[t as usize][l as usize].order.len() > 2 * self.slots.experts as usize + 8
            {
                self.compact(t as usize, l);
            }
            self.mark_stale(t as usize, l);
        }
    }

    /// Keeps only the residents in layer `l`'s order in tier `t`, once each. A tier that gains
    /// and loses experts without victim requests (so without re-sorts) would grow its orders
    /// without end.
    #[cold]
    #[inline(never)]
    fn compact(&mut self, t: usize, l: u32) {
        let ranked = &mut self.ranked[t][l as usize];
        let residents = &self.residents[t];
        if ranked.dirty {
            // Its estimates are stale anyway (the re-sort re-scores): by id alone.
            for o in &mut ranked.order {
                *o = u64::from(entry_id(*o));
            }
            ranked.order.sort_unstable();
        }
        ranked.order.retain(|&o| residents.contains(entry_id(o)));
        ranked.order.dedup();
        ranked.start = 0;
    }

    /// Expert-id `e` left tier `t`.
    pub fn remove(&mut self, e: u32, t: u8) {
        if let Some(l) = self.leave(e, t) {
            if self.heads[t as usize].head(l).id == e {
                self.mark_stale(t as usize, l);
            }
        }
    }

    /// Takes expert-id `e` out of tier `t`'s residents; its layer when it was in.
    fn leave(&mut self, e: u32, t: u8) -> Option<u32> {
        let (Some(set), Some((l, _))) = (self.residents.get_mut(t as usize), self.slots.split(e))
        else {
            return None;
        };
        set.remove(e).then_some(l)
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

    /// The facts of one call: the layer being served and, in order, the experts accessed
    /// (layer, expert). Accesses for a layer at or before `layer` belong to `step`, those of a
    /// later layer to the previous step (a host that reports a step's accesses one call late).
    pub fn on_step(&mut self, step: u64, layer: u32, accesses: &[(u32, u32)]) {
        if layer < self.slots.layers {
            if layer != (self.current + 1) % self.slots.layers {
                // Out of turn: the layers passed over come next a cycle later.
                for t in 0..tier::CACHED {
                    for l in 0..self.slots.layers {
                        self.mark_stale(t, l);
                    }
                }
            }
            self.clock += self.distance(layer) as u64;
            self.current = layer;
            // The layer served now comes next a cycle later: its heads' keys move.
            for t in 0..tier::CACHED {
                self.mark_stale(t, layer);
            }
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
        let top_k = self.top_k as f32;
        let (experts, decay) = (&mut self.experts, &self.decay);
        let layer = &mut self.layers[l as usize];
        if layer.last_step != Some(step) {
            // A new visit: update the layer's statistics from the whole set.
            layer.last_step = Some(step);
            layer.visits += 1;
            let v = layer.visits;
            let n = used.len() as f32;
            let burst = n > BURST * layer.mean_used && n > 2.0 * top_k;
            layer.mean_used = 0.9 * layer.mean_used + 0.1 * n;
            let ring = (v % (LAGS as u64 + 1)) as usize;
            if burst {
                layer.reset_at = v;
                layer.sizes[ring] = 0;
                self.refresh_view(l);
                self.scratch = used;
                return;
            }
            // inter[p]: the experts used now that were used p visits ago too (histories are
            // sparse: visit their set bits only).
            let mut inter = [0u32; LAGS + 1];
            for &s in &used {
                let mut b = experts[s as usize].bits(v) & !1;
                while b != 0 {
                    inter[b.trailing_zeros() as usize] += 1;
                    b &= b - 1;
                }
            }
            let mut best = (1, 0.0);
            for (p, &hits) in inter.iter().enumerate().skip(1) {
                let size =
                    layer.sizes[((v + (LAGS as u64 + 1) - p as u64) % (LAGS as u64 + 1)) as usize];
                if v > p as u64 && size > 0 {
                    // Counts below 2^31 convert the same through i32, which WebAssembly does
                    // in one instruction (from u32 it takes a branchy sequence).
                    let precision = hits as i32 as f32 / size as i32 as f32;
                    layer.q[p] = LAG_DECAY * layer.q[p] + (1.0 - LAG_DECAY) * precision;
                }
                // The most precise lag, the first of equals (lag 1 when all are 0).
                if p == 1 || layer.q[p] > best.1 {
                    best = (p, layer.q[p]);
                }
            }
            layer.best = best;
            layer.sizes[ring] = used.len() as u32;
        }
        let v = layer.visits;
        for &s in &used {
            let slot = &mut experts[s as usize];
            if slot.last == v {
                continue;
            }
            let p = if slot.last > layer.reset_at {
                slot.p * decay.pow(v - slot.last)
            } else {
                0.0
            };
            *slot = Slot {
                p: p + (1.0 - DECAY),
                hist: slot.bits(v) | 1,
                last: v,
            };
        }
        self.refresh_view(l);
        self.scratch = used;
    }

    fn refresh_view(&mut self, l: u32) {
        for t in 0..tier::CACHED {
            self.ranked[t][l as usize].dirty = true;
            self.mark_stale(t, l);
        }
        let layer = &self.layers[l as usize];
        let (lag, qb) = layer.best;
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
    #[cfg(test)]
    fn beyond(&self, l: u32, x: u32) -> f32 {
        match self.slots.index(l, x) {
            Some(s) => self.scorer(l).beyond(&self.experts[s]),
            None => f32::INFINITY,
        }
    }

    /// What estimating layer `l`'s experts needs, read once for all of them.
    fn scorer(&self, l: u32) -> Scorer<'_> {
        let layer = &self.layers[l as usize];
        Scorer {
            decay: &self.decay,
            visits: layer.visits,
            reset_at: layer.reset_at,
            view: self.views[l as usize],
            m: self.slots.layers as f32,
        }
    }

    /// Puts layer `l` in tier `t`'s stale list (once).
    fn mark_stale(&mut self, t: usize, l: u32) {
        let ranked = &mut self.ranked[t][l as usize];
        if !ranked.stale {
            ranked.stale = true;
            self.stale[t].push(l);
        }
    }

    /// Re-sorts tier `t`'s residents of layer `l` if their estimates changed.
    fn rank(&mut self, t: usize, l: u32) {
        if !self.ranked[t][l as usize].dirty {
            return;
        }
        // The order holds every resident of the layer (those that joined since the last sort
        // included), and some that left, some twice: keep the residents, once each.
        let mut order = core::mem::take(&mut self.ranked[t][l as usize].order);
        let residents = &self.residents[t];
        order.retain(|&o| residents.contains(entry_id(o)));
        let scorer = self.scorer(l);
        for o in &mut order {
            let e = entry_id(*o);
            *o = order_entry(scorer.beyond(&self.experts[e as usize]), e);
        }
        order.sort_unstable();
        order.dedup();
        let ranked = &mut self.ranked[t][l as usize];
        ranked.order = order;
        ranked.start = 0;
        ranked.dirty = false;
    }

    /// Sets layer `l`'s head in tier `t` to its first candidate at or after position `from`:
    /// the first entry of its order still resident in the tier (entries before it that left
    /// are skipped for good) and, when `skip` is set, not excluded.
    fn set_head(&mut self, t: usize, l: u32, from: usize, skip: bool) {
        let next_visit = self.next_visit(l);
        let (residents, excluded) = (&self.residents[t], &self.excluded);
        let ranked = &mut self.ranked[t][l as usize];
        let order = &ranked.order;
        let mut start = ranked.start;
        while start < order.len() && !residents.contains(entry_id(order[start])) {
            start += 1;
        }
        ranked.start = start;
        let mut i = from.max(start);
        let head = loop {
            let Some(&o) = order.get(i) else {
                break Head::default();
            };
            let e = entry_id(o);
            if residents.contains(e) && !(skip && excluded.contains(e as usize)) {
                let beyond = f32::from_bits((u32::MAX - (o >> 32) as u32) & 0x7fff_ffff);
                let at = next_visit as f64 + f64::from(beyond);
                break Head {
                    key: u64::MAX - ordered_bits64(at),
                    id: e,
                    at: i as u32,
                };
            }
            i += 1;
        };
        self.heads[t].set(l, head);
    }

    /// Appends to `out` up to `count` victims among tier `t`'s residents (of MoE layer
    /// `only_layer` when set) minus `excluded`: the furthest estimated next use first (ties:
    /// the lower expert-id, i.e. lower layer, then lower expert). The victims leave the tier's
    /// residents at once (the host evicts them; its remove events come later).
    /// Per request: re-sorting the layers visited since the last one and refreshing the heads
    /// of the layers that changed, then one pass over the layers' heads per victim; no
    /// allocation once the buffers are grown.
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
        let mut stale = core::mem::take(&mut self.stale[t]);
        for &l in &stale {
            self.rank(t, l);
            self.set_head(t, l, 0, false);
            self.ranked[t][l as usize].stale = false;
        }
        stale.clear();
        self.stale[t] = stale;
        // The layers holding excluded experts take their heads past them for this request.
        self.excluded.start();
        let mut layers = core::mem::take(&mut self.excluded_layers);
        layers.clear();
        for &e in excluded {
            self.excluded.mark(e as usize);
            if let Some((l, _)) = self.slots.split(e) {
                if !layers.contains(&l) {
                    layers.push(l);
                }
            }
        }
        for &l in &layers {
            self.set_head(t, l, 0, true);
        }
        let m = self.slots.layers;
        match only_layer {
            None => self.pick_from_heads(t, count, out),
            Some(l) if l < m => {
                while out.len() < count {
                    let head = self.heads[t].head(l);
                    if head.key == u64::MAX {
                        break;
                    }
                    out.push(head.id);
                    self.take(t, l, head);
                }
            }
            Some(_) => {}
        }
        for &l in &layers {
            self.set_head(t, l, 0, false);
        }
        self.excluded_layers = layers;
    }

    /// Takes `head`, layer `l`'s head in tier `t`, as a victim: it leaves the tier and the
    /// layer's next candidate becomes the head.
    fn take(&mut self, t: usize, l: u32, head: Head) {
        self.leave(head.id, t as u8);
        self.set_head(t, l, head.at as usize + 1, true);
    }

    fn pick_from_heads(&mut self, t: usize, count: usize, out: &mut Vec<u32>) {
        while out.len() < count {
            let (l, head) = self.heads[t].winner();
            if head.key == u64::MAX {
                break;
            }
            out.push(head.id);
            self.take(t, l, head);
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
    fn orders_stay_bounded_without_requests() {
        // The host tier churns (visits, joins, departures) and is never asked for victims:
        // each layer's order keeps at most about twice its experts.
        let mut p = LayerCycle::new(2, 8, 2);
        for step in 0..2000u64 {
            let l = (step % 2) as u32;
            let e = l * 8 + (step % 8) as u32;
            p.on_step(step / 2, l, &[(l, (step % 8) as u32)]);
            p.insert(e, tier::HOST);
            p.remove(e, tier::HOST);
            p.insert(e, tier::HOST);
        }
        for ranked in &p.ranked[tier::HOST as usize] {
            assert!(ranked.order.len() <= 2 * 8 + 8, "{}", ranked.order.len());
        }
        // And the victims are still right: every resident, furthest first.
        let mut out = Vec::new();
        p.victims(tier::HOST, 100, &[], None, &mut out);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 2, 4, 6, 9, 11, 13, 15]);
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
