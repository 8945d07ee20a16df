//! Running the model: `generate`, `forward` (a prefill's logits and routing) and `bench`.

use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

use moehost::experts::tiered::StoreConfig;
use moehost::{bundled_model_dir, Engine};

use super::{open, print_report, ModelArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text. Special tokens written in it (e.g. <|bos|>) are recognised.
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids (e.g. 0,412,93), taken as they are.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 = greedy. Default: generation_config.json's (greedy unless it samples).
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 = all).
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print {"prompt_ids", "ids", "text"} as JSON instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let GenerateArgs {
        model,
        prompt,
        prompt_ids,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        json,
    } = a;
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
    model.print_stats(&store)
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. 0,412,93.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn forward(a: ForwardArgs) -> Result<()> {
    let ForwardArgs { model, ids, out } = a;
    let (engine, store) = model.open()?;
    let dump = moehost::forward_dump::run(&engine.model, &ids)?;
    dump.save(&out)?;
    eprintln!(
        "wrote {} ({} tokens, {} MoE layers)",
        out.display(),
        dump.tokens,
        dump.moe_layers
    );
    model.print_stats(&store)
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu: every weight in host memory (the plain engine). cuda: attention, dense and
    /// shared FFNs and every routed expert in GPU memory (the tiered engine with its
    /// default policies, all experts resident); without a GPU it says why and runs on the CPU.
    #[arg(long, default_value = "cpu", value_parser = moehost::experts::tiered::Device::parse)]
    pub device: moehost::experts::tiered::Device,
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub decode_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also measure this many sequences decoding together in batched forward passes (what
    /// the server runs for concurrent requests), and the speed-up over the single stream.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub batch: u16,
    /// Also measure this model folder (e.g. the bf16 original of an INT4 copy) in
    /// alternating rounds, on the CPU, and report the ratios.
    #[arg(long, conflicts_with_all = ["batch", "device"])]
    pub baseline: Option<PathBuf>,
    /// Measure greedy decode constrained by a JSON schema (structured output) against free
    /// decode, in alternating rounds, and the grammar's cost per token.
    #[arg(long, conflicts_with_all = ["batch", "device", "baseline"])]
    pub structured: bool,
    /// Time one Kimi-K2-width MoE layer step on the CPU from each storage format (8 of a pool
    /// of synthetic 7168 x 2048 experts, none of the previous two steps') against this
    /// machine's read bandwidth measured the same way (a read-only sum over the same
    /// memory), in alternating rounds. No model needed.
    #[arg(long, conflicts_with_all = ["model", "batch", "device", "baseline", "structured"])]
    pub experts: bool,
    /// With --experts: synthetic experts per format (the pool each step routes into).
    #[arg(long, default_value_t = 40, requires = "experts")]
    pub pool: usize,
    /// With --experts: tokens each routed expert computes (1: a decode step).
    #[arg(long, default_value_t = 1, requires = "experts")]
    pub rows: usize,
    /// With --experts: the storage formats, comma-separated (fp8, int4, int8, bf16).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fp8,int4,int8,bf16",
        requires = "experts"
    )]
    pub formats: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        model,
        device,
        prompt_tokens,
        decode_tokens,
        repeats,
        batch,
        baseline,
        structured,
        experts,
        pool,
        rows,
        formats,
        json,
    } = a;
    if experts {
        let o = moehost::bench::experts::ExpertBenchOptions {
            formats: formats
                .iter()
                .map(|f| moehost::weights::format::WeightFormat::parse(f))
                .collect::<Result<_>>()?,
            pool,
            rows,
            rounds: repeats,
            ..Default::default()
        };
        let r = moehost::bench::experts::run(&o)?;
        print_report(json, &r, |r| {
            let mut s =
                format!(
                "A {}-wide MoE layer step on the CPU: {} experts of {} x {} at {} token(s) each, \
                 from a pool of {} per format, {} threads, {} kernels\n",
                r.hidden,
                r.top_k,
                r.intermediate,
                r.hidden,
                r.rows,
                r.pool,
                r.threads,
                if r.avx512_kernels { "AVX-512" } else { "decode-then-dot" }
            );
            for f in &r.formats {
                s += &format!(
                    "{:5} {:7.2} ms  {:6.2} GB/s of weights  read-only sum {:6.2} GB/s  {:.2} of it\n",
                    f.format.name(),
                    f.step_ms,
                    f.weights_gbps,
                    f.read_gbps,
                    f.of_read_bandwidth
                );
            }
            s + &format!("(best of {repeats} rounds alternating the sum and the steps)\n")
        })?;
        return Ok(());
    }
    if structured {
        let engine = open(model)?;
        let r = moehost::bench::structured(&engine, decode_tokens, repeats)?;
        print_report(json, &r, |r| {
            format!(
                "free:        {:.1} tokens/s\nconstrained: {:.1} tokens/s ({:.2}x; grammar {:.0} us a token; best of {repeats} alternating rounds of {} tokens)\n",
                r.free_tokens_per_s,
                r.constrained_tokens_per_s,
                r.ratio,
                r.mask_us_per_token,
                r.decode_tokens
            )
        })?;
        return Ok(());
    }
    if let Some(base) = baseline {
        let engine = open(model)?;
        let base = open(Some(base))?;
        let c = moehost::bench::compare(&engine, &base, prompt_tokens, decode_tokens, repeats)?;
        print_report(json, &c, |c| {
            let mut s = String::new();
            for (what, r) in [("model", &c.model), ("baseline", &c.baseline)] {
                s += &format!(
                    "{what:8}  {}: prefill {:.0} tokens/s, decode {:.0} tokens/s\n",
                    r.model, r.prefill_tokens_per_s, r.decode_tokens_per_s
                );
            }
            s + &format!(
                "ratio     prefill {:.2}x, decode {:.2}x (best of {repeats} alternating rounds, {} threads)\n",
                c.prefill_ratio, c.decode_ratio, c.model.threads
            )
        })?;
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
    print_report(json, &r, |r| {
        let mut s = format!(
            "model:   {}\nthreads: {}\ndevice:  {}\n",
            r.model, r.threads, r.device
        );
        s += &format!(
            "prefill: {:.0} tokens/s ({} tokens)\n",
            r.prefill_tokens_per_s, r.prompt_tokens
        );
        s += &format!(
            "decode:  {:.0} tokens/s ({} tokens, single stream)\n",
            r.decode_tokens_per_s, r.decode_tokens
        );
        if let (Some(b), Some(x)) = (r.batch_decode_tokens_per_s, r.batch_speedup) {
            s += &format!(
                "batched: {b:.0} tokens/s ({} sequences x {} tokens, {x:.2}x the single stream)\n",
                r.batch, r.decode_tokens
            );
        }
        s
    })?;
    Ok(())
}
