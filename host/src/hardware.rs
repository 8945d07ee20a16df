//! Machine figures in one table: the `--link` presets every command takes (`generate`/`serve`
//! placement, `replay`'s cost estimate, `plan`), and Kimi-K2's expert size.
//!
//! Owns: the numbers. Does not own: what is computed from them (placement's roofline in
//! `policy::costs`, the replay lab's stall estimate in `replay::cost`, `plan`'s throughput).

use anyhow::{bail, Result};
use serde::Serialize;

/// Kimi-K2's routed expert in FP8 with its block scales: 3 x 7168 x 2048 + 3 x 896 x 4 bytes.
pub const K2_FP8_EXPERT_BYTES: u64 = 44_050_944;

/// One machine: a device (GPU, or none) behind a link, and its host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Machine {
    pub name: &'static str,
    pub description: &'static str,
    /// Host -> device copies, bytes/s (infinite: no separate device).
    pub link_bytes_per_second: f64,
    pub link_latency_seconds: f64,
    pub device_flops: f64,
    pub device_memory_bytes_per_second: f64,
    pub host_flops: f64,
    pub host_memory_bytes_per_second: f64,
    /// Cores the host computes experts with (`plan`'s hybrid path).
    pub host_cores: usize,
    /// Disk -> host sequential reads, bytes/s.
    pub disk_bytes_per_second: f64,
    /// Bytes of one activation value crossing the link (bf16 on a GPU; none without a device).
    pub activation_bytes_per_value: u32,
}

/// H100 SXM: PCIe Gen5 x16 54.8 GB/s measured pinned host -> device, HBM3 3.35 TB/s, 989
/// TFLOP/s bf16; its host a 2-socket server CPU (2 x 64 cores, 2 TFLOP/s f32, 300 GB/s DDR5).
const H100: Machine = Machine {
    name: "h100-pcie5",
    description: "H100 SXM: PCIe Gen5 x16 54.8 GB/s (measured pinned host->device), HBM3 3.35 TB/s, \
                  989 TFLOP/s bf16, NVMe Gen4 7 GB/s; host: 2-socket server CPU, 128 cores, 2 TFLOP/s, 300 GB/s DDR5",
    link_bytes_per_second: 54.8e9,
    link_latency_seconds: 10e-6,
    device_flops: 989e12,
    device_memory_bytes_per_second: 3350e9,
    host_flops: 2e12,
    host_memory_bytes_per_second: 300e9,
    host_cores: 128,
    disk_bytes_per_second: 7e9,
    activation_bytes_per_value: 2,
};

/// A small CPU on both sides of a free link.
const LOCAL: Machine = Machine {
    name: "local",
    description: "no separate device: the device tier is dequantized weights in host RAM, so a \
                  fetch costs what running from the storage format costs and placement keeps caching",
    link_bytes_per_second: f64::INFINITY,
    link_latency_seconds: 0.0,
    device_flops: 50e9,
    device_memory_bytes_per_second: 10e9,
    host_flops: 50e9,
    host_memory_bytes_per_second: 10e9,
    host_cores: 2,
    disk_bytes_per_second: 2e9,
    activation_bytes_per_value: 0,
};

/// The presets, by name (`local` is the default of `generate`/`serve`, `h100-pcie5` of `replay`
/// and `plan`).
pub const PRESETS: &[Machine] = &[
    LOCAL,
    H100,
    Machine {
        name: "h100-pcie5-nvme5",
        description: "the H100 host with an NVMe Gen5 disk (14 GB/s)",
        disk_bytes_per_second: 14e9,
        ..H100
    },
    Machine {
        name: "h100-pcie4",
        description: "the same H100 host behind PCIe Gen4 x16 (25 GB/s)",
        link_bytes_per_second: 25e9,
        ..H100
    },
    Machine {
        name: "slow-link",
        description:
            "a 1 GB/s link with a 50 GFLOP/s, 10 GB/s host: fetching rarely pays (tests, what-ifs)",
        link_bytes_per_second: 1e9,
        link_latency_seconds: 10e-6,
        activation_bytes_per_value: 4,
        ..LOCAL
    },
];

/// The preset named `name`.
pub fn preset(name: &str) -> Result<&'static Machine> {
    match PRESETS.iter().find(|m| m.name == name) {
        Some(m) => Ok(m),
        None => bail!(
            "no link preset named {name:?}; presets: {}",
            PRESETS
                .iter()
                .map(|m| m.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// GB of weights per second one core computes a decode step's experts at from their storage
/// format (`stored_dot`'s AVX-512 kernels): the low end of `moehost bench --experts` on this
/// project's 2-core machine (FP8 12-19, int4 9.4-16, int8 16-20, bf16 22-23 GB/s on 2 threads),
/// per thread. Formats the kernels do not serve decode rows first: a quarter of FP8's rate.
pub fn cpu_core_expert_gbps(format: crate::weights::format::WeightFormat) -> f64 {
    use crate::weights::format::WeightFormat;
    match format {
        WeightFormat::Fp8 => 6.0,
        WeightFormat::Int4 => 4.7,
        WeightFormat::Int8 => 8.0,
        WeightFormat::Bf16 => 11.0,
        _ => 1.5,
    }
}

/// What `moehost doctor --save-profile` measured of this host, for placement to price a miss
/// computed on the CPU at this machine's rate instead of [`cpu_core_expert_gbps`]'s constants
/// (`--host-profile`). A JSON file: `{"version": 1, "threads": 2, "cpu_expert_gbps": {"fp8":
/// 12.1, "int4": 9.8}}`, the rates in GB of weights per second with `threads` threads.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostProfile {
    pub version: u32,
    /// Threads the rates were measured with.
    pub threads: usize,
    /// Expert format name (`fp8`, `int4`, ...) -> GB of weights per second.
    pub cpu_expert_gbps: std::collections::BTreeMap<String, f64>,
}

impl HostProfile {
    pub const VERSION: u32 = 1;

    /// Reads and checks a profile; the error names the file and what is wrong.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("host profile {}: {e}", path.display()))?;
        let p: HostProfile = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "host profile {}: {e} (write one with `moehost doctor --save-profile`)",
                path.display()
            )
        })?;
        p.check()
            .map_err(|e| anyhow::anyhow!("host profile {}: {e}", path.display()))?;
        Ok(p)
    }

    fn check(&self) -> Result<()> {
        if self.version != Self::VERSION {
            bail!(
                "version {} (this moehost reads version {})",
                self.version,
                Self::VERSION
            );
        }
        if self.threads == 0 {
            bail!("threads must be at least 1");
        }
        for (name, &gbps) in &self.cpu_expert_gbps {
            crate::weights::format::WeightFormat::parse(name)?;
            if !(gbps.is_finite() && gbps > 0.0) {
                bail!("cpu_expert_gbps.{name} is {gbps}: a rate must be positive");
            }
        }
        Ok(())
    }

    /// The measured rate of one thread for `format`'s experts, GB/s, if the profile has it.
    pub fn per_thread_gbps(&self, format: crate::weights::format::WeightFormat) -> Option<f64> {
        self.cpu_expert_gbps
            .get(format.name())
            .map(|g| g / self.threads as f64)
    }
}

/// Measured, for `moehost doctor`: one Kimi-K2-shaped FP8 expert on this machine's GPU.
#[derive(Debug, Clone, Serialize)]
pub struct ExpertSpeed {
    /// Seconds per `GpuExpert::forward` at 1 and at 8 tokens (inputs up, both projections and
    /// the SwiGLU between them, outputs down).
    pub one_token_s: f64,
    pub eight_tokens_s: f64,
    /// The expert's FP8 bytes over `one_token_s`.
    pub weights_gbps: f64,
    /// `layer_step_experts` distinct experts at 1 token each in one call (a MoE layer step:
    /// one host round trip in all), its seconds and weight bytes per second.
    pub layer_step_experts: usize,
    pub layer_step_s: f64,
    pub layer_step_gbps: f64,
    /// Device-to-device copy bandwidth (bytes read + written), the memory's practical ceiling.
    pub dtod_gbps: f64,
}

/// A machine's bandwidths as the replay lab and `plan` weigh them, GB/s (10^9 bytes per
/// second); `replay --h2d-gbps/--hbm-gbps/--disk-gbps` override them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Link {
    pub name: String,
    /// Host -> device (pinned memory, copy engine).
    pub h2d_gbps: f64,
    /// Device memory.
    pub hbm_gbps: f64,
    /// Disk -> host (sequential read).
    pub disk_gbps: f64,
}

impl Link {
    /// The bandwidths of preset `name`.
    pub fn preset(name: &str) -> Result<Link> {
        let m = preset(name)?;
        Ok(Link {
            name: m.name.to_owned(),
            h2d_gbps: m.link_bytes_per_second / 1e9,
            hbm_gbps: m.device_memory_bytes_per_second / 1e9,
            disk_gbps: m.disk_bytes_per_second / 1e9,
        })
    }
}

impl Default for Link {
    fn default() -> Self {
        Link::preset("h100-pcie5").expect("the default preset exists")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_profiles_load_checked() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let good = write(
            "good.json",
            r#"{"version": 1, "threads": 2, "cpu_expert_gbps": {"fp8": 12.0, "int4": 9.0}}"#,
        );
        let p = HostProfile::load(&good).unwrap();
        use crate::weights::format::WeightFormat;
        assert_eq!(p.per_thread_gbps(WeightFormat::Fp8), Some(6.0));
        assert_eq!(p.per_thread_gbps(WeightFormat::Int4), Some(4.5));
        assert_eq!(p.per_thread_gbps(WeightFormat::Bf16), None);
        // What `doctor --save-profile` writes reads back the same.
        let again = write("again.json", &serde_json::to_string(&p).unwrap());
        assert_eq!(HostProfile::load(&again).unwrap(), p);
        for (text, says) in [
            (
                r#"{"version": 2, "threads": 2, "cpu_expert_gbps": {}}"#,
                "version 2",
            ),
            (
                r#"{"version": 1, "threads": 0, "cpu_expert_gbps": {}}"#,
                "threads",
            ),
            (
                r#"{"version": 1, "threads": 2, "cpu_expert_gbps": {"fp9": 1.0}}"#,
                "unknown weight format \"fp9\"",
            ),
            (
                r#"{"version": 1, "threads": 2, "cpu_expert_gbps": {"int8": -1.0}}"#,
                "cpu_expert_gbps.int8 is -1",
            ),
            (
                r#"{"version": 1, "threads": 2, "cpu_expert_gbps": {}, "gpu": 1}"#,
                "unknown field `gpu`",
            ),
            ("not json", "doctor --save-profile"),
        ] {
            let path = write("bad.json", text);
            let err = format!("{:#}", HostProfile::load(&path).unwrap_err());
            assert!(
                err.contains("bad.json") && err.contains(says),
                "{text}: {err}"
            );
        }
        let err = HostProfile::load(&dir.path().join("missing.json")).unwrap_err();
        assert!(err.to_string().contains("missing.json"), "{err}");
    }

    #[test]
    fn every_preset_is_found_by_its_name_once() {
        for m in PRESETS {
            assert_eq!(preset(m.name).unwrap(), m);
            assert_eq!(PRESETS.iter().filter(|p| p.name == m.name).count(), 1);
        }
        assert!(preset("pcie9")
            .unwrap_err()
            .to_string()
            .contains("slow-link"));
    }
}
