//! Shadow policies: candidate eviction (and prefetch) policies that run beside an arm's live
//! ones, on the same access stream, against simulated caches of the same capacity, so their
//! hit rates compare on identical traffic without touching a live result.
//!
//! The arm's store sends every MoE layer step to a shadow thread (`TieredExperts::observe`;
//! a full channel drops the step and counts it, so serving never waits). The thread feeds
//! each candidate's simulated cache with the replay lab's rules (`replay::engine::OnlineSim`,
//! policies behind the host's guard), plus one with the live policies themselves, the
//! like-for-like baseline (the live store's own hit rate also depends on prefetch timing).
//! Owns: the thread, the candidates, their counters. Does not own: the simulation rules.

use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::experts::tiered::{ObservedStep, TieredExperts};
use crate::policy::wasm::{load_component, RuntimeLimits};
use crate::policy::{GuardedEviction, GuardedPrefetch, PolicySource};
use crate::replay::engine::{OnlineSim, Prefetcher, SimConfig};
use crate::replay::plugin::{guarded_eviction, guarded_prefetch, ContractEvictor};

/// A candidate: an eviction policy, optionally with a prefetch policy, written `EVICTION` or
/// `EVICTION+PREFETCH` (bundled names or `.wasm` paths), as in the replay lab's reports.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowSpec {
    pub eviction: PolicySource,
    pub prefetch: Option<PolicySource>,
}

impl std::str::FromStr for ShadowSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (e, p) = match s.split_once('+') {
            Some((e, p)) => (e.trim(), Some(p.trim())),
            None => (s.trim(), None),
        };
        if e.is_empty() || p.is_some_and(str::is_empty) {
            return Err(format!(
                "shadow {s:?}: expected EVICTION or EVICTION+PREFETCH, e.g. lfu+transitions"
            ));
        }
        Ok(Self {
            eviction: PolicySource::parse(e),
            prefetch: p.map(PolicySource::parse),
        })
    }
}

impl ShadowSpec {
    pub fn label(&self) -> String {
        match &self.prefetch {
            Some(p) => format!("{}+{}", self.eviction.describe(), p.describe()),
            None => self.eviction.describe(),
        }
    }
}

/// One simulated cache's counts so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShadowStats {
    /// `EVICTION[+PREFETCH]`.
    pub policy: String,
    /// The live policies' own simulation (the baseline), or a candidate.
    pub live: bool,
    pub accesses: u64,
    pub hits: u64,
    pub hit_rate: f64,
    pub prefetch_issued: u64,
    pub prefetch_used: u64,
    /// Calls the built-in policy served because the candidate failed.
    pub policy_fallbacks: u64,
}

/// The shadows of one arm.
pub struct Shadows {
    pub arm: String,
    pub device_slots: usize,
    stats: Arc<Mutex<Vec<ShadowStats>>>,
    /// Live steps the shadows missed because they fell behind.
    pub dropped_steps: Arc<AtomicU64>,
    /// Steps simulated.
    pub steps: Arc<AtomicU64>,
}

/// Live steps buffered for the shadow thread before steps are dropped.
const QUEUE: usize = 8192;

struct Candidate {
    label: String,
    live: bool,
    sim: OnlineSim,
    eviction: GuardedEviction,
    prefetch: Option<GuardedPrefetch>,
}

impl Shadows {
    /// Starts shadowing `store` (whose live policies are `live_eviction` / `live_prefetch`)
    /// with `candidates`. Every candidate is loaded and initialised here, so a bad one fails
    /// the start with its name.
    pub fn start(
        arm: &str,
        store: &TieredExperts,
        live_eviction: &PolicySource,
        live_prefetch: &PolicySource,
        candidates: &[ShadowSpec],
        limits: RuntimeLimits,
    ) -> Result<Self> {
        let shape = store.shape();
        let n = (shape.moe_layers * shape.experts_per_layer) as usize;
        let (device_slots, host_slots) = store.slots();
        let cfg = SimConfig {
            capacity: device_slots.min(n) as u32,
            per_layer: false,
            host_capacity: (host_slots < n).then_some(host_slots as u32),
            oracle_prefetch: false,
            expert_bytes: shape.expert_bytes,
        };
        let live = ShadowSpec {
            eviction: live_eviction.clone(),
            prefetch: Some(live_prefetch.clone()),
        };
        let mut built = Vec::new();
        let mut lookahead = 0;
        for (spec, is_live) in
            std::iter::once((&live, true)).chain(candidates.iter().map(|c| (c, false)))
        {
            let label = spec.label();
            let sim = OnlineSim::new(shape, cfg);
            let args = sim.init_args();
            let load = |s: &PolicySource| {
                load_component(&s.bytes()?, &s.describe())
                    .with_context(|| format!("shadow policy {label}"))
            };
            let eviction = guarded_eviction(&load(&spec.eviction)?, &label, limits, &args)?;
            let prefetch = match &spec.prefetch {
                Some(p) => {
                    let g = guarded_prefetch(&load(p)?, &label, limits, &args)?;
                    lookahead = lookahead.max(g.lookahead());
                    Some(g)
                }
                None => None,
            };
            built.push(Candidate {
                label,
                live: is_live,
                sim,
                eviction,
                prefetch,
            });
        }
        let stats = Arc::new(Mutex::new(
            built
                .iter()
                .map(|c| ShadowStats {
                    policy: c.label.clone(),
                    live: c.live,
                    ..Default::default()
                })
                .collect(),
        ));
        let dropped = Arc::new(AtomicU64::new(0));
        let steps = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::sync_channel::<ObservedStep>(QUEUE);
        let (st, sp) = (stats.clone(), steps.clone());
        let e = shape.experts_per_layer;
        std::thread::Builder::new()
            .name(format!("moehost-shadow-{arm}"))
            .spawn(move || run(built, rx, st, sp, e))
            .context("cannot start the shadow thread")?;
        store.observe(tx, lookahead, dropped.clone());
        Ok(Self {
            arm: arm.to_owned(),
            device_slots,
            stats,
            dropped_steps: dropped,
            steps,
        })
    }

    /// The counts so far, the live baseline first.
    pub fn stats(&self) -> Vec<ShadowStats> {
        self.stats.lock().unwrap().clone()
    }
}

/// The shadow thread: until the store (the sender) goes away.
fn run(
    mut candidates: Vec<Candidate>,
    rx: std::sync::mpsc::Receiver<ObservedStep>,
    stats: Arc<Mutex<Vec<ShadowStats>>>,
    steps: Arc<AtomicU64>,
    experts_per_layer: u32,
) {
    let mut parts: Vec<_> = candidates
        .iter_mut()
        .map(|c| {
            let Candidate {
                sim,
                eviction,
                prefetch,
                ..
            } = c;
            (
                sim,
                prefetch,
                ContractEvictor::new(eviction, experts_per_layer),
            )
        })
        .collect();
    while let Ok(step) = rx.recv() {
        let outlook = step.outlook.as_ref().map(|(l, s)| (*l, s.as_slice()));
        for (sim, prefetch, ev) in parts.iter_mut() {
            sim.step(
                step.step,
                step.layer,
                step.tokens,
                &step.experts,
                outlook,
                ev,
                prefetch.as_mut().map(|p| p as &mut dyn Prefetcher),
            );
        }
        steps.fetch_add(1, Ordering::Relaxed);
        let mut st = stats.lock().unwrap();
        for (s, (sim, prefetch, ev)) in st.iter_mut().zip(&parts) {
            let c = sim.counters();
            s.accesses = c.accesses;
            s.hits = c.hits;
            s.hit_rate = c.hits as f64 / c.accesses.max(1) as f64;
            s.prefetch_issued = c.prefetch_issued;
            s.prefetch_used = c.prefetch_used;
            s.policy_fallbacks = ev.stats().map_or(0, |x| x.fallbacks)
                + prefetch.as_ref().map_or(0, |p| p.stats().fallbacks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_candidates() {
        let s: ShadowSpec = "lfu+transitions".parse().unwrap();
        assert_eq!(s.eviction, PolicySource::Bundled("lfu".into()));
        assert_eq!(
            s.prefetch,
            Some(PolicySource::Bundled("transitions".into()))
        );
        assert_eq!(s.label(), "lfu+transitions");
        let s: ShadowSpec = "/tmp/x.wasm".parse().unwrap();
        assert_eq!(s.prefetch, None);
        assert!("lfu+".parse::<ShadowSpec>().is_err());
        assert!("+none".parse::<ShadowSpec>().is_err());
    }
}
