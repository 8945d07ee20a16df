//! FP8 e4m3 (the `float8_e4m3fn` of DeepSeek-V3 / Kimi-K2 checkpoints) and 128x128 block dequantization.
//!
//! `w[i, j] = fp8[i, j] * scale_inv[i / block_rows, j / block_cols]`; edge blocks are partial
//! (`ceil(rows / block_rows)` scale rows), as DeepSeek's own dequantizer does.

/// The 256 values of e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities,
/// `S.1111.111` is NaN.
pub static E4M3_TABLE: [f32; 256] = build_table();

const fn build_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0f32 };
        let exp = ((b >> 3) & 0x0f) as i32;
        let man = (b & 0x07) as f32;
        let mag = if exp == 0x0f && b & 0x07 == 0x07 {
            f32::NAN
        } else if exp == 0 {
            // Subnormal: m/8 * 2^(1-7).
            man * (1.0 / 512.0)
        } else {
            (1.0 + man / 8.0) * pow2(exp - 7)
        };
        t[b] = sign * mag;
        b += 1;
    }
    t
}

const fn pow2(e: i32) -> f32 {
    let mut v = 1.0f32;
    let mut i = 0;
    if e >= 0 {
        while i < e {
            v *= 2.0;
            i += 1;
        }
    } else {
        while i < -e {
            v *= 0.5;
            i += 1;
        }
    }
    v
}

/// Dequantizes a row-major `rows x cols` FP8 matrix with per-block scales
/// (`scales` is `ceil(rows/br) x ceil(cols/bc)`, row-major) into `out`.
pub fn dequantize_blocks(
    bytes: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    block: [usize; 2],
    out: &mut [f32],
) {
    let [br, bc] = block;
    let scale_cols = cols.div_ceil(bc);
    debug_assert_eq!(bytes.len(), rows * cols);
    debug_assert_eq!(scales.len(), rows.div_ceil(br) * scale_cols);
    for i in 0..rows {
        let srow = &scales[(i / br) * scale_cols..(i / br + 1) * scale_cols];
        let src = &bytes[i * cols..(i + 1) * cols];
        let dst = &mut out[i * cols..(i + 1) * cols];
        for (jb, &s) in srow.iter().enumerate() {
            let lo = jb * bc;
            let hi = (lo + bc).min(cols);
            for (d, &q) in dst[lo..hi].iter_mut().zip(&src[lo..hi]) {
                *d = E4M3_TABLE[q as usize] * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(E4M3_TABLE[0x00], 0.0);
        assert_eq!(E4M3_TABLE[0x38], 1.0); // exp 7, man 0
        assert_eq!(E4M3_TABLE[0x7e], 448.0); // largest finite
        assert_eq!(E4M3_TABLE[0x01], 2f32.powi(-9)); // smallest subnormal
        assert_eq!(E4M3_TABLE[0xb8], -1.0);
        assert!(E4M3_TABLE[0x7f].is_nan() && E4M3_TABLE[0xff].is_nan());
        // Every other code is finite and round-trips through half's f8-like ordering: monotone.
        let pos: Vec<f32> = (0..0x7f).map(|b| E4M3_TABLE[b]).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ragged_blocks_use_ceil_scales() {
        // 3 x 5 matrix, 2 x 2 blocks: scales are 2 x 3, the last row/column blocks are partial.
        let bytes = [0x38u8; 15]; // all 1.0
        let scales = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0f32; 15];
        dequantize_blocks(&bytes, 3, 5, &scales, [2, 2], &mut out);
        assert_eq!(&out[0..5], &[1.0, 1.0, 2.0, 2.0, 3.0]);
        assert_eq!(&out[10..15], &[4.0, 4.0, 5.0, 5.0, 6.0]);
    }
}
