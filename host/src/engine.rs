//! A model folder as published, opened for generation: config, checkpoint, tokenizer,
//! generation defaults, and the generation loop (prefill, then one token per step on the cache).
//!
//! Owns: reading the folder, encode/decode, incremental text streaming, the stop rules.
//! Does not own: the arithmetic (`deepseek_v3`), token choice (`sampling`).

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokenizers::Tokenizer;

use crate::checkpoint::Checkpoint;
use crate::config::{parse_token_ids, ModelConfig};
use crate::deepseek_v3::{DeepseekV3, Logits};
use crate::experts::{ExpertProvider, ResidentExperts};
use crate::sampling::{Sampler, SamplingParams};

/// The model bundled with moehost (the trained tiny-k2), used when no `--model` is given.
/// `MOEHOST_BUNDLED_MODEL` overrides its location (e.g. for an installed binary).
pub fn bundled_model_dir() -> PathBuf {
    std::env::var_os("MOEHOST_BUNDLED_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join("tiny-k2")
        })
}

/// Sampling defaults of `generation_config.json` and the stop tokens.
#[derive(Debug, Clone)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

/// An opened model folder.
pub struct Engine {
    pub dir: PathBuf,
    pub model: DeepseekV3,
    pub tokenizer: Tokenizer,
    pub defaults: GenerationDefaults,
    pub checkpoint: Arc<Checkpoint>,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    /// Why it stopped: "eos" or "length".
    pub finish_reason: &'static str,
}

impl Engine {
    /// Opens `dir` with every routed expert resident once used.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, |ckpt, cfg| Arc::new(ResidentExperts::new(ckpt, cfg)))
    }

    /// Opens `dir`, taking routed experts from the provider `make_experts` builds.
    pub fn open_with(
        dir: &Path,
        make_experts: impl FnOnce(Arc<Checkpoint>, &ModelConfig) -> Arc<dyn ExpertProvider>,
    ) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "model folder {} does not exist",
            dir.display()
        );
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Arc::new(Checkpoint::open(dir, cfg.fp8_block)?);
        let experts = make_experts(ckpt.clone(), &cfg);
        let defaults = read_generation_defaults(dir, &cfg)?;
        let model = DeepseekV3::load(cfg, &ckpt, experts)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tok_path.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            model,
            tokenizer,
            defaults,
            checkpoint: ckpt,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|bos|>`) are recognised;
    /// nothing is added that the tokenizer's post-processor does not add.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    /// Generates up to `max_tokens` after `prompt_ids`, calling `on_text` with each new piece
    /// of text as soon as it is complete UTF-8. Stops at an eos token (not included) or at
    /// `max_tokens`; the prompt plus the output must fit `max_position_embeddings`.
    pub fn generate(
        &self,
        prompt_ids: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        params.validate()?;
        let cfg = self.model.config();
        ensure!(!prompt_ids.is_empty(), "the prompt is empty");
        ensure!(
            prompt_ids.len() <= cfg.max_position_embeddings,
            "prompt of {} tokens is longer than max_position_embeddings ({})",
            prompt_ids.len(),
            cfg.max_position_embeddings
        );
        let max_tokens = max_tokens.min(cfg.max_position_embeddings - prompt_ids.len() + 1);
        let mut sampler = Sampler::new(params.clone());
        let mut cache = self.model.new_cache();
        let mut stream = TextStream::default();
        let mut ids = Vec::new();
        let mut finish_reason = "length";
        if max_tokens > 0 {
            let mut logits = self
                .model
                .forward(prompt_ids, &mut cache, Logits::Last, false)?
                .logits;
            loop {
                let next = sampler.sample(&logits);
                if self.defaults.eos_token_ids.contains(&next) {
                    finish_reason = "eos";
                    break;
                }
                ids.push(next);
                if let Some(piece) = stream.push(self, &ids)? {
                    on_text(&piece);
                }
                if ids.len() >= max_tokens || cache.len() >= cfg.max_position_embeddings {
                    break;
                }
                logits = self
                    .model
                    .forward(&[next], &mut cache, Logits::Last, false)?
                    .logits;
            }
        }
        let text = self.decode(&ids)?;
        if let Some(rest) = text.get(stream.emitted..) {
            if !rest.is_empty() {
                on_text(rest);
            }
        }
        Ok(Generation {
            prompt_ids: prompt_ids.to_vec(),
            ids,
            text,
            finish_reason,
        })
    }
}

/// Emits decoded text incrementally without splitting multi-byte characters.
#[derive(Default)]
struct TextStream {
    emitted: usize,
}

impl TextStream {
    fn push(&mut self, engine: &Engine, ids: &[u32]) -> Result<Option<String>> {
        let text = engine.decode(ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_owned();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}

fn read_generation_defaults(dir: &Path, cfg: &ModelConfig) -> Result<GenerationDefaults> {
    let path = dir.join("generation_config.json");
    let mut eos = cfg.eos_token_ids.clone();
    let mut sampling = SamplingParams::default();
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if let Some(v) = json.get("eos_token_id") {
            let ids =
                parse_token_ids(v).with_context(|| format!("{}: eos_token_id", path.display()))?;
            if !ids.is_empty() {
                eos = ids;
            }
        }
        let do_sample = json
            .get("do_sample")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if do_sample {
            sampling.temperature = json
                .get("temperature")
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0) as f32;
            sampling.top_p = json.get("top_p").and_then(|v| v.as_f64()).unwrap_or(1.0) as f32;
            sampling.top_k = json.get("top_k").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        }
    }
    Ok(GenerationDefaults {
        eos_token_ids: eos,
        sampling,
    })
}

impl Engine {
    /// `[bos]` if the model has a bos token, else empty.
    pub fn bos_ids(&self) -> Vec<u32> {
        self.model.config().bos_token_id.into_iter().collect()
    }
}

impl Engine {
    /// Opens `dir` with the tiered expert store (budgets and policies from `config`).
    pub fn open_tiered(
        dir: &Path,
        config: &crate::store::StoreConfig,
    ) -> Result<(Self, Arc<crate::store::TieredExperts>)> {
        let mut store_slot = None;
        let mut error = None;
        let engine = Self::open_with(dir, |ckpt, cfg| {
            match crate::store::TieredExperts::new(ckpt.clone(), cfg, config) {
                Ok(s) => {
                    let s = Arc::new(s);
                    store_slot = Some(s.clone());
                    s as Arc<dyn ExpertProvider>
                }
                Err(e) => {
                    error = Some(e);
                    Arc::new(ResidentExperts::new(ckpt, cfg))
                }
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        let engine = engine?;
        Ok((engine, store_slot.expect("store built")))
    }
}
