//! `moehost policy bench`: the cost of policy calls at Kimi-K2's shape (60 MoE layers x 384
//! experts, top-8, a device tier of 1,300 experts), per call and per decoded token, next to
//! native Rust doing the same work (exact top-k, LRU).
//!
//! Per decoded token and MoE layer the host makes one call of each kind: selection over one
//! token's 384 scores, eviction with the step's events and a request for 8 victims among the
//! ~1,300 resident candidates, prefetch with the routed experts and the outlook the policy
//! asks for.

use anyhow::Result;
use serde::Serialize;
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

fn source_plugin(name: &str) -> Result<WasmPolicy> {
    let src = PolicySource::parse(name);
    Ok(WasmPolicy::new(
        load_component(&src.bytes()?, &src.describe())?,
        RuntimeLimits::default(),
    ))
}

pub fn run(
    selection: &str,
    eviction: &str,
    prefetch: &str,
    tokens: usize,
) -> Result<PolicyBenchReport> {
    let args = k2_init_args();
    let shape = args.shape;
    let e = shape.experts_per_layer as usize;
    let k = shape.top_k;
    let layers = shape.moe_layers;
    let device_slots = args.capacities[0].slots as usize;
    let init = || args.clone();

    let mut sel =
        GuardedSelection::new(Some(Box::new(source_plugin(selection)?)), selection, "", 3);
    sel.init(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut ev = GuardedEviction::new(Some(Box::new(source_plugin(eviction)?)), eviction, "", 3);
    ev.init(&args).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut pf = GuardedPrefetch::new(Some(Box::new(source_plugin(prefetch)?)), prefetch, "", 3);
    pf.init(&args).map_err(|e| anyhow::anyhow!("{e}"))?;

    // A resident set of `device_slots` experts, rotated as victims leave.
    let mut wl = Workload {
        rng: 0x9e3779b97f4a7c15,
    };
    let mut resident: Vec<ExpertKey> = (0..device_slots as u32)
        .map(|i| ExpertKey {
            layer: i % layers,
            expert: (i / layers) % shape.experts_per_layer,
        })
        .collect();
    let residency = vec![Tier::Disk; e];
    let (mut t_sel, mut t_ev, mut t_pf) = (0f64, 0f64, 0f64);
    let mut native_sel = ExactTopK;
    let mut native_ev = Lru::default();
    native_ev.init(&args).ok();
    let mut t_native = 0f64;
    for step in 0..tokens as u64 {
        for layer in 0..layers {
            let scores = wl.scores(e);
            let t0 = Instant::now();
            let chosen = sel.select(layer, 1, k, &scores, &residency, &init);
            t_sel += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let native_chosen = native_sel.select(layer, 1, k, &scores, &residency).unwrap();
            t_native += t0.elapsed().as_secs_f64();
            debug_assert_eq!(chosen.len(), native_chosen.len());

            let keys: Vec<ExpertKey> = chosen
                .iter()
                .map(|&x| ExpertKey { layer, expert: x })
                .collect();
            let mut events: Vec<Event> = keys
                .iter()
                .map(|&expert| Event {
                    kind: EventKind::Access,
                    tier: Tier::Device,
                    expert,
                })
                .collect();
            events.extend(keys.iter().map(|&expert| Event {
                kind: EventKind::Insert,
                tier: Tier::Device,
                expert,
            }));
            let facts = StepFacts {
                step,
                layer,
                events,
            };
            let request = VictimRequest {
                tier: Tier::Device,
                count: k,
                candidates: resident.clone(),
            };
            let t0 = Instant::now();
            let victims = ev.on_step(&facts, Some(&request), &init);
            t_ev += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let _ = native_ev.on_step(&facts, Some(&request));
            t_native += t0.elapsed().as_secs_f64();
            // Replace the victims with this step's experts.
            resident.retain(|r| !victims.contains(r));
            for key in keys.iter().take(victims.len()) {
                resident.push(*key);
            }

            let outlook = (1..=pf.lookahead())
                .map(|d| Outlook {
                    layer: (layer + d) % layers,
                    scores: wl.scores(e),
                    residency: residency.clone(),
                })
                .collect();
            let routed = RoutedStep {
                step,
                layer,
                tokens: 1,
                experts: chosen,
                outlook,
            };
            let t0 = Instant::now();
            let _ = pf.on_routed(&routed, &init);
            t_pf += t0.elapsed().as_secs_f64();
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
    let calls = (tokens * layers as usize) as f64;
    let cost = |policy: &str, t: f64| KindCost {
        policy: policy.to_owned(),
        per_call_us: t / calls * 1e6,
        per_token_us: t / tokens as f64 * 1e6,
    };
    let total = (t_sel + t_ev + t_pf) / tokens as f64 * 1e6;
    Ok(PolicyBenchReport {
        tokens,
        moe_layers: layers,
        selection: cost(selection, t_sel),
        eviction: cost(eviction, t_ev),
        prefetch: cost(prefetch, t_pf),
        total_per_token_us: total,
        native_per_token_us: t_native / tokens as f64 * 1e6,
        share_of_50ms_step: total / 50_000.0,
    })
}
