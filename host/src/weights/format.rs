//! A weight's storage format: the one place a stored tensor's dtype is recognised as a format,
//! named and sized. The CPU's reference decoder (`checkpoint::decode_f32`) and streamed row
//! decoder (`ffn`) dispatch on it; the GPU kernels (`gpu::KERNEL_FORMATS`), the checkpoint's
//! header checks and shape helpers, the tiered store and `plan` read it.
//!
//! To add a format: a variant here (name, dtype, sizes), its decode in
//! `checkpoint::decode_f32` and a streamed row decoder in `ffn::OwnedTensor::decode_rows` with
//! the same bits, and a GPU kernel twin (`gpu/rows_dot.cu`) checked by `tests/gpu.rs`.

use anyhow::Result;
use safetensors::Dtype;

use super::quant::GROUP;

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    F32,
    Bf16,
    F16,
    /// e4m3 with block scales (`quantization_config.weight_block_size`), f32 `_scale_inv`.
    Fp8,
    /// moehost's group-wise int8 (`I8`), an f16 scale per `GROUP` columns (`_qscale`).
    Int8,
    /// moehost's packed int4 (`U8`, two a byte, low nibble first, value + 8), scales as int8;
    /// compressed-tensors' packed INT4 has the same bits.
    Int4,
}

impl WeightFormat {
    /// Every format, in the GPU kernels' order for those they have.
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::F32,
        WeightFormat::Bf16,
        WeightFormat::Fp8,
        WeightFormat::Int8,
        WeightFormat::Int4,
        WeightFormat::F16,
    ];

    /// The format of a tensor stored as `dtype`, if moehost reads it.
    pub fn of_dtype(dtype: Dtype) -> Option<Self> {
        Some(match dtype {
            Dtype::F32 => WeightFormat::F32,
            Dtype::BF16 => WeightFormat::Bf16,
            Dtype::F16 => WeightFormat::F16,
            Dtype::F8_E4M3 => WeightFormat::Fp8,
            Dtype::I8 => WeightFormat::Int8,
            Dtype::U8 => WeightFormat::Int4,
            _ => return None,
        })
    }

    /// The format of a weight matrix as stored, complete: the scaled formats need their scales
    /// (and FP8 the checkpoint's block size); the plain ones have none.
    pub fn of(dtype: Dtype, has_scales: bool, fp8_block: Option<[usize; 2]>) -> Option<Self> {
        let f = Self::of_dtype(dtype)?;
        let complete = match f {
            WeightFormat::Fp8 => has_scales && fp8_block.is_some(),
            WeightFormat::Int8 | WeightFormat::Int4 => has_scales,
            _ => !has_scales,
        };
        complete.then_some(f)
    }

    pub fn dtype(self) -> Dtype {
        match self {
            WeightFormat::F32 => Dtype::F32,
            WeightFormat::Bf16 => Dtype::BF16,
            WeightFormat::F16 => Dtype::F16,
            WeightFormat::Fp8 => Dtype::F8_E4M3,
            WeightFormat::Int8 => Dtype::I8,
            WeightFormat::Int4 => Dtype::U8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Fp8 => "fp8",
            WeightFormat::Int8 => "int8",
            WeightFormat::Int4 => "int4",
        }
    }

    /// A format by name (`bf16`, `fp8`, `int8`, `int4`, `f16`, `f32`).
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!("unknown weight format {s:?}: bf16, fp8, int8, int4, f16 or f32")
            })
    }

    /// moehost's group-wise quantized formats (scales per `GROUP` columns, `_qscale`).
    pub fn is_grouped(self) -> bool {
        matches!(self, WeightFormat::Int8 | WeightFormat::Int4)
    }

    /// The stored shape of a weight of logical shape `[rows, cols]` (int4 packs two a byte).
    pub fn stored_shape(self, logical: &[usize]) -> Vec<usize> {
        match (self, logical) {
            (WeightFormat::Int4, [r, c]) => vec![*r, c.div_ceil(2)],
            _ => logical.to_vec(),
        }
    }

    /// The logical shape of a stored weight.
    pub fn logical_shape(self, stored: &[usize]) -> Vec<usize> {
        match (self, stored) {
            (WeightFormat::Int4, [r, c]) => vec![*r, c * 2],
            _ => stored.to_vec(),
        }
    }

    /// Scales of a `[rows, cols]` weight: FP8 one per block of `fp8_block` (edge blocks
    /// partial), int8/int4 one per `GROUP` columns of a row, none for the plain formats.
    pub fn scale_count(self, rows: usize, cols: usize, fp8_block: [usize; 2]) -> usize {
        match self {
            WeightFormat::Fp8 => rows.div_ceil(fp8_block[0]) * cols.div_ceil(fp8_block[1]),
            WeightFormat::Int8 | WeightFormat::Int4 => rows * cols.div_ceil(GROUP),
            _ => 0,
        }
    }

    /// Bytes of a `[rows, cols]` weight with its scales (FP8: blocks of `fp8_block`, f32
    /// scales; int8/int4: f16 scales).
    pub fn stored_bytes(self, rows: u64, cols: u64, fp8_block: [usize; 2]) -> u64 {
        let (r, c) = (rows, cols);
        let scales = self.scale_count(rows as usize, cols as usize, fp8_block) as u64;
        match self {
            WeightFormat::F32 => 4 * r * c,
            WeightFormat::Bf16 | WeightFormat::F16 => 2 * r * c,
            WeightFormat::Fp8 => r * c + scales * 4,
            WeightFormat::Int8 => r * c + scales * 2,
            WeightFormat::Int4 => r * c.div_ceil(2) + scales * 2,
        }
    }
}

/// Whether a tensor stored as `dtype` is group-wise quantized (int8, int4).
pub fn is_grouped(dtype: Dtype) -> bool {
    WeightFormat::of_dtype(dtype).is_some_and(WeightFormat::is_grouped)
}

/// The stored shape of a tensor of logical shape `logical` stored as `dtype`.
pub fn stored_shape(dtype: Dtype, logical: &[usize]) -> Vec<usize> {
    WeightFormat::of_dtype(dtype).map_or_else(|| logical.to_vec(), |f| f.stored_shape(logical))
}

/// The logical shape of a tensor stored as `dtype` with shape `stored`.
pub fn logical_shape(dtype: Dtype, stored: &[usize]) -> Vec<usize> {
    WeightFormat::of_dtype(dtype).map_or_else(|| stored.to_vec(), |f| f.logical_shape(stored))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_and_need_their_scales() {
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::of_dtype(f.dtype()), Some(f));
            assert_eq!(WeightFormat::parse(f.name()).unwrap(), f);
        }
        assert!(WeightFormat::parse("int3").is_err());
        assert_eq!(WeightFormat::of(Dtype::F8_E4M3, true, None), None);
        assert_eq!(
            WeightFormat::of(Dtype::F8_E4M3, true, Some([128, 128])),
            Some(WeightFormat::Fp8)
        );
        assert_eq!(WeightFormat::of(Dtype::U8, false, None), None);
        assert_eq!(WeightFormat::of(Dtype::BF16, true, None), None);
        assert_eq!(WeightFormat::Int4.stored_shape(&[4, 7]), vec![4, 4]);
        assert_eq!(WeightFormat::Int4.logical_shape(&[4, 4]), vec![4, 8]);
        // Kimi-K2's FP8 expert: 3 x 7168 x 2048 weights and their 128 x 128 block scales.
        let k2: u64 = [(2048, 7168), (2048, 7168), (7168, 2048)]
            .iter()
            .map(|&(r, c)| WeightFormat::Fp8.stored_bytes(r, c, [128, 128]))
            .sum();
        assert_eq!(k2, 44_050_944);
    }
}
