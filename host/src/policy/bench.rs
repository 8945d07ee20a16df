//! `moehost policy bench`: the cost of policy calls at Kimi-K2's shape (60 MoE layers x 384
//! experts, top-8, a device tier of 1,300 experts), per call and per decoded token, next to
//! native Rust doing the same work (exact top-k, LRU).
//!
//! Per decoded token and MoE layer the host makes one call of each kind: selection over one
//! token's 384 scores, eviction with the step's events and a request for 8 victims among the
//! ~1,300 resident candidates, prefetch with the routed experts and the outlook the policy
//! asks for.
//!
//! The same calls run twice: with direct calls into each plugin's core module
//! (`policy::direct`, what moehost uses for plain-shaped 0.2 components) and on wasmtime's
//! generic component path. Both must give the same answers (checked: a digest of every
//! answer), and the report gives both costs.

use anyhow::Result;
use serde::Serialize;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use super::builtin::{ExactTopK, Lru};
use super::check::k2_init_args;
use super::wasm::{load_component, RuntimeLimits, WasmPolicy};
use super::*;

#[derive(Debug, Serialize)]
pub struct KindCost {
    pub policy: String,
    pub per_call_us: f64,
    pub per_token_us: f64,
}

#[derive(Debug, Serialize)]
pub struct PolicyBenchReport {
    pub tokens: usize,
    pub moe_layers: u32,
    pub selection: KindCost,
    pub eviction: KindCost,
    pub prefetch: KindCost,
    /// All three kinds, per decoded token.
    pub total_per_token_us: f64,
    /// Native Rust exact top-k + LRU doing the same selection and eviction work, per token.
    pub native_per_token_us: f64,
    /// `total_per_token_us` as a share of a 50 ms Kimi-K2 decode step.
    pub share_of_50ms_step: f64,
    /// Whether all three plugins were called directly (`policy::direct`).
    pub direct_calls: bool,
    /// The same calls on wasmtime's generic component path, per token (the same answers).
    pub generic_path_per_token_us: f64,
}

/// A deterministic stream of routing-like facts.
struct Workload {
    rng: u64,
}

impl Workload {
    fn next(&mut self) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 16) as u32
    }

    fn scores(&mut self, e: usize) -> Vec<f32> {
        (0..e)
            .map(|_| (self.next() % 10_000) as f32 / 10_000.0)
            .collect()
    }
}

/// The benchmark's device tier: a dense membership table, so the host's side of a victim
/// request (validation) costs what the live store's does, O(victims).
struct Resident {
    shape: ModelShape,
    on: Vec<bool>,
    excluded: Vec<ExpertKey>,
}

impl Resident {
    fn new(shape: ModelShape) -> Self {
        Self {
            shape,
            on: vec![false; (shape.moe_layers * shape.experts_per_layer) as usize],
            excluded: Vec::new(),
        }
    }

    fn insert(&mut self, e: ExpertKey) {
        self.on[self.shape.id_of(e) as usize] = true;
    }

    fn remove(&mut self, e: ExpertKey) {
        self.on[self.shape.id_of(e) as usize] = false;
    }

    fn exclude(&mut self, keys: &[ExpertKey]) {
        self.excluded = keys.to_vec();
    }

    fn keys(&self) -> Vec<ExpertKey> {
        (0..self.on.len() as u32)
            .filter(|&i| self.on[i as usize])
            .filter_map(|i| self.shape.key_of(i))
            .collect()
    }

    fn layer_tiers(&self, layer: u32) -> Vec<Tier> {
        (0..self.shape.experts_per_layer)
            .map(|x| {
                if self.contains_resident(ExpertKey { layer, expert: x }) {
                    Tier::Device
                } else {
                    Tier::Disk
                }
            })
            .collect()
    }

    fn contains_resident(&self, e: ExpertKey) -> bool {
        self.shape
            .key_of(self.shape.id_of(e))
            .is_some_and(|_| self.on[self.shape.id_of(e) as usize])
    }
}

impl Candidates for Resident {
    fn contains(&self, e: ExpertKey) -> bool {
        self.contains_resident(e) && !self.excluded.contains(&e)
    }

    fn list(&self) -> Vec<ExpertKey> {
        let mut v = self.keys();
        v.retain(|k| !self.excluded.contains(k));
        v
    }
}

fn source_plugin(name: &str, generic: bool) -> Result<WasmPolicy> {
    let src = PolicySource::parse(name);
    let component = load_component(&src.bytes()?, &src.describe())?;
    Ok(WasmPolicy::new(
        if generic {
            component.generic_path()
        } else {
            component
        },
        RuntimeLimits::default(),
    ))
}

/// One pass of the benchmark's calls: seconds per kind, native seconds, a digest of every
/// answer, and whether every plugin was called directly.
struct Pass {
    selection: f64,
    eviction: f64,
    prefetch: f64,
    native: f64,
    digest: u64,
    direct: bool,
}

pub fn run(
    selection: &str,
    eviction: &str,
    prefetch: &str,
    tokens: usize,
) -> Result<PolicyBenchReport> {
    let generic = drive(selection, eviction, prefetch, tokens, true)?;
    let direct = drive(selection, eviction, prefetch, tokens, false)?;
    anyhow::ensure!(
        direct.digest == generic.digest,
        "direct calls answered differently from the generic component path"
    );
    let layers = k2_init_args().shape.moe_layers;
    let calls = (tokens * layers as usize) as f64;
    let cost = |policy: &str, t: f64| KindCost {
        policy: policy.to_owned(),
        per_call_us: t / calls * 1e6,
        per_token_us: t / tokens as f64 * 1e6,
    };
    let per_token = |p: &Pass| (p.selection + p.eviction + p.prefetch) / tokens as f64 * 1e6;
    let total = per_token(&direct);
    Ok(PolicyBenchReport {
        tokens,
        moe_layers: layers,
        selection: cost(selection, direct.selection),
        eviction: cost(eviction, direct.eviction),
        prefetch: cost(prefetch, direct.prefetch),
        total_per_token_us: total,
        native_per_token_us: direct.native / tokens as f64 * 1e6,
        share_of_50ms_step: total / 50_000.0,
        direct_calls: direct.direct,
        generic_path_per_token_us: per_token(&generic),
    })
}

fn drive(
    selection: &str,
    eviction: &str,
    prefetch: &str,
    tokens: usize,
    generic: bool,
) -> Result<Pass> {
    let mut args = k2_init_args();
    let shape = args.shape;
    let e = shape.experts_per_layer as usize;
    let k = shape.top_k;
    let layers = shape.moe_layers;
    let device_slots = args.capacities[0].slots as usize;
    // A full device tier of `device_slots` experts, spread over the layers.
    let mut resident = Resident::new(shape);
    for i in 0..device_slots as u32 {
        let key = ExpertKey {
            layer: i % layers,
            expert: (i / layers) % shape.experts_per_layer,
        };
        resident.insert(key);
    }
    args.resident = resident
        .keys()
        .into_iter()
        .map(|k| (k, Tier::Device))
        .collect();
    let init = || args.clone();

    let plugins = [selection, eviction, prefetch]
        .map(|name| source_plugin(name, generic))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let direct = plugins.iter().all(|p| p.is_direct());
    let [sp, ep, pp]: [WasmPolicy; 3] = plugins.try_into().ok().expect("three plugins");
    let mut sel = GuardedSelection::new(
        Some(Box::new(sp)),
        selection,
        "",
        3,
        crate::policy::wasm::DEFAULT_MAX_SCORE_GAP,
    );
    let exact = sel
        .init(&args)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .max_score_gap
        == 0.0;
    let mut ev = GuardedEviction::new(Some(Box::new(ep)), eviction, "", 3);
    ev.init(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pf = GuardedPrefetch::new(Some(Box::new(pp)), prefetch, "", 3);
    pf.init(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut digest = std::collections::hash_map::DefaultHasher::new();

    let mut wl = Workload {
        rng: 0x9e3779b97f4a7c15,
    };
    let (mut t_sel, mut t_ev, mut t_pf) = (0f64, 0f64, 0f64);
    let mut native_sel = ExactTopK;
    let mut native_ev = Lru::default();
    native_ev.init(&args).ok();
    let mut t_native = 0f64;
    let mut events: Vec<Event> = Vec::new();
    for step in 0..tokens as u64 {
        for layer in 0..layers {
            let scores = wl.scores(e);
            let residency = resident.layer_tiers(layer);
            let t0 = Instant::now();
            let chosen = sel.select(layer, 1, k, &scores, &residency, &init);
            t_sel += t0.elapsed().as_secs_f64();
            chosen.hash(&mut digest);
            let t0 = Instant::now();
            let native_chosen = native_sel.select(layer, 1, k, &scores, &residency).unwrap();
            t_native += t0.elapsed().as_secs_f64();
            // A cache-aware policy may substitute within its declared gap.
            debug_assert!(!exact || chosen == native_chosen);

            // The step's accesses; the misses need room in the full tier.
            let keys: Vec<ExpertKey> = chosen
                .iter()
                .map(|&x| ExpertKey { layer, expert: x })
                .collect();
            events.extend(keys.iter().map(|&expert| Event {
                kind: EventKind::Access,
                tier: Tier::Device,
                expert,
            }));
            let (hits, misses): (Vec<ExpertKey>, Vec<ExpertKey>) =
                keys.iter().partition(|k| resident.contains(**k));
            resident.exclude(&hits);
            let request = (!misses.is_empty()).then_some(VictimRequest {
                tier: Tier::Device,
                count: misses.len() as u32,
                only_layer: None,
                excluded: &hits,
                candidates: &resident,
            });
            let facts = StepFacts {
                step,
                layer,
                events: std::mem::take(&mut events),
            };
            let t0 = Instant::now();
            let victims = ev.on_step(&facts, request.as_ref(), &init);
            t_ev += t0.elapsed().as_secs_f64();
            for v in &victims {
                (v.layer, v.expert).hash(&mut digest);
            }
            let t0 = Instant::now();
            let _ = native_ev.on_step(&facts, request.as_ref());
            t_native += t0.elapsed().as_secs_f64();
            resident.exclude(&[]);
            // The victims leave, the misses arrive: reported in the next call.
            for v in victims {
                resident.remove(v);
                events.push(Event {
                    kind: EventKind::Remove,
                    tier: Tier::Device,
                    expert: v,
                });
            }
            for m in misses {
                resident.insert(m);
                events.push(Event {
                    kind: EventKind::Insert,
                    tier: Tier::Device,
                    expert: m,
                });
            }

            let outlook = (1..=pf.lookahead())
                .map(|d| {
                    let l = (layer + d) % layers;
                    Outlook {
                        layer: l,
                        scores: wl.scores(e),
                        residency: resident.layer_tiers(l),
                    }
                })
                .collect();
            let mut experts = chosen;
            experts.sort_unstable();
            let routed = RoutedStep {
                step,
                layer,
                tokens: 1,
                experts,
                outlook,
            };
            let t0 = Instant::now();
            let requests = pf.on_routed(&routed, &init);
            t_pf += t0.elapsed().as_secs_f64();
            for r in &requests {
                (r.expert.layer, r.expert.expert, r.tier.code(), r.priority).hash(&mut digest);
            }
        }
    }
    for (name, st) in [
        ("selection", sel.stats()),
        ("eviction", ev.stats()),
        ("prefetch", pf.stats()),
    ] {
        anyhow::ensure!(
            st.fallbacks == 0,
            "{name} plugin failed during the benchmark: {st:?}"
        );
    }
    Ok(Pass {
        selection: t_sel,
        eviction: t_ev,
        prefetch: t_pf,
        native: t_native,
        digest: digest.finish(),
        direct,
    })
}
