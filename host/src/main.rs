//! The `moehost` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

use moehost::experts::tiered::{parse_bytes, StoreConfig, TieredExperts};
use moehost::policy::PolicySource;
use moehost::{bundled_model_dir, Engine};
use std::sync::Arc;
use std::time::Duration;

/// mimalloc: a batched step allocates and frees a few hundred KiB of activations; glibc's
/// malloc returned them to the kernel and took page faults and page clearing on the next step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Model folder, memory budgets and policies: shared by the commands that run the model.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json); default: the bundled tiny-k2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device-tier budget for routed experts (compute-ready: on the CPU f32, or bf16 as stored; in GPU memory their storage format), e.g. 512MiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    device_mem: Option<u64>,
    /// Host-tier budget for routed experts (storage format), e.g. 2GiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    host_mem: Option<u64>,
    /// Expert-selection policy: a bundled name (topk, cache-aware) or a .wasm path.
    #[arg(long, default_value = "topk")]
    selection: String,
    /// Eviction policy: a bundled name (layer-cycle, lru, lfu) or a .wasm path.
    #[arg(long, default_value = "layer-cycle")]
    eviction: String,
    /// Prefetch policy: a bundled name (none, next-layer-blend, next-layer-fill,
    /// next-layer-gate, transitions) or a .wasm path.
    #[arg(long, default_value = "none")]
    prefetch: String,
    /// Placement of experts missing from the device tier (fetch, or run from the host tier):
    /// cost-model (built in), a bundled plugin (hot-fetch) or a .wasm path.
    #[arg(long, default_value = "cost-model")]
    placement: String,
    /// Where the device tier lives and computes: cpu, or cuda (a `--features cuda` build with a
    /// driver; otherwise it says why and runs on the CPU).
    #[arg(long, default_value = "cpu", value_parser = moehost::experts::tiered::Device::parse)]
    device: moehost::experts::tiered::Device,
    /// Link and compute figures placement weighs: local (no separate device: always fetch),
    /// h100-pcie5, h100-pcie5-nvme5, h100-pcie4, slow-link.
    #[arg(long, default_value = "local")]
    link: String,
    /// Deadline of one policy call, milliseconds.
    #[arg(long, default_value_t = 10)]
    policy_timeout_ms: u64,
    /// Memory limit of one policy plugin, e.g. 64MiB.
    #[arg(long, value_parser = parse_bytes, default_value = "128MiB")]
    policy_memory: u64,
    /// The most a selection policy may substitute: each expert it picks must score within this
    /// of the token's k-th best selection score, whatever gap it declares (0: exact routing).
    #[arg(long, default_value_t = moehost::policy::wasm::DEFAULT_MAX_SCORE_GAP, value_parser = parse_gap)]
    max_score_gap: f32,
    /// Time all policies together may take per token, microseconds: warned once (and flagged
    /// in /metrics) when their recent mean passes 80% of it.
    #[arg(long, default_value_t = moehost::policy::budget::DEFAULT_TOKEN_BUDGET_US)]
    policy_budget_us: f64,
    /// Print the store's and policies' counters as JSON (after the normal output).
    #[arg(long)]
    stats: bool,
}

impl ModelArgs {
    fn store_config(&self) -> StoreConfig {
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
        c
    }

    /// Opens the model with the tiered store; policies given as files are watched and
    /// hot-swapped when they change.
    fn open(&self) -> Result<(Engine, Arc<TieredExperts>)> {
        let dir = self.model.clone().unwrap_or_else(bundled_model_dir);
        let config = self.store_config();
        let (engine, store) = Engine::open_tiered(&dir, &config)?;
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt text. Special tokens written in it (e.g. <|bos|>) are recognised.
        #[arg(
            long,
            required_unless_present = "prompt_ids",
            conflicts_with = "prompt_ids"
        )]
        prompt: Option<String>,
        /// The prompt as comma-separated token ids (e.g. 0,412,93), taken as they are.
        #[arg(long, value_delimiter = ',')]
        prompt_ids: Option<Vec<u32>>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy. Default: generation_config.json's (greedy unless it samples).
        #[arg(long)]
        temperature: Option<f32>,
        #[arg(long)]
        top_p: Option<f32>,
        /// Keep only the k most likely tokens (0 = all).
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print {"prompt_ids", "ids", "text"} as JSON instead of streaming text.
        #[arg(long)]
        json: bool,
    },
    /// Run one prefill and write logits and routing as safetensors (the golden-file layout).
    Forward {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. 0,412,93.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure prefill and decode tokens/s.
    Bench {
        #[arg(long)]
        model: Option<PathBuf>,
        /// cpu: every weight in host memory (the plain engine). cuda: attention, dense and
        /// shared FFNs and every routed expert in GPU memory (the tiered engine with its
        /// default policies, all experts resident); without a GPU it says why and runs on the CPU.
        #[arg(long, default_value = "cpu", value_parser = moehost::experts::tiered::Device::parse)]
        device: moehost::experts::tiered::Device,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also measure this many sequences decoding together in batched forward passes (what
        /// the server runs for concurrent requests), and the speed-up over the single stream.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        batch: u16,
        /// Also measure this model folder (e.g. the bf16 original of an INT4 copy) in
        /// alternating rounds, on the CPU, and report the ratios.
        #[arg(long, conflicts_with_all = ["batch", "device"])]
        baseline: Option<PathBuf>,
        /// Measure greedy decode constrained by a JSON schema (structured output) against free
        /// decode, in alternating rounds, and the grammar's cost per token.
        #[arg(long, conflicts_with_all = ["batch", "device", "baseline"])]
        structured: bool,
        #[arg(long)]
        json: bool,
    },
    /// Work with policy plugins.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Serve an OpenAI-compatible HTTP API (completions, chat, models, metrics, admin).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: String,
        /// Enables the admin API (policies at run time); every admin call needs this bearer token.
        #[arg(long, env = "MOEHOST_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
        /// Requests waiting for admission before new ones get HTTP 429.
        #[arg(long, default_value_t = 256)]
        queue: usize,
        /// An A/B arm beside the default one (repeatable):
        /// NAME=KIND:POLICY[,KIND:POLICY...][,weight:W], e.g. b=eviction:lfu,weight:0.5.
        /// Requests go to arms by weight, or to the arm the x-moehost-arm header names. Each arm
        /// has its own expert store with the same budgets; default=weight:W sets the default
        /// arm's weight (1 unless given).
        #[arg(long = "arm", value_name = "SPEC")]
        arms: Vec<moehost::server::arms::ArmSpec>,
        /// A candidate policy that shadows the default arm on a simulated cache of the same
        /// capacity (repeatable): EVICTION or EVICTION+PREFETCH, e.g. lfu+transitions.
        /// Hit rates are in /metrics (moehost_shadow_*) and GET /admin/policies.
        #[arg(long = "shadow", value_name = "POLICIES")]
        shadows: Vec<moehost::server::shadow::ShadowSpec>,
        /// How the model writes tool calls (vLLM's names): kimi_k2, deepseek_v3 (V3, R1),
        /// deepseek_v31. Default: detected from the tokenizer's markers and the chat template.
        #[arg(long, value_parser = parse_tool_parser)]
        tool_call_parser: Option<moehost::server::tools::ToolParser>,
        /// Open connections at once; past it new connections get HTTP 503 and are closed.
        #[arg(long, default_value_t = 1024)]
        max_connections: usize,
        /// Seconds a client has to send a request's head (and a kept-alive connection may sit
        /// idle); then the connection is closed.
        #[arg(long, default_value = "30", value_parser = moehost::server::listen::parse_seconds)]
        header_timeout: std::time::Duration,
        /// Seconds a client has to send a request's body once its head is in; then HTTP 408.
        #[arg(long, default_value = "60", value_parser = moehost::server::listen::parse_seconds)]
        body_timeout: std::time::Duration,
        /// Largest request body (prompts, chats, plugin uploads); larger ones get HTTP 413.
        #[arg(long, value_parser = parse_bytes, default_value = "8MiB")]
        body_limit: u64,
    },
    /// Routing traces (the moehost-trace/1 format): record, import, export, inspect.
    Trace {
        #[command(subcommand)]
        command: TraceCommand,
    },
    /// Replay routing traces through eviction and prefetch policies, next to Belady's optimum.
    Replay(Box<ReplayArgs>),
    /// Run calibration text through a model and record layer importance (block influence) and
    /// per-expert routing statistics, for `convert`.
    Profile {
        #[command(flatten)]
        text: TextArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a smaller checkpoint: the dense layers plus the most important MoE layers, the
    /// top experts of each (by routed mass), router sliced to them, config.json made consistent.
    Convert {
        /// Source model folder.
        #[arg(long)]
        model: PathBuf,
        /// Output folder (created; never the source).
        #[arg(long)]
        out: PathBuf,
        /// Decoder layers to keep, dense ones included.
        #[arg(long)]
        layers: usize,
        /// Routed experts to keep per MoE layer.
        #[arg(long)]
        experts: usize,
        /// A profile from `moehost profile`: layers by block influence, experts by routed mass.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Evenly spaced MoE layers instead (experts: by the profile if given, else the first M).
        #[arg(long)]
        uniform: bool,
        /// Rank experts with a pruning plugin (a bundled name such as count-rank, or a .wasm
        /// exporting moehost:policy/pruning) instead of by routed mass; needs --profile.
        #[arg(long)]
        selection: Option<String>,
        /// Weights of the result: keep (as stored), bf16 (dequantize FP8) or fp8 (keep FP8).
        #[arg(long, default_value = "keep", value_parser = ["keep", "bf16", "fp8"])]
        dtype: String,
        /// Store the kept routed experts as int8 or int4 (see `moehost quantize`).
        #[arg(long, value_parser = ["int8", "int4"])]
        quantize_experts: Option<String>,
        /// Largest shard, e.g. 4GiB.
        #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
        shard_size: u64,
        /// Replace an existing non-empty output folder.
        #[arg(long)]
        force: bool,
    },
    /// Write a copy of a model whose routed experts are stored group-wise quantized (int8 or
    /// int4, f16 scale per 32 columns): the host-RAM and disk tiers hold and move 1.8x / 3.2x
    /// fewer bytes than bf16. Everything else is copied as stored.
    Quantize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = ["int8", "int4"])]
        experts: String,
        #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
        shard_size: u64,
        #[arg(long)]
        force: bool,
    },
    /// What this machine offers a Kimi-K2 deployment, measured: CPU matmul, memory and FP8
    /// dequantization speed, the model folder's read bandwidth, and with the `cuda` feature the
    /// GPU, driver, free memory and host->device bandwidth (pinned vs pageable); then the plan.
    Doctor {
        /// Model folder whose read bandwidth stands for the disk tier (default: the bundled one).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Memory layout and expected decode figures of a model on a machine, from config.json
    /// alone (e.g. Kimi-K2 on one H100): experts per tier, bytes moved and the tokens/s ceiling.
    Plan {
        /// A config.json (e.g. Kimi-K2's), or a model folder holding one.
        #[arg(long)]
        config: PathBuf,
        /// Device memory, e.g. 80GiB.
        #[arg(long, value_parser = parse_bytes, default_value = "80GiB")]
        device_mem: u64,
        /// Host RAM for experts, e.g. 1TiB.
        #[arg(long, value_parser = parse_bytes, default_value = "1TiB")]
        host_mem: u64,
        /// Link and memory bandwidths: a `--link` preset (h100-pcie5, h100-pcie5-nvme5, h100-pcie4,
        /// local, slow-link).
        #[arg(long, default_value = "h100-pcie5")]
        link: String,
        /// Context tokens per sequence the KV cache holds.
        #[arg(long, default_value_t = 8192)]
        context: usize,
        /// Sequences decoded together.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Expert storage: bf16, fp8, int8, int4 (default: the checkpoint's).
        #[arg(long)]
        experts: Option<String>,
        /// Device memory kept for activations and workspace.
        #[arg(long, value_parser = parse_bytes, default_value = "4GiB")]
        reserve: u64,
        /// Device-tier hit rate to assume (e.g. measured by `moehost replay`); default: the
        /// device tier's share of experts (uniform routing).
        #[arg(long)]
        hit_rate: Option<f64>,
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of a model over a text, and forward tokens/s.
    Eval {
        #[command(flatten)]
        text: TextArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TraceCommand {
    /// Record prefill and greedy decode of each prompt (one JSON object per line, "prompt").
    Record {
        /// Model folder; default: the bundled tiny-k2.
        #[arg(long)]
        model: Option<PathBuf>,
        /// JSON lines: {"prompt": "..."} per line.
        #[arg(long)]
        prompts: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Decode steps per prompt after its prefill (stops early at eos).
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Also record `speculative`: the next MoE layer's gate on the current hidden state.
        #[arg(long)]
        speculative: bool,
    },
    /// Convert a routing dump into a trace.
    Import {
        /// Input format: `jsonl` ({"doc", "token", "layer", "experts", "weights"} per line, one
        /// file), or `dense-csv` (FLAME-MoE-Traces' per-layer CSV: `layer_id,token_id,expert_0,...`
        /// with each expert's router probability, one file per MoE layer in layer order).
        #[arg(long, value_parser = ["jsonl", "dense-csv"])]
        from: String,
        /// The dump (dense-csv: one file per MoE layer).
        #[arg(required = true)]
        input: Vec<PathBuf>,
        /// dense-csv: rows are position-major across N sequences (row r = position r / N of
        /// sequence r % N), as in FLAME's encoder batches.
        #[arg(long, default_value_t = 1)]
        interleave: u32,
        #[arg(long)]
        out: PathBuf,
        /// Routed experts per layer (default: the largest id seen + 1).
        #[arg(long)]
        n_experts: Option<u32>,
        /// Bytes of one expert (e.g. 44050944, 42MiB or k2-fp8); default 0 (unknown).
        #[arg(long, value_parser = parse_expert_bytes)]
        expert_bytes: Option<u64>,
        /// Model name for the metadata.
        #[arg(long)]
        model_name: Option<String>,
    },
    /// Write a trace as JSON lines (the import format), to stdout or --out.
    Export {
        trace: PathBuf,
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        to: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a trace's metadata and counts (JSON).
    Info { trace: PathBuf },
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// A trace file (repeat for several).
    #[arg(long = "trace", required = true)]
    traces: Vec<PathBuf>,
    /// A trace replayed alike but summarised apart: one the policies were not tuned on
    /// (repeatable).
    #[arg(long = "held-out")]
    held_out: Vec<PathBuf>,
    /// Eviction policy: bundled name (lru, lfu, layer-cycle), .wasm path, or native-lru. Repeatable.
    #[arg(long = "eviction", default_values_t = ["lru".to_string()])]
    evictions: Vec<String>,
    /// Prefetch policy: bundled name (none, next-layer-blend, next-layer-fill, next-layer-gate,
    /// transitions) or .wasm path. Repeatable; adds the oracle-prefetch bound.
    #[arg(long = "prefetch")]
    prefetches: Vec<String>,
    /// Device cache size: experts (64) or a share of the pool (10%). Repeatable or comma-separated.
    #[arg(long = "capacity", required = true, value_delimiter = ',')]
    capacities: Vec<String>,
    /// C slots per MoE layer instead of one pool of C for the model.
    #[arg(long)]
    per_layer: bool,
    /// Host tier size (same layout as --capacity); default: the host tier holds every expert.
    #[arg(long)]
    host_capacity: Option<String>,
    /// Expert size for the cost model (bytes, 42MiB, or k2-fp8 = 44050944); default: the trace's.
    #[arg(long, value_parser = parse_expert_bytes)]
    expert_bytes: Option<u64>,
    /// Cost-model preset: h100-pcie5 (NVMe Gen4 7 GB/s), h100-pcie5-nvme5 (Gen5 14 GB/s),
    /// h100-pcie4, local, slow-link.
    #[arg(long, default_value = "h100-pcie5")]
    link: String,
    /// Override the preset's host->device bandwidth, GB/s.
    #[arg(long)]
    h2d_gbps: Option<f64>,
    /// Override the preset's device-memory bandwidth, GB/s.
    #[arg(long)]
    hbm_gbps: Option<f64>,
    /// Override the preset's disk bandwidth, GB/s.
    #[arg(long)]
    disk_gbps: Option<f64>,
    /// Print one JSON array of rows instead of tables.
    #[arg(long)]
    json: bool,
    /// Draw hit rate against capacity to OUT.svg or OUT.png.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the across-trace summary (geometric means of the ratio to Belady) to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Measure replay speed (accesses/s) of Belady, native LRU and the eviction plugins instead.
    #[arg(long)]
    bench: bool,
    /// Runs per engine in --bench (the best counts).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Deadline of one policy call, milliseconds (generous: a replay must not depend on load).
    #[arg(long, default_value_t = 2000)]
    policy_timeout_ms: u64,
    /// Memory limit of one policy plugin, e.g. 64MiB.
    #[arg(long, value_parser = parse_bytes, default_value = "128MiB")]
    policy_memory: u64,
}

/// `k2-fp8` or a byte size.
fn parse_tool_parser(s: &str) -> Result<moehost::server::tools::ToolParser> {
    moehost::server::tools::ToolParser::parse_name(s).with_context(|| {
        format!("unknown tool-call parser {s:?}: kimi_k2, deepseek_v3 or deepseek_v31")
    })
}

fn parse_gap(s: &str) -> Result<f32> {
    let g: f32 = s
        .parse()
        .with_context(|| format!("{s:?} is not a number"))?;
    anyhow::ensure!(
        g.is_finite() && g >= 0.0,
        "--max-score-gap must be finite and >= 0"
    );
    Ok(g)
}

fn parse_expert_bytes(s: &str) -> Result<u64> {
    if s.eq_ignore_ascii_case("k2-fp8") {
        Ok(moehost::replay::K2_FP8_EXPERT_BYTES)
    } else {
        parse_bytes(s)
    }
}

fn trace_command(command: TraceCommand) -> Result<()> {
    use moehost::trace;
    match command {
        TraceCommand::Record {
            model,
            prompts,
            out,
            max_tokens,
            speculative,
        } => {
            let dir = model.unwrap_or_else(bundled_model_dir);
            let prompts = trace::read_prompts(&prompts)?;
            let t = trace::record(
                &dir,
                &prompts,
                &trace::RecordOptions {
                    max_tokens,
                    speculative,
                },
            )?;
            t.save(&out)?;
            let s = t.summary();
            eprintln!(
                "wrote {} ({} tokens in {} steps, {} prompts)",
                out.display(),
                s.tokens,
                s.steps,
                s.docs
            );
        }
        TraceCommand::Import {
            from,
            input,
            interleave,
            out,
            n_experts,
            expert_bytes,
            model_name,
        } => {
            let opts = trace::ImportOptions {
                n_routed_experts: n_experts,
                expert_bytes,
                model: model_name,
            };
            let t = if from == "dense-csv" {
                trace::import_dense_csv(&input, interleave, &opts)?
            } else {
                anyhow::ensure!(
                    input.len() == 1,
                    "--from jsonl reads one file ({} given)",
                    input.len()
                );
                trace::import_jsonl(&input[0], &opts)?
            };
            t.save(&out)?;
            let s = t.summary();
            eprintln!(
                "wrote {} ({} tokens = steps, {} docs, {} MoE layers, k={})",
                out.display(),
                s.tokens,
                s.docs,
                t.layers(),
                t.k()
            );
        }
        TraceCommand::Export {
            trace: path,
            to: _,
            out,
        } => {
            let t = trace::Trace::load(&path)?;
            match out {
                Some(o) => {
                    let f = std::fs::File::create(&o)
                        .with_context(|| format!("cannot create {}", o.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    trace::export_jsonl(&t, &mut w)?;
                    w.flush()?;
                }
                None => {
                    let stdout = std::io::stdout();
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    trace::export_jsonl(&t, &mut w)?;
                    w.flush()?;
                }
            }
        }
        TraceCommand::Info { trace: path } => {
            let t = trace::Trace::load(&path)?;
            println!("{}", serde_json::to_string_pretty(&t.summary())?);
        }
    }
    Ok(())
}

fn replay_command(a: ReplayArgs) -> Result<()> {
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
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", replay::bench::text(&rows));
        }
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

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load, validate and smoke-test a plugin; print its world, version and name.
    Check {
        /// A .wasm component or a bundled policy name.
        plugin: String,
    },
    /// List the bundled policies.
    List,
    /// Cost of policy calls at Kimi-K2's shape, per call and per decoded token.
    Bench {
        #[arg(long, default_value = "topk")]
        selection: String,
        #[arg(long, default_value = "layer-cycle")]
        eviction: String,
        #[arg(long, default_value = "none")]
        prefetch: String,
        /// Decoded tokens to simulate (60 MoE layers each).
        #[arg(long, default_value_t = 200)]
        tokens: usize,
    },
}

fn open(model: Option<PathBuf>) -> Result<Engine> {
    let dir = model.unwrap_or_else(bundled_model_dir);
    Engine::open(&dir)
}

fn bits_of(s: &str) -> moehost::quant::Bits {
    match s {
        "int4" => moehost::quant::Bits::Int4,
        _ => moehost::quant::Bits::Int8,
    }
}

/// A model and a text to run through it in windows (`profile`, `eval`).
#[derive(clap::Args)]
struct TextArgs {
    /// Model folder; default: the bundled tiny-k2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text (UTF-8): calibration text for `profile`, held-out text for `eval`.
    #[arg(long)]
    text: PathBuf,
    /// Use at most this many tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Tokens per forward pass (each window starts with BOS).
    #[arg(long, default_value_t = 512)]
    window: usize,
}

impl TextArgs {
    /// The model, and the text's token windows.
    fn open(&self) -> Result<(Engine, Vec<Vec<u32>>)> {
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
    match cli.command {
        Command::Generate {
            model,
            prompt,
            prompt_ids,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            json,
        } => {
            let (engine, store) = model.open()?;
            let mut params = engine.defaults.sampling.clone();
            if let Some(t) = temperature {
                params.temperature = t;
            }
            if let Some(p) = top_p {
                params.top_p = p;
            }
            if let Some(k) = top_k {
                params.top_k = k;
            }
            params.seed = seed;
            let prompt_ids = match (prompt_ids, prompt) {
                (Some(ids), _) => ids,
                (None, Some(text)) => engine.encode(&text)?,
                (None, None) => unreachable!("clap requires --prompt or --prompt-ids"),
            };
            let stdout = std::io::stdout();
            let gen = engine.generate(&prompt_ids, max_tokens, &params, |piece| {
                if !json {
                    let mut out = stdout.lock();
                    let _ = out.write_all(piece.as_bytes());
                    let _ = out.flush();
                }
            })?;
            if json {
                let v = serde_json::json!({
                    "prompt_ids": gen.prompt_ids,
                    "ids": gen.ids,
                    "text": gen.text,
                    "finish_reason": gen.finish_reason,
                });
                println!("{v}");
            } else {
                println!();
            }
            if model.stats {
                println!("{}", serde_json::to_string(&store.stats())?);
            }
        }
        Command::Forward { model, ids, out } => {
            let (engine, store) = model.open()?;
            let dump = moehost::forward_dump::run(&engine.model, &ids)?;
            dump.save(&out)?;
            eprintln!(
                "wrote {} ({} tokens, {} MoE layers)",
                out.display(),
                dump.tokens,
                dump.moe_layers
            );
            if model.stats {
                println!("{}", serde_json::to_string(&store.stats())?);
            }
        }
        Command::Serve {
            model,
            addr,
            admin_token,
            queue,
            arms,
            shadows,
            tool_call_parser,
            max_connections,
            header_timeout,
            body_timeout,
            body_limit,
        } => {
            let (engine, store) = model.open()?;
            let opts = moehost::server::ServeOptions {
                queue_capacity: queue,
                admin_token,
                arms,
                shadows,
                tool_call_parser,
                conn: moehost::server::listen::ConnLimits {
                    max_connections,
                    header_timeout,
                    body_timeout,
                },
                body_limit: usize::try_from(body_limit).unwrap_or(usize::MAX),
            };
            let (state, scheduler, _) =
                moehost::server::start(Arc::new(engine), store, &model.store_config(), &opts)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}"))?;
                eprintln!(
                    "moehost: serving {} on http://{} (arms: {}; admin API {})",
                    state.model_name,
                    listener.local_addr()?,
                    state.arms.names().join(", "),
                    if state.admin.is_some() { "on" } else { "off" }
                );
                moehost::server::serve_on(
                    listener,
                    state,
                    &opts,
                    moehost::server::shutdown_signal(),
                )
                .await
            })?;
            // The handlers are gone, so the queue is closed: the scheduler finishes and exits.
            let _ = scheduler.join();
        }
        Command::Policy { command } => match command {
            PolicyCommand::Check { plugin } => {
                let report = moehost::policy::check::check(&PolicySource::parse(&plugin))?;
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            PolicyCommand::Bench {
                selection,
                eviction,
                prefetch,
                tokens,
            } => {
                let r =
                    moehost::policy::bench::run(&selection, &eviction, &prefetch, tokens.max(1))?;
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            PolicyCommand::List => {
                for name in moehost::policy::bundled::names() {
                    let src = PolicySource::Bundled(name.to_owned());
                    match moehost::policy::check::check(&src) {
                        Ok(r) => println!("{name:18} {:9} {}", r.kind.to_string(), r.description),
                        // Not a serving policy: maybe a pruning ranker (moehost convert).
                        Err(e) => match moehost::policy::wasm::PruningPlugin::load(
                            &src.bytes()?,
                            name,
                            Default::default(),
                        ) {
                            Ok(p) => println!("{name:18} {:9} {}", "pruning", p.description),
                            Err(_) => println!("{name:18} error: {e:#}"),
                        },
                    }
                }
            }
        },
        Command::Trace { command } => trace_command(command)?,
        Command::Replay(args) => replay_command(*args)?,
        Command::Profile { text, out } => {
            let (engine, windows) = text.open()?;
            let profile = moehost::compress::profile::run(&engine, &windows, true)?;
            std::fs::write(&out, serde_json::to_string_pretty(&profile)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "moehost: profiled {} tokens into {}",
                profile.tokens,
                out.display()
            );
        }
        Command::Convert {
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
        } => {
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
        }
        Command::Doctor { model, json } => {
            let dir = model.unwrap_or_else(bundled_model_dir);
            let report = moehost::doctor::run(&dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
        }
        Command::Plan {
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
        } => {
            let path = if config.is_dir() {
                config.join("config.json")
            } else {
                config
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let cfg = moehost::ModelConfig::from_json(&text)
                .with_context(|| format!("in {}", path.display()))?;
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
                    .map(moehost::plan::ExpertFormat::parse)
                    .transpose()?,
                reserve_bytes: reserve,
                hit_rate,
            };
            let p = moehost::plan::plan(&cfg, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!("{}", p.summary());
            }
        }
        Command::Quantize {
            model,
            out,
            experts,
            shard_size,
            force,
        } => {
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
        }
        Command::Eval { text, json } => {
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
        }
        Command::Bench {
            model,
            device,
            prompt_tokens,
            decode_tokens,
            repeats,
            batch,
            baseline,
            structured,
            json,
        } => {
            if structured {
                let engine = open(model)?;
                let r = moehost::bench::structured(&engine, decode_tokens, repeats)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                } else {
                    println!(
                        "free:        {:.1} tokens/s\nconstrained: {:.1} tokens/s ({:.2}x; grammar {:.0} us a token; best of {repeats} alternating rounds of {} tokens)",
                        r.free_tokens_per_s,
                        r.constrained_tokens_per_s,
                        r.ratio,
                        r.mask_us_per_token,
                        r.decode_tokens
                    );
                }
                return Ok(());
            }
            if let Some(base) = baseline {
                let engine = open(model)?;
                let base = open(Some(base))?;
                let c =
                    moehost::bench::compare(&engine, &base, prompt_tokens, decode_tokens, repeats)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&c)?);
                } else {
                    for (what, r) in [("model", &c.model), ("baseline", &c.baseline)] {
                        println!(
                            "{what:8}  {}: prefill {:.0} tokens/s, decode {:.0} tokens/s",
                            r.model, r.prefill_tokens_per_s, r.decode_tokens_per_s
                        );
                    }
                    println!(
                        "ratio     prefill {:.2}x, decode {:.2}x (best of {repeats} alternating rounds, {} threads)",
                        c.prefill_ratio, c.decode_ratio, c.model.threads
                    );
                }
                return Ok(());
            }
            let (engine, backend) = match device {
                moehost::experts::tiered::Device::Cpu => (open(model)?, "cpu".to_owned()),
                device => {
                    let dir = model.unwrap_or_else(bundled_model_dir);
                    let config = StoreConfig {
                        device,
                        ..Default::default()
                    };
                    let (engine, store) = Engine::open_tiered(&dir, &config)?;
                    (engine, store.stats().device_backend)
                }
            };
            let r = moehost::bench::run(
                &engine,
                backend,
                prompt_tokens,
                decode_tokens,
                repeats,
                batch.into(),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("model:   {}", r.model);
                println!("threads: {}", r.threads);
                println!("device:  {}", r.device);
                println!(
                    "prefill: {:.0} tokens/s ({} tokens)",
                    r.prefill_tokens_per_s, r.prompt_tokens
                );
                println!(
                    "decode:  {:.0} tokens/s ({} tokens, single stream)",
                    r.decode_tokens_per_s, r.decode_tokens
                );
                if let (Some(b), Some(x)) = (r.batch_decode_tokens_per_s, r.batch_speedup) {
                    println!(
                        "batched: {b:.0} tokens/s ({} sequences x {} tokens, {x:.2}x the single stream)",
                        r.batch, r.decode_tokens
                    );
                }
            }
        }
    }
    Ok(())
}
