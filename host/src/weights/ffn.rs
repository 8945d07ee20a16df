//! An expert's two forms: compute form (`FfnWeights`: a SwiGLU block's matrices, bf16 or f32,
//! and its arithmetic) and stored form (`ExpertBytes`: the checkpoint's bytes and scales, FP8,
//! INT4/INT8 or bf16, copied out as the host tier holds them, runnable a few rows at a time).
//!
//! Owns: reading both forms from a checkpoint and turning one into the other. Does not own:
//! which experts a layer step needs (`experts`), or where they live (`store`, `gpu`).

use anyhow::Result;
use std::sync::OnceLock;

use crate::kernels::{linear, swiglu, Matrix, Weight, ROW_INVARIANT_MAX};
use crate::weights::checkpoint::{Checkpoint, StoredBytes};
use crate::weights::format::WeightFormat;
use crate::weights::scales::{ScaleType, ScaleView, Scales};
use crate::weights::stored_dot::{self, StoredMatrix};

/// A SwiGLU feed-forward block in compute form: `down(silu(gate(x)) * up(x))`.
/// Used for routed experts, shared experts and dense MLP layers alike. A BF16 checkpoint's
/// weights stay bf16 (exact, half the bytes to stream); others are f32.
pub struct FfnWeights {
    /// `gate_proj` rows then `up_proj` rows: `[2 * intermediate, hidden]`.
    pub gate_up: Matrix,
    /// `down_proj`: `[hidden, intermediate]`.
    pub down: Matrix,
    pub intermediate: usize,
}

impl FfnWeights {
    /// Reads `{prefix}.{gate,up,down}_proj.weight` with the given widths.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self> {
        let gate = ckpt.read_matrix(
            &format!("{prefix}.gate_proj.weight"),
            &[intermediate, hidden],
        )?;
        let up = ckpt.read_matrix(&format!("{prefix}.up_proj.weight"), &[intermediate, hidden])?;
        let gate_up = gate.append(up);
        let down = ckpt.read_matrix(
            &format!("{prefix}.down_proj.weight"),
            &[hidden, intermediate],
        )?;
        Ok(Self {
            gate_up,
            down,
            intermediate,
        })
    }

    /// Bytes this block occupies in compute form.
    pub fn compute_bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// DeepseekV3MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))` for `[t, hidden]` inputs.
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) {
        let t = x.len() / hidden;
        let i = self.intermediate;
        let mut gu = vec![0f32; t * 2 * i];
        self.gate_up.linear(x, hidden, &mut gu);
        let mut act = vec![0f32; t * i];
        swiglu(&gu, i, &mut act);
        self.down.linear(&act, i, out);
    }
}

/// Checkpoint tensor prefix of routed expert `expert` of decoder layer `layer`.
pub fn expert_prefix(layer: usize, expert: u32) -> String {
    format!("model.layers.{layer}.mlp.experts.{expert}")
}

/// One stored tensor, copied out of the checkpoint (the host-RAM tier's storage format).
pub struct OwnedTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Owned (the host tier's copy) or mapped (a view of the checkpoint).
    pub bytes: StoredBytes,
    /// FP8 block scales or int8/int4 group scales, as stored, when the tensor has them.
    pub scales: Option<Scales>,
}

/// A routed expert in storage format (e.g. FP8 bytes + scales): what the host tier holds.
pub struct ExpertBytes {
    /// gate, up, down.
    pub tensors: [OwnedTensor; 3],
    fp8_block: Option<[usize; 2]>,
    /// Whether each FP8 tensor holds a NaN code, found the first time it is computed.
    fp8_nan: [OnceLock<bool>; 3],
}

impl ExpertBytes {
    /// Copies expert `expert` of decoder layer `layer` out of the memory-mapped checkpoint.
    pub fn read(ckpt: &Checkpoint, layer: usize, expert: u32) -> Result<Self> {
        Self::read_prefix(ckpt, &expert_prefix(layer, expert))
    }

    /// Copies the FFN at `prefix` (`<prefix>.{gate,up,down}_proj.weight`: a routed expert, a
    /// shared expert or a dense MLP) out of the checkpoint, as stored.
    pub fn read_prefix(ckpt: &Checkpoint, prefix: &str) -> Result<Self> {
        Self::from_tensors(ckpt, prefix, OwnedTensor::read)
    }

    /// Expert `expert` of decoder layer `layer` as views of the mapped checkpoint (its scales
    /// too): nothing copied.
    pub fn map(ckpt: &Checkpoint, layer: usize, expert: u32) -> Result<Self> {
        Self::map_prefix(ckpt, &expert_prefix(layer, expert))
    }

    /// The FFN at `prefix` as views of the mapped checkpoint (see [`Self::read_prefix`]).
    pub fn map_prefix(ckpt: &Checkpoint, prefix: &str) -> Result<Self> {
        Self::from_tensors(ckpt, prefix, OwnedTensor::map)
    }

    fn from_tensors(
        ckpt: &Checkpoint,
        prefix: &str,
        tensor: impl Fn(&Checkpoint, &str) -> Result<OwnedTensor>,
    ) -> Result<Self> {
        let one = |proj: &str| tensor(ckpt, &format!("{prefix}.{proj}.weight"));
        Ok(Self::new(
            [one("gate_proj")?, one("up_proj")?, one("down_proj")?],
            ckpt.fp8_block(),
        ))
    }

    /// An expert from its three tensors (gate, up, down) in storage format.
    pub fn new(tensors: [OwnedTensor; 3], fp8_block: Option<[usize; 2]>) -> Self {
        Self {
            tensors,
            fp8_block,
            fp8_nan: Default::default(),
        }
    }

    /// An expert of pseudo-random FP8 weights (any e4m3 code but NaN, 128 x 128 blocks, scales
    /// 1/4096) at the given shape, from the xorshift32 `state`: what `doctor` times at
    /// Kimi-K2's shape.
    pub fn synthetic_fp8(hidden: usize, intermediate: usize, state: &mut u32) -> Self {
        Self::synthetic(WeightFormat::Fp8, hidden, intermediate, state)
    }

    /// An expert of pseudo-random int4 weights (moehost's int4, the bits of compressed-tensors'
    /// packed INT4, a scale per 32 columns): what `doctor` times as Kimi-K2-Thinking's experts.
    pub fn synthetic_int4(hidden: usize, intermediate: usize, state: &mut u32) -> Self {
        Self::synthetic(WeightFormat::Int4, hidden, intermediate, state)
    }

    /// An expert of pseudo-random weights in `format` (fp8, int4, int8 or bf16) at the given
    /// shape, from the xorshift32 `state`: every byte masked so values stay finite (no FP8 NaN
    /// code; bf16 normal and below 2 in magnitude), FP8 in 128 x 128 blocks, one scale a block
    /// or group.
    pub fn synthetic(
        format: WeightFormat,
        hidden: usize,
        intermediate: usize,
        state: &mut u32,
    ) -> Self {
        let (mask, scale) = match format {
            WeightFormat::Fp8 => (0xfe, 1.0 / 4096.0),
            WeightFormat::Int4 | WeightFormat::Int8 => (0xff, 1.0 / 64.0),
            _ => (0xbf, 1.0),
        };
        let block = [128, 128];
        let mut tensor = |name: &str, rows: usize, cols: usize| {
            let shape = format.stored_shape(&[rows, cols]);
            let n_bytes = shape.iter().product::<usize>() * format.dtype().bitsize() / 8;
            let n_scales = format.scale_count(rows, cols, block);
            // A bf16's high byte keeps an exponent from 2^-63 up: no subnormal weights, which
            // real checkpoints (almost) never hold and which cost a CPU a microcode assist.
            let floor = |i: usize| match format {
                WeightFormat::Bf16 if i % 2 == 1 => 0x20,
                _ => 0,
            };
            let bytes = (0..n_bytes)
                .map(|i| {
                    *state ^= *state << 13;
                    *state ^= *state >> 17;
                    *state ^= *state << 5;
                    (*state as u8) & mask | floor(i)
                })
                .collect();
            OwnedTensor {
                name: name.into(),
                dtype: format.dtype(),
                shape,
                bytes: StoredBytes::Owned(bytes),
                scales: (n_scales > 0).then(|| synthetic_scales(format, scale, n_scales)),
            }
        };
        let e = Self::new(
            [
                tensor("gate", intermediate, hidden),
                tensor("up", intermediate, hidden),
                tensor("down", hidden, intermediate),
            ],
            None,
        );
        match format {
            WeightFormat::Fp8 => e.with_fp8_block(block),
            _ => e,
        }
    }

    fn with_fp8_block(mut self, block: [usize; 2]) -> Self {
        self.fp8_block = Some(block);
        self
    }

    /// The checkpoint's FP8 block size, when its weights are FP8.
    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        self.fp8_block
    }

    /// Whether this is a `[hidden] -> [intermediate] -> [hidden]` block whose every projection
    /// the CPU computes straight from the stored bytes here (`stored_dot`'s kernels serve
    /// them), so no compute-form copy is worth holding.
    pub fn runs_stored(&self, hidden: usize, intermediate: usize) -> bool {
        let want = [
            [intermediate, hidden],
            [intermediate, hidden],
            [hidden, intermediate],
        ];
        self.tensors
            .iter()
            .zip(want)
            .all(|(t, want)| crate::weights::format::logical_shape(t.dtype, &t.shape) == want)
            && (0..3).all(|n| self.fused(n).is_some())
    }

    /// Bytes held (weights and scales).
    pub fn storage_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.bytes.len() + t.scales.as_ref().map_or(0, |s| s.bytes.len()))
            .sum()
    }

    /// The compute form: the same values `FfnWeights::load` produces from the checkpoint.
    pub fn to_ffn(&self) -> Result<FfnWeights> {
        let whole = |t: &OwnedTensor| -> Result<Matrix> {
            Ok(
                match crate::weights::checkpoint::bf16_values(t.dtype, &t.bytes) {
                    Some(w) => Matrix::Bf16(w),
                    None => Matrix::F32(t.decode_rows(0, t.rows(), self.fp8_block)?),
                },
            )
        };
        let gate_up = whole(&self.tensors[0])?.append(whole(&self.tensors[1])?);
        Ok(FfnWeights {
            gate_up,
            down: whole(&self.tensors[2])?,
            intermediate: self.tensors[0].rows(),
        })
    }

    /// `FfnWeights::forward` computed straight from the storage format, bit for bit (see
    /// [`OwnedTensor::linear_into`]): never the whole expert widened.
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) -> Result<()> {
        let t = x.len() / hidden;
        let i = self.tensors[0].rows();
        let mut gu = vec![0f32; t * 2 * i];
        self.linear(0, x, hidden, &mut gu, 0)?;
        self.linear(1, x, hidden, &mut gu, i)?;
        let mut act = vec![0f32; t * i];
        swiglu(&gu, i, &mut act);
        self.linear(2, &act, i, out, 0)
    }

    /// `out[:, col..col + rows(w)] = x @ w^T` for tensor `n` (`out` being `[t, width]`).
    fn linear(&self, n: usize, x: &[f32], k: usize, out: &mut [f32], col: usize) -> Result<()> {
        self.tensors[n].linear_into(x, k, out, col, self.fp8_block, &self.fp8_nan[n])
    }

    /// Tensor `n` as `stored_dot` reads it, when its kernels serve it here.
    fn fused(&self, n: usize) -> Option<StoredMatrix<'_>> {
        self.tensors[n].fused(self.fp8_block, &self.fp8_nan[n])
    }
}

/// One weight matrix computed where it lies (a view of the mapped checkpoint): what the CPU
/// runs for attention's projections, the output head and the embedding table when
/// `stored_dot`'s kernels serve their format here.
pub struct StoredLinear {
    pub tensor: OwnedTensor,
    fp8_block: Option<[usize; 2]>,
    fp8_nan: OnceLock<bool>,
}

impl StoredLinear {
    /// Tensor `name` (logical shape `shape`) as a view of the checkpoint.
    pub fn map(ckpt: &Checkpoint, name: &str, shape: [usize; 2]) -> Result<Self> {
        let tensor = OwnedTensor::map(ckpt, name)?;
        let logical = crate::weights::format::logical_shape(tensor.dtype, &tensor.shape);
        anyhow::ensure!(
            logical == shape,
            "tensor {name} has shape {logical:?}, expected {shape:?} from config.json"
        );
        Ok(Self {
            tensor,
            fp8_block: ckpt.fp8_block(),
            fp8_nan: OnceLock::new(),
        })
    }

    /// Whether the kernels compute it as stored on this CPU.
    pub fn runs_stored(&self) -> bool {
        self.tensor.fused(self.fp8_block, &self.fp8_nan).is_some()
    }

    /// Columns (`in_features`).
    pub fn cols(&self) -> usize {
        crate::weights::format::logical_shape(self.tensor.dtype, &self.tensor.shape)[1]
    }

    pub fn fp8_block(&self) -> Option<[usize; 2]> {
        self.fp8_block
    }

    /// `out = x @ w^T` (`x` `[t, cols]`, `out` `[t, rows]`): the bits of `kernels::linear`
    /// over the decoded matrix.
    pub fn linear(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let k = self.cols();
        self.tensor
            .linear_into(x, k, out, 0, self.fp8_block, &self.fp8_nan)
    }

    /// Row `r`, decoded (an embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        // FP8 decodes whole scale blocks of rows.
        let r0 = match (self.tensor.format(), self.fp8_block) {
            (Some(WeightFormat::Fp8), Some([br, _])) => r / br * br,
            _ => r,
        };
        let rows = self.tensor.decode_rows(r0, r + 1, self.fp8_block)?;
        out.copy_from_slice(&rows[(r - r0) * out.len()..]);
        Ok(())
    }
}

/// A weight matrix the CPU runs: as stored where the kernels read its format here, else its
/// compute form (the same bits either way).
pub enum HostMatrix {
    Stored(Box<StoredLinear>),
    Compute(Matrix),
}

impl HostMatrix {
    /// Checkpoint tensor `name` of logical shape `[n, k]`.
    pub fn load(ckpt: &Checkpoint, name: &str, shape: [usize; 2]) -> Result<Self> {
        let stored = StoredLinear::map(ckpt, name, shape)?;
        if stored.runs_stored() {
            return Ok(HostMatrix::Stored(Box::new(stored)));
        }
        Ok(HostMatrix::Compute(ckpt.read_matrix(name, &shape)?))
    }

    /// `out = x @ w^T` for `x` `[t, k]`.
    pub fn linear(&self, x: &[f32], k: usize, out: &mut [f32]) -> Result<()> {
        match self {
            HostMatrix::Stored(w) => w.linear(x, out),
            HostMatrix::Compute(w) => {
                w.linear(x, k, out);
                Ok(())
            }
        }
    }

    /// Row `r` of `k` values, decoded.
    pub fn row(&self, r: usize, k: usize, out: &mut [f32]) -> Result<()> {
        match self {
            HostMatrix::Stored(w) => w.row(r, out),
            HostMatrix::Compute(Matrix::F32(w)) => {
                out.copy_from_slice(&w[r * k..(r + 1) * k]);
                Ok(())
            }
            HostMatrix::Compute(Matrix::Bf16(w)) => {
                for (o, v) in out.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *o = v.to_f32();
                }
                Ok(())
            }
        }
    }

    /// The matrix as f32 (a GPU upload of a format its kernels do not read).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self {
            HostMatrix::Stored(w) => w.tensor.decode_rows(0, w.tensor.rows(), w.fp8_block),
            HostMatrix::Compute(m) => Ok(m.to_f32().into_owned()),
        }
    }
}

/// Rows decoded at a time when running from the storage format.
const STREAM_ROWS: usize = 128;
/// FP8 rows decoded at a time (with their block's scales) when running from the storage format.
const FP8_STREAM_ROWS: usize = 16;

/// Rows `rows` of an FP8 matrix with `k` columns and `block` scales, decoded into `out`
/// (`fp8::dequantize_rows`), after checking they are there.
fn decode_fp8_rows(
    bytes: &[u8],
    scales: &[f32],
    k: usize,
    block: [usize; 2],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) -> Result<()> {
    let [br, bc] = block;
    anyhow::ensure!(
        br > 0
            && bc > 0
            && bytes.len() >= rows.end * k
            && scales.len() >= rows.end.div_ceil(br) * k.div_ceil(bc),
        "FP8 rows {rows:?} of {k} columns are not in {} bytes and {} scales",
        bytes.len(),
        scales.len()
    );
    crate::weights::fp8::dequantize_rows(bytes, k, scales, block, rows, out);
    Ok(())
}

impl OwnedTensor {
    /// Its storage format, if moehost reads its dtype.
    pub fn format(&self) -> Option<WeightFormat> {
        WeightFormat::of_dtype(self.dtype)
    }

    /// Copies tensor `name` (and its FP8 block or int group scales) out of the checkpoint.
    pub fn read(ckpt: &Checkpoint, name: &str) -> Result<Self> {
        let raw = ckpt.raw(name)?;
        let scales = ckpt.stored_scales(&raw, false)?;
        Ok(Self {
            name: raw.name.to_owned(),
            dtype: raw.dtype,
            shape: raw.shape.to_vec(),
            bytes: StoredBytes::Owned(raw.bytes.to_vec()),
            scales,
        })
    }

    /// Tensor `name` and its scales as views of the mapped checkpoint.
    pub fn map(ckpt: &Checkpoint, name: &str) -> Result<Self> {
        let (raw, bytes) = ckpt.mapped(name)?;
        let scales = ckpt.stored_scales(&raw, true)?;
        Ok(Self {
            name: raw.name.to_owned(),
            dtype: raw.dtype,
            shape: raw.shape.to_vec(),
            bytes,
            scales,
        })
    }

    /// This tensor as `stored_dot` reads it, when its kernels serve it here (`nan` holds
    /// whether FP8 bytes hold a NaN code, scanned the first time).
    fn fused(
        &self,
        fp8_block: Option<[usize; 2]>,
        nan: &OnceLock<bool>,
    ) -> Option<StoredMatrix<'_>> {
        let format = self.format()?;
        let cols = *crate::weights::format::logical_shape(self.dtype, &self.shape).get(1)?;
        let m = StoredMatrix {
            format,
            bytes: &self.bytes,
            scales: self.scales.as_ref().map_or(ScaleView::NONE, Scales::view),
            rows: self.rows(),
            cols,
            fp8_block: fp8_block.unwrap_or([0, 0]),
        };
        let has_nan = || {
            format == WeightFormat::Fp8 && *nan.get_or_init(|| stored_dot::has_fp8_nan(&self.bytes))
        };
        (m.fused() && !has_nan()).then_some(m)
    }

    /// `out[:, col..col + rows] = x @ w^T` (`out` being `[t, width]`, `x` `[t, k]`) from the
    /// stored bytes, with the bits of `kernels::linear` over the decoded matrix:
    /// - up to `ROW_INVARIANT_MAX` rows each output is `kernels::dot` of a decoded row and an
    ///   input, through `stored_dot`'s kernels where they serve the matrix, else over rows
    ///   decoded a block at a time (int4 and int8 under `--activations q8`: `q8`'s
    ///   arithmetic instead);
    /// - above, `kernels::gemm_decoded` over blocks of decoded rows (aligned to FP8's blocks).
    pub fn linear_into(
        &self,
        x: &[f32],
        k: usize,
        out: &mut [f32],
        col: usize,
        fp8_block: Option<[usize; 2]>,
        nan: &OnceLock<bool>,
    ) -> Result<()> {
        let t = x.len() / k;
        let width = out.len() / t.max(1);
        if t > ROW_INVARIANT_MAX {
            let align = match (self.format(), fp8_block) {
                (Some(WeightFormat::Fp8), Some([br, _])) => br,
                _ => 1,
            };
            return crate::kernels::gemm_decoded(
                x,
                k,
                self.rows(),
                out,
                width,
                col,
                align,
                |r, buf| {
                    buf.copy_from_slice(&self.decode_rows(r.start, r.end, fp8_block)?);
                    Ok(())
                },
            );
        }
        if let Some(m) = self.fused(fp8_block, nan).filter(|m| m.cols == k) {
            if crate::weights::q8::serves(&m) {
                crate::weights::q8::linear(&m, x, 0..m.rows, out, width, col);
            } else {
                m.linear(x, 0..m.rows, out, width, col);
            }
            return Ok(());
        }
        // Rows decoded a block at a time (aligned to the FP8 scale blocks), `kernels::linear`
        // on each.
        let fp8 = match (self.format(), fp8_block, &self.scales) {
            (Some(WeightFormat::Fp8), Some(block), Some(scales)) => Some((block, scales.all_f32())),
            _ => None,
        };
        let step = match fp8 {
            // A few rows at a time, decoded into one buffer that stays in cache for the dots.
            Some(_) => FP8_STREAM_ROWS,
            None => STREAM_ROWS,
        };
        let mut part = Vec::new();
        let mut decoded = Vec::new();
        for r0 in (0..self.rows()).step_by(step) {
            let r1 = (r0 + step).min(self.rows());
            let rows = match &fp8 {
                Some((block, scales)) => {
                    decoded.resize((r1 - r0) * k, 0f32);
                    decode_fp8_rows(&self.bytes, scales, k, *block, r0..r1, &mut decoded)?;
                    &decoded[..]
                }
                None => {
                    decoded = self.decode_rows(r0, r1, fp8_block)?;
                    &decoded[..]
                }
            };
            part.clear();
            part.resize(t * (r1 - r0), 0.0);
            linear(x, rows, k, &mut part);
            for (o, p) in out.chunks_exact_mut(width).zip(part.chunks_exact(r1 - r0)) {
                o[col + r0..col + r1].copy_from_slice(p);
            }
        }
        Ok(())
    }

    /// Logical rows (`out_features`).
    pub fn rows(&self) -> usize {
        crate::weights::format::logical_shape(self.dtype, &self.shape)[0]
    }

    /// Rows `r0..r1` in f32. For FP8, `r0` must sit on a scale-block boundary.
    pub fn decode_rows(
        &self,
        r0: usize,
        r1: usize,
        fp8_block: Option<[usize; 2]>,
    ) -> Result<Vec<f32>> {
        let rows = self.rows();
        let bytes_per_row = self.bytes.len() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = r1 - r0;
        let scales = match (&self.scales, self.format(), fp8_block) {
            (None, ..) => None,
            (Some(s), Some(WeightFormat::Fp8), Some([bm, _])) => {
                anyhow::ensure!(
                    r0.is_multiple_of(bm),
                    "FP8 rows must start on a block ({r0} % {bm})"
                );
                let per_row = s.len() / rows.div_ceil(bm).max(1);
                Some(s.to_f32(r0 / bm * per_row..r1.div_ceil(bm) * per_row))
            }
            (Some(s), ..) => {
                let per_row = s.len() / rows.max(1);
                Some(s.to_f32(r0 * per_row..r1 * per_row))
            }
        };
        let raw = crate::weights::checkpoint::RawTensor {
            name: &self.name,
            dtype: self.dtype,
            shape: &shape,
            bytes: &self.bytes[r0 * bytes_per_row..r1 * bytes_per_row],
        };
        crate::weights::checkpoint::decode_f32(&raw, scales.as_deref(), fp8_block)
    }
}

/// `n` synthetic scales of value `scale`, stored as the format's checkpoints store them (FP8:
/// F32; moehost's int8/int4: F16).
fn synthetic_scales(format: WeightFormat, scale: f32, n: usize) -> Scales {
    let ty = match format {
        WeightFormat::Fp8 => ScaleType::F32,
        _ => ScaleType::F16,
    };
    Scales::stored_as(&vec![scale; n], ty)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An int4 expert (the bits of compressed-tensors' packed INT4) run from its storage
    /// format, a few rows decoded at a time, gives the bits of its whole dequantized weights.
    #[test]
    fn int4_experts_stream_with_the_dequantized_bits() {
        let (hidden, inter) = (96, 160);
        let mut state = 0x2468_ace1_u32;
        let mut e = ExpertBytes::synthetic_int4(hidden, inter, &mut state);
        for (n, t) in e.tensors.iter_mut().enumerate() {
            let s = t.scales.as_ref().unwrap();
            assert_eq!(s.ty, ScaleType::F16, "moehost's int scales are F16");
            let bytes: Vec<u8> = (0..s.len())
                .flat_map(|i| {
                    half::f16::from_f32((1 + (i * 5 + n) % 11) as f32 / 700.0).to_le_bytes()
                })
                .collect();
            t.scales = Some(Scales {
                ty: ScaleType::F16,
                bytes: bytes.into(),
            });
        }
        let reference = e.to_ffn().unwrap();
        streams_with_the_bits_of(&e, &reference, hidden, &[1, 4, 70]);
    }

    /// A long prefill over an int8 expert, its rows decoded a block at a time (more than one
    /// block, with a tail), gives the bits of the compute form's GEMM over the whole widened
    /// matrices.
    #[test]
    fn long_prefills_from_storage_have_the_compute_forms_bits() {
        let (hidden, inter) = (64, 544);
        let mut state = 0x0bad_cafe_u32;
        let e = ExpertBytes::synthetic(WeightFormat::Int8, hidden, inter, &mut state);
        let reference = e.to_ffn().unwrap();
        assert!(matches!(reference.gate_up, Matrix::F32(_)));
        streams_with_the_bits_of(&e, &reference, hidden, &[65, 130]);
    }

    /// `e` run from its storage format gives `reference`'s bits at each token count.
    pub(crate) fn streams_with_the_bits_of(
        e: &ExpertBytes,
        reference: &FfnWeights,
        hidden: usize,
        tokens: &[usize],
    ) {
        for &t in tokens {
            let x: Vec<f32> = (0..t * hidden)
                .map(|i| ((i * 31 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let (mut want, mut got) = (vec![0f32; t * hidden], vec![0f32; t * hidden]);
            reference.forward(&x, hidden, &mut want);
            e.forward(&x, hidden, &mut got).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{t} tokens");
            assert!(want.iter().any(|v| *v != 0.0));
        }
    }

    /// An FP8 expert run from its storage format (rows decoded a few at a time, vector
    /// decoder) gives the bits of weights decoded one by one from the e4m3 table, at shapes
    /// whose rows and columns end mid-block, with a different scale in every block.
    #[test]
    fn fp8_experts_stream_with_the_tables_bits() {
        let (hidden, inter) = (136, 200);
        let mut state = 0x1357_9bdf_u32;
        let mut e = ExpertBytes::synthetic_fp8(hidden, inter, &mut state);
        for (n, t) in e.tensors.iter_mut().enumerate() {
            let count = t.scales.as_ref().unwrap().len();
            let s: Vec<f32> = (0..count)
                .map(|i| (1 + (i * 7 + n) % 13) as f32 / 3000.0)
                .collect();
            t.scales = Some(Scales::from_f32(&s));
        }
        let table = |t: &OwnedTensor| -> Vec<f32> {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let sc = t.scales.as_ref().unwrap().all_f32();
            (0..rows * cols)
                .map(|at| {
                    let (r, c) = (at / cols, at % cols);
                    let s = sc[(r / 128) * cols.div_ceil(128) + c / 128];
                    crate::weights::fp8::E4M3_TABLE[t.bytes[at] as usize] * s
                })
                .collect()
        };
        let mut gate_up = table(&e.tensors[0]);
        gate_up.extend(table(&e.tensors[1]));
        let reference = FfnWeights {
            gate_up: Matrix::F32(gate_up),
            down: Matrix::F32(table(&e.tensors[2])),
            intermediate: inter,
        };
        streams_with_the_bits_of(&e, &reference, hidden, &[1, 3, 67]);
    }
}
