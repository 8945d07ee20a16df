//! Making smaller models and measuring them: `profile`, `convert`, `quantize`, `eval`.

use anyhow::{Context, Result};
use std::path::PathBuf;

use moehost::experts::tiered::parse_bytes;
use moehost::policy::PolicySource;

use super::{bits_of, TextArgs};

#[derive(clap::Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub text: TextArgs,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn profile(a: ProfileArgs) -> Result<()> {
    let ProfileArgs { text, out } = a;
    let (engine, windows) = text.open()?;
    let profile = moehost::compress::profile::run(&engine, &windows, true)?;
    std::fs::write(&out, serde_json::to_string_pretty(&profile)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "moehost: profiled {} tokens into {}",
        profile.tokens,
        out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Source model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (created; never the source).
    #[arg(long)]
    pub out: PathBuf,
    /// Decoder layers to keep, dense ones included.
    #[arg(long)]
    pub layers: usize,
    /// Routed experts to keep per MoE layer.
    #[arg(long)]
    pub experts: usize,
    /// A profile from `moehost profile`: layers by block influence, experts by routed mass.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Evenly spaced MoE layers instead (experts: by the profile if given, else the first M).
    #[arg(long)]
    pub uniform: bool,
    /// Rank experts with a pruning plugin (a bundled name such as count-rank, or a .wasm
    /// exporting moehost:policy/pruning) instead of by routed mass; needs --profile.
    #[arg(long)]
    pub selection: Option<String>,
    /// Weights of the result: keep (as stored), bf16 (dequantize FP8) or fp8 (keep FP8).
    #[arg(long, default_value = "keep", value_parser = ["keep", "bf16", "fp8"])]
    pub dtype: String,
    /// Store the kept routed experts as int8 or int4 (see `moehost quantize`).
    #[arg(long, value_parser = ["int8", "int4"])]
    pub quantize_experts: Option<String>,
    /// Largest shard, e.g. 4GiB.
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    pub shard_size: u64,
    /// Replace an existing non-empty output folder.
    #[arg(long)]
    pub force: bool,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let ConvertArgs {
        model,
        out,
        layers,
        experts,
        profile,
        uniform,
        selection,
        dtype,
        quantize_experts,
        shard_size,
        force,
    } = a;
    use moehost::compress::convert::{convert, ConvertOptions, LayerChoice, OutDtype};
    let profile = profile
        .as_deref()
        .map(moehost::compress::profile::Profile::load)
        .transpose()?;
    let opts = ConvertOptions {
        layers,
        experts,
        layer_choice: if uniform {
            LayerChoice::Uniform
        } else {
            LayerChoice::Profile
        },
        profile,
        ranker: selection.as_deref().map(PolicySource::parse),
        dtype: match dtype.as_str() {
            "bf16" => OutDtype::Bf16,
            "fp8" => OutDtype::Fp8,
            _ => OutDtype::Keep,
        },
        quantize_experts: quantize_experts.as_deref().map(bits_of),
        force,
        shard_bytes: shard_size.max(1),
        show_progress: true,
    };
    let report = convert(&model, &out, &opts)?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_parser = ["int8", "int4"])]
    pub experts: String,
    #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
    pub shard_size: u64,
    #[arg(long)]
    pub force: bool,
}

pub fn quantize(a: QuantizeArgs) -> Result<()> {
    let QuantizeArgs {
        model,
        out,
        experts,
        shard_size,
        force,
    } = a;
    use moehost::compress::convert::{convert, ConvertOptions, LayerChoice, OutDtype};
    let cfg = moehost::ModelConfig::from_dir(&model)?;
    let opts = ConvertOptions {
        layers: cfg.num_hidden_layers,
        experts: cfg.n_routed_experts,
        layer_choice: LayerChoice::Uniform,
        profile: None,
        ranker: None,
        dtype: OutDtype::Keep,
        quantize_experts: Some(bits_of(&experts)),
        force,
        shard_bytes: shard_size.max(1),
        show_progress: true,
    };
    let report = convert(&model, &out, &opts)?;
    println!(
        "{}",
        serde_json::json!({"experts": experts, "tensors": report.tensors,
                           "shards": report.shards, "bytes": report.bytes})
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub text: TextArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let EvalArgs { text, json } = a;
    let (engine, windows) = text.open()?;
    let r = moehost::compress::eval::run(&engine, &windows, true)?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "perplexity {:.3} (nll {:.4} nats/token over {} tokens), {:.0} tokens/s",
            r.perplexity, r.nll, r.tokens, r.tokens_per_s
        );
    }
    Ok(())
}
