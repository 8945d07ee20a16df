//! The opt-in int8-activation arithmetic for int4 and int8 experts (`--activations q8`): each
//! input row quantized to int8 per 32 columns (llama.cpp's Q8_0 rule: `d = max|x| / 127`,
//! `q = round(x * (1 / d))`, ties to even), multiplied into the weights with integer dot products (AVX-512 VNNI
//! `vpdpbusd`: 64 multiply-adds an instruction, exact), and the integer sums scaled in f32. It
//! reads a weight byte in a few instructions instead of the exact path's decode-to-f32 and an
//! FMA per weight, so a decode step is bound by memory rather than by arithmetic; the price is
//! the activations' rounding (relative error ~1/254 per value), which changes logits slightly
//! against the f32 reference.
//!
//! The arithmetic is defined, not just approximated, so the invariant still holds within the
//! mode: a chunk's 64 weight bytes (int4: 128 columns; int8: 64) split into 16 lanes of 4
//! bytes (int4 lane `i`: columns `8i..8i + 8` of the chunk, in group `i / 4`; int8: columns
//! `4i..4i + 4`, group `i / 8`); a lane's integer sum (`sum (q_w - 8) * q_x`, or
//! `sum q_w * q_x`) is exact, reached through unsigned weight bytes (the nibble, or the int8
//! value + 128) and an offset per lane computed with the input; it is converted to f32 and
//! added as `fma(sum, s_w[g] * d_x[g], acc_i)` chunk after chunk; the 16 lanes are then summed
//! as a tree (`i` with `i + 8`, then `+ 4`, `+ 2`, `+ 1`). [`reference`] computes exactly that
//! in scalar code; the kernels are tested against it bit for bit, and every tier runs them.
//!
//! Owns: the activations' quantization, the reference, the kernels and when they apply (int4
//! or int8 weights, whole chunks, AVX-512 VNNI). Does not own: the mode switch's CLI, or the
//! exact path (`stored_dot`).

use std::sync::OnceLock;

use crate::weights::format::WeightFormat;
use crate::weights::stored_dot::StoredMatrix;

/// 1.5 x 2^23: see [`Q8Input::quantize`].
const ROUND: f32 = 12_582_912.0;

/// Weight bytes of a chunk (one 512-bit load).
const CHUNK_BYTES: usize = 64;
/// Columns sharing an activation scale (and a weight scale).
const GROUP: usize = 32;

static MODE: OnceLock<bool> = OnceLock::new();

/// Turns the int8-activation arithmetic on for this process (before any forward pass; the
/// first call wins). Refused where the CPU has no AVX-512 VNNI.
pub fn enable() -> anyhow::Result<()> {
    anyhow::ensure!(
        cpu_has_vnni(),
        "--activations q8 needs a CPU with AVX-512 (F, BW, VL) and VNNI; this one has not"
    );
    let on = *MODE.get_or_init(|| true);
    anyhow::ensure!(
        on,
        "the activation arithmetic was already chosen for this process"
    );
    Ok(())
}

/// Whether int4 weights run with int8 activations in this process.
pub fn enabled() -> bool {
    *MODE.get().unwrap_or(&false)
}

/// AVX-512 F/BW/VL and VNNI (and what `stored_dot` needs).
pub fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::weights::stored_dot::cpu_has_avx512() && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Columns of a chunk of `format` (int4: 128, int8: 64), if the mode serves it.
fn chunk_cols(format: WeightFormat) -> Option<usize> {
    match format {
        WeightFormat::Int4 => Some(2 * CHUNK_BYTES),
        WeightFormat::Int8 => Some(CHUNK_BYTES),
        _ => None,
    }
}

/// Whether the mode's kernels serve matrix `m` (int4 or int8, whole chunks, all there).
pub fn serves(m: &StoredMatrix<'_>) -> bool {
    let Some(chunk) = chunk_cols(m.format) else {
        return false;
    };
    enabled()
        && m.cols > 0
        && m.cols.is_multiple_of(chunk)
        && m.bytes.len() >= m.rows * m.cols / chunk * CHUNK_BYTES
        && m.scales.len() >= m.rows * m.cols / GROUP
}

/// One input row quantized, laid out as the kernels read it for one weight format, per
/// chunk: 64 int8 values per weight-byte operand (int4: the even columns, then in `odd` the
/// odd ones, in the weight bytes' order; int8: the columns as they are), each lane's offset
/// (int4: `-8` times the sum of its 8 values; int8: `-128` times its 4), and each lane's
/// activation scale.
pub struct Q8Input {
    pub chunks: usize,
    format: WeightFormat,
    q: Vec<i8>,
    odd: Vec<i8>,
    offset: Vec<i32>,
    d: Vec<f32>,
}

impl Q8Input {
    /// `x` (whole chunks of `format`) quantized per 32 columns.
    pub fn quantize(x: &[f32], format: WeightFormat) -> Self {
        let chunk = chunk_cols(format).expect("int4 or int8");
        assert!(x.len().is_multiple_of(chunk));
        let chunks = x.len() / chunk;
        let mut q = vec![0i8; x.len()];
        let mut dg = vec![0f32; x.len() / GROUP];
        for ((g, q), d) in x
            .chunks_exact(GROUP)
            .zip(q.chunks_exact_mut(GROUP))
            .zip(&mut dg)
        {
            let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = max / 127.0;
            let id = if *d > 0.0 { 1.0 / *d } else { 0.0 };
            // Adding and subtracting 1.5 x 2^23 rounds a value below 2^22 to the nearest
            // integer, ties to even, in plain arithmetic the compiler vectorises.
            for (q, v) in q.iter_mut().zip(g) {
                *q = ((v * id + ROUND) - ROUND).clamp(-127.0, 127.0) as i8;
            }
        }
        // Columns a lane covers, and the weights' offset it cancels.
        let (per_lane, offset) = match format {
            WeightFormat::Int4 => (8, -8),
            _ => (4, -128),
        };
        let mut offsets = vec![0i32; chunks * 16];
        let mut d = vec![0f32; chunks * 16];
        for (lane, (o, dl)) in offsets.iter_mut().zip(&mut d).enumerate() {
            let cols = lane * per_lane;
            *o = offset
                * q[cols..cols + per_lane]
                    .iter()
                    .map(|&v| i32::from(v))
                    .sum::<i32>();
            *dl = dg[cols / GROUP];
        }
        let (q, odd) = match format {
            WeightFormat::Int4 => {
                let even = q.iter().step_by(2).copied().collect();
                let odd = q.iter().skip(1).step_by(2).copied().collect();
                (even, odd)
            }
            _ => (q, Vec::new()),
        };
        Q8Input {
            chunks,
            format,
            q,
            odd,
            offset: offsets,
            d,
        }
    }
}

/// Row `r` of matrix `m` (int4 or int8) times `x`, in scalar code, in the mode's order.
pub fn reference(m: &StoredMatrix<'_>, r: usize, x: &Q8Input) -> f32 {
    assert_eq!(m.format, x.format);
    let row = &m.bytes[r * x.chunks * CHUNK_BYTES..(r + 1) * x.chunks * CHUNK_BYTES];
    let groups = m.cols / GROUP;
    let lanes_per_group = match m.format {
        WeightFormat::Int4 => 4,
        _ => 8,
    };
    let mut acc = [0f32; 16];
    for c in 0..x.chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            let mut sum = x.offset[c * 16 + i];
            for b in 0..4 {
                let j = c * CHUNK_BYTES + 4 * i + b;
                if m.format == WeightFormat::Int4 {
                    sum += i32::from(row[j] & 0x0f) * i32::from(x.q[j]);
                    sum += i32::from(row[j] >> 4) * i32::from(x.odd[j]);
                } else {
                    sum += i32::from(row[j] ^ 0x80) * i32::from(x.q[j]);
                }
            }
            let g = c * (16 / lanes_per_group) + i / lanes_per_group;
            let scale = m.scales.get(r * groups + g) * x.d[c * 16 + i];
            *a = (sum as f32).mul_add(scale, *a);
        }
    }
    tree_sum(acc)
}

/// `i` with `i + 8`, then `+ 4`, `+ 2`, `+ 1`: the kernel's reduction.
fn tree_sum(mut v: [f32; 16]) -> f32 {
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            v[i] += v[i + half];
        }
    }
    v[0]
}

/// `out[j * width + col + r - rows.start] = row r . x[j]` in the mode's arithmetic, for the
/// rows `rows` and each input row of `x`. Call only when [`serves`].
pub fn linear(
    m: &StoredMatrix<'_>,
    x: &[f32],
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    width: usize,
    col: usize,
) {
    assert!(serves(m) && rows.end <= m.rows);
    let inputs: Vec<Q8Input> = x
        .chunks_exact(m.cols)
        .map(|x| Q8Input::quantize(x, m.format))
        .collect();
    let t = inputs.len();
    let bytes_per_row = m.bytes.len() / m.rows.max(1);
    crate::weights::stored_dot::by_rows(rows, t, bytes_per_row, out, width, col, |r0, o| {
        for (i, v) in o.chunks_exact_mut(t).enumerate() {
            // Up to four inputs per pass over the row: each weight chunk loaded once for them.
            for (ys, xs) in v.chunks_mut(4).zip(inputs.chunks(4)) {
                // SAFETY: `serves` checked the CPU and that bytes and scales cover every row.
                unsafe {
                    match *xs {
                        [ref a, ref b, ref c, ref d] => {
                            ys.copy_from_slice(&vnni::row(m, r0 + i, [a, b, c, d]))
                        }
                        [ref a, ref b, ref c] => {
                            ys.copy_from_slice(&vnni::row(m, r0 + i, [a, b, c]))
                        }
                        [ref a, ref b] => ys.copy_from_slice(&vnni::row(m, r0 + i, [a, b])),
                        [ref a] => ys.copy_from_slice(&vnni::row(m, r0 + i, [a])),
                        _ => unreachable!("chunks of one to four"),
                    }
                }
            }
        }
    });
}

#[cfg(not(target_arch = "x86_64"))]
mod vnni {
    pub(super) unsafe fn row<const TK: usize>(
        _: &super::StoredMatrix<'_>,
        _: usize,
        _: [&super::Q8Input; TK],
    ) -> [f32; TK] {
        unreachable!("the q8 mode is refused off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Q8Input, StoredMatrix, GROUP};
    use crate::weights::scales::ScaleType;

    /// Bytes ahead of the current chunk to prefetch.
    const PREFETCH: usize = 2048;

    /// Row `r` of matrix `m` (int4 or int8) times each of `xs`, [`super::reference`]'s
    /// arithmetic for each: a weight chunk is loaded once for all the inputs.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and VNNI; the row, its scales and the inputs' chunks are there; the
    /// inputs were quantized for `m`'s format.
    pub(super) unsafe fn row<const TK: usize>(
        m: &StoredMatrix<'_>,
        r: usize,
        xs: [&Q8Input; TK],
    ) -> [f32; TK] {
        match m.format {
            crate::weights::format::WeightFormat::Int4 => row_int4(m, r, xs),
            _ => row_int8(m, r, xs),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn row_int4<const TK: usize>(
        m: &StoredMatrix<'_>,
        r: usize,
        xs: [&Q8Input; TK],
    ) -> [f32; TK] {
        let bytes = m.bytes.as_ptr().add(r * m.cols / 2);
        let s0 = r * (m.cols / GROUP);
        let low = _mm512_set1_epi8(0x0f);
        // Lane i takes its group's scale: group i / 4 of the chunk's four.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        let mut acc = [_mm512_setzero_ps(); TK];
        for c in 0..xs[0].chunks {
            // Ahead across 4 KiB pages, where the hardware prefetcher stops (the rows lie end
            // to end, so past a row's end is the next one's start).
            _mm_prefetch::<_MM_HINT_T0>(bytes.add(64 * c).wrapping_add(PREFETCH) as *const i8);
            let w = _mm512_loadu_si512(bytes.add(64 * c) as *const _);
            let lo = _mm512_and_si512(w, low);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), low);
            let sw =
                _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales::<4>(m, s0 + 4 * c)));
            for (a, x) in acc.iter_mut().zip(xs) {
                let xe = _mm512_loadu_si512(x.q.as_ptr().add(64 * c) as *const _);
                let xo = _mm512_loadu_si512(x.odd.as_ptr().add(64 * c) as *const _);
                let mut sum = _mm512_loadu_si512(x.offset.as_ptr().add(16 * c) as *const _);
                sum = _mm512_dpbusd_epi32(sum, lo, xe);
                sum = _mm512_dpbusd_epi32(sum, hi, xo);
                *a = scaled(*a, sum, sw, x, c);
            }
        }
        let mut out = [0f32; TK];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = tree(a);
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    unsafe fn row_int8<const TK: usize>(
        m: &StoredMatrix<'_>,
        r: usize,
        xs: [&Q8Input; TK],
    ) -> [f32; TK] {
        let bytes = m.bytes.as_ptr().add(r * m.cols);
        let s0 = r * (m.cols / GROUP);
        let bias = _mm512_set1_epi8(-128);
        // Lanes 0-7 take the chunk's first group's scale, 8-15 its second's.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let mut acc = [_mm512_setzero_ps(); TK];
        for c in 0..xs[0].chunks {
            _mm_prefetch::<_MM_HINT_T0>(bytes.add(64 * c).wrapping_add(PREFETCH) as *const i8);
            // The int8 value + 128, as an unsigned byte.
            let w = _mm512_xor_si512(_mm512_loadu_si512(bytes.add(64 * c) as *const _), bias);
            let sw =
                _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales::<2>(m, s0 + 2 * c)));
            for (a, x) in acc.iter_mut().zip(xs) {
                let xq = _mm512_loadu_si512(x.q.as_ptr().add(64 * c) as *const _);
                let mut sum = _mm512_loadu_si512(x.offset.as_ptr().add(16 * c) as *const _);
                sum = _mm512_dpbusd_epi32(sum, w, xq);
                *a = scaled(*a, sum, sw, x, c);
            }
        }
        let mut out = [0f32; TK];
        for (o, a) in out.iter_mut().zip(acc) {
            *o = tree(a);
        }
        out
    }

    /// `acc + sum * (s_w * d_x)` per lane: the chunk's weight scales `sw` (spread to their
    /// lanes) times chunk `c`'s activation scales.
    #[inline(always)]
    unsafe fn scaled(acc: __m512, sum: __m512i, sw: __m512, x: &Q8Input, c: usize) -> __m512 {
        let scale = _mm512_mul_ps(sw, _mm512_loadu_ps(x.d.as_ptr().add(16 * c)));
        _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc)
    }

    /// The 16 lanes summed: i + 8, i + 4, i + 2, i + 1.
    #[inline(always)]
    unsafe fn tree(acc: __m512) -> f32 {
        let a = _mm256_add_ps(
            _mm512_castps512_ps256(acc),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
        );
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        let d = _mm_add_ss(c, _mm_shuffle_ps::<1>(c, c));
        _mm_cvtss_f32(d)
    }

    /// Scales `i..i + N` of `m` (`N` 2 or 4), widened exactly into the low `N` lanes, reading
    /// no further.
    #[inline(always)]
    unsafe fn scales<const N: u8>(m: &StoredMatrix<'_>, i: usize) -> __m128 {
        let mask = (1u8 << N) - 1;
        let at = m.scales.bytes.as_ptr();
        let half = || _mm_maskz_loadu_epi16(mask, (at as *const i16).add(i));
        match m.scales.ty {
            ScaleType::F32 => _mm_maskz_loadu_ps(mask, (at as *const f32).add(i)),
            ScaleType::F16 => _mm_cvtph_ps(half()),
            ScaleType::Bf16 => _mm_castsi128_ps(_mm_slli_epi32::<16>(_mm_cvtepu16_epi32(half()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::scales::ScaleType;
    use crate::weights::stored_dot::tests::{matrix, next};

    /// The kernels give the reference's bits, row by row, for int4 and int8 with every stored
    /// scale type; and the mode's result stays within the activations' rounding of the exact
    /// f32 dot.
    #[test]
    fn the_kernels_give_the_references_bits() {
        if !cpu_has_vnni() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let mut s = 0x1234_5678_u32;
        for (format, rows, cols, ty) in [
            (WeightFormat::Int4, 5, 128, ScaleType::F16),
            (WeightFormat::Int4, 7, 384, ScaleType::Bf16),
            (WeightFormat::Int4, 3, 1024, ScaleType::F32),
            (WeightFormat::Int8, 5, 64, ScaleType::F16),
            (WeightFormat::Int8, 6, 448, ScaleType::Bf16),
            (WeightFormat::Int8, 3, 1024, ScaleType::F32),
        ] {
            let (bytes, scales, w) = matrix(format, rows, cols, [1, 1], ty, &mut s);
            let m = StoredMatrix {
                format,
                bytes: &bytes,
                scales: scales.view(),
                rows,
                cols,
                fp8_block: [0, 0],
            };
            let x: Vec<f32> = (0..cols)
                .map(|_| (next(&mut s) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let xi = Q8Input::quantize(&x, format);
            for r in 0..rows {
                // SAFETY: the CPU was checked; the matrix holds `rows` rows.
                let [got] = unsafe { vnni::row(&m, r, [&xi]) };
                let want = reference(&m, r, &xi);
                // Several inputs in one pass give each its own bits.
                let others: Vec<Q8Input> = (0..2)
                    .map(|j| {
                        let y: Vec<f32> = x.iter().map(|v| v * (j as f32 + 0.5)).collect();
                        Q8Input::quantize(&y, format)
                    })
                    .collect();
                // SAFETY: as above.
                let three = unsafe { vnni::row(&m, r, [&others[0], &xi, &others[1]]) };
                assert_eq!(three[1].to_bits(), want.to_bits());
                assert_eq!(three[0].to_bits(), reference(&m, r, &others[0]).to_bits());
                assert_eq!(three[2].to_bits(), reference(&m, r, &others[1]).to_bits());
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{} {rows}x{cols} {ty:?} row {r}",
                    format.name()
                );
                let exact = crate::kernels::dot(&w[r * cols..(r + 1) * cols], &x);
                let size: f32 = w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!((got - exact).abs() <= size / 100.0, "{got} vs {exact}");
            }
        }
    }

    /// Quantization: each group's largest value maps to +-127, zeros stay zero, and the lane
    /// offsets are -8 times the lane's values.
    #[test]
    fn inputs_quantize_per_group() {
        let mut x = vec![0f32; 128];
        x[3] = -2.0;
        x[5] = 1.0;
        x[40] = 0.5;
        let q = Q8Input::quantize(&x, WeightFormat::Int4);
        assert_eq!(q.chunks, 1);
        // Column 3 is odd (pair 1), column 5 odd (pair 2), column 40 even (pair 20).
        assert_eq!((q.odd[1], q.odd[2], q.q[20]), (-127, 64, 127));
        assert_eq!(q.d[0], 2.0 / 127.0);
        assert_eq!(q.d[4], 0.5 / 127.0);
        assert_eq!(q.offset[0], -8 * (-127 + 64));
        assert!(q.d[8..].iter().all(|&d| d == 0.0));
        // int8: 64-column chunks, lanes of 4 columns in order, offsets -128 times their sum.
        let q = Q8Input::quantize(&x, WeightFormat::Int8);
        assert_eq!(q.chunks, 2);
        assert_eq!((q.q[3], q.q[5], q.q[40]), (-127, 64, 127));
        assert_eq!((q.offset[0], q.offset[1]), (-128 * -127, -128 * 64));
        assert_eq!((q.d[7], q.d[8]), (2.0 / 127.0, 0.5 / 127.0));
    }
}
