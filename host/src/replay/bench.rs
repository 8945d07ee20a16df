//! `moehost replay --bench`: replay speed in accesses per second, one replay at a time on one
//! thread, for native Belady, native LRU (`native-lru`) and each eviction plugin given (LRU as
//! a WebAssembly plugin by default), on the same traces and capacities in the same run. Best
//! of `repeats` runs. Each plugin is timed two ways: behind the host's `GuardedEviction` (as
//! in a sweep and in the live store), and bare (the floor).

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

use super::belady::Belady;
use super::engine::{simulate, Counters, SimConfig};
use super::plugin::{guarded_eviction, ContractEvictor, EvictionCalls, Native};
use super::sweep::{load_trace, Capacity, EvictionSpec, ReplayConfig};
use crate::experts::tiered::residency::Residency;
use crate::policy::wasm::WasmPolicy;

#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub trace: String,
    pub capacity: u32,
    /// `belady`, `native-lru`, or the plugin's name.
    pub policy: String,
    pub accesses: u64,
    /// (step, layer) visits = eviction policy `on-step` calls per replay.
    pub visits: u64,
    pub hit_rate: f64,
    pub best_s: f64,
    pub accesses_per_s: f64,
    /// `accesses_per_s` over native LRU's in this run.
    pub vs_native_lru: f64,
}

/// Times every engine on every trace x capacity of `cfg` (its eviction plugins; Belady and
/// native LRU are always included).
pub fn run(cfg: &ReplayConfig, repeats: usize) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let plugins: Vec<EvictionSpec> = cfg
        .evictions
        .iter()
        .filter(|e| *e != "native-lru")
        .map(|a| EvictionSpec::load(a))
        .collect::<Result<_>>()?;
    for path in &cfg.traces {
        let t = load_trace(path)?;
        let s = &t.schedule;
        s.next_use(); // the index Belady reads, built once per trace
        let pool = if cfg.per_layer {
            s.experts_per_layer
        } else {
            s.layers * s.experts_per_layer
        };
        let eb = cfg.expert_bytes.unwrap_or(s.expert_bytes);
        let shape = crate::policy::ModelShape {
            moe_layers: s.layers,
            experts_per_layer: s.experts_per_layer,
            top_k: s.top_k,
            expert_bytes: eb,
        };
        for cap in &cfg.capacities {
            let capacity = Capacity::slots(cap, pool);
            let sim = SimConfig {
                capacity,
                per_layer: cfg.per_layer,
                host_capacity: cfg.host_capacity.map(|c| c.slots(pool)),
                oracle_prefetch: false,
                expert_bytes: eb,
            };
            let args =
                Residency::new(shape, cfg.per_layer, capacity, sim.host_capacity).init_args();
            let mut timed: Vec<(String, f64, Counters)> = Vec::new();
            let best = |f: &mut dyn FnMut() -> Result<Counters>| -> Result<(f64, Counters)> {
                let mut best = f64::INFINITY;
                let mut counters = Counters::default();
                for _ in 0..repeats.max(1) {
                    let t0 = Instant::now();
                    counters = f()?;
                    best = best.min(t0.elapsed().as_secs_f64());
                }
                Ok((best, counters))
            };
            let (t, c) = best(&mut || {
                let mut b = Belady::new(s, cfg.per_layer);
                Ok(simulate(s, &sim, &mut b, None))
            })?;
            timed.push(("belady".into(), t, c));
            let (t, c) = best(&mut || {
                let mut lru = crate::policy::builtin::Lru::named("native-lru");
                crate::policy::Eviction::init(&mut lru, &args)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut calls = Native(lru);
                let mut ev = ContractEvictor::new(&mut calls, s.experts_per_layer);
                Ok(simulate(s, &sim, &mut ev, None))
            })?;
            timed.push(("native-lru".into(), t, c));
            for p in &plugins {
                let EvictionSpec::Plugin { label, component } = p else {
                    continue;
                };
                // Two ways to call the same plugin: behind the host's guard (what a sweep and
                // the live store do), and bare (the floor).
                for way in ["wasm", "wasm, unguarded"] {
                    let mut best_t = f64::INFINITY;
                    let mut counters = Counters::default();
                    for _ in 0..repeats.max(1) {
                        // Instantiation is outside the timed part.
                        let mut calls: Box<dyn EvictionCalls> = match way {
                            "wasm" => {
                                Box::new(guarded_eviction(component, label, cfg.limits, &args)?)
                            }
                            _ => {
                                let mut w = WasmPolicy::new(component.clone(), cfg.limits);
                                crate::policy::Eviction::init(&mut w, &args)
                                    .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
                                Box::new(Native(w))
                            }
                        };
                        let t0 = Instant::now();
                        counters = {
                            let mut ev = ContractEvictor::new(calls.as_mut(), s.experts_per_layer);
                            simulate(s, &sim, &mut ev, None)
                        };
                        best_t = best_t.min(t0.elapsed().as_secs_f64());
                        if let Some(st) = calls.stats() {
                            anyhow::ensure!(
                                st.fallbacks == 0,
                                "plugin {label} failed during the benchmark: {st:?}"
                            );
                        }
                    }
                    timed.push((format!("{label} ({way})"), best_t, counters));
                }
            }
            let native = timed
                .iter()
                .find(|t| t.0 == "native-lru")
                .map(|t| s.accesses() as f64 / t.1)
                .unwrap_or(1.0);
            for (policy, secs, c) in timed {
                let aps = s.accesses() as f64 / secs;
                rows.push(BenchRow {
                    trace: s.name.clone(),
                    capacity,
                    policy,
                    accesses: s.accesses(),
                    visits: s.visits.len() as u64,
                    hit_rate: c.hits as f64 / c.accesses.max(1) as f64,
                    best_s: secs,
                    accesses_per_s: aps,
                    vs_native_lru: aps / native,
                });
            }
        }
    }
    Ok(rows)
}

/// The benchmark as a text table.
pub fn text(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:<22} {:>10} {:>8} {:>9} {:>14} {:>10}\n",
        "trace", "capacity", "policy", "accesses", "hit rate", "best ms", "accesses/s", "vs native"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:>8} {:<22} {:>10} {:>8.3} {:>9.2} {:>14} {:>9.2}x\n",
            r.trace,
            r.capacity,
            r.policy,
            super::report::group(r.accesses),
            r.hit_rate,
            r.best_s * 1e3,
            super::report::group(r.accesses_per_s as u64),
            r.vs_native_lru
        ));
    }
    out
}
