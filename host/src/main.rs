//! The `moehost` command line (`cli/`: one file per command family).

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod cli;

/// mimalloc: a batched step allocates and frees a few hundred KiB of activations; glibc's
/// malloc returned them to the kernel and took page faults and page clearing on the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "moehost",
    version,
    about = "Run giant Mixture-of-Experts models (DeepSeek-V3 / Kimi-K2)"
)]
struct Cli {
    /// Worker threads for the forward pass (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Activations of int4 experts on the CPU: `exact` (f32, the reference's bits) or `q8`
    /// (int8 per 32 columns with VNNI integer dot products: memory-bound decode, logits
    /// within the activations' rounding; CPU only, AVX-512 VNNI).
    #[arg(long, global = true, default_value = "exact", value_parser = ["exact", "q8"])]
    activations: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cli::generate::GenerateArgs),
    /// Run one prefill and write logits and routing as safetensors (the golden-file layout).
    Forward(cli::generate::ForwardArgs),
    /// Measure prefill and decode tokens/s.
    Bench(cli::generate::BenchArgs),
    /// Work with policy plugins.
    Policy {
        #[command(subcommand)]
        command: cli::policy::PolicyCommand,
    },
    /// Serve an OpenAI-compatible HTTP API (completions, chat, models, metrics, admin).
    Serve(cli::serve::ServeArgs),
    /// Routing traces (the moehost-trace/1 format): record, import, export, inspect.
    Trace {
        #[command(subcommand)]
        command: cli::trace::TraceCommand,
    },
    /// Replay routing traces through eviction and prefetch policies, next to Belady's optimum.
    Replay(Box<cli::replay::ReplayArgs>),
    /// Run calibration text through a model and record layer importance (block influence) and
    /// per-expert routing statistics, for `convert`.
    Profile(cli::compress::ProfileArgs),
    /// Write a smaller checkpoint: the dense layers plus the most important MoE layers, the
    /// top experts of each (by routed mass), router sliced to them, config.json made consistent.
    Convert(cli::compress::ConvertArgs),
    /// Write a copy of a model whose routed experts are stored group-wise quantized (int8 or
    /// int4, f16 scale per 32 columns): the host-RAM and disk tiers hold and move 1.8x / 3.2x
    /// fewer bytes than bf16. Everything else is copied as stored.
    Quantize(cli::compress::QuantizeArgs),
    /// What this machine offers a Kimi-K2 deployment, measured: CPU matmul, memory and FP8
    /// dequantization speed, the model folder's read bandwidth, and with the `cuda` feature the
    /// GPU, driver, free memory and host->device bandwidth (pinned vs pageable); then the plan.
    Doctor(cli::tools::DoctorArgs),
    /// Memory layout and expected decode figures of a model on a machine, from config.json
    /// alone (e.g. Kimi-K2 on one H100): experts per tier, bytes moved and the tokens/s ceiling.
    Plan(cli::tools::PlanArgs),
    /// Perplexity of a model over a text, and forward tokens/s.
    Eval(cli::compress::EvalArgs),
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    moehost::server::access::init_logging();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global()
            .context("cannot start the thread pool")?;
    }
    if cli.activations == "q8" {
        moehost::weights::q8::enable()?;
    }
    match cli.command {
        Command::Generate(a) => cli::generate::generate(a)?,
        Command::Forward(a) => cli::generate::forward(a)?,
        Command::Bench(a) => cli::generate::bench(a)?,
        Command::Policy { command } => cli::policy::run(command)?,
        Command::Serve(a) => cli::serve::serve(a)?,
        Command::Trace { command } => cli::trace::run(command)?,
        Command::Replay(a) => cli::replay::run(*a)?,
        Command::Profile(a) => cli::compress::profile(a)?,
        Command::Convert(a) => cli::compress::convert(a)?,
        Command::Quantize(a) => cli::compress::quantize(a)?,
        Command::Doctor(a) => cli::tools::doctor(a)?,
        Command::Plan(a) => cli::tools::plan(a)?,
        Command::Eval(a) => cli::compress::eval(a)?,
    }
    Ok(())
}
