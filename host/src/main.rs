//! The `moehost` command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

use moehost::{bundled_model_dir, Engine};

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
        /// Model folder (config.json, *.safetensors, tokenizer.json); default: the bundled tiny-k2.
        #[arg(long)]
        model: Option<PathBuf>,
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
        #[arg(long)]
        model: Option<PathBuf>,
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
            let engine = open(model)?;
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
        }
        Command::Forward { model, ids, out } => {
            let engine = open(model)?;
            let dump = moehost::forward_dump::run(&engine.model, &ids)?;
            dump.save(&out)?;
            eprintln!(
                "wrote {} ({} tokens, {} MoE layers)",
                out.display(),
                dump.tokens,
                dump.moe_layers
            );
        }
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
