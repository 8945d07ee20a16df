//! A store's budgets, policy sources and device, as the command line and the server give them.

use anyhow::{Context, Result};
use serde::Serialize;

use crate::policy::wasm::RuntimeLimits;
use crate::policy::{PolicyKind, PolicySource};

use super::policies::BUILTIN_PLACEMENT;

/// Budgets and policies of a store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Device-tier budget in bytes (`None`: every expert fits).
    pub device_bytes: Option<u64>,
    /// Host-tier budget in bytes (`None`: every expert fits).
    pub host_bytes: Option<u64>,
    pub selection: PolicySource,
    pub eviction: PolicySource,
    pub prefetch: PolicySource,
    /// `cost-model` (built in) or a placement plugin.
    pub placement: PolicySource,
    /// The `LinkCosts` preset placement weighs (`local`, `h100-pcie5`, ...).
    pub link: String,
    /// Where the device tier lives and computes.
    pub device: Device,
    pub limits: RuntimeLimits,
    /// Threads serving the prefetch queue.
    pub prefetch_workers: usize,
    /// This host's measured rate of computing experts on the CPU (`moehost doctor
    /// --save-profile`); `None`: threads x the kernels' per-core constants.
    pub host_profile: Option<crate::hardware::HostProfile>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            device_bytes: None,
            host_bytes: None,
            selection: PolicySource::Bundled("topk".into()),
            eviction: PolicySource::Bundled("layer-cycle".into()),
            prefetch: PolicySource::Bundled("none".into()),
            placement: PolicySource::Bundled(BUILTIN_PLACEMENT.into()),
            link: "local".into(),
            device: Device::Cpu,
            limits: RuntimeLimits::default(),
            prefetch_workers: 2,
            host_profile: None,
        }
    }
}

/// Parses a byte size: `512MiB`, `2GiB`, `1.5GB`, `4096` (bytes), `0`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.trim().parse().with_context(|| {
        format!("invalid size {s:?}: expected a number with an optional unit, e.g. 512MiB")
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024f64.powi(2),
        "g" | "gb" => 1e9,
        "gib" => 1024f64.powi(3),
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => anyhow::bail!("invalid size {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    anyhow::ensure!(
        value >= 0.0 && value.is_finite(),
        "invalid size {s:?}: must be a non-negative number"
    );
    Ok((value * mult) as u64)
}

/// Where the device tier's experts live and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Dequantized f32 in host RAM, computed by the CPU kernels.
    Cpu,
    /// GPU memory, computed by the CUDA kernel (feature `cuda`); falls back to `Cpu`, saying
    /// why, when there is no driver, no device, or no `cuda` feature.
    Cuda,
}

impl Device {
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            other => anyhow::bail!("unknown device {other:?}: cpu or cuda"),
        }
    }
}

impl StoreConfig {
    /// Every policy kind with its source.
    pub fn sources(&self) -> [(PolicyKind, &PolicySource); 4] {
        [
            (PolicyKind::Selection, &self.selection),
            (PolicyKind::Eviction, &self.eviction),
            (PolicyKind::Prefetch, &self.prefetch),
            (PolicyKind::Placement, &self.placement),
        ]
    }

    /// The source of the `kind` policy, to read or replace.
    pub fn source_mut(&mut self, kind: PolicyKind) -> &mut PolicySource {
        match kind {
            PolicyKind::Selection => &mut self.selection,
            PolicyKind::Eviction => &mut self.eviction,
            PolicyKind::Prefetch => &mut self.prefetch,
            PolicyKind::Placement => &mut self.placement,
        }
    }

    pub(super) fn source_of(&self, kind: PolicyKind) -> PolicySource {
        let (_, source) = self
            .sources()
            .into_iter()
            .find(|(k, _)| *k == kind)
            .expect("every kind has a source");
        source.clone()
    }
}
