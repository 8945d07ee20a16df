//! The `moehost` command line, one file per command family; this file holds what several
//! share: the model, budget and policy flags, a text in windows, and small parsers.

pub mod compress;
pub mod generate;
pub mod policy;
pub mod replay;
pub mod serve;
pub mod tools;
pub mod trace;

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moehost::experts::tiered::{parse_bytes, StoreConfig, TieredExperts};
use moehost::policy::PolicySource;
use moehost::{bundled_model_dir, Engine};

/// Model folder, memory budgets and policies: shared by the commands that run the model.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json); default: the bundled tiny-k2.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Device-tier budget for routed experts (compute-ready: on the CPU f32, or bf16 as stored; in GPU memory their storage format), e.g. 512MiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    pub device_mem: Option<u64>,
    /// Host-tier budget for routed experts (storage format), e.g. 2GiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    pub host_mem: Option<u64>,
    /// Expert-selection policy: a bundled name (topk, cache-aware) or a .wasm path.
    #[arg(long, default_value = "topk")]
    pub selection: String,
    /// Eviction policy: a bundled name (layer-cycle, lru, lfu) or a .wasm path.
    #[arg(long, default_value = "layer-cycle")]
    pub eviction: String,
    /// Prefetch policy: a bundled name (none, next-layer-blend, next-layer-fill,
    /// next-layer-gate, transitions) or a .wasm path.
    #[arg(long, default_value = "none")]
    pub prefetch: String,
    /// Placement of experts missing from the device tier (fetch, or run from the host tier):
    /// cost-model (built in), a bundled plugin (hot-fetch) or a .wasm path.
    #[arg(long, default_value = "cost-model")]
    pub placement: String,
    /// Where the device tier lives and computes: cpu, or cuda (a `--features cuda` build with a
    /// driver; otherwise it says why and runs on the CPU).
    #[arg(long, default_value = "cpu", value_parser = moehost::experts::tiered::Device::parse)]
    pub device: moehost::experts::tiered::Device,
    /// Link and compute figures placement weighs: local (no separate device: always fetch),
    /// h100-pcie5, h100-pcie5-nvme5, h100-pcie4, slow-link.
    #[arg(long, default_value = "local")]
    pub link: String,
    /// A host profile written by `moehost doctor --save-profile`: placement prices a miss
    /// computed on this CPU at the rate measured for the checkpoint's expert format (default:
    /// the threads times the kernels' per-core rate on this project's reference machine).
    #[arg(long)]
    pub host_profile: Option<PathBuf>,
    /// Deadline of one policy call, milliseconds.
    #[arg(long, default_value_t = 10)]
    pub policy_timeout_ms: u64,
    /// Memory limit of one policy plugin, e.g. 64MiB.
    #[arg(long, value_parser = parse_bytes, default_value = "128MiB")]
    pub policy_memory: u64,
    /// The most a selection policy may substitute: each expert it picks must score within this
    /// of the token's k-th best selection score, whatever gap it declares (0: exact routing).
    #[arg(long, default_value_t = moehost::policy::wasm::DEFAULT_MAX_SCORE_GAP, value_parser = parse_gap)]
    pub max_score_gap: f32,
    /// Time all policies together may take per token, microseconds: warned once (and flagged
    /// in /metrics) when their recent mean passes 80% of it.
    #[arg(long, default_value_t = moehost::policy::budget::DEFAULT_TOKEN_BUDGET_US)]
    pub policy_budget_us: f64,
    /// Print the store's and policies' counters as JSON (after the normal output).
    #[arg(long)]
    pub stats: bool,
}

impl ModelArgs {
    pub fn store_config(&self) -> Result<StoreConfig> {
        let mut c = StoreConfig {
            device_bytes: self.device_mem,
            host_bytes: self.host_mem,
            selection: PolicySource::parse(&self.selection),
            eviction: PolicySource::parse(&self.eviction),
            prefetch: PolicySource::parse(&self.prefetch),
            placement: PolicySource::parse(&self.placement),
            link: self.link.clone(),
            device: self.device,
            ..Default::default()
        };
        c.limits.call_timeout = Duration::from_millis(self.policy_timeout_ms.max(1));
        c.limits.memory_bytes = self.policy_memory as usize;
        c.limits.max_score_gap = self.max_score_gap;
        c.limits.token_budget_us = self.policy_budget_us;
        c.host_profile = self
            .host_profile
            .as_deref()
            .map(moehost::hardware::HostProfile::load)
            .transpose()?;
        Ok(c)
    }

    /// Prints the store's and policies' counters as JSON when `--stats` asks for them.
    pub fn print_stats(&self, store: &TieredExperts) -> Result<()> {
        if self.stats {
            println!("{}", serde_json::to_string(&store.stats())?);
        }
        Ok(())
    }

    /// Opens the model with the tiered store; policies given as files are watched and
    /// hot-swapped when they change.
    pub fn open(&self) -> Result<(Engine, Arc<TieredExperts>)> {
        self.open_with(&self.store_config()?)
    }

    /// [`ModelArgs::open`] with the store configuration already built (`serve` needs it too:
    /// built once, its files are read once).
    pub fn open_with(&self, config: &StoreConfig) -> Result<(Engine, Arc<TieredExperts>)> {
        let dir = self.model.clone().unwrap_or_else(bundled_model_dir);
        let (engine, store) = Engine::open_tiered(&dir, config)?;
        let mtp = engine.model.config().num_nextn_predict_layers;
        if mtp > 0 {
            eprintln!(
                "moehost: not loading the {mtp} multi-token-prediction layer(s) \
                 (model.layers.{}.*): they only draft tokens for speculative decoding",
                engine.model.config().num_hidden_layers
            );
        }
        for (kind, src) in config.sources() {
            if let PolicySource::File(path) = src {
                store.watch_policy(kind, path)?;
            }
        }
        Ok((engine, store))
    }
}

pub fn parse_gap(s: &str) -> Result<f32> {
    let g: f32 = s
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    anyhow::ensure!(
        g.is_finite() && g >= 0.0,
        "--max-score-gap must be finite and >= 0"
    );
    Ok(g)
}

pub fn parse_expert_bytes(s: &str) -> Result<u64> {
    if s.eq_ignore_ascii_case("k2-fp8") {
        Ok(moehost::replay::K2_FP8_EXPERT_BYTES)
    } else {
        parse_bytes(s)
    }
}

pub fn open(model: Option<PathBuf>) -> Result<Engine> {
    let dir = model.unwrap_or_else(bundled_model_dir);
    Engine::open(&dir)
}

pub fn bits_of(s: &str) -> moehost::weights::quant::Bits {
    match s {
        "int4" => moehost::weights::quant::Bits::Int4,
        _ => moehost::weights::quant::Bits::Int8,
    }
}

/// A model and a text to run through it in windows (`profile`, `eval`).
#[derive(clap::Args)]
pub struct TextArgs {
    /// Model folder; default: the bundled tiny-k2.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The text (UTF-8): calibration text for `profile`, held-out text for `eval`.
    #[arg(long)]
    pub text: PathBuf,
    /// Use at most this many tokens of the text.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Tokens per forward pass (each window starts with BOS).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
}

impl TextArgs {
    /// The model, and the text's token windows.
    pub fn open(&self) -> Result<(Engine, Vec<Vec<u32>>)> {
        let dir = self.model.clone().unwrap_or_else(bundled_model_dir);
        let engine = Engine::open(&dir)?;
        let bytes = std::fs::read(&self.text)
            .with_context(|| format!("cannot read text {}", self.text.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("{} is not UTF-8 text: {e}", self.text.display()))?;
        let windows = moehost::compress::windows(&engine, &text, self.window, self.max_tokens)?;
        Ok((engine, windows))
    }
}

/// Prints `value` as pretty JSON with `--json`, else as the text `text` gives.
pub fn print_report<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", text(value));
    }
    Ok(())
}
