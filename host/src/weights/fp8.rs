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
    debug_assert_eq!(bytes.len(), rows * cols);
    debug_assert_eq!(
        scales.len(),
        rows.div_ceil(block[0]) * cols.div_ceil(block[1])
    );
    dequantize_rows(bytes, cols, scales, block, 0..rows, out);
}

/// Rows `rows` of [`dequantize_blocks`]'s matrix (`bytes` and `scales` of the whole matrix)
/// into `out` (`rows.len() x cols`): any first row, so a few rows can be decoded at a time.
pub fn dequantize_rows(
    bytes: &[u8],
    cols: usize,
    scales: &[f32],
    [br, bc]: [usize; 2],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let scale_cols = cols.div_ceil(bc);
    for (i, dst) in rows.zip(out.chunks_exact_mut(cols)) {
        let srow = &scales[(i / br) * scale_cols..(i / br + 1) * scale_cols];
        let src = &bytes[i * cols..(i + 1) * cols];
        for ((d, q), &s) in dst.chunks_mut(bc).zip(src.chunks(bc)).zip(srow) {
            decode_scaled(q, s, d);
        }
    }
}

/// `out[i] = E4M3_TABLE[codes[i]] * scale`, bit for bit, eight codes at a time with AVX2
/// (each value built from its code's bits: the table's own values, NaN codes included).
#[inline]
pub fn decode_scaled(codes: &[u8], scale: f32, out: &mut [f32]) {
    debug_assert_eq!(codes.len(), out.len());
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::has_avx2_fma() {
        // 2^8 * scale is exact unless it overflows (scales are far below 2^120).
        if has_f16c() && (scale * 256.0).is_finite() {
            // SAFETY: AVX2 and F16C checked; whole groups of 16 within both slices.
            done = unsafe { decode_scaled_f16c(codes, scale, out) };
        }
        // SAFETY: AVX2 checked; the kernel reads and writes whole groups of 8 within both.
        done += unsafe { decode_scaled_avx2(&codes[done..], scale, &mut out[done..]) };
    }
    for (d, &q) in out[done..].iter_mut().zip(&codes[done..]) {
        *d = E4M3_TABLE[q as usize] * scale;
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("f16c"))
}

/// [`decode_scaled`] 16 codes at a time through the half-precision converter: an e4m3 code's
/// exponent and mantissa bits placed in an f16 (bias 15, not 7) give its value times 2^-8
/// exactly, subnormals included, so `half * (256 * scale)` is `value * scale` rounded once,
/// the table's product. NaN codes (rare) take the 8-wide path. Returns how many were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_scaled_f16c(codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = codes.len().min(out.len()) / 16 * 16;
    let s = _mm256_set1_ps(scale * 256.0);
    let low7 = _mm256_set1_epi16(0x7f);
    let sign_bit = _mm256_set1_epi16(0x80);
    let mut i = 0;
    while i < n {
        let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i));
        let em = _mm256_and_si256(q, low7);
        if _mm256_movemask_epi8(_mm256_cmpeq_epi16(em, low7)) != 0 {
            break; // a NaN code in these 16
        }
        let half = _mm256_or_si256(
            _mm256_slli_epi16(em, 7),
            _mm256_slli_epi16(_mm256_and_si256(q, sign_bit), 8),
        );
        let lo = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
        let hi = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(lo, s));
        _mm256_storeu_ps(out.as_mut_ptr().add(i + 8), _mm256_mul_ps(hi, s));
        i += 16;
    }
    i
}

/// [`decode_scaled`]'s vector body: the first `8 * (len / 8)` values; returns how many.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_scaled_avx2(codes: &[u8], scale: f32, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = codes.len().min(out.len()) / 8 * 8;
    let s = _mm256_set1_ps(scale);
    let low7 = _mm256_set1_epi32(0x7f);
    let sign_bit = _mm256_set1_epi32(0x80);
    // A normal code's exponent e - 7 + 127 = e + 120 over its mantissa: add 120 << 23.
    let bias = _mm256_set1_epi32(120 << 23);
    let nan = _mm256_set1_epi32(0x7f);
    let sub_unit = _mm256_set1_ps(1.0 / 512.0);
    let nan_pos = _mm256_set1_ps(E4M3_TABLE[0x7f]);
    let nan_neg = _mm256_set1_ps(E4M3_TABLE[0xff]);
    for i in (0..n).step_by(8) {
        let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(codes.as_ptr().add(i) as *const __m128i));
        let em = _mm256_and_si256(q, low7);
        let neg = _mm256_cmpeq_epi32(_mm256_and_si256(q, sign_bit), sign_bit);
        let sign = _mm256_slli_epi32(_mm256_and_si256(q, sign_bit), 24);
        let normal = _mm256_add_epi32(_mm256_slli_epi32(em, 20), bias);
        // Subnormal (and zero): m * 2^-9, exact.
        let sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(em), sub_unit));
        let is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), em);
        let mag = _mm256_blendv_epi8(normal, sub, is_sub);
        let mut v = _mm256_castsi256_ps(_mm256_or_si256(mag, sign));
        let is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, nan));
        let nans = _mm256_blendv_ps(nan_pos, nan_neg, _mm256_castsi256_ps(neg));
        v = _mm256_blendv_ps(v, nans, is_nan);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(v, s));
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_decode_gives_the_tables_bits() {
        // Every code (NaN ones stop the 16-wide path for the rest of a call), then every
        // non-NaN code in several orders (the 16-wide path throughout).
        let finite = (0..=255u8).filter(|q| q & 0x7f != 0x7f);
        let codes: Vec<u8> = finite
            .clone()
            .chain(finite.clone().rev())
            .chain(
                finite
                    .map(|q| q.wrapping_mul(37))
                    .filter(|q| q & 0x7f != 0x7f),
            )
            .chain((0..=255u8).chain((0..=255u8).rev()).chain(0..13))
            .collect();
        for scale in [
            1.0f32,
            1.0 / 4096.0,
            3.7e-5,
            448.0,
            -2.5,
            1e-40,
            0.0,
            f32::MAX,
        ] {
            let mut got = vec![0f32; codes.len()];
            decode_scaled(&codes, scale, &mut got);
            for (&q, g) in codes.iter().zip(&got) {
                let want = E4M3_TABLE[q as usize] * scale;
                assert_eq!(g.to_bits(), want.to_bits(), "code {q:#04x} x {scale}");
            }
        }
    }

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
