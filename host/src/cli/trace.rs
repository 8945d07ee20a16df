//! `trace`: record, import, export and inspect routing traces.

use anyhow::{Context, Result};
use clap::Subcommand;
use std::io::Write;
use std::path::PathBuf;

use moehost::bundled_model_dir;

use super::parse_expert_bytes;

#[derive(Subcommand)]
pub enum TraceCommand {
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

pub fn run(command: TraceCommand) -> Result<()> {
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
