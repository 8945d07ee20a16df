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

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::sync::Arc;

use crate::experts::{expert_prefix, ExpertProvider, ExpertWeights, FfnWeights};
use crate::kernels::{
    self, axpy, dots_one_input, grouped_rows, linear, rms_norm, rms_norm_inplace, softmax_inplace,
};
use crate::model::config::ModelConfig;
use crate::model::rope::Rope;
use crate::model::router::{Gate, LayerRouting};
use crate::weights::checkpoint::Checkpoint;

/// An attention weight: `groups` matrices `[n, k]` (one for a projection, one per head for
/// MLA's W_UK^T and W_UV), in host memory or, after `place_on_gpu`, in GPU memory.
enum Proj {
    Host {
        w: Vec<f32>,
        groups: usize,
        k: usize,
        /// The checkpoint tensor `w` was decoded from, if it is one (not a derived matrix):
        /// the GPU takes it as stored.
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        stored: Option<String>,
    },
    #[cfg(feature = "cuda")]
    Gpu(crate::gpu::GpuMatrix),
}

impl Proj {
    /// Checkpoint tensor `name` of shape `[n, k]`, decoded to f32.
    fn linear(ckpt: &Checkpoint, name: String, [n, k]: [usize; 2]) -> Result<Self> {
        Ok(Proj::Host {
            w: ckpt.read_f32(&name, &[n, k])?,
            groups: 1,
            k,
            stored: Some(name),
        })
    }

    /// `out [t, groups, n]`: each group's matrix times `x [t, groups, x_stride]`'s first `k`
    /// values (a plain projection: one group, `x_stride = k`).
    fn apply(&self, x: &[f32], x_stride: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Proj::Host {
                w, groups: 1, k, ..
            } if x_stride == *k => linear(x, w, *k, out),
            Proj::Host { w, groups, k, .. } => grouped_rows(w, *groups, *k, x, x_stride, out),
            #[cfg(feature = "cuda")]
            Proj::Gpu(m) => m.forward(x, x_stride, out)?,
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn move_to_gpu(&mut self, gpu: &Arc<crate::gpu::Gpu>, ckpt: &Checkpoint) -> Result<()> {
        use crate::gpu::GpuMatrix;
        if let Proj::Host {
            w,
            groups,
            k,
            stored,
        } = self
        {
            // As stored (FP8: a quarter of the f32 bytes) when a kernel reads the format.
            let from_checkpoint = match stored {
                Some(name) => {
                    let t = crate::experts::OwnedTensor::read(ckpt, name)?;
                    GpuMatrix::upload_stored(gpu, &t, *k, ckpt.fp8_block())?
                }
                None => None,
            };
            *self = Proj::Gpu(match from_checkpoint {
                Some(m) => m,
                None => GpuMatrix::upload(gpu, w, *groups, *k)?,
            });
        }
        Ok(())
    }
}

enum QProj {
    /// `q_b_proj(q_a_layernorm(q_a_proj(x)))` when `q_lora_rank` is set.
    Lora {
        a: Proj,
        norm: Vec<f32>,
        b: Proj,
        rank: usize,
    },
    /// `q_proj(x)` when `q_lora_rank` is null.
    Full(Proj),
}

/// DeepseekV3Attention with the up-projections absorbed, so the cache holds only the
/// normalised latent `c` (kv_lora_rank) and the rotated shared rope key per position:
/// `q_nope . (W_UK c) = (W_UK^T q_nope) . c` and `sum p W_UV c = W_UV (sum p c)`.
struct Attention {
    q: QProj,
    /// `kv_a_proj_with_mqa`: `[kv_lora_rank + qk_rope_head_dim, hidden]`.
    kv_a: Proj,
    kv_a_norm: Vec<f32>,
    /// `kv_b_proj`'s key rows per head, transposed: `[heads, kv_lora_rank, qk_nope_head_dim]`.
    w_uk_t: Proj,
    /// `kv_b_proj`'s value rows per head: `[heads, v_head_dim, kv_lora_rank]`.
    w_uv: Proj,
    /// `o_proj`: `[hidden, heads * v_head_dim]`.
    o_proj: Proj,
    /// With every projection in GPU memory (`place_on_gpu`): the norms there too, and the
    /// whole of attention runs on the GPU over a device cache.
    #[cfg(feature = "cuda")]
    core: Option<crate::gpu::GpuMla>,
}

#[cfg(feature = "cuda")]
impl Attention {
    fn projections(&mut self) -> Vec<&mut Proj> {
        let mut v = match &mut self.q {
            QProj::Lora { a, b, .. } => vec![a, b],
            QProj::Full(w) => vec![w],
        };
        v.extend([
            &mut self.kv_a,
            &mut self.w_uk_t,
            &mut self.w_uv,
            &mut self.o_proj,
        ]);
        v
    }
}

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
    #[cfg(feature = "cuda")]
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
        #[cfg(feature = "cuda")]
        return self.device.iter().map(|d| d.device_bytes()).sum();
        #[cfg(not(feature = "cuda"))]
        0
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

/// A loaded DeepSeek-V3-family model. Non-expert weights are dequantized to f32 at load;
/// routed experts come from the provider when routed to.
pub struct DeepseekV3 {
    cfg: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when `tie_word_embeddings` (the embedding is used).
    /// Untied output projection in compute form (bf16 as stored for a BF16 checkpoint).
    lm_head: Option<kernels::Matrix>,
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
        let embed = ckpt.read_f32("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
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
                w_uk_t: Proj::Host {
                    w: w_uk_t,
                    groups: nh,
                    k: nope,
                    stored: None,
                },
                w_uv: Proj::Host {
                    w: w_uv,
                    groups: nh,
                    k: lora,
                    stored: None,
                },
                o_proj: Proj::linear(ckpt, format!("{a}.o_proj.weight"), [h, nh * v])?,
                #[cfg(feature = "cuda")]
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
                    Some(ExpertWeights::Compute(Arc::new(FfnWeights::load(
                        ckpt,
                        &format!("{p}.mlp.shared_experts"),
                        h,
                        cfg.moe_intermediate_size * cfg.n_shared_experts,
                    )?)))
                } else {
                    None
                };
                Ffn::Moe(Box::new(Moe { gate, shared }))
            } else {
                Ffn::Dense(ExpertWeights::Compute(Arc::new(FfnWeights::load(
                    ckpt,
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                )?)))
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
            Some(ckpt.read_matrix("lm_head.weight", &[cfg.vocab_size, h])?)
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
    #[cfg(feature = "cuda")]
    pub fn place_on_gpu(&mut self, gpu: &Arc<crate::gpu::Gpu>, ckpt: &Checkpoint) -> Result<usize> {
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
                if let ExpertWeights::Compute(_) = w {
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
    #[cfg(feature = "cuda")]
    pub fn set_gpu_attention_scores_max(&mut self, floats: usize) {
        for l in &mut self.layers {
            if let Some(core) = &mut l.attn.core {
                core.set_scores_max(floats);
            }
        }
    }

    /// Layers whose attention (projections, norms, KV cache) runs on the GPU.
    pub fn attention_on_gpu(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.layers.iter().filter(|l| l.attn.core.is_some()).count();
        #[cfg(not(feature = "cuda"))]
        0
    }

    /// Dense MLPs and shared experts that live in GPU memory.
    pub fn ffns_on_gpu(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.layers
                .iter()
                .filter(|l| match &l.ffn {
                    Ffn::Dense(w) => matches!(w, ExpertWeights::Gpu(_)),
                    Ffn::Moe(m) => matches!(m.shared, Some(ExpertWeights::Gpu(_))),
                })
                .count()
        }
        #[cfg(not(feature = "cuda"))]
        0
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
            #[cfg(feature = "cuda")]
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
            row.copy_from_slice(&self.embed[id as usize * h..(id as usize + 1) * h]);
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
            #[cfg(feature = "cuda")]
            let on_gpu = layer.attn.core.as_ref();
            #[cfg(not(feature = "cuda"))]
            let on_gpu: Option<()> = None;
            if let Some(_core) = on_gpu {
                #[cfg(feature = "cuda")]
                self.attention_gpu(&layer.attn, _core, &xn, l, seqs, &mut delta)
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
            Some(head) => head.linear(&normed, h, &mut out),
            None => linear(&normed, &self.embed, h, &mut out),
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

    /// DeepseekV3Attention over the chunk's normalised inputs `xn` (`[t, hidden]`), writing
    /// `o_proj(...)` to `out`. Appends the chunk's latents and rope keys to the cache.
    fn attention(
        &self,
        attn: &Attention,
        xn: &[f32],
        layer: usize,
        pos0: usize,
        cache: &mut KvCache,
        out: &mut [f32],
    ) -> Result<()> {
        let (mut q, kv, q_lat) = self.attention_in(attn, xn)?;
        let ctx = self.attend(attn, &mut q, &kv, &q_lat, layer, pos0, cache);
        self.attention_out(attn, &ctx, out)
    }

    /// `attention` on the GPU for every sequence of the step at once (their rows through the
    /// projections together; each attends over its own device cache): one round trip.
    #[cfg(feature = "cuda")]
    fn attention_gpu(
        &self,
        attn: &Attention,
        core: &crate::gpu::GpuMla,
        xn: &[f32],
        layer: usize,
        seqs: &mut [Sequence<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        use crate::gpu::{GpuMatrix, MlaSeq, MlaWeights};
        let half = self.rope.half_dim();
        let mut cos_sin = vec![0f32; xn.len() / self.cfg.hidden_size * 2 * half];
        let mut rows = cos_sin.chunks_exact_mut(2 * half);
        for s in seqs.iter() {
            ensure!(
                s.cache.latent[layer].is_empty(),
                "a cache filled on the CPU cannot go on on the GPU"
            );
            for pos in s.cache.len..s.cache.len + s.ids.len() {
                let (cos, sin) = rows.next().expect("a row per token").split_at_mut(half);
                self.rope.cos_sin(pos, cos, sin);
            }
        }
        fn m(p: &Proj) -> Result<&GpuMatrix> {
            match p {
                Proj::Gpu(m) => Ok(m),
                Proj::Host { .. } => anyhow::bail!("a projection is not in GPU memory"),
            }
        }
        let q = match &attn.q {
            QProj::Lora { a, b, .. } => vec![m(a)?, m(b)?],
            QProj::Full(w) => vec![m(w)?],
        };
        let weights = MlaWeights {
            q: &q,
            kv_a: m(&attn.kv_a)?,
            w_uk_t: m(&attn.w_uk_t)?,
            w_uv: m(&attn.w_uv)?,
            o_proj: m(&attn.o_proj)?,
        };
        let mut on_device: Vec<MlaSeq<'_>> = seqs
            .iter_mut()
            .map(|s| MlaSeq {
                rows: s.ids.len(),
                pos0: s.cache.len,
                kv: &mut s.cache.device[layer],
            })
            .collect();
        out.copy_from_slice(&core.forward(&weights, xn, &cos_sin, &mut on_device)?);
        Ok(())
    }

    /// Attention's input projections for rows `xn`: `(q [t, heads, qk_head_dim], kv [t,
    /// kv_lora_rank + qk_rope_head_dim], q_lat [t, heads, kv_lora_rank])`.
    fn attention_in(&self, attn: &Attention, xn: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        let t = xn.len() / h;
        let (nh, qk) = (cfg.num_attention_heads, cfg.qk_head_dim());
        let (lora, rope_d) = (cfg.kv_lora_rank, cfg.qk_rope_head_dim);
        // Queries: q_b_proj(q_a_layernorm(q_a_proj(x))) or q_proj(x); [t, heads, qk_head_dim].
        let mut q = vec![0f32; t * nh * qk];
        match &attn.q {
            QProj::Lora { a, norm, b, rank } => {
                let mut qa = vec![0f32; t * rank];
                a.apply(xn, h, &mut qa)?;
                rms_norm_inplace(&mut qa, norm, cfg.rms_norm_eps);
                b.apply(&qa, *rank, &mut q)?;
            }
            QProj::Full(w) => w.apply(xn, h, &mut q)?,
        }
        // compressed_kv = kv_a_proj_with_mqa(x) = [latent (kv_lora_rank) | k_rot (qk_rope_head_dim)]
        let mut kv = vec![0f32; t * (lora + rope_d)];
        attn.kv_a.apply(xn, h, &mut kv)?;
        // Absorb W_UK: q_lat = W_UK^T q_nope, per token and head (RoPE leaves q_nope alone).
        let mut q_lat = vec![0f32; t * nh * lora];
        attn.w_uk_t.apply(&q, qk, &mut q_lat)?;
        Ok((q, kv, q_lat))
    }

    /// One sequence's attention over its cache: RoPE on `q` and the new keys, the new rows
    /// appended to `cache`, then softmax(q k^T * scale + causal mask) over the latents: `[t,
    /// heads, kv_lora_rank]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        attn: &Attention,
        q: &mut [f32],
        kv: &[f32],
        q_lat: &[f32],
        layer: usize,
        pos0: usize,
        cache: &mut KvCache,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let nh = cfg.num_attention_heads;
        let (nope, rope_d, lora) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank);
        let qk = nope + rope_d;
        let t = kv.len() / (lora + rope_d);
        let half = self.rope.half_dim();
        let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
        let latent_cache = &mut cache.latent[layer];
        let rope_cache = &mut cache.k_rope[layer];
        for i in 0..t {
            self.rope.cos_sin(pos0 + i, &mut cos, &mut sin);
            let row = &kv[i * (lora + rope_d)..(i + 1) * (lora + rope_d)];
            // kv_a_layernorm on the latent: the cache stores it normalised.
            let start = latent_cache.len();
            latent_cache.extend_from_slice(&row[..lora]);
            rms_norm_inplace(
                &mut latent_cache[start..],
                &attn.kv_a_norm,
                cfg.rms_norm_eps,
            );
            // k_rot is shared by all heads (MQA-style), rotated once.
            let start = rope_cache.len();
            rope_cache.extend_from_slice(&row[lora..]);
            self.rope.rotate(&mut rope_cache[start..], &cos, &sin);
            for head in 0..nh {
                let qh = &mut q[(i * nh + head) * qk..(i * nh + head + 1) * qk];
                self.rope.rotate(&mut qh[nope..], &cos, &sin);
            }
        }
        let latent_cache = &cache.latent[layer];
        let rope_cache = &cache.k_rope[layer];
        // Eager attention: softmax(q k^T * scale + causal mask) v over the latents, per token
        // and head: [t, heads, kv_lora_rank].
        let mut ctx = vec![0f32; t * nh * lora];
        let scale = self.softmax_scale;
        let attend = |idx: usize, ctx: &mut [f32]| {
            let i = idx / nh;
            let n_ctx = pos0 + i + 1;
            let ql = &q_lat[idx * lora..(idx + 1) * lora];
            let qr = &q[idx * qk + nope..(idx + 1) * qk];
            // (dot(ql, latent_j) + dot(qr, rope_j)) * scale for every cached position j, eight
            // positions at a time (the same bits as one by one).
            let mut scores = vec![0f32; 2 * n_ctx];
            let (latent, rope_scores) = scores.split_at_mut(n_ctx);
            dots_one_input(&latent_cache[..n_ctx * lora], lora, ql, latent);
            dots_one_input(&rope_cache[..n_ctx * rope_d], rope_d, qr, rope_scores);
            for (s, r) in latent.iter_mut().zip(&*rope_scores) {
                *s = (*s + r) * scale;
            }
            scores.truncate(n_ctx);
            softmax_inplace(&mut scores);
            for (j, &p) in scores.iter().enumerate() {
                axpy(p, &latent_cache[j * lora..(j + 1) * lora], ctx);
            }
        };
        let work = t * nh * (pos0 + t) * (lora + rope_d);
        if work > 1 << 16 {
            ctx.par_chunks_mut(lora)
                .enumerate()
                .for_each(|(idx, c)| attend(idx, c));
        } else {
            ctx.chunks_mut(lora)
                .enumerate()
                .for_each(|(idx, c)| attend(idx, c));
        }
        ctx
    }

    /// Absorbed W_UV per head, then o_proj: `out [t, hidden]` for `ctx [t, heads,
    /// kv_lora_rank]`.
    fn attention_out(&self, attn: &Attention, ctx: &[f32], out: &mut [f32]) -> Result<()> {
        let cfg = &self.cfg;
        let (nh, v, lora) = (cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank);
        let mut o = vec![0f32; ctx.len() / lora * v];
        attn.w_uv.apply(ctx, lora, &mut o)?;
        attn.o_proj.apply(&o, nh * v, out)
    }

    /// DeepseekV3MoE: route, run the routed experts (ascending id, each output times its
    /// weight x routed_scaling_factor, summed in that order per token), add the shared expert.
    fn moe(
        &self,
        provider: &dyn ExpertProvider,
        moe: &Moe,
        layer: usize,
        xn: &[f32],
        out: &mut [f32],
    ) -> Result<LayerRouting> {
        let h = self.cfg.hidden_size;
        let t = xn.len() / h;
        let k = moe.gate.top_k;
        let scores = moe.gate.scores(xn, h);
        ensure!(
            scores.sigmoid.iter().all(|x| x.is_finite()),
            "layer {layer}: the router's scores are not finite (NaN hidden states: the \
             checkpoint's weights or config.json's values are damaged)"
        );
        // Policies rank the model's own selection scores (group limit applied), so exact top-k
        // on them is the model's routing whatever the provider.
        let choice = moe.gate.selection_scores(&scores);
        let experts = match provider.select(layer, t, k, &choice) {
            Some(chosen) => chosen,
            None => moe.gate.top_k_rows(&choice),
        };
        let weights = moe.gate.weights_for(&scores, &experts);
        let routing = LayerRouting {
            top_k: k,
            experts,
            weights,
        };
        // Group token slots by expert.
        let n_experts = moe.gate.n_experts();
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
        for (slot, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            by_expert[e as usize].push((slot / k, w * self.cfg.routed_scaling_factor));
        }
        let ids: Vec<u32> = (0..n_experts as u32)
            .filter(|&e| !by_expert[e as usize].is_empty())
            .collect();
        let tokens: Vec<u32> = ids
            .iter()
            .map(|&e| by_expert[e as usize].len() as u32)
            .collect();
        let weights = provider
            .fetch(layer, &ids, &tokens)
            .with_context(|| format!("fetching experts of layer {layer}"))?;
        ensure!(
            weights.len() == ids.len(),
            "expert provider returned {} experts for {} requested",
            weights.len(),
            ids.len()
        );
        let lookahead = provider.lookahead();
        if lookahead > 0 {
            // Speculative routing: the next MoE layers' gates on this layer's input.
            let outlook: Vec<(usize, Vec<f32>)> = self
                .layers
                .iter()
                .enumerate()
                .skip(layer + 1)
                .filter_map(|(l, next)| match &next.ffn {
                    Ffn::Moe(m) => {
                        let scores = m.gate.scores(xn, h);
                        Some((l, m.gate.selection_scores(&scores).into_owned()))
                    }
                    Ffn::Dense(_) => None,
                })
                .take(lookahead)
                .collect();
            provider.routed(layer, t, &ids, &outlook);
        } else {
            provider.routed(layer, t, &ids, &[]);
        }
        // Each expert's rows, then every expert (the shared one last) in one call: those in GPU
        // memory run together.
        let gather = |e: &u32| {
            let rows = &by_expert[*e as usize];
            let mut x = Vec::with_capacity(rows.len() * h);
            for &(tok, _) in rows {
                x.extend_from_slice(&xn[tok * h..(tok + 1) * h]);
            }
            x
        };
        let inputs: Vec<Vec<f32>> = if t > 1 {
            ids.par_iter().map(gather).collect()
        } else {
            ids.iter().map(gather).collect()
        };
        let mut jobs: Vec<(&ExpertWeights, &[f32])> = weights
            .iter()
            .zip(&inputs)
            .map(|(w, x)| (w, &x[..]))
            .collect();
        // A GPU shared expert joins the routed ones' launches; on the CPU it runs after them
        // with every core (as one task among the routed experts it would run on one).
        let shared_with_routed = moe.shared.as_ref().filter(|s| s.on_gpu());
        if let Some(shared) = shared_with_routed {
            jobs.push((shared, xn));
        }
        let mut outputs = ExpertWeights::forward_all(&jobs, h, t > 1)
            .with_context(|| format!("experts of layer {layer}"))?;
        let shared = match (&moe.shared, shared_with_routed) {
            (Some(_), Some(_)) => outputs.pop(),
            (Some(shared), None) => {
                let mut s = vec![0f32; t * h];
                shared
                    .forward(xn, h, &mut s)
                    .with_context(|| format!("shared expert of layer {layer}"))?;
                Some(s)
            }
            (None, _) => None,
        };
        out.iter_mut().for_each(|x| *x = 0.0);
        for (e, y) in ids.iter().zip(&outputs) {
            for (r, &(tok, w)) in by_expert[*e as usize].iter().enumerate() {
                axpy(w, &y[r * h..(r + 1) * h], &mut out[tok * h..(tok + 1) * h]);
            }
        }
        if let Some(s) = shared {
            add_inplace(out, &s);
        }
        Ok(routing)
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

/// Checks that every tensor the architecture reads exists with the right shape and a
/// supported dtype, reading headers only.
pub(crate) fn check_tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<()> {
    let h = cfg.hidden_size;
    let nh = cfg.num_attention_heads;
    let qk = cfg.qk_head_dim();
    let lora = cfg.kv_lora_rank;
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        want.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    let ffn = |want: &mut Vec<(String, Vec<usize>)>, p: String, i: usize| {
        want.push((format!("{p}.gate_proj.weight"), vec![i, h]));
        want.push((format!("{p}.up_proj.weight"), vec![i, h]));
        want.push((format!("{p}.down_proj.weight"), vec![h, i]));
    };
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        want.push((format!("{p}.input_layernorm.weight"), vec![h]));
        want.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        match cfg.q_lora_rank {
            Some(r) => {
                want.push((format!("{a}.q_a_proj.weight"), vec![r, h]));
                want.push((format!("{a}.q_a_layernorm.weight"), vec![r]));
                want.push((format!("{a}.q_b_proj.weight"), vec![nh * qk, r]));
            }
            None => want.push((format!("{a}.q_proj.weight"), vec![nh * qk, h])),
        }
        want.push((
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![lora + cfg.qk_rope_head_dim, h],
        ));
        want.push((format!("{a}.kv_a_layernorm.weight"), vec![lora]));
        want.push((
            format!("{a}.kv_b_proj.weight"),
            vec![nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), lora],
        ));
        want.push((format!("{a}.o_proj.weight"), vec![h, nh * cfg.v_head_dim]));
        if cfg.is_moe_layer(l) {
            want.push((
                format!("{p}.mlp.gate.weight"),
                vec![cfg.n_routed_experts, h],
            ));
            want.push((
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![cfg.n_routed_experts],
            ));
            if cfg.n_shared_experts > 0 {
                ffn(
                    &mut want,
                    format!("{p}.mlp.shared_experts"),
                    cfg.moe_intermediate_size * cfg.n_shared_experts,
                );
            }
            for e in 0..cfg.n_routed_experts as u32 {
                ffn(&mut want, expert_prefix(l, e), cfg.moe_intermediate_size);
            }
        } else {
            ffn(&mut want, format!("{p}.mlp"), cfg.intermediate_size);
        }
    }
    // Headers only: no weight is read here.
    for (name, shape) in &want {
        let (dtype, stored) = ckpt.header(name)?;
        ensure!(
            stored == crate::weights::format::stored_shape(dtype, shape).as_slice(),
            "tensor {name} has shape {stored:?}, expected {shape:?} from config.json"
        );
        use crate::weights::format::WeightFormat;
        match WeightFormat::of_dtype(dtype) {
            Some(WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16) => {}
            Some(WeightFormat::Int8 | WeightFormat::Int4) => {
                ensure!(shape.len() == 2, "tensor {name} is quantized but not a 2-D weight");
                let scale_name = format!("{name}_qscale");
                let (_, scale) = ckpt
                    .header(&scale_name)
                    .with_context(|| format!("quantized tensor {name} needs its scales"))?;
                let want_scale = crate::weights::quant::scale_shape(shape[0], shape[1]);
                ensure!(
                    scale == want_scale,
                    "tensor {scale_name} has shape {scale:?}, expected {want_scale:?}"
                );
            }
            Some(WeightFormat::Fp8) => {
                ensure!(shape.len() == 2, "tensor {name} is F8_E4M3 but not a 2-D weight");
                ensure!(
                    cfg.fp8_block.is_some(),
                    "tensor {name} is F8_E4M3 but config.json has no quantization_config"
                );
                let [br, bc] = cfg.fp8_block.unwrap();
                let scale_name = format!("{name}_scale_inv");
                let (_, scale) = ckpt
                    .header(&scale_name)
                    .with_context(|| format!("FP8 tensor {name} needs its block scales"))?;
                let want_scale = [shape[0].div_ceil(br), shape[1].div_ceil(bc)];
                ensure!(
                    scale == want_scale,
                    "tensor {scale_name} has shape {scale:?}, expected {want_scale:?} ({br}x{bc} blocks of {shape:?})"
                );
            }
            None => anyhow::bail!(
                "tensor {name} has dtype {dtype:?}; moehost reads F32, BF16, F16, F8_E4M3 and its own int8/int4 (I8/U8) weights"
            ),
        }
    }
    Ok(())
}
