//! The `moehost` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

use moehost::policy::{PolicyKind, PolicySource};
use moehost::store::{parse_bytes, StoreConfig, TieredExperts};
use moehost::{bundled_model_dir, Engine};
use std::sync::Arc;
use std::time::Duration;

/// Model folder, memory budgets and policies: shared by the commands that run the model.
#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// Model folder (config.json, *.safetensors, tokenizer.json); default: the bundled tiny-k2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Device-tier budget for routed experts (compute-ready), e.g. 512MiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    device_mem: Option<u64>,
    /// Host-tier budget for routed experts (storage format), e.g. 2GiB. Default: all fit.
    #[arg(long, value_parser = parse_bytes)]
    host_mem: Option<u64>,
    /// Expert-selection policy: a bundled name (topk, cache-aware) or a .wasm path.
    #[arg(long, default_value = "topk")]
    selection: String,
    /// Eviction policy: a bundled name (lru, lfu, ...) or a .wasm path.
    #[arg(long, default_value = "lru")]
    eviction: String,
    /// Prefetch policy: a bundled name (none, next-layer-gate, transitions) or a .wasm path.
    #[arg(long, default_value = "none")]
    prefetch: String,
    /// Deadline of one policy call, milliseconds.
    #[arg(long, default_value_t = 10)]
    policy_timeout_ms: u64,
    /// Memory limit of one policy plugin, e.g. 64MiB.
    #[arg(long, value_parser = parse_bytes, default_value = "128MiB")]
    policy_memory: u64,
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
            ..Default::default()
        };
        c.limits.call_timeout = Duration::from_millis(self.policy_timeout_ms.max(1));
        c.limits.memory_bytes = self.policy_memory as usize;
        c
    }

    /// Opens the model with the tiered store; policies given as files are watched and
    /// hot-swapped when they change.
    fn open(&self) -> Result<(Engine, Arc<TieredExperts>)> {
        let dir = self.model.clone().unwrap_or_else(bundled_model_dir);
        let config = self.store_config();
        let (engine, store) = Engine::open_tiered(&dir, &config)?;
        for (kind, src) in [
            (PolicyKind::Selection, &config.selection),
            (PolicyKind::Eviction, &config.eviction),
            (PolicyKind::Prefetch, &config.prefetch),
        ] {
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
        #[arg(long)]
        prompt: String,
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
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        decode_tokens: usize,
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        #[arg(long)]
        json: bool,
    },
    /// Work with policy plugins.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
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
        #[arg(long, default_value = "lru")]
        eviction: String,
        #[arg(long, default_value = "next-layer-gate")]
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

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
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
            let prompt_ids = engine.encode(&prompt)?;
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
                        Err(e) => println!("{name:18} error: {e:#}"),
                    }
                }
            }
        },
        Command::Bench {
            model,
            prompt_tokens,
            decode_tokens,
            repeats,
            json,
        } => {
            let engine = open(model)?;
            let r = moehost::bench::run(&engine, prompt_tokens, decode_tokens, repeats)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("model:   {}", r.model);
                println!("threads: {}", r.threads);
                println!(
                    "prefill: {:.0} tokens/s ({} tokens)",
                    r.prefill_tokens_per_s, r.prompt_tokens
                );
                println!(
                    "decode:  {:.0} tokens/s ({} tokens, single stream)",
                    r.decode_tokens_per_s, r.decode_tokens
                );
            }
        }
    }
    Ok(())
}
