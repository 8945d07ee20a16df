//! moehost's group-wise quantized weights: the int8 / int4 storage of routed experts that
//! `moehost quantize` writes, so the host-RAM and disk tiers hold and move 1.8x / 3.2x fewer
//! bytes than bf16.
//!
//! Format (a safetensors checkpoint, documented in docs/compression.md): a weight `W` of logical
//! shape `[rows, cols]` is stored as
//! - `W` itself: `I8 [rows, cols]` (int8), or `U8 [rows, cols / 2]` (int4: two values per byte,
//!   the even column in the low nibble, each stored as `q + 8`);
//! - `W_qscale`: `F16 [rows, ceil(cols / 32)]`, one scale per group of 32 consecutive columns.
//!
//! A value is `q * scale`; quantization is symmetric: `scale = max|w| / 127` (int8) or `/ 7`
//! (int4), `q = round(w / scale)`. Like GGML's Q8_0 / Q4_0, with moehost's own layout.

use anyhow::{ensure, Result};
use safetensors::Dtype;

/// Columns sharing one scale.
pub const GROUP: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bits {
    Int8,
    Int4,
}

impl Bits {
    pub fn name(self) -> &'static str {
        match self {
            Bits::Int8 => "int8",
            Bits::Int4 => "int4",
        }
    }

    fn max_q(self) -> f32 {
        match self {
            Bits::Int8 => 127.0,
            Bits::Int4 => 7.0,
        }
    }

    pub fn dtype(self) -> Dtype {
        match self {
            Bits::Int8 => Dtype::I8,
            Bits::Int4 => Dtype::U8,
        }
    }
}

/// The shape of the scale tensor.
pub fn scale_shape(rows: usize, cols: usize) -> [usize; 2] {
    [rows, cols.div_ceil(GROUP)]
}

/// Quantizes `w` (`[rows, cols]`, row-major): the stored bytes and the f16 scale bytes.
pub fn quantize(w: &[f32], rows: usize, cols: usize, bits: Bits) -> (Vec<u8>, Vec<u8>) {
    debug_assert_eq!(w.len(), rows * cols);
    let groups = cols.div_ceil(GROUP);
    let mut scales = Vec::with_capacity(rows * groups * 2);
    let mut q = vec![0i8; rows * cols];
    for r in 0..rows {
        for g in 0..groups {
            let (a, b) = (r * cols + g * GROUP, r * cols + ((g + 1) * GROUP).min(cols));
            let max = w[a..b].iter().fold(0f32, |m, x| m.max(x.abs()));
            // The scale as stored (f16), so quantization uses exactly what dequantization will.
            let scale = half::f16::from_f32(max / bits.max_q());
            scales.extend_from_slice(&scale.to_le_bytes());
            let s = scale.to_f32();
            for i in a..b {
                q[i] = if s > 0.0 {
                    (w[i] / s).round().clamp(-bits.max_q(), bits.max_q()) as i8
                } else {
                    0
                };
            }
        }
    }
    let data = match bits {
        Bits::Int8 => q.iter().map(|&x| x as u8).collect(),
        Bits::Int4 => {
            let packed_cols = cols.div_ceil(2);
            let mut out = vec![0u8; rows * packed_cols];
            for r in 0..rows {
                for c in 0..cols {
                    let nib = (q[r * cols + c] + 8) as u8 & 0x0f;
                    out[r * packed_cols + c / 2] |= if c % 2 == 0 { nib } else { nib << 4 };
                }
            }
            out
        }
    };
    (data, scales)
}

/// Dequantizes stored bytes of logical shape `[rows, cols]` into `out` with `scales`
/// (`[rows, ceil(cols / 32)]`, as f32).
pub fn dequantize(
    name: &str,
    dtype: Dtype,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let groups = cols.div_ceil(GROUP);
    ensure!(
        scales.len() == rows * groups,
        "tensor {name}: {} scales, expected {rows} x {groups}",
        scales.len()
    );
    ensure!(out.len() == rows * cols, "tensor {name}: wrong output size");
    // Row by row, a group of 32 columns at a time under its scale (loops the compiler
    // vectorises: prefills past 64 rows decode whole matrices through here).
    fn rows_of(
        out: &mut [f32],
        bytes: &[u8],
        scales: &[f32],
        [cols, groups, per_row, group_bytes]: [usize; 4],
        one: impl Fn(&mut [f32], &[u8], f32),
    ) {
        for ((orow, brow), srow) in out
            .chunks_exact_mut(cols)
            .zip(bytes.chunks_exact(per_row))
            .zip(scales.chunks_exact(groups))
        {
            for ((o, b), &s) in orow
                .chunks_mut(GROUP)
                .zip(brow.chunks(group_bytes))
                .zip(srow)
            {
                one(o, b, s);
            }
        }
    }
    match dtype {
        Dtype::I8 => {
            ensure!(
                bytes.len() == rows * cols,
                "tensor {name}: truncated int8 data"
            );
            rows_of(
                out,
                bytes,
                scales,
                [cols, groups, cols, GROUP],
                |o, b, s| {
                    for (o, &b) in o.iter_mut().zip(b) {
                        *o = f32::from(b as i8) * s;
                    }
                },
            );
        }
        Dtype::U8 => {
            let packed = cols.div_ceil(2);
            ensure!(
                bytes.len() == rows * packed,
                "tensor {name}: truncated int4 data"
            );
            // The even column in the low nibble, each stored as value + 8.
            rows_of(
                out,
                bytes,
                scales,
                [cols, groups, packed, GROUP / 2],
                |o, b, s| {
                    for (pair, &b) in o.chunks_mut(2).zip(b) {
                        pair[0] = f32::from((b & 0x0f) as i8 - 8) * s;
                        if let Some(odd) = pair.get_mut(1) {
                            *odd = f32::from((b >> 4) as i8 - 8) * s;
                        }
                    }
                },
            );
        }
        other => anyhow::bail!("tensor {name}: {other:?} is not a moehost quantized format"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_within_half_a_step() {
        let (rows, cols) = (3, 70); // a ragged last group
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        for bits in [Bits::Int8, Bits::Int4] {
            let (data, scale_bytes) = quantize(&w, rows, cols, bits);
            let scales: Vec<f32> = scale_bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect();
            assert_eq!(
                data.len(),
                crate::weights::format::stored_shape(bits.dtype(), &[rows, cols])
                    .iter()
                    .product::<usize>()
            );
            let mut out = vec![0f32; rows * cols];
            dequantize("w", bits.dtype(), &data, rows, cols, &scales, &mut out).unwrap();
            for (i, (a, b)) in w.iter().zip(&out).enumerate() {
                let step = scales[(i / cols) * cols.div_ceil(GROUP) + (i % cols) / GROUP];
                assert!(
                    (a - b).abs() <= step * 0.5 + 1e-6,
                    "{bits:?} {i}: {a} vs {b}"
                );
            }
        }
        // All zeros: scale 0, values 0.
        let (data, scales) = quantize(&[0.0; 32], 1, 32, Bits::Int4);
        assert!(data.iter().all(|&b| b == 0x88) && scales == vec![0, 0]);
    }
}
