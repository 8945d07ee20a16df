//! A stored weight's scales as the checkpoint holds them: FP8 block scales (F32 in DeepSeek's and
//! Kimi-K2's releases), moehost's int8/int4 group scales (F16) and compressed-tensors' INT4
//! group scales (BF16). Held as a view of the mapped shard or as the host tier's copy of those
//! bytes, and read a value at a time: widening them to an f32 copy would cost 2x their bytes
//! (Kimi-K2-Thinking: ~31 GB of bf16 group scales).
//!
//! Owns: the scale dtypes and their exact widening to f32. Does not own: which tensor's scales
//! are which (`checkpoint`), or how a format applies them (`fp8`, `quant`, `stored_dot`).

use std::ops::Range;

use anyhow::{bail, Result};
use safetensors::Dtype;

use crate::weights::stored_bytes::StoredBytes;

/// How a scale is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleType {
    F32,
    F16,
    Bf16,
}

impl ScaleType {
    /// The scale type of a stored scale tensor's dtype.
    pub fn of(name: &str, dtype: Dtype) -> Result<Self> {
        Ok(match dtype {
            Dtype::F32 => ScaleType::F32,
            Dtype::F16 => ScaleType::F16,
            Dtype::BF16 => ScaleType::Bf16,
            d => bail!("scale tensor {name} has dtype {d:?}; scales are F32, F16 or BF16"),
        })
    }

    /// Bytes a scale takes.
    pub fn size(self) -> usize {
        match self {
            ScaleType::F32 => 4,
            ScaleType::F16 | ScaleType::Bf16 => 2,
        }
    }

    /// The scale stored at the start of `b`, widened exactly to f32.
    #[inline(always)]
    pub fn read(self, b: &[u8]) -> f32 {
        match self {
            ScaleType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ScaleType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            ScaleType::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        }
    }
}

/// A tensor's scales, as stored.
#[derive(Clone)]
pub struct Scales {
    pub ty: ScaleType,
    pub bytes: StoredBytes,
}

impl Scales {
    /// Owned f32 scales (tests, synthetic experts, scales read back from a device).
    pub fn from_f32(v: &[f32]) -> Self {
        Self::stored_as(v, ScaleType::F32)
    }

    /// Owned scales of type `ty` holding `v` (rounded to `ty`): what a checkpoint of that type
    /// stores (synthetic experts, tests).
    pub fn stored_as(v: &[f32], ty: ScaleType) -> Self {
        let bytes: Vec<u8> = match ty {
            ScaleType::F32 => v.iter().flat_map(|s| s.to_le_bytes()).collect(),
            ScaleType::F16 => v
                .iter()
                .flat_map(|s| half::f16::from_f32(*s).to_le_bytes())
                .collect(),
            ScaleType::Bf16 => v
                .iter()
                .flat_map(|s| half::bf16::from_f32(*s).to_le_bytes())
                .collect(),
        };
        Scales {
            ty,
            bytes: StoredBytes::Owned(bytes),
        }
    }

    pub fn view(&self) -> ScaleView<'_> {
        ScaleView {
            ty: self.ty,
            bytes: &self.bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.view().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scales `range` widened to f32 (what the reference decoders take).
    pub fn to_f32(&self, range: Range<usize>) -> Vec<f32> {
        self.view().to_f32(range)
    }

    /// All of them widened to f32.
    pub fn all_f32(&self) -> Vec<f32> {
        self.to_f32(0..self.len())
    }
}

/// Borrowed scales: what the kernels read.
#[derive(Clone, Copy)]
pub struct ScaleView<'a> {
    pub ty: ScaleType,
    pub bytes: &'a [u8],
}

impl ScaleView<'_> {
    /// No scales (formats without them).
    pub const NONE: ScaleView<'static> = ScaleView {
        ty: ScaleType::F32,
        bytes: &[],
    };

    pub fn len(&self) -> usize {
        self.bytes.len() / self.ty.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Scale `i`, widened to f32.
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        let n = self.ty.size();
        self.ty.read(&self.bytes[i * n..i * n + n])
    }

    pub fn to_f32(&self, range: Range<usize>) -> Vec<f32> {
        range.map(|i| self.get(i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_for_every_stored_type() {
        let values = [0.0f32, 1.0, -2.5, 1.0 / 4096.0, 6.1035156e-5, 65504.0];
        let as_f16 = Scales::stored_as(&values, ScaleType::F16);
        let as_bf16 = Scales::stored_as(&values, ScaleType::Bf16);
        assert_eq!((as_f16.bytes.len(), as_bf16.bytes.len()), (12, 12));
        for (i, v) in values.iter().enumerate() {
            assert_eq!(as_f16.view().get(i), half::f16::from_f32(*v).to_f32());
            assert_eq!(as_bf16.view().get(i), half::bf16::from_f32(*v).to_f32());
        }
        assert_eq!(Scales::from_f32(&values).all_f32(), values);
        assert_eq!(as_f16.to_f32(2..4).len(), 2);
        assert!(ScaleType::of("s", Dtype::I8).is_err());
    }
}
