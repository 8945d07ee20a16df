//! The machine and the plan: `doctor`, `plan`.

use anyhow::{Context, Result};
use std::path::PathBuf;

use moehost::bundled_model_dir;
use moehost::experts::tiered::parse_bytes;

use super::print_report;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Model folder whose read bandwidth stands for the disk tier (default: the bundled one).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Also write what was measured of this host's CPU (its rate of computing experts per
    /// format) to this file, for `--host-profile` (placement's price of a CPU-computed miss).
    #[arg(long)]
    pub save_profile: Option<PathBuf>,
}

pub fn doctor(a: DoctorArgs) -> Result<()> {
    let DoctorArgs {
        model,
        json,
        save_profile,
    } = a;
    let dir = model.unwrap_or_else(bundled_model_dir);
    let report = moehost::doctor::run(&dir)?;
    if let Some(path) = save_profile {
        let profile = report.host_profile();
        std::fs::write(&path, serde_json::to_string_pretty(&profile)? + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        eprintln!("host profile written to {}", path.display());
    }
    print_report(json, &report, |r| r.text())?;
    Ok(())
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// A config.json (e.g. Kimi-K2's), or a model folder holding one.
    #[arg(long)]
    pub config: PathBuf,
    /// Device memory, e.g. 80GiB.
    #[arg(long, value_parser = parse_bytes, default_value = "80GiB")]
    pub device_mem: u64,
    /// Host RAM for experts, e.g. 1TiB.
    #[arg(long, value_parser = parse_bytes, default_value = "1TiB")]
    pub host_mem: u64,
    /// Link and memory bandwidths: a `--link` preset (h100-pcie5, h100-pcie5-nvme5, h100-pcie4,
    /// local, slow-link).
    #[arg(long, default_value = "h100-pcie5")]
    pub link: String,
    /// Context tokens per sequence the KV cache holds.
    #[arg(long, default_value_t = 8192)]
    pub context: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Expert storage: bf16, fp8, int8, int4 (default: the checkpoint's).
    #[arg(long)]
    pub experts: Option<String>,
    /// Device memory kept for activations and workspace.
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    pub reserve: u64,
    /// Device-tier hit rate to assume (e.g. measured by `moehost replay`); default: the
    /// device tier's share of experts (uniform routing).
    #[arg(long)]
    pub hit_rate: Option<f64>,
    /// The hybrid path's host CPU: read-only memory bandwidth in GB/s (default: the link
    /// preset's host; `moehost doctor` measures it).
    #[arg(long)]
    pub cpu_read_gbps: Option<f64>,
    /// Cores computing experts (default: the preset's).
    #[arg(long)]
    pub cpu_cores: Option<usize>,
    /// GB/s of expert weights one core computes at decode (default: measured on this
    /// project's machine per format; `moehost bench --experts` measures yours).
    #[arg(long)]
    pub cpu_core_gbps: Option<f64>,
    /// The CPU's f32 GEMM rate in GFLOP/s, for prefill (default: the preset's).
    #[arg(long)]
    pub cpu_gflops: Option<f64>,
    /// Prompt length of the prefill figure.
    #[arg(long, default_value_t = 8192)]
    pub prompt_tokens: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn plan(a: PlanArgs) -> Result<()> {
    let PlanArgs {
        config,
        device_mem,
        host_mem,
        link,
        context,
        batch,
        experts,
        reserve,
        hit_rate,
        cpu_read_gbps,
        cpu_cores,
        cpu_core_gbps,
        cpu_gflops,
        prompt_tokens,
        json,
    } = a;
    let path = if config.is_dir() {
        config.join("config.json")
    } else {
        config
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cfg =
        moehost::ModelConfig::from_json(&text).with_context(|| format!("in {}", path.display()))?;
    anyhow::ensure!(
        batch >= 1 && context >= 1,
        "--batch and --context must be at least 1"
    );
    if let Some(h) = hit_rate {
        anyhow::ensure!(
            (0.0..=1.0).contains(&h),
            "--hit-rate must be in 0..1, got {h}"
        );
    }
    for (name, v) in [
        ("--cpu-read-gbps", cpu_read_gbps),
        ("--cpu-core-gbps", cpu_core_gbps),
        ("--cpu-gflops", cpu_gflops),
    ] {
        if let Some(v) = v {
            anyhow::ensure!(v.is_finite() && v > 0.0, "{name} must be positive, got {v}");
        }
    }
    anyhow::ensure!(
        cpu_cores != Some(0) && prompt_tokens >= 1,
        "--cpu-cores and --prompt-tokens must be at least 1"
    );
    let host = moehost::plan::HostCpu::of(moehost::hardware::preset(&link)?);
    let opts = moehost::plan::PlanOptions {
        device_bytes: device_mem,
        host_bytes: host_mem,
        link: moehost::replay::cost::Link::preset(&link)?,
        context,
        batch,
        experts: experts
            .as_deref()
            .map(moehost::weights::format::WeightFormat::parse)
            .transpose()?,
        reserve_bytes: reserve,
        hit_rate,
        cpu: Some(moehost::plan::HostCpu {
            basis: if cpu_read_gbps.or(cpu_gflops).is_some() || cpu_cores.is_some() {
                format!("{link} host, as given")
            } else {
                format!("{link} host")
            },
            read_gbps: cpu_read_gbps.unwrap_or(host.read_gbps),
            cores: cpu_cores.unwrap_or(host.cores),
            core_gbps: cpu_core_gbps,
            gflops: cpu_gflops.unwrap_or(host.gflops),
        }),
        prompt_tokens,
    };
    let p = moehost::plan::plan(&cfg, &opts)?;
    print_report(json, &p, |p| format!("{}\n", p.summary()))?;
    Ok(())
}
