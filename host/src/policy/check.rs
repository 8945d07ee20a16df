//! `moehost policy check`: load a plugin, validate it, and smoke-test it at Kimi-K2's shape.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

use super::wasm::{load_component, RuntimeLimits, WasmPolicy};
use super::*;

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub kind: PolicyKind,
    /// The world it implements, e.g. `moehost:policy/eviction-policy`.
    pub world: String,
    /// The exported interface and its version.
    pub export: String,
    pub version: String,
    pub name: String,
    pub description: String,
    pub bytes: usize,
    /// init plus one representative call at Kimi-K2's shape, microseconds.
    pub smoke_test_us: f64,
}

/// Kimi-K2's shape: 60 MoE layers x 384 experts, top-8, 44,050,944-byte FP8 experts.
pub fn k2_init_args() -> InitArgs {
    InitArgs {
        shape: ModelShape {
            moe_layers: 60,
            experts_per_layer: 384,
            top_k: 8,
            expert_bytes: 44_050_944,
        },
        capacities: vec![
            TierCapacity {
                tier: Tier::Device,
                slots: 1300,
                bytes: 1300 * 44_050_944,
            },
            TierCapacity {
                tier: Tier::Host,
                slots: 23_040,
                bytes: 23_040 * 44_050_944,
            },
            TierCapacity {
                tier: Tier::Disk,
                slots: 23_040,
                bytes: 23_040 * 44_050_944,
            },
        ],
        resident: vec![],
    }
}

fn smoke_failed(e: PolicyError) -> anyhow::Error {
    anyhow::anyhow!("smoke test failed: {e}")
}

pub fn check(source: &PolicySource) -> Result<CheckReport> {
    let bytes = source.bytes()?;
    let component = load_component(&bytes, &source.describe())?;
    let kind = component.kind;
    let export = component.export.clone();
    let version = component.version.clone();
    let mut plugin = WasmPolicy::new(component, RuntimeLimits::default());
    let args = k2_init_args();
    let e = args.shape.experts_per_layer as usize;
    let scores: Vec<f32> = (0..e).map(|i| ((i * 7919) % e) as f32 / e as f32).collect();
    let (info, t0) = match kind {
        PolicyKind::Selection => {
            let info = Selection::init(&mut plugin, &args).map_err(smoke_failed)?;
            let t0 = Instant::now();
            let mut g = GuardedSelection::new(Some(Box::new(plugin)), "", "", 1);
            g.init(&args).map_err(smoke_failed)?;
            g.select(0, 1, 8, &scores, &vec![Tier::Disk; e], &|| args.clone());
            anyhow::ensure!(
                g.stats().fallbacks == 0,
                "smoke test failed: its answer was rejected or it trapped"
            );
            (info.info, t0)
        }
        PolicyKind::Eviction => {
            let info = Eviction::init(&mut plugin, &args).map_err(smoke_failed)?;
            let t0 = Instant::now();
            let mut g = GuardedEviction::new(Some(Box::new(plugin)), "", "", 1);
            g.init(&args).map_err(smoke_failed)?;
            let facts = StepFacts {
                step: 1,
                layer: 0,
                events: (0..8)
                    .map(|x| Event {
                        kind: EventKind::Access,
                        tier: Tier::Device,
                        expert: ExpertKey {
                            layer: 0,
                            expert: x,
                        },
                    })
                    .collect(),
            };
            let req = VictimRequest {
                tier: Tier::Device,
                count: 8,
                candidates: (8..64)
                    .map(|x| ExpertKey {
                        layer: 1,
                        expert: x,
                    })
                    .collect(),
            };
            g.on_step(&facts, Some(&req), &|| args.clone());
            anyhow::ensure!(
                g.stats().fallbacks == 0,
                "smoke test failed: its answer was rejected or it trapped"
            );
            (info, t0)
        }
        PolicyKind::Prefetch => {
            let info = Prefetch::init(&mut plugin, &args).map_err(smoke_failed)?;
            let t0 = Instant::now();
            let mut g = GuardedPrefetch::new(Some(Box::new(plugin)), "", "", 1);
            g.init(&args).map_err(smoke_failed)?;
            let step = RoutedStep {
                step: 1,
                layer: 0,
                tokens: 1,
                experts: (0..8).collect(),
                outlook: (1..=info.lookahead.min(guard::MAX_LOOKAHEAD))
                    .map(|l| Outlook {
                        layer: l,
                        scores: scores.clone(),
                        residency: vec![Tier::Disk; e],
                    })
                    .collect(),
            };
            g.on_routed(&step, &|| args.clone());
            anyhow::ensure!(
                g.stats().fallbacks == 0,
                "smoke test failed: its answer was rejected or it trapped"
            );
            (info.info, t0)
        }
    };
    Ok(CheckReport {
        source: source.describe(),
        kind,
        world: format!("moehost:policy/{kind}-policy"),
        export,
        version,
        name: info.name,
        description: info.description,
        bytes: bytes.len(),
        smoke_test_us: t0.elapsed().as_secs_f64() * 1e6,
    })
}
