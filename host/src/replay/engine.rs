//! The cache simulator: one pass over a schedule with an eviction policy and, optionally, a
//! prefetch policy, following the live store's order of events (`crate::experts::tiered`) exactly.
//!
//! Per visit (one (step, layer)):
//! 1. The visit's experts are pinned; each is a hit (on the device) or a miss.
//! 2. The eviction policy is told the visit (once: `on_step`) and, when the misses need more
//!    room than is free in the pool, asked for victims among the unpinned residents.
//! 3. Device victims are demoted to the host tier (when it is limited; host victims by policy).
//! 4. Misses are loaded and cached while there is room; the rest stream through uncached.
//! 5. The prefetch policy sees the routed experts and names experts to load before the next
//!    visit; they are inserted at once (evicting by the eviction policy) and count as prefetched.

use crate::policy::{InitArgs, Outlook, PrefetchRequest, RoutedStep, Tier};

use super::schedule::{Schedule, Visit};
use crate::experts::tiered::residency::{Request, Residency};
use crate::experts::tiered::rules::{accept_prefetches, prefetch_cap, victims_wanted};

/// What an eviction policy must do in a replay. Keys are dense (`Residency::key`).
pub trait Evictor {
    /// Visit `vi` begins: `keys` are its accesses, ascending.
    fn begin_visit(&mut self, vi: usize, visit: &Visit, keys: &[u32]);
    /// Exactly once per visit, after `begin_visit`: the visit's facts and the device victim
    /// request if one is needed. Victims go to `out`.
    fn on_step(&mut self, res: &Residency, request: Option<Request>, out: &mut Vec<u32>);
    /// A further request in the same visit (host tier, or room for prefetches).
    fn victims(&mut self, res: &Residency, request: Request, out: &mut Vec<u32>);
    /// `key` became resident in `tier`.
    fn inserted(&mut self, key: u32, tier: Tier);
    /// `key` left `tier`.
    fn removed(&mut self, key: u32, tier: Tier);
}

/// What a prefetch policy must do in a replay.
pub trait Prefetcher {
    /// Layers of speculative scores it wants.
    fn lookahead(&self) -> u32;
    fn on_routed(&mut self, step: &RoutedStep, init: &dyn Fn() -> InitArgs)
        -> Vec<PrefetchRequest>;
}

/// Cache geometry of one replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Device slots: for the whole model, or per layer with `per_layer`.
    pub capacity: u32,
    pub per_layer: bool,
    /// Host slots (same layout); `None`: the host tier holds every expert.
    pub host_capacity: Option<u32>,
    /// Oracle prefetch: every load is done ahead of its access (counts as a prefetched hit).
    pub oracle_prefetch: bool,
    /// Overrides the trace's expert size in the policies' `init` (bytes).
    pub expert_bytes: u64,
}

/// The counts of one replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub accesses: u64,
    /// Accesses served by the device tier (prefetched experts included).
    pub hits: u64,
    /// Accesses that had to load on demand (streamed ones included).
    pub misses: u64,
    /// Misses served without being cached (every resident expert of the pool was pinned).
    pub streamed: u64,
    /// Device loads (demand or prefetch) found in the host tier.
    pub host_hits: u64,
    /// Device loads read from disk.
    pub host_misses: u64,
    /// Demand loads into the device tier (= misses).
    pub demand_loads: u64,
    /// Of those, read from disk.
    pub demand_disk_loads: u64,
    /// Prefetch loads into the device tier.
    pub prefetch_loads: u64,
    /// Disk reads for prefetches (into the device tier, or host-tier prefetches).
    pub prefetch_disk_loads: u64,
    /// Prefetch requests carried out (device and host tier).
    pub prefetch_issued: u64,
    /// Device prefetches accessed before leaving the tier.
    pub prefetch_used: u64,
    /// Device prefetches never accessed (evicted unused, or unused at the end).
    pub prefetch_wasted: u64,
    /// Device experts evicted.
    pub evictions: u64,
    /// Host experts evicted.
    pub host_evictions: u64,
}

/// Replays `s` through `ev` (and `pf`).
pub fn simulate(
    s: &Schedule,
    cfg: &SimConfig,
    ev: &mut dyn Evictor,
    mut pf: Option<&mut dyn Prefetcher>,
) -> Counters {
    let shape = crate::policy::ModelShape {
        moe_layers: s.layers,
        experts_per_layer: s.experts_per_layer,
        top_k: s.top_k,
        expert_bytes: cfg.expert_bytes,
    };
    let mut sim = Sim::new(shape, cfg);
    for (vi, v) in s.visits.iter().enumerate() {
        let keys = s.keys_of(v);
        sim.visit(vi, v, keys, cfg, ev);
        if let Some(p) = pf.as_deref_mut() {
            sim.prefetch(s, v, keys, ev, p);
        }
        for &k in keys {
            sim.res.pinned.clear(k);
        }
    }
    let n = s.n_keys() as u32;
    sim.prefetched
        .for_each_in(0, n, &[], |_| sim.c.prefetch_wasted += 1);
    sim.c
}

struct Sim {
    res: Residency,
    c: Counters,
    /// Prefetched into the device tier and not accessed yet.
    prefetched: crate::experts::tiered::residency::BitSet,
    misses: Vec<u32>,
    victims: Vec<u32>,
    demote: Vec<u32>,
}

impl Sim {
    fn new(shape: crate::policy::ModelShape, cfg: &SimConfig) -> Self {
        Sim {
            res: Residency::new(shape, cfg.per_layer, cfg.capacity, cfg.host_capacity),
            c: Counters::default(),
            prefetched: crate::experts::tiered::residency::BitSet::new(
                (shape.moe_layers * shape.experts_per_layer) as usize,
            ),
            misses: Vec::new(),
            victims: Vec::new(),
            demote: Vec::new(),
        }
    }

    fn visit(&mut self, vi: usize, v: &Visit, keys: &[u32], cfg: &SimConfig, ev: &mut dyn Evictor) {
        for &k in keys {
            self.res.pinned.set(k);
        }
        ev.begin_visit(vi, v, keys);
        self.misses.clear();
        let mut resident_hits = 0u32;
        for &k in keys {
            if self.res.on_device(k) {
                self.c.hits += 1;
                resident_hits += 1;
                if self.prefetched.has(k) {
                    self.prefetched.clear(k);
                    self.c.prefetch_used += 1;
                }
            } else {
                self.misses.push(k);
            }
        }
        self.c.accesses += keys.len() as u64;
        // Every key of a visit is in the same layer, so in the same pool.
        let pool = self.res.pool_of(keys[0]);
        let free = self.res.device_free(pool);
        let want = self.misses.len() as u32;
        let candidates = self.res.device_count(pool) - resident_hits;
        let request = victims_wanted(want as usize, free as usize, candidates as usize)
            .map(|count| Request::device(pool, count, false));
        let mut victims = std::mem::take(&mut self.victims);
        victims.clear();
        ev.on_step(&self.res, request, &mut victims);
        self.evict(&victims, ev);
        self.victims = victims;
        self.admit_host(ev);
        let room = self.res.device_free(pool) as usize;
        for n in 0..self.misses.len() {
            let k = self.misses[n];
            let on_host = self.res.on_host(k);
            if on_host {
                self.c.host_hits += 1;
            } else {
                self.c.host_misses += 1;
            }
            let cached = n < room;
            if cached {
                self.res.insert(k, Tier::Device);
                ev.inserted(k, Tier::Device);
            } else {
                self.c.streamed += 1;
            }
            if cfg.oracle_prefetch && cached {
                self.c.hits += 1;
                self.c.prefetch_issued += 1;
                self.c.prefetch_used += 1;
                self.c.prefetch_loads += 1;
                self.c.prefetch_disk_loads += u64::from(!on_host);
            } else {
                self.c.misses += 1;
                self.c.demand_loads += 1;
                self.c.demand_disk_loads += u64::from(!on_host);
            }
        }
    }

    /// The eviction policy's victims for `request`, which leaves out `marked` (the experts the
    /// room is for).
    fn victims_sparing(
        &mut self,
        request: Request,
        marked: &[u32],
        ev: &mut dyn Evictor,
    ) -> Vec<u32> {
        self.res.extra.set_all(marked.iter().copied(), true);
        let mut victims = Vec::new();
        ev.victims(&self.res, request, &mut victims);
        self.res.extra.set_all(marked.iter().copied(), false);
        victims
    }

    /// Removes device victims; queues them for the host tier.
    fn evict(&mut self, victims: &[u32], ev: &mut dyn Evictor) {
        for &k in victims {
            let removed = self.res.remove(k, Tier::Device);
            assert!(removed, "victim {k} was not resident");
            self.c.evictions += 1;
            ev.removed(k, Tier::Device);
            if self.prefetched.has(k) {
                self.prefetched.clear(k);
                self.c.prefetch_wasted += 1;
            }
            if self.res.host_cap.is_some_and(|c| c > 0) && !self.res.on_host(k) {
                self.demote.push(k);
            }
        }
    }

    /// Puts the demoted experts into the host tier, evicting by policy when it is full.
    fn admit_host(&mut self, ev: &mut dyn Evictor) {
        let Some(cap) = self.res.host_cap else {
            return;
        };
        if self.demote.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.demote);
        // Victims of one request share a pool.
        let pool = self.res.pool_of(keys[0]);
        let free = cap.saturating_sub(self.res.host_count(pool)) as usize;
        let mut room = free;
        let candidates = self.res.host_count(pool) as usize;
        if let Some(count) = victims_wanted(keys.len(), free, candidates) {
            let victims = self.victims_sparing(Request::host(pool, count), &keys, ev);
            for v in victims {
                if self.res.remove(v, Tier::Host) {
                    room += 1;
                    self.c.host_evictions += 1;
                    ev.removed(v, Tier::Host);
                }
            }
        }
        for &k in keys.iter().take(room) {
            self.res.insert(k, Tier::Host);
            ev.inserted(k, Tier::Host);
        }
        self.demote = keys;
        self.demote.clear();
    }

    /// The prefetch policy's turn after visit `v` (see the module doc).
    fn prefetch(
        &mut self,
        s: &Schedule,
        v: &Visit,
        keys: &[u32],
        ev: &mut dyn Evictor,
        pf: &mut dyn Prefetcher,
    ) {
        let outlook = if s.speculative.is_some() && pf.lookahead() > 0 && v.layer + 1 < s.layers {
            let next = v.layer + 1;
            vec![Outlook {
                layer: next,
                scores: s
                    .speculative_rows(v, next)
                    .expect("trace has speculative scores"),
                residency: self.res.layer_tiers(next),
            }]
        } else {
            Vec::new()
        };
        self.prefetch_with(s.top_k, s.experts_per_layer, v, keys, outlook, ev, pf);
    }

    /// The prefetch policy's turn with a given outlook (a replay's, or a live step's).
    #[allow(clippy::too_many_arguments)]
    fn prefetch_with(
        &mut self,
        top_k: u32,
        e: u32,
        v: &Visit,
        keys: &[u32],
        outlook: Vec<Outlook>,
        ev: &mut dyn Evictor,
        pf: &mut dyn Prefetcher,
    ) {
        let step = RoutedStep {
            step: v.step,
            layer: v.layer,
            tokens: v.tokens,
            experts: keys.iter().map(|&k| k % e).collect(),
            outlook,
        };
        let res = &self.res;
        let reqs = pf.on_routed(&step, &|| res.init_args());
        if reqs.is_empty() {
            return;
        }
        // As the store: highest priority first, each (expert, tier) once, at most one layer
        // step's worth of each tier.
        let res = &self.res;
        let accepted = accept_prefetches(
            reqs,
            prefetch_cap(top_k as usize, v.tokens as usize),
            |e| res.dense(e).is_none_or(|k| res.on_device(k)),
            |e| res.dense(e).is_none_or(|k| res.on_host(k)),
        );
        let device: Vec<u32> = accepted
            .device
            .iter()
            .filter_map(|r| res.dense(r.expert))
            .collect();
        let host: Vec<u32> = accepted
            .host
            .iter()
            .filter_map(|r| res.dense(r.expert))
            .collect();
        // Device requests, pool by pool in order of first appearance.
        let mut pools: Vec<u32> = Vec::new();
        for &k in &device {
            let p = self.res.pool_of(k);
            if !pools.contains(&p) {
                pools.push(p);
            }
        }
        for pool in pools {
            let wanted: Vec<u32> = device
                .iter()
                .copied()
                .filter(|&k| self.res.pool_of(k) == pool)
                .collect();
            let free = self.res.device_free(pool) as usize;
            let mut room = free;
            let pinned_here = keys
                .iter()
                .filter(|&&k| self.res.pool_of(k) == pool && self.res.on_device(k))
                .count();
            let candidates = self.res.device_count(pool) as usize - pinned_here;
            if let Some(count) = victims_wanted(wanted.len(), free, candidates) {
                let victims = self.victims_sparing(Request::device(pool, count, true), &wanted, ev);
                let before = self.res.device_count(pool);
                self.evict(&victims, ev);
                room += (before - self.res.device_count(pool)) as usize;
                self.admit_host(ev);
            }
            for &k in wanted.iter().take(room) {
                self.res.insert(k, Tier::Device);
                ev.inserted(k, Tier::Device);
                self.prefetched.set(k);
                self.c.prefetch_issued += 1;
                self.c.prefetch_loads += 1;
                if self.res.on_host(k) {
                    self.c.host_hits += 1;
                } else {
                    self.c.host_misses += 1;
                    self.c.prefetch_disk_loads += 1;
                }
            }
        }
        if let Some(cap) = self.res.host_cap {
            for k in host {
                if self.res.host_count(self.res.pool_of(k)) < cap {
                    self.res.insert(k, Tier::Host);
                    ev.inserted(k, Tier::Host);
                    self.c.prefetch_issued += 1;
                    self.c.prefetch_disk_loads += 1;
                }
            }
        }
    }
}

/// A simulated cache fed one live layer step at a time (the server's shadow policies): the
/// same rules as [`simulate`], on an access stream that is not known in advance.
pub struct OnlineSim {
    sim: Sim,
    cfg: SimConfig,
    visits: usize,
}

impl OnlineSim {
    pub fn new(shape: crate::policy::ModelShape, cfg: SimConfig) -> Self {
        Self {
            sim: Sim::new(shape, &cfg),
            cfg,
            visits: 0,
        }
    }

    /// What a policy's `init` gets now.
    pub fn init_args(&self) -> InitArgs {
        self.sim.res.init_args()
    }

    /// One layer step: `experts` are the distinct experts the step routed to at MoE `layer`,
    /// ascending; `outlook` the next MoE layer's speculative scores, when the live store had
    /// them. Out-of-range experts are ignored.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        step: u64,
        layer: u32,
        tokens: u32,
        experts: &[u32],
        outlook: Option<(u32, &[f32])>,
        ev: &mut dyn Evictor,
        pf: Option<&mut dyn Prefetcher>,
    ) {
        let shape = self.sim.res.shape;
        let e = shape.experts_per_layer;
        if layer >= shape.moe_layers {
            return;
        }
        let keys: Vec<u32> = experts
            .iter()
            .filter(|&&x| x < e)
            .map(|&x| layer * e + x)
            .collect();
        if keys.is_empty() {
            return;
        }
        let v = Visit {
            step,
            layer,
            tokens,
            first_token: 0,
            start: 0,
            end: keys.len() as u32,
        };
        let vi = self.visits;
        self.visits += 1;
        self.sim.visit(vi, &v, &keys, &self.cfg, ev);
        if let Some(pf) = pf {
            let outlook = match outlook {
                Some((l, scores)) if pf.lookahead() > 0 && l < shape.moe_layers => {
                    vec![Outlook {
                        layer: l,
                        scores: scores.to_vec(),
                        residency: self.sim.res.layer_tiers(l),
                    }]
                }
                _ => Vec::new(),
            };
            self.sim
                .prefetch_with(shape.top_k, e, &v, &keys, outlook, ev, pf);
        }
        for &k in &keys {
            self.sim.res.pinned.clear(k);
        }
    }

    /// The counts so far (prefetched experts not used yet are not counted as wasted).
    pub fn counters(&self) -> &Counters {
        &self.sim.c
    }
}
