//! MLA attention (DeepseekV3Attention) with the up-projections absorbed: its weights, the
//! query, latent and rope key of a chunk, attention over the cache, the output projection; on
//! the CPU per sequence, or whole on the GPU (`gpu::GpuMla`) after `place_on_gpu`.

use super::*;

/// An attention weight, in host memory or, after `place_on_gpu`, in GPU memory.
pub(super) enum Proj {
    /// Checkpoint tensor `name`, `[n, k]`: as stored where the CPU computes it so (a view of
    /// the mapped checkpoint), else in compute form.
    Host {
        w: HostMatrix,
        k: usize,
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        name: String,
    },
    /// MLA's per-head matrices derived from `kv_b_proj` (W_UK^T, W_UV): `groups` matrices
    /// `[n, k]` in f32.
    Heads {
        w: Vec<f32>,
        groups: usize,
        k: usize,
    },
    Gpu(crate::gpu::GpuMatrix),
}

impl Proj {
    /// Checkpoint tensor `name` of shape `[n, k]`.
    pub(super) fn linear(ckpt: &Checkpoint, name: String, [n, k]: [usize; 2]) -> Result<Self> {
        Ok(Proj::Host {
            w: HostMatrix::load(ckpt, &name, [n, k])?,
            k,
            name,
        })
    }

    /// `out [t, groups, n]`: each group's matrix times `x [t, groups, x_stride]`'s first `k`
    /// values (a plain projection: one group, `x_stride = k`).
    pub(super) fn apply(&self, x: &[f32], x_stride: usize, out: &mut [f32]) -> Result<()> {
        match self {
            Proj::Host { w, k, .. } if x_stride == *k => w.linear(x, *k, out)?,
            Proj::Host { w, k, .. } => {
                let packed: Vec<f32> = x.chunks(x_stride).flat_map(|r| &r[..*k]).copied().collect();
                w.linear(&packed, *k, out)?
            }
            Proj::Heads { w, groups, k } => grouped_rows(w, *groups, *k, x, x_stride, out),
            Proj::Gpu(m) => m.forward(x, x_stride, out)?,
        }
        Ok(())
    }

    pub(super) fn move_to_gpu(
        &mut self,
        gpu: &Arc<crate::gpu::Gpu>,
        ckpt: &Checkpoint,
    ) -> Result<()> {
        use crate::gpu::GpuMatrix;
        let m = match self {
            Proj::Host { w, k, name } => {
                // As stored (FP8: a quarter of the f32 bytes) when a kernel reads the format.
                let stored = match w {
                    HostMatrix::Stored(s) => {
                        GpuMatrix::upload_stored(gpu, &s.tensor, *k, s.fp8_block())?
                    }
                    HostMatrix::Compute(_) => {
                        let t = crate::experts::OwnedTensor::read(ckpt, name)?;
                        GpuMatrix::upload_stored(gpu, &t, *k, ckpt.fp8_block())?
                    }
                };
                match stored {
                    Some(m) => m,
                    None => GpuMatrix::upload(gpu, &w.to_f32()?, 1, *k)?,
                }
            }
            Proj::Heads { w, groups, k } => GpuMatrix::upload(gpu, w, *groups, *k)?,
            Proj::Gpu(_) => return Ok(()),
        };
        *self = Proj::Gpu(m);
        Ok(())
    }
}

pub(super) enum QProj {
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
pub(super) struct Attention {
    pub(super) q: QProj,
    /// `kv_a_proj_with_mqa`: `[kv_lora_rank + qk_rope_head_dim, hidden]`.
    pub(super) kv_a: Proj,
    pub(super) kv_a_norm: Vec<f32>,
    /// `kv_b_proj`'s key rows per head, transposed: `[heads, kv_lora_rank, qk_nope_head_dim]`.
    pub(super) w_uk_t: Proj,
    /// `kv_b_proj`'s value rows per head: `[heads, v_head_dim, kv_lora_rank]`.
    pub(super) w_uv: Proj,
    /// `o_proj`: `[hidden, heads * v_head_dim]`.
    pub(super) o_proj: Proj,
    /// With every projection in GPU memory (`place_on_gpu`): the norms there too, and the
    /// whole of attention runs on the GPU over a device cache.
    pub(super) core: Option<crate::gpu::GpuMla>,
}

impl Attention {
    pub(super) fn projections(&mut self) -> Vec<&mut Proj> {
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

impl DeepseekV3 {
    /// DeepseekV3Attention over the chunk's normalised inputs `xn` (`[t, hidden]`), writing
    /// `o_proj(...)` to `out`. Appends the chunk's latents and rope keys to the cache.
    pub(super) fn attention(
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
    pub(super) fn attention_gpu(
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
                Proj::Host { .. } | Proj::Heads { .. } => {
                    anyhow::bail!("a projection is not in GPU memory")
                }
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
    pub(super) fn attention_in(
        &self,
        attn: &Attention,
        xn: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
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
    pub(super) fn attend(
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
    pub(super) fn attention_out(
        &self,
        attn: &Attention,
        ctx: &[f32],
        out: &mut [f32],
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (nh, v, lora) = (cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank);
        let mut o = vec![0f32; ctx.len() / lora * v];
        attn.w_uv.apply(ctx, lora, &mut o)?;
        attn.o_proj.apply(&o, nh * v, out)
    }
}
