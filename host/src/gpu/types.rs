//! The GPU API's plain types, the same with or without the `cuda` feature (`off.rs` is the
//! API without it).

use super::{DeviceKv, GpuMatrix};
use crate::weights::ffn::{ExpertBytes, FfnWeights};

/// A layer's attention shape and constants.
#[derive(Clone, Copy, Debug)]
pub struct MlaDims {
    pub hidden: usize,
    pub heads: usize,
    /// `q_lora_rank`: queries through q_a, q_a_layernorm, q_b; `None`: one q_proj.
    pub q_rank: Option<usize>,
    pub nope: usize,
    pub rope: usize,
    pub lora: usize,
    pub v: usize,
    pub eps: f32,
    pub scale: f32,
    /// RoPE pairs `(2i, 2i + 1)` rather than `(i, i + half)`.
    pub interleave: bool,
}

/// Attention's projections of one layer, in device memory.
pub struct MlaWeights<'a> {
    /// `[q_a_proj, q_b_proj]` with a `q_rank`, else `[q_proj]`.
    pub q: &'a [&'a GpuMatrix],
    pub kv_a: &'a GpuMatrix,
    pub w_uk_t: &'a GpuMatrix,
    pub w_uv: &'a GpuMatrix,
    pub o_proj: &'a GpuMatrix,
}

/// One sequence of a call: its rows of the inputs (consecutive, in call order), the position of
/// its first row, and its cache of this layer.
pub struct MlaSeq<'a> {
    pub rows: usize,
    pub pos0: usize,
    pub kv: &'a mut DeviceKv,
}

/// What `GpuPool::load` copies: the storage format, or the compute form.
pub enum ExpertSource<'a> {
    Stored(&'a ExpertBytes),
    Compute(&'a FfnWeights),
}
