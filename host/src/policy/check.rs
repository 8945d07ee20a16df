//! `moehost policy check`: load a plugin, validate it, and smoke-test it at Kimi-K2's shape.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

use super::set::AnyGuarded;
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
    /// Whether moehost calls its core module directly (`policy::direct`: a 0.2 selection,
    /// eviction or prefetch component of the plain shape wit-bindgen produces), rather than
    /// through wasmtime's generic component path (same answers, ~0.3 us more per call here).
    pub direct_calls: bool,
    /// init plus the smoke test's calls at Kimi-K2's shape, microseconds.
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

pub fn check(source: &PolicySource) -> Result<CheckReport> {
    let bytes = source.bytes()?;
    let component = load_component(&bytes, &source.describe())?;
    let kind = component.kind;
    let export = component.export.clone();
    let version = component.version.clone();
    let direct_calls = component.is_direct();
    let plugin = WasmPolicy::new(component, RuntimeLimits::default());
    let args = k2_init_args();
    let src = source.describe();
    let t0 = Instant::now();
    // Quarantined at the first failure; a selection policy is checked against its own
    // declared gap (serving holds it to --max-score-gap).
    let info =
        AnyGuarded::new(kind, Some(plugin), &src, &version, 1, f32::INFINITY).smoke(&args)?;
    Ok(CheckReport {
        source: src,
        kind,
        world: format!("moehost:policy/{kind}-policy"),
        export,
        version,
        name: {
            let mut stats = crate::policy::PolicyStats::default();
            stats.set_name(&info.name);
            stats.name
        },
        description: info.description.chars().take(1024).collect(),
        bytes: bytes.len(),
        direct_calls,
        smoke_test_us: t0.elapsed().as_secs_f64() * 1e6,
    })
}
