//! `replay`: routing traces through eviction and prefetch policies, next to Belady.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

use moehost::experts::tiered::parse_bytes;

use super::{parse_expert_bytes, print_report};

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// A trace file (repeat for several).
    #[arg(long = "trace", required = true)]
    pub traces: Vec<PathBuf>,
    /// A trace replayed alike but summarised apart: one the policies were not tuned on
    /// (repeatable).
    #[arg(long = "held-out")]
    pub held_out: Vec<PathBuf>,
    /// Eviction policy: bundled name (lru, lfu, layer-cycle), .wasm path, or native-lru. Repeatable.
    #[arg(long = "eviction", default_values_t = ["lru".to_string()])]
    pub evictions: Vec<String>,
    /// Prefetch policy: bundled name (none, next-layer-blend, next-layer-fill, next-layer-gate,
    /// transitions) or .wasm path. Repeatable; adds the oracle-prefetch bound.
    #[arg(long = "prefetch")]
    pub prefetches: Vec<String>,
    /// Device cache size: experts (64) or a share of the pool (10%). Repeatable or comma-separated.
    #[arg(long = "capacity", required = true, value_delimiter = ',')]
    pub capacities: Vec<String>,
    /// C slots per MoE layer instead of one pool of C for the model.
    #[arg(long)]
    pub per_layer: bool,
    /// Host tier size (same layout as --capacity); default: the host tier holds every expert.
    #[arg(long)]
    pub host_capacity: Option<String>,
    /// Expert size for the cost model (bytes, 42MiB, or k2-fp8 = 44050944); default: the trace's.
    #[arg(long, value_parser = parse_expert_bytes)]
    pub expert_bytes: Option<u64>,
    /// Cost-model preset: h100-pcie5 (NVMe Gen4 7 GB/s), h100-pcie5-nvme5 (Gen5 14 GB/s),
    /// h100-pcie4, local, slow-link.
    #[arg(long, default_value = "h100-pcie5")]
    pub link: String,
    /// Override the preset's host->device bandwidth, GB/s.
    #[arg(long)]
    h2d_gbps: Option<f64>,
    /// Override the preset's device-memory bandwidth, GB/s.
    #[arg(long)]
    pub hbm_gbps: Option<f64>,
    /// Override the preset's disk bandwidth, GB/s.
    #[arg(long)]
    pub disk_gbps: Option<f64>,
    /// Print one JSON array of rows instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Draw hit rate against capacity to OUT.svg or OUT.png.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the across-trace summary (geometric means of the ratio to Belady) to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// Measure replay speed (accesses/s) of Belady, native LRU and the eviction plugins instead.
    #[arg(long)]
    pub bench: bool,
    /// Runs per engine in --bench (the best counts).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Deadline of one policy call, milliseconds (generous: a replay must not depend on load).
    #[arg(long, default_value_t = 2000)]
    pub policy_timeout_ms: u64,
    /// Memory limit of one policy plugin, e.g. 64MiB.
    #[arg(long, value_parser = parse_bytes, default_value = "128MiB")]
    pub policy_memory: u64,
}

pub fn run(a: ReplayArgs) -> Result<()> {
    use moehost::replay::{self, Capacity, Link, ReplayConfig};
    let mut link = Link::preset(&a.link)?;
    for (v, slot, what) in [
        (a.h2d_gbps, &mut link.h2d_gbps, "--h2d-gbps"),
        (a.hbm_gbps, &mut link.hbm_gbps, "--hbm-gbps"),
        (a.disk_gbps, &mut link.disk_gbps, "--disk-gbps"),
    ] {
        if let Some(v) = v {
            anyhow::ensure!(v > 0.0 && v.is_finite(), "{what} must be positive");
            *slot = v;
            link.name = format!("{} (custom)", a.link);
        }
    }
    let mut limits = replay::sweep::replay_limits();
    limits.call_timeout = Duration::from_millis(a.policy_timeout_ms.max(1));
    limits.memory_bytes = a.policy_memory as usize;
    let cfg = ReplayConfig {
        traces: a.traces,
        held_out: a.held_out,
        evictions: a.evictions,
        prefetches: a.prefetches,
        capacities: a
            .capacities
            .iter()
            .map(|c| Capacity::parse(c))
            .collect::<Result<_>>()?,
        per_layer: a.per_layer,
        host_capacity: a
            .host_capacity
            .as_deref()
            .map(Capacity::parse)
            .transpose()?,
        expert_bytes: a.expert_bytes,
        link,
        limits,
        progress: true,
    };
    if a.bench {
        let rows = replay::bench::run(&cfg, a.repeats)?;
        print_report(a.json, &rows, |r| replay::bench::text(r))?;
        return Ok(());
    }
    let rows = replay::run(&cfg)?;
    let summary = replay::summary::summarize(&rows);
    let several = cfg.traces.len() + cfg.held_out.len() > 1;
    if a.json {
        println!("{}", replay::report::json(&rows));
    } else {
        print!("{}", replay::report::text(&rows));
        if several {
            print!("{}", replay::summary::text(&summary));
        }
    }
    if let Some(path) = &a.summary {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: u64 = rows.iter().map(|r| r.policy_fallbacks).sum();
    if failed > 0 {
        eprintln!(
            "moehost: {failed} policy calls failed and were served by the built-in policy (see policy_fallbacks)"
        );
    }
    if let Some(p) = &a.plot {
        replay::plot::plot(&rows, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}
