//! MLA attention on the GPU, whole: projections, norms, RoPE, the KV cache, scores, softmax and
//! the context, with one host round trip per layer step (the normalised inputs go up, `o_proj`'s
//! output comes down).
//!
//! Owns: `GpuMla` (a layer's two norms in device memory and the dimensions), `DeviceKv` (one
//! sequence's cache of one layer in device memory, grown by doubling) and the call that chains
//! the projections (`rows_dot` kernels) with the `mla.cu` kernels. Every step gives the CPU's
//! bits (`deepseek_v3::attend`; softmax through `kernels::exp_portable`), so where attention
//! runs never changes a token, up to `ROW_INVARIANT_MAX` rows per step as for `GpuMatrix`.
//! Does not own: the projections' weights (`GpuMatrix`, held by `deepseek_v3`), RoPE's angles
//! (the host computes each row's cos/sin and sends them with the inputs), which sequences share
//! a step (`deepseek_v3::forward_rows`).

use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::Arc;

use super::{Gpu, GpuMatrix, MlaDims, MlaSeq, MlaWeights};

/// `rms_norm_rows`, `mla_append` and `mla_attend`, compiled from `mla.cu` by `nvcc -ptx
/// -arch=compute_80` (CUDA 13.0).
const MLA_PTX: &str = include_str!("mla.ptx");
/// Warps per block of `rms_norm_rows` and `mla_attend`, as `WARPS` in the kernels.
const WARPS: u32 = 8;
/// By default, at most this many attention scores in scratch at once (256 MiB): a long prefill
/// attends in chunks of its tokens.
const SCORES_MAX: usize = 64 << 20;

pub(super) struct MlaKernels {
    norm: CudaFunction,
    append: CudaFunction,
    attend: CudaFunction,
}

impl MlaKernels {
    pub(super) fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let m = ctx.load_module(cudarc::nvrtc::Ptx::from_src(MLA_PTX))?;
        Ok(Self {
            norm: m.load_function("rms_norm_rows")?,
            append: m.load_function("mla_append")?,
            attend: m.load_function("mla_attend")?,
        })
    }
}

/// One token of a call, as `Tok` in the kernels: its cache rows and its position.
#[repr(C)]
#[derive(Clone, Copy)]
struct Tok {
    cache: u64,
    pos: i32,
    pad: i32,
}

/// One sequence's cache of one layer in device memory: a row of `[latent | rope key]` per
/// position. Empty until its first step on the GPU.
#[derive(Default)]
pub struct DeviceKv {
    mem: Option<CudaSlice<f32>>,
    /// Positions the allocation holds.
    capacity: usize,
}

impl DeviceKv {
    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.len() * 4)
    }

    /// Room for `positions`, keeping the first `keep` positions' rows.
    fn reserve(&mut self, gpu: &Gpu, positions: usize, keep: usize, width: usize) -> Result<()> {
        if positions <= self.capacity {
            return Ok(());
        }
        let capacity = positions.max(2 * self.capacity).max(64);
        let mut grown = gpu.stream.alloc_zeros::<f32>(capacity * width)?;
        if let Some(old) = &self.mem {
            let n = keep.min(self.capacity) * width;
            if n > 0 {
                gpu.stream
                    .memcpy_dtod(&old.slice(..n), &mut grown.slice_mut(..n))?;
            }
        }
        self.mem = Some(grown);
        self.capacity = capacity;
        Ok(())
    }
}

/// A layer's attention norms in device memory, for `forward`.
pub struct GpuMla {
    gpu: Arc<Gpu>,
    q_a_norm: Option<CudaSlice<f32>>,
    kv_a_norm: CudaSlice<f32>,
    dims: MlaDims,
    scores_max: usize,
}

impl GpuMla {
    pub fn new(
        gpu: &Arc<Gpu>,
        q_a_norm: Option<&[f32]>,
        kv_a_norm: &[f32],
        dims: MlaDims,
    ) -> Result<Self> {
        ensure!(
            q_a_norm.map(<[f32]>::len) == dims.q_rank && kv_a_norm.len() == dims.lora,
            "attention norms do not match the layer's ranks"
        );
        ensure!(dims.rope.is_multiple_of(2), "qk_rope_head_dim must be even");
        let _one = gpu.scratch.lock().unwrap();
        gpu.ctx.bind_to_thread()?;
        let q_a_norm = q_a_norm.map(|w| gpu.stream.clone_htod(w)).transpose()?;
        let kv_a_norm = gpu.stream.clone_htod(kv_a_norm)?;
        gpu.stream.synchronize()?;
        Ok(Self {
            gpu: gpu.clone(),
            q_a_norm,
            kv_a_norm,
            dims,
            scores_max: SCORES_MAX,
        })
    }

    /// Bounds the scores held at once to `floats` (at least one token's are): fewer tokens
    /// attend per launch, the same bits.
    pub fn set_scores_max(&mut self, floats: usize) {
        self.scores_max = floats;
    }

    /// DeepseekV3Attention for the rows `xn [t, hidden]` of `seqs` (normalised inputs), with
    /// `cos_sin [t, rope]` each row's RoPE cos (first half) and sin: appends each row's latent
    /// and rope key to its sequence's cache and returns `o_proj(...)`, `[t, hidden]`.
    pub fn forward(
        &self,
        w: &MlaWeights<'_>,
        xn: &[f32],
        cos_sin: &[f32],
        seqs: &mut [MlaSeq<'_>],
    ) -> Result<Vec<f32>> {
        let d = self.dims;
        let (h, nh, lora, rope) = (d.hidden, d.heads, d.lora, d.rope);
        let qk = d.nope + rope;
        let width = lora + rope;
        let t: usize = seqs.iter().map(|s| s.rows).sum();
        ensure!(
            t > 0 && t < 1 << 16 && xn.len() == t * h && cos_sin.len() == t * rope,
            "attention: {} inputs and {} cos/sin values for {t} rows",
            xn.len(),
            cos_sin.len()
        );
        ensure!(
            w.q.len() == 1 + d.q_rank.is_some() as usize,
            "attention: {} query projections for this layer",
            w.q.len()
        );
        let max_ctx = seqs.iter().map(|s| s.pos0 + s.rows).max().unwrap_or(0);
        let chunk = (self.scores_max / (nh * max_ctx).max(1)).clamp(1, t);
        // Device work buffer: every intermediate, each part 256-byte aligned.
        let mut at = 0;
        let mut part = |n: usize| {
            let p = at;
            at += n.next_multiple_of(64);
            p as u64 * 4
        };
        let qa = part(t * d.q_rank.unwrap_or(0));
        let kv = part(t * width);
        let q = part(t * nh * qk);
        let q_lat = part(t * nh * lora);
        let ctx = part(t * nh * lora);
        let uv = part(t * nh * d.v);
        let scores = part(chunk * nh * max_ctx);
        let work_floats = at;
        // Inputs: xn, then cos/sin, then the token table (8-byte aligned).
        let toks_at = (t * h + t * rope).next_multiple_of(2);
        let in_floats = toks_at + t * std::mem::size_of::<Tok>() / 4;

        let gpu = &*self.gpu;
        let s = &gpu.stream;
        let mut scratch = gpu.scratch.lock().unwrap();
        gpu.ctx.bind_to_thread()?;
        scratch.reserve(in_floats.max(t * h))?;
        let work = scratch.reserve_work(work_floats)?;
        let mut toks = Vec::with_capacity(t);
        for sq in seqs.iter_mut() {
            sq.kv.reserve(gpu, sq.pos0 + sq.rows, sq.pos0, width)?;
            let base = sq.kv.mem.as_ref().expect("reserved").device_ptr(s).0;
            toks.extend((0..sq.rows).map(|i| Tok {
                cache: base,
                pos: (sq.pos0 + i) as i32,
                pad: 0,
            }));
        }
        let ([hx, hout], [xp, op]) = (scratch.host, scratch.device);
        // SAFETY: the host input buffer holds `floats` >= in_floats values (the table 8-byte
        // aligned in the page-aligned buffer); it is filled before the copy is queued.
        unsafe {
            let host = std::slice::from_raw_parts_mut(hx, toks_at);
            host[..t * h].copy_from_slice(xn);
            host[t * h..t * h + t * rope].copy_from_slice(cos_sin);
            // The alignment padding too: every value copied up has been written.
            host[t * h + t * rope..].fill(0.0);
            let table = hx.add(toks_at) as *mut Tok;
            for (i, tok) in toks.iter().enumerate() {
                table.add(i).write(*tok);
            }
            let staged = std::slice::from_raw_parts(hx, in_floats);
            cudarc::driver::result::memcpy_htod_async(xp, staged, s.cu_stream())?;
        }
        let toks_dev = xp + 4 * toks_at as u64;
        let cs_dev = xp + 4 * (t * h) as u64;
        let launched = (|| -> Result<()> {
            let mm = |m: &GpuMatrix, x: u64, stride: usize, out: u64| {
                gpu.launch(&m.linear, x, stride, t, out, None)
            };
            // Queries: q_b(q_a_layernorm(q_a(x))) or q_proj(x); the latent and rope key.
            match (w.q, &self.q_a_norm, d.q_rank) {
                ([a, b], Some(norm), Some(rank)) => {
                    mm(a, xp, h, work + qa)?;
                    let norm = norm.device_ptr(s).0;
                    let cfg = LaunchConfig {
                        grid_dim: ((t as u32).div_ceil(WARPS), 1, 1),
                        block_dim: (WARPS * 32, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let (x, rank_i, eps, rows) = (work + qa, rank as i32, d.eps, t as i32);
                    let mut l = s.launch_builder(&gpu.mla.norm);
                    l.arg(&x)
                        .arg(&norm)
                        .arg(&rank_i)
                        .arg(&eps)
                        .arg(&rows)
                        .arg(&rank_i);
                    // SAFETY: t rows of `rank` floats at x, `rank` weights at norm.
                    unsafe { l.launch(cfg) }.map_err(|e| anyhow!("rms_norm_rows: {e}"))?;
                    mm(b, work + qa, rank, work + q)?;
                }
                ([full], None, None) => mm(full, xp, h, work + q)?,
                _ => unreachable!("checked above"),
            }
            mm(w.kv_a, xp, h, work + kv)?;
            // Absorbed W_UK: q_lat [t, heads, lora] from each head's q_nope.
            mm(w.w_uk_t, work + q, qk, work + q_lat)?;
            let ints = [lora, rope, nh, qk].map(|v| v as i32);
            {
                let (kv_dev, q_dev) = (work + kv, work + q);
                let norm = self.kv_a_norm.device_ptr(s).0;
                let interleave = d.interleave as i32;
                let mut l = s.launch_builder(&gpu.mla.append);
                l.arg(&kv_dev)
                    .arg(&norm)
                    .arg(&d.eps)
                    .arg(&cs_dev)
                    .arg(&q_dev);
                l.arg(&toks_dev);
                for v in &ints {
                    l.arg(v);
                }
                l.arg(&interleave);
                let cfg = LaunchConfig {
                    grid_dim: (t as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: t rows of kv and q, t cos/sin rows and tokens, each token's cache
                // row at its position within the capacity reserved above.
                unsafe { l.launch(cfg) }.map_err(|e| anyhow!("mla_append: {e}"))?;
            }
            let (q_dev, q_lat_dev, scores_dev, ctx_dev) =
                (work + q, work + q_lat, work + scores, work + ctx);
            let dims = [max_ctx, nh, qk, lora, rope].map(|v| v as i32);
            for tok0 in (0..t).step_by(chunk) {
                let tok0_i = tok0 as i32;
                let mut l = s.launch_builder(&gpu.mla.attend);
                l.arg(&q_dev).arg(&q_lat_dev).arg(&toks_dev).arg(&tok0_i);
                l.arg(&scores_dev).arg(&dims[0]).arg(&ctx_dev);
                for v in &dims[1..] {
                    l.arg(v);
                }
                l.arg(&d.scale);
                let cfg = LaunchConfig {
                    grid_dim: (nh as u32, chunk.min(t - tok0) as u32, 1),
                    block_dim: (WARPS * 32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: t x heads queries and latent queries, max_ctx scores per (token,
                // head) for up to `chunk` tokens, each token's cache rows up to its position.
                unsafe { l.launch(cfg) }.map_err(|e| anyhow!("mla_attend: {e}"))?;
            }
            // Absorbed W_UV per head, then o_proj, into the output buffer.
            mm(w.w_uv, work + ctx, lora, work + uv)?;
            mm(w.o_proj, work + uv, nh * d.v, op)?;
            // SAFETY: `hout` holds `floats` >= t * h values, read after the synchronisation.
            unsafe {
                let hout = std::slice::from_raw_parts_mut(hout, t * h);
                cudarc::driver::result::memcpy_dtoh_async(hout, op, s.cu_stream())?;
            }
            Ok(())
        })();
        let synced = s.synchronize();
        launched?;
        synced?;
        // SAFETY: the copy into `hout` completed (synchronised above).
        Ok(unsafe { std::slice::from_raw_parts(hout, t * h) }.to_vec())
    }
}
