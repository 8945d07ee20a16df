//! A model folder as published, opened for generation: config, checkpoint, tokenizer,
//! generation defaults, and the generation loop (prefill, then one token per step on the cache).
//!
//! Owns: reading the folder, encode/decode, incremental text streaming, the stop rules.
//! Does not own: the arithmetic (`deepseek_v3`), token choice (`sampling`).

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::experts::{ExpertProvider, ResidentExperts};
use crate::model::config::{parse_token_ids, ModelConfig};
use crate::model::deepseek_v3::{DeepseekV3, KvCache, Logits};
use crate::model::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::checkpoint::Checkpoint;

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
    /// The folder's chat template, if it has one.
    pub chat_template: Option<crate::chat::ChatTemplate>,
    /// Finds the text of any special token (a user's text that would forge a control token).
    special_text: aho_corasick::AhoCorasick,
    pub defaults: GenerationDefaults,
    pub checkpoint: Arc<Checkpoint>,
    /// Longest prompt text that can fit the context (`max_prompt_bytes`).
    max_prompt_bytes: usize,
    /// The vocabulary as the grammar engine sees it, built on the first structured request.
    grammars: std::sync::OnceLock<std::result::Result<crate::structured::Grammars, String>>,
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
    /// Bytes of prompt text past which it cannot fit the context whatever its tokens: the
    /// context length times the tokenizer's longest token (checked before tokenizing).
    pub fn max_prompt_bytes(&self) -> usize {
        self.max_prompt_bytes
    }

    /// Compiles grammars for this model's vocabulary (structured output).
    pub fn grammars(&self) -> Result<&crate::structured::Grammars> {
        self.grammars
            .get_or_init(|| {
                crate::structured::Grammars::new(
                    &self.dir,
                    &self.tokenizer,
                    self.model.config().vocab_size,
                    self.defaults.eos_token_ids.first().copied().unwrap_or(0),
                )
                .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

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
        // The cheap files first: a bad config or tokenizer is reported before any weight is read.
        let cfg = ModelConfig::from_dir(dir)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        ensure!(
            tokenizer.vocab_size() <= cfg.vocab_size,
            "the tokenizer of {} has {} tokens, more than config.json's vocab_size {}",
            dir.display(),
            tokenizer.vocab_size(),
            cfg.vocab_size
        );
        let chat_template = crate::chat::ChatTemplate::from_dir(dir)?;
        let special_text = aho_corasick::AhoCorasick::new(tokenizer.special_tokens())
            .context("cannot index the tokenizer's special tokens")?;
        let defaults = read_generation_defaults(dir, &cfg)?;
        let max_prompt_bytes = cfg
            .max_position_embeddings
            .saturating_mul(tokenizer.max_token_bytes().max(1));
        let ckpt = Arc::new(Checkpoint::open(dir, cfg.quantization())?);
        let experts = make_experts(ckpt.clone(), &cfg);
        let model = DeepseekV3::load(cfg, &ckpt, experts)
            .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            model,
            tokenizer,
            chat_template,
            special_text,
            defaults,
            checkpoint: ckpt,
            max_prompt_bytes,
            grammars: std::sync::OnceLock::new(),
        })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. `<|bos|>`) are recognised;
    /// nothing is added that the tokenizer does not add (its post-processor, or a tiktoken
    /// folder's `add_bos_token`), and a text that starts with the BOS token gets no second one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, self.model.config().bos_token_id)
    }

    /// Whether `text` holds the text of a special token.
    pub fn contains_special(&self, text: &str) -> bool {
        self.special_text.is_match(text)
    }

    /// Token ids of a prompt given as `(text, is_user_text)` segments: template text reads
    /// special-token text as control tokens, user text as ordinary text. The tokenizer's own
    /// prefix (BOS) is added once, as [`Engine::encode`] adds it.
    pub fn encode_segments(&self, segments: &[(String, bool)]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (i, (text, user)) in segments.iter().enumerate() {
            match (i, user) {
                (0, false) => ids = self.encode(text)?,
                (0, true) => {
                    ids = self.encode("")?;
                    ids.extend(self.tokenizer.encode_plain(text)?);
                }
                (_, true) => ids.extend(self.tokenizer.encode_plain(text)?),
                (_, false) => ids.extend(self.tokenizer.encode_bare(text)?),
            }
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true)
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
        let mut seq = SequenceState::new(self, prompt_ids, max_tokens, params, Vec::new())?;
        if let Some(piece) = seq.prefill(self)? {
            on_text(&piece);
        }
        while let Some(next) = seq.next_input() {
            let logits = self
                .model
                .forward(&[next], &mut seq.cache, Logits::Last, false)?
                .logits;
            if let Some(piece) = seq.accept(self, &logits)? {
                on_text(&piece);
            }
        }
        Ok(seq.into_generation())
    }
}

/// A generated token's log-probability and the most likely alternatives at its step: the
/// log-softmax of the model's logits (before temperature and truncation, as vLLM reports them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// `id`'s entry with the `top` most likely tokens of `logits`.
    pub fn of(logits: &[f32], id: u32, top: usize) -> Self {
        let max = logits
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
        let lse = max + sum.ln() as f32;
        let top = crate::model::router::top_k_indices(logits, top)
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
        Self {
            id,
            logprob: logits[id as usize] - lse,
            top,
        }
    }
}

/// One sequence being generated: its cache, sampler, output and stop rules. `generate` drives
/// one; the server's scheduler drives many through batched forward passes, so both produce the
/// same tokens and text for the same request.
pub struct SequenceState {
    pub cache: KvCache,
    sampler: Sampler,
    prompt_ids: Vec<u32>,
    ids: Vec<u32>,
    max_tokens: usize,
    stop: Vec<String>,
    /// Bytes of the text already handed out.
    emitted: usize,
    /// The text, cut at a stop string once one appears.
    text: String,
    finish_reason: Option<&'static str>,
    /// Special tokens decoded into the text (a tool-call parser's markers); others are left out.
    keep_special: Vec<u32>,
    /// Report log-probabilities with this many alternatives per token.
    logprobs: Option<usize>,
    /// Entries not yet taken.
    pending_logprobs: Vec<TokenLogprob>,
    /// Added to a token's logit before sampling (OpenAI's `logit_bias`).
    logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow (structured output).
    constraint: Option<crate::structured::Constraint>,
}

impl SequenceState {
    /// Checks the request against the model's limits.
    pub fn new(
        engine: &Engine,
        prompt_ids: &[u32],
        max_tokens: usize,
        params: &SamplingParams,
        stop: Vec<String>,
    ) -> Result<Self> {
        params.validate()?;
        let cfg = engine.model.config();
        ensure!(!prompt_ids.is_empty(), "the prompt is empty");
        ensure!(
            prompt_ids.len() <= cfg.max_position_embeddings,
            "prompt of {} tokens is longer than max_position_embeddings ({})",
            prompt_ids.len(),
            cfg.max_position_embeddings
        );
        Ok(Self {
            cache: engine.model.new_cache(),
            sampler: Sampler::new(params.clone()),
            prompt_ids: prompt_ids.to_vec(),
            ids: Vec::new(),
            max_tokens: max_tokens.min(cfg.max_position_embeddings - prompt_ids.len() + 1),
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            emitted: 0,
            text: String::new(),
            finish_reason: (max_tokens == 0).then_some("length"),
            keep_special: Vec::new(),
            logprobs: None,
            pending_logprobs: Vec::new(),
            logit_bias: Vec::new(),
            constraint: None,
        })
    }

    /// Adds `bias` to these tokens' logits before each sampling (not to reported logprobs).
    pub fn with_logit_bias(mut self, bias: Vec<(u32, f32)>) -> Self {
        self.logit_bias = bias;
        self
    }

    /// Samples only what `constraint` allows (not reflected in reported logprobs).
    pub fn with_constraint(mut self, constraint: Option<crate::structured::Constraint>) -> Self {
        self.constraint = constraint;
        self
    }

    /// Records each generated token's log-probability with `top` alternatives.
    pub fn with_logprobs(mut self, top: Option<usize>) -> Self {
        self.logprobs = top;
        self
    }

    /// The log-probabilities recorded since the last call.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.pending_logprobs)
    }

    /// Keeps these special tokens in the text (default: every special token is left out).
    pub fn keep_special_tokens(mut self, keep: Vec<u32>) -> Self {
        self.keep_special = keep;
        self
    }

    /// Runs the prompt and takes the first token; returns new text, if any.
    pub fn prefill(&mut self, engine: &Engine) -> Result<Option<String>> {
        self.prefill_on(engine, None)
    }

    /// [`Self::prefill`] with routed experts from `experts` (default: the model's own).
    pub fn prefill_on(
        &mut self,
        engine: &Engine,
        experts: Option<&dyn crate::experts::ExpertProvider>,
    ) -> Result<Option<String>> {
        if self.finish_reason.is_some() {
            return Ok(None);
        }
        let ids = &self.prompt_ids;
        let cache = &mut self.cache;
        let logits = match experts {
            Some(e) => engine
                .model
                .forward_on(e, ids, cache, Logits::Last, false)?,
            None => engine.model.forward(ids, cache, Logits::Last, false)?,
        }
        .logits;
        self.accept(engine, &logits)
    }

    /// Prefills `seqs` together in one forward pass on `experts` and takes each one's first
    /// token. Each result is bit-identical to `prefill_on` alone when the prompts add up to at
    /// most `kernels::ROW_INVARIANT_MAX` tokens (then every kernel computes each row on its
    /// own); the caller keeps groups within that.
    pub fn prefill_group(
        engine: &Engine,
        experts: &dyn crate::experts::ExpertProvider,
        seqs: &mut [&mut SequenceState],
    ) -> Vec<Result<Option<String>>> {
        let logits = {
            let mut batch: Vec<crate::Sequence<'_>> = seqs
                .iter_mut()
                .map(|s| crate::Sequence {
                    ids: &s.prompt_ids,
                    cache: &mut s.cache,
                })
                .collect();
            engine.model.forward_batch_on(experts, &mut batch)
        };
        match logits {
            Ok(logits) => seqs
                .iter_mut()
                .zip(&logits)
                .map(|(s, l)| s.accept(engine, l))
                .collect(),
            Err(e) => seqs.iter().map(|_| Err(anyhow::anyhow!("{e:#}"))).collect(),
        }
    }

    pub fn prompt_tokens_len(&self) -> usize {
        self.prompt_ids.len()
    }

    /// Whether the prompt has not run yet (and the sequence is not finished).
    pub fn awaits_prefill(&self) -> bool {
        self.finish_reason.is_none() && self.ids.is_empty() && self.cache.is_empty()
    }

    /// This sequence's rows in a batched forward pass: its prompt while it awaits prefill,
    /// otherwise `next` (its [`Self::next_input`]). Feed the pass's logits to [`Self::accept`].
    pub fn step_input<'a>(&'a mut self, next: &'a [u32]) -> crate::Sequence<'a> {
        let ids = if self.awaits_prefill() {
            &self.prompt_ids[..]
        } else {
            next
        };
        crate::Sequence {
            ids,
            cache: &mut self.cache,
        }
    }

    /// The token to feed next, or `None` once finished.
    pub fn next_input(&self) -> Option<u32> {
        match self.finish_reason {
            None => self.ids.last().copied(),
            Some(_) => None,
        }
    }

    /// Samples from `logits`, applies the stop rules; returns the text that became final.
    pub fn accept(&mut self, engine: &Engine, logits: &[f32]) -> Result<Option<String>> {
        let next = if self.constraint.is_none() && self.logit_bias.is_empty() {
            self.sampler.sample(logits)
        } else {
            let mut adjusted = logits.to_vec();
            for &(id, bias) in &self.logit_bias {
                if let Some(l) = adjusted.get_mut(id as usize) {
                    *l += bias;
                }
            }
            if let Some(c) = &mut self.constraint {
                c.mask(&mut adjusted)?;
            }
            self.sampler.sample(&adjusted)
        };
        if let Some(c) = &mut self.constraint {
            c.advance(next)?;
        }
        if engine.defaults.eos_token_ids.contains(&next) {
            self.finish_reason = Some("eos");
        } else {
            if let Some(top) = self.logprobs {
                self.pending_logprobs
                    .push(TokenLogprob::of(logits, next, top));
            }
            self.ids.push(next);
            let cfg = engine.model.config();
            if self.ids.len() >= self.max_tokens || self.cache.len() >= cfg.max_position_embeddings
            {
                self.finish_reason = Some("length");
            }
            let text = engine
                .tokenizer
                .decode_keeping(&self.ids, &self.keep_special)?;
            match self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                Some(cut) => {
                    self.text = text[..cut].to_owned();
                    self.finish_reason = Some("stop");
                }
                None => self.text = text,
            }
        }
        Ok(self.release())
    }

    /// Text that can no longer change: complete characters, and nothing that might still turn
    /// out to begin a stop string (held back until the sequence ends).
    fn release(&mut self) -> Option<String> {
        let mut end = self.text.len();
        if self.finish_reason.is_none() {
            if self.text.ends_with('\u{FFFD}') {
                return None;
            }
            let hold = self
                .stop
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        if end <= self.emitted {
            return None;
        }
        let piece = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        Some(piece)
    }

    /// Ends the sequence after an error (it produces nothing more).
    pub fn abort(&mut self) {
        self.finish_reason = Some("error");
    }

    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    pub fn finish_reason(&self) -> Option<&'static str> {
        self.finish_reason
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_ids.len()
    }

    pub fn completion_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn into_generation(self) -> Generation {
        Generation {
            prompt_ids: self.prompt_ids,
            ids: self.ids,
            text: self.text,
            finish_reason: self.finish_reason.unwrap_or("length"),
        }
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
        config: &crate::experts::tiered::StoreConfig,
    ) -> Result<(Self, Arc<crate::experts::tiered::TieredExperts>)> {
        let mut store_slot = None;
        let mut error = None;
        let engine =
            Self::open_with(
                dir,
                |ckpt, cfg| match crate::experts::tiered::TieredExperts::new(
                    ckpt.clone(),
                    cfg,
                    config,
                ) {
                    Ok(s) => {
                        let s = Arc::new(s);
                        store_slot = Some(s.clone());
                        s as Arc<dyn ExpertProvider>
                    }
                    Err(e) => {
                        error = Some(e);
                        Arc::new(ResidentExperts::new(ckpt, cfg))
                    }
                },
            );
        if let Some(e) = error {
            return Err(e);
        }
        #[allow(unused_mut)]
        let mut engine = engine?;
        // The CUDA device tier also holds attention's projections, the dense MLPs and the
        // shared experts.
        if config.device == crate::experts::tiered::Device::Cuda {
            if let Ok(gpu) = crate::gpu::gpu() {
                let ckpt = engine.checkpoint.clone();
                engine.model.place_on_gpu(&gpu, &ckpt)?;
            }
        }
        Ok((engine, store_slot.expect("store built")))
    }
}
