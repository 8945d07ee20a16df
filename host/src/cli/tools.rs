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
}

pub fn doctor(a: DoctorArgs) -> Result<()> {
    let DoctorArgs { model, json } = a;
    let dir = model.unwrap_or_else(bundled_model_dir);
    let report = moehost::doctor::run(&dir)?;
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
    };
    let p = moehost::plan::plan(&cfg, &opts)?;
    print_report(json, &p, |p| format!("{}\n", p.summary()))?;
    Ok(())
}
