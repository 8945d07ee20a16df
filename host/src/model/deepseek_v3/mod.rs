//! DeepSeek-V3 / Kimi-K2 (`DeepseekV3ForCausalLM`) forward pass in f32, on the CPU; with
//! `place_on_gpu` (feature `cuda`) the whole of attention (projections, norms, RoPE, scores,
//! softmax, a KV cache in device memory: `gpu::GpuMla`) and the dense and shared FFNs run the
//! GPU's exact-order kernels instead, with the same bits.
//!
//! Each step follows transformers' `modeling_deepseek_v3.py` (module names cited below) and
//! matches it to float tolerance. Owns: embedding, RMSNorm, MLA attention over a cache of the
//! compressed latent, dense MLP layers, MoE layers (gate, then routed experts fetched through the
//! `ExpertProvider`, then the shared expert), final norm and lm_head.
//! Does not own: where expert weights live (`experts`), the gate's arithmetic (`router`),
//! sampling or tokenization.
//!
//! This file: loading, the layer loop (`forward_rows`) and the caches; `attention` (MLA),
//! `moe` (the MoE layer step over the provider), `check` (every tensor's header checked before
//! any weight is read).

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::sync::Arc;

use crate::experts::{ExpertProvider, ExpertWeights, LayerStep};
use crate::kernels::{
    self, axpy, dots_one_input, grouped_rows, rms_norm, rms_norm_inplace, softmax_inplace,
};
use crate::model::config::ModelConfig;
use crate::model::rope::Rope;
use crate::model::router::{Gate, LayerRouting};
use crate::weights::checkpoint::Checkpoint;
use crate::weights::ffn::HostMatrix;

mod attention;
mod check;
mod moe;

use attention::{Attention, Proj, QProj};
pub(crate) use check::check_tensors;

struct Moe {
    gate: Gate,
    /// Compute form, or on the GPU after `place_on_gpu`.
    shared: Option<ExpertWeights>,
}

enum Ffn {
    /// Compute form, or on the GPU after `place_on_gpu`.
    Dense(ExpertWeights),
    Moe(Box<Moe>),
}

struct Layer {
    input_norm: Vec<f32>,
    post_attention_norm: Vec<f32>,
    attn: Attention,
    ffn: Ffn,
}

/// The compressed KV cache of one sequence: per layer, per position, the normalised latent
/// and the rotated rope key. About `(kv_lora_rank + qk_rope_head_dim) * 4` bytes per layer
/// and position (Kimi-K2 stores 576 values, not 64 heads x 320).
pub struct KvCache {
    len: usize,
    latent: Vec<Vec<f32>>,
    k_rope: Vec<Vec<f32>>,
    /// Per layer, for a layer whose attention runs on the GPU: the same rows in device memory
    /// (positions from `len` on are stale, so `truncate` needs nothing here).
    device: Vec<crate::gpu::DeviceKv>,
}

impl KvCache {
    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of this cache in GPU memory (layers whose attention runs there).
    pub fn device_bytes(&self) -> usize {
        self.device.iter().map(|d| d.device_bytes()).sum()
    }

    /// Forgets positions from `len` on (e.g. to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize, cfg: &ModelConfig) {
        if len < self.len {
            self.len = len;
            for (l, r) in self.latent.iter_mut().zip(self.k_rope.iter_mut()) {
                l.truncate(len * cfg.kv_lora_rank);
                r.truncate(len * cfg.qk_rope_head_dim);
            }
        }
    }
}

/// Called after each decoder layer with its index, input and output hidden states.
type LayerObserver<'a> = &'a mut dyn FnMut(usize, &[f32], &[f32]);

/// One sequence of a batched forward pass: the tokens to run and its cache.
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// Which logits a forward pass computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position (`[tokens, vocab]`).
    All,
    /// The last position only (`[1, vocab]`): what generation needs.
    Last,
}

/// The result of one forward pass over a chunk of tokens.
pub struct ForwardOutput {
    /// Row-major `[rows, vocab]`.
    pub logits: Vec<f32>,
    /// Routing per MoE layer in layer order, if asked for.
    pub routing: Vec<LayerRouting>,
}

/// A loaded DeepSeek-V3-family model. Non-expert weights are views of the mapped checkpoint
/// where the CPU computes their format as stored, else decoded to compute form at load (MLA's
/// per-head matrices, derived from `kv_b_proj`, always are); routed experts come from the
/// provider when routed to.
pub struct DeepseekV3 {
    cfg: ModelConfig,
    /// The embedding table (and the output head when tied): as stored where the CPU computes
    /// it so, else in compute form.
    embed: HostMatrix,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// The untied output projection; `None` when `tie_word_embeddings` (the embedding is
    /// used).
    lm_head: Option<HostMatrix>,
    rope: Rope,
    softmax_scale: f32,
    experts: Arc<dyn ExpertProvider>,
}

impl DeepseekV3 {
    /// Loads the always-resident weights from `ckpt` and takes routed experts from `experts`.
    /// Every tensor the architecture needs (experts included) is checked for presence, shape
    /// and dtype first, from the headers alone, so a damaged checkpoint fails here.
    pub fn load(
        cfg: ModelConfig,
        ckpt: &Checkpoint,
        experts: Arc<dyn ExpertProvider>,
    ) -> Result<Self> {
        check_tensors(&cfg, ckpt)?;
        let h = cfg.hidden_size;
        let nh = cfg.num_attention_heads;
        let (nope, rope_d, v, lora) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let qk = cfg.qk_head_dim();
        let embed = HostMatrix::load(ckpt, "model.embed_tokens.weight", [cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let q = match cfg.q_lora_rank {
                Some(rank) => QProj::Lora {
                    a: Proj::linear(ckpt, format!("{a}.q_a_proj.weight"), [rank, h])?,
                    norm: ckpt.read_vec(&format!("{a}.q_a_layernorm.weight"), rank)?,
                    b: Proj::linear(ckpt, format!("{a}.q_b_proj.weight"), [nh * qk, rank])?,
                    rank,
                },
                None => QProj::Full(Proj::linear(
                    ckpt,
                    format!("{a}.q_proj.weight"),
                    [nh * qk, h],
                )?),
            };
            // kv_b_proj rows, per head: qk_nope_head_dim key rows then v_head_dim value rows.
            let kv_b = ckpt.read_f32(&format!("{a}.kv_b_proj.weight"), &[nh * (nope + v), lora])?;
            let mut w_uk_t = vec![0f32; nh * lora * nope];
            let mut w_uv = vec![0f32; nh * v * lora];
            for head in 0..nh {
                let base = head * (nope + v) * lora;
                for n in 0..nope {
                    for c in 0..lora {
                        w_uk_t[(head * lora + c) * nope + n] = kv_b[base + n * lora + c];
                    }
                }
                w_uv[head * v * lora..(head + 1) * v * lora]
                    .copy_from_slice(&kv_b[base + nope * lora..base + (nope + v) * lora]);
            }
            let attn = Attention {
                q,
                kv_a: Proj::linear(
                    ckpt,
                    format!("{a}.kv_a_proj_with_mqa.weight"),
                    [lora + rope_d, h],
                )?,
                kv_a_norm: ckpt.read_vec(&format!("{a}.kv_a_layernorm.weight"), lora)?,
                w_uk_t: Proj::Heads {
                    w: w_uk_t,
                    groups: nh,
                    k: nope,
                },
                w_uv: Proj::Heads {
                    w: w_uv,
                    groups: nh,
                    k: lora,
                },
                o_proj: Proj::linear(ckpt, format!("{a}.o_proj.weight"), [h, nh * v])?,
                core: None,
            };
            let ffn = if cfg.is_moe_layer(l) {
                let e = cfg.n_routed_experts;
                let gate = Gate {
                    weight: ckpt.read_f32(&format!("{p}.mlp.gate.weight"), &[e, h])?,
                    bias: ckpt.read_vec(&format!("{p}.mlp.gate.e_score_correction_bias"), e)?,
                    n_group: cfg.n_group,
                    topk_group: cfg.topk_group,
                    top_k: cfg.num_experts_per_tok,
                    norm_topk_prob: cfg.norm_topk_prob,
                };
                let shared = if cfg.n_shared_experts > 0 {
                    Some(ExpertWeights::for_cpu(
                        ckpt,
                        &format!("{p}.mlp.shared_experts"),
                        h,
                        cfg.moe_intermediate_size * cfg.n_shared_experts,
                    )?)
                } else {
                    None
                };
                Ffn::Moe(Box::new(Moe { gate, shared }))
            } else {
                Ffn::Dense(ExpertWeights::for_cpu(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                )?)
            };
            layers.push(Layer {
                input_norm: ckpt.read_vec(&format!("{p}.input_layernorm.weight"), h)?,
                post_attention_norm: ckpt
                    .read_vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                attn,
                ffn,
            });
        }
        let norm = ckpt.read_vec("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(HostMatrix::load(
                ckpt,
                "lm_head.weight",
                [cfg.vocab_size, h],
            )?)
        };
        Ok(Self {
            rope: Rope::new(&cfg),
            softmax_scale: cfg.softmax_scale(),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            experts,
        })
    }

    /// Moves attention's projections, the dense MLPs and the shared experts into GPU memory
    /// (the CUDA device tier): they then run the exact-order GPU kernel, giving the CPU's bits
    /// up to `ROW_INVARIANT_MAX` rows (see `gpu::GpuMatrix` above). Returns how many FFNs moved.
    pub fn place_on_gpu(&mut self, gpu: &Arc<crate::gpu::Gpu>, ckpt: &Checkpoint) -> Result<usize> {
        anyhow::ensure!(
            !crate::weights::q8::enabled(),
            "--activations q8 runs on the CPU only (the GPU kernels keep f32 activations)"
        );
        let mut moved = 0;
        let cfg = &self.cfg;
        let dims = crate::gpu::MlaDims {
            hidden: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            q_rank: cfg.q_lora_rank,
            nope: cfg.qk_nope_head_dim,
            rope: cfg.qk_rope_head_dim,
            lora: cfg.kv_lora_rank,
            v: cfg.v_head_dim,
            eps: cfg.rms_norm_eps,
            scale: self.softmax_scale,
            interleave: self.rope.interleave(),
        };
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let attn = &mut layer.attn;
            for p in attn.projections() {
                p.move_to_gpu(gpu, ckpt)?;
            }
            let q_norm = match &attn.q {
                QProj::Lora { norm, .. } => Some(&norm[..]),
                QProj::Full(_) => None,
            };
            attn.core = Some(crate::gpu::GpuMla::new(gpu, q_norm, &attn.kv_a_norm, dims)?);
            let (slot, prefix) = match &mut layer.ffn {
                Ffn::Dense(w) => (Some(w), format!("model.layers.{l}.mlp")),
                Ffn::Moe(m) => (
                    m.shared.as_mut(),
                    format!("model.layers.{l}.mlp.shared_experts"),
                ),
            };
            if let Some(w) = slot {
                if !matches!(w, ExpertWeights::Gpu(_)) {
                    // As stored, like the routed experts: the same values the CPU decoded.
                    let stored = crate::experts::ExpertBytes::read_prefix(ckpt, &prefix)?;
                    let g = crate::gpu::GpuExpert::upload_stored(gpu, &stored)?;
                    *w = ExpertWeights::Gpu(Arc::new(g));
                    moved += 1;
                }
            }
        }
        Ok(moved)
    }

    /// Bounds the attention scores each GPU layer holds at once to `floats` (by default 256 MiB
    /// of them): a long prefill then attends in chunks of its tokens, with the same bits.
    pub fn set_gpu_attention_scores_max(&mut self, floats: usize) {
        for l in &mut self.layers {
            if let Some(core) = &mut l.attn.core {
                core.set_scores_max(floats);
            }
        }
    }

    /// Layers whose attention (projections, norms, KV cache) runs on the GPU.
    pub fn attention_on_gpu(&self) -> usize {
        self.layers.iter().filter(|l| l.attn.core.is_some()).count()
    }

    /// Dense MLPs and shared experts that live in GPU memory.
    pub fn ffns_on_gpu(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| match &l.ffn {
                Ffn::Dense(w) => w.on_gpu(),
                Ffn::Moe(m) => m.shared.as_ref().is_some_and(ExpertWeights::on_gpu),
            })
            .count()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            len: 0,
            latent: vec![Vec::new(); self.cfg.num_hidden_layers],
            k_rope: vec![Vec::new(); self.cfg.num_hidden_layers],
            device: (0..self.cfg.num_hidden_layers)
                .map(|_| Default::default())
                .collect(),
        }
    }

    /// Runs `ids` at positions `cache.len()..`, appending them to the cache. With
    /// `record_routing`, returns every MoE layer's routing of these tokens.
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        record_routing: bool,
    ) -> Result<ForwardOutput> {
        self.forward_on(&*self.experts, ids, cache, logits, record_routing)
    }

    /// [`Self::forward`] with routed experts from `experts` instead of the model's own
    /// provider: the same weights served from another expert store (the server's A/B arms).
    pub fn forward_on(
        &self,
        experts: &dyn ExpertProvider,
        ids: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        record_routing: bool,
    ) -> Result<ForwardOutput> {
        let mut seqs = [Sequence { ids, cache }];
        let (out, routing) = self.forward_rows(experts, &mut seqs, logits, record_routing, None)?;
        Ok(ForwardOutput {
            logits: out,
            routing,
        })
    }

    /// One forward pass over several sequences at once (continuous batching): each runs its
    /// `ids` on its own cache; the layers' matmuls and every MoE layer step are shared, so the
    /// step's expert loads serve all of them. Returns each sequence's last-position logits.
    /// A sequence's results are bit-identical to running it alone whenever each sequence
    /// contributes at most `kernels::ROW_INVARIANT_MAX` rows to the batch (decode steps).
    pub fn forward_batch(&self, seqs: &mut [Sequence<'_>]) -> Result<Vec<Vec<f32>>> {
        self.forward_batch_on(&*self.experts, seqs)
    }

    /// [`Self::forward_batch`] with routed experts from `experts` (see [`Self::forward_on`]).
    pub fn forward_batch_on(
        &self,
        experts: &dyn ExpertProvider,
        seqs: &mut [Sequence<'_>],
    ) -> Result<Vec<Vec<f32>>> {
        let v = self.cfg.vocab_size;
        let mut pass = || self.forward_rows(experts, seqs, Logits::Last, false, None);
        // From a pool thread, the pass's many parallel sections fork from a worker that takes
        // part, instead of each waking a blocked caller when it ends.
        let (out, _) = if rayon::current_thread_index().is_some() {
            pass()
        } else {
            rayon::scope(|_| pass())
        }?;
        Ok(out.chunks_exact(v).map(<[f32]>::to_vec).collect())
    }

    /// [`Self::forward`] with the routing recorded and `on_layer(l, hidden_in, hidden_out)`
    /// called after every decoder layer with its input and output hidden states (`[t,
    /// hidden]`): what calibration (`moehost profile`) measures layer importance with.
    pub fn forward_observed(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        on_layer: LayerObserver<'_>,
    ) -> Result<ForwardOutput> {
        let mut seqs = [Sequence { ids, cache }];
        let (out, routing) =
            self.forward_rows(&*self.experts, &mut seqs, logits, true, Some(on_layer))?;
        Ok(ForwardOutput {
            logits: out,
            routing,
        })
    }

    /// The forward pass over the concatenated rows of `seqs`. Logits: every row (`All`) or
    /// each sequence's last row (`Last`).
    fn forward_rows(
        &self,
        experts: &dyn ExpertProvider,
        seqs: &mut [Sequence<'_>],
        logits: Logits,
        record_routing: bool,
        mut on_layer: Option<LayerObserver<'_>>,
    ) -> Result<(Vec<f32>, Vec<LayerRouting>)> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        ensure!(!seqs.is_empty(), "forward needs at least one sequence");
        let mut starts = Vec::with_capacity(seqs.len());
        let mut t = 0;
        for s in seqs.iter() {
            ensure!(!s.ids.is_empty(), "forward needs at least one token");
            ensure!(
                s.cache.len + s.ids.len() <= cfg.max_position_embeddings,
                "sequence of {} tokens exceeds max_position_embeddings ({})",
                s.cache.len + s.ids.len(),
                cfg.max_position_embeddings
            );
            starts.push(t);
            t += s.ids.len();
        }
        // DeepseekV3Model.embed_tokens
        let mut hidden = vec![0f32; t * h];
        let ids = seqs.iter().flat_map(|s| s.ids.iter());
        for (row, &id) in hidden.chunks_exact_mut(h).zip(ids) {
            ensure!(
                (id as usize) < cfg.vocab_size,
                "token id {id} out of range (vocab_size {})",
                cfg.vocab_size
            );
            self.embed.row(id as usize, h, row)?;
        }
        experts.begin_step();
        let mut routing = Vec::new();
        let mut xn = vec![0f32; t * h];
        let mut delta = vec![0f32; t * h];
        for (l, layer) in self.layers.iter().enumerate() {
            let layer_in = on_layer.as_ref().map(|_| hidden.clone());
            // DeepseekV3DecoderLayer: h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(h))
            rms_norm(&hidden, &layer.input_norm, cfg.rms_norm_eps, &mut xn);
            // Each sequence attends over its own cache: independent, so in parallel (a decode
            // batch is many one-row sequences, too small to split inside). On the GPU every
            // sequence's rows go through one call (the same bits per row; one round trip per
            // step). The CPU keeps attention per sequence: spread over its cores, that measured
            // faster.
            if let Some(core) = &layer.attn.core {
                self.attention_gpu(&layer.attn, core, &xn, l, seqs, &mut delta)
                    .with_context(|| format!("attention of layer {l} on the GPU"))?;
            } else {
                let outs = per_sequence(&mut delta, seqs, h);
                let run = |((s, &start), out): ((&mut Sequence<'_>, &usize), &mut [f32])| {
                    let rows = start * h..(start + s.ids.len()) * h;
                    let pos0 = s.cache.len;
                    self.attention(&layer.attn, &xn[rows], l, pos0, s.cache, out)
                        .with_context(|| format!("attention of layer {l}"))
                };
                if seqs.len() > 1 {
                    seqs.par_iter_mut()
                        .zip(starts.par_iter())
                        .zip(outs.into_par_iter())
                        .map(|job| kernels::as_task(|| run(job)))
                        .collect::<Result<()>>()?;
                } else {
                    seqs.iter_mut().zip(&starts).zip(outs).try_for_each(run)?;
                }
            }
            add_inplace(&mut hidden, &delta);
            rms_norm(
                &hidden,
                &layer.post_attention_norm,
                cfg.rms_norm_eps,
                &mut xn,
            );
            match &layer.ffn {
                Ffn::Dense(mlp) => mlp
                    .forward(&xn, h, &mut delta)
                    .with_context(|| format!("dense MLP of layer {l}"))?,
                Ffn::Moe(moe) => {
                    let r = self.moe(experts, moe, l, &xn, &mut delta)?;
                    if record_routing {
                        routing.push(r);
                    }
                }
            }
            add_inplace(&mut hidden, &delta);
            if let (Some(f), Some(before)) = (on_layer.as_mut(), &layer_in) {
                f(l, before, &hidden);
            }
        }
        for s in seqs.iter_mut() {
            s.cache.len += s.ids.len();
        }
        // DeepseekV3Model.norm, then lm_head.
        let rows: Vec<f32> = match logits {
            Logits::All => hidden,
            Logits::Last => seqs
                .iter()
                .zip(&starts)
                .flat_map(|(s, &start)| {
                    let last = start + s.ids.len() - 1;
                    hidden[last * h..(last + 1) * h].to_vec()
                })
                .collect(),
        };
        let mut normed = vec![0f32; rows.len()];
        rms_norm(&rows, &self.norm, cfg.rms_norm_eps, &mut normed);
        let mut out = vec![0f32; rows.len() / h * cfg.vocab_size];
        match &self.lm_head {
            Some(head) => head.linear(&normed, h, &mut out)?,
            None => self.embed.linear(&normed, h, &mut out)?,
        }
        if let Some(bad) = out.iter().position(|x| !x.is_finite()) {
            anyhow::bail!(
                "the logits are not finite (row {}, token {}): the checkpoint's weights or \
                 config.json's values are damaged",
                bad / cfg.vocab_size,
                bad % cfg.vocab_size
            );
        }
        Ok((out, routing))
    }
}

/// `rows` split into each sequence's rows of `width` values, in order.
fn per_sequence<'a>(
    rows: &'a mut [f32],
    seqs: &[Sequence<'_>],
    width: usize,
) -> Vec<&'a mut [f32]> {
    let mut parts = Vec::with_capacity(seqs.len());
    let mut rest = rows;
    for s in seqs {
        let (mine, tail) = rest.split_at_mut(s.ids.len() * width);
        parts.push(mine);
        rest = tail;
    }
    parts
}

fn add_inplace(a: &mut [f32], b: &[f32]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}
