//! Linear layers computed straight from a weight's storage format: each 32-column chunk of a
//! stored row (FP8 with block scales, int4 and int8 with a scale per 32 columns, bf16) is
//! decoded in registers and multiplied into the inputs at once, never written out as f32, so a
//! decode step reads each weight byte once and nothing else.
//!
//! Owns: the AVX-512 kernels (F, BW, VL, with F16C), chosen at run time, and when they apply.
//! Every output has the bits of `kernels::dot` of the decoded row (`checkpoint::decode_f32`'s
//! values) and the input row:
//! - each weight is decoded to the reference's value: FP8 through the half-precision converter
//!   (`fp8::decode_scaled`'s exact construction), int4 through a 16-entry table of
//!   `(q - 8) * scale` per group, int8 as `q * scale`, bf16 widened;
//! - the 32 accumulator lanes take the same elements in the same order as `dot`'s four 8-lane
//!   accumulators (int4 keeps even and odd columns in separate registers and de-interleaves the
//!   input to match; the lanes are put back in `dot`'s order before the sum);
//! - the horizontal sum is `kernels::hsum4`'s.
//!
//! Does not own: the reference decoders (`checkpoint`, `fp8`, `quant`), or shapes and CPUs the
//! kernels do not serve (`ffn::ExpertBytes` decodes a block of rows and runs `kernels::linear`
//! there: the same bits, more memory traffic).

use std::ops::Range;

use rayon::prelude::*;

use crate::weights::format::WeightFormat;
use crate::weights::scales::ScaleView;

/// One stored weight matrix `[rows, cols]` as the kernels read it.
#[derive(Clone, Copy)]
pub struct StoredMatrix<'a> {
    pub format: WeightFormat,
    /// Row-major storage (int4: `cols / 2` bytes a row).
    pub bytes: &'a [u8],
    /// FP8: `[ceil(rows / br), ceil(cols / bc)]` block scales; int8/int4: `[rows, cols / 32]`;
    /// bf16: none. As stored (F32, F16 or BF16).
    pub scales: ScaleView<'a>,
    pub rows: usize,
    pub cols: usize,
    /// FP8 block `[br, bc]` (ignored otherwise).
    pub fp8_block: [usize; 2],
}

/// Weight rows a parallel task takes.
const TASK_ROWS: usize = 64;
/// Stored bytes from which one call spreads its rows over threads (a Kimi-K2 expert
/// projection holds 7-29 MB; a tiny-k2 one 16-64 KB).
const PAR_MIN_BYTES: usize = 1 << 20;

impl StoredMatrix<'_> {
    /// Whether the kernels serve this matrix on this CPU: AVX-512 F/BW/VL and F16C, whole
    /// 32-column chunks, FP8 blocks that never split a chunk and scales whose `256 * s` is
    /// finite (the converter's exact construction), bytes and scales all there. The caller
    /// has checked that FP8 bytes hold no NaN code (`has_fp8_nan`).
    pub fn fused(&self) -> bool {
        let (r, c) = (self.rows, self.cols);
        if !cpu_has_avx512() || c == 0 || !c.is_multiple_of(32) {
            return false;
        }
        let scales = self.format.scale_count(r, c, self.fp8_block);
        match self.format {
            WeightFormat::Fp8 => {
                let [br, bc] = self.fp8_block;
                br > 0
                    && bc > 0
                    && bc.is_multiple_of(32)
                    && self.bytes.len() >= r * c
                    && self.scales.len() >= scales
                    && (0..scales).all(|i| (self.scales.get(i) * 256.0).is_finite())
            }
            WeightFormat::Int4 => self.bytes.len() >= r * c / 2 && self.scales.len() >= scales,
            WeightFormat::Int8 => self.bytes.len() >= r * c && self.scales.len() >= scales,
            WeightFormat::Bf16 => self.bytes.len() >= r * c * 2,
            _ => false,
        }
    }

    /// `out[j * width + col + r - rows.start] = dot(decoded row r, x[j])` for the rows `rows`
    /// and each of the `x.len() / cols` input rows; other columns of `out` are left alone.
    /// Spread over threads when the rows hold enough bytes. Call only when [`Self::fused`].
    pub fn linear(&self, x: &[f32], rows: Range<usize>, out: &mut [f32], width: usize, col: usize) {
        assert!(self.fused() && rows.end <= self.rows);
        let k = self.cols;
        let t = x.len() / k;
        assert!(out.len() >= t * width && col + rows.len() <= width);
        let x = match self.format {
            WeightFormat::Int4 => std::borrow::Cow::Owned(deinterleave(x, k)),
            _ => std::borrow::Cow::Borrowed(x),
        };
        let bytes_per_row = self.bytes.len() / self.rows.max(1);
        by_rows(rows, t, bytes_per_row, out, width, col, |r0, o| {
            // SAFETY: `fused` checked the CPU's features and that bytes and scales cover every
            // row; `r0 + o.len() / t <= rows.end <= self.rows`; `x` holds t rows of k.
            unsafe { avx512::rows(self, &x, t, r0, o) }
        });
    }
}

/// `run(r0, o)` fills `o` (`[rows, t]`, by weight row) for the rows from `r0`; over the pool in
/// 64-row tasks when the rows hold enough bytes; the results are then placed at
/// `out[j * width + col + r - rows.start]`.
pub(crate) fn by_rows(
    rows: Range<usize>,
    t: usize,
    bytes_per_row: usize,
    out: &mut [f32],
    width: usize,
    col: usize,
    run: impl Fn(usize, &mut [f32]) + Sync,
) {
    let n = rows.len();
    let mut by_row = vec![0f32; n * t];
    if n * bytes_per_row >= PAR_MIN_BYTES && rayon::current_num_threads() > 1 {
        by_row
            .par_chunks_mut(TASK_ROWS * t)
            .enumerate()
            .for_each(|(c, o)| run(rows.start + c * TASK_ROWS, o));
    } else {
        run(rows.start, &mut by_row);
    }
    for (r, v) in by_row.chunks_exact(t).enumerate() {
        for (j, &y) in v.iter().enumerate() {
            out[j * width + col + r] = y;
        }
    }
}

/// Each 32-element chunk of each `k`-wide row of `x` as its 16 even then its 16 odd elements:
/// the order int4's decoded registers hold the weights in.
fn deinterleave(x: &[f32], k: usize) -> Vec<f32> {
    debug_assert!(k.is_multiple_of(32) && x.len().is_multiple_of(32));
    let mut d = vec![0f32; x.len()];
    for (o, c) in d.chunks_exact_mut(32).zip(x.chunks_exact(32)) {
        for j in 0..16 {
            o[j] = c[2 * j];
            o[16 + j] = c[2 * j + 1];
        }
    }
    d
}

/// Whether FP8 `bytes` hold a NaN code (`S.1111.111`), which the kernels' converter does not
/// produce: such a matrix takes the decoder's path (where the NaN reaches the output as the
/// reference's does).
pub fn has_fp8_nan(bytes: &[u8]) -> bool {
    // Whole pieces folded without an early exit, so the compiler vectorises the test.
    bytes
        .chunks(1 << 12)
        .any(|c| c.iter().fold(false, |nan, &b| nan | (b & 0x7f == 0x7f)))
}

/// AVX-512 F, BW and VL, F16C, AVX2 and FMA: what the kernels use.
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *YES.get_or_init(|| {
            std::env::var_os("MOEHOST_NO_AVX512").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("f16c")
                && crate::kernels::has_avx2_fma()
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn rows(
        _: &super::StoredMatrix<'_>,
        _: &[f32],
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("fused() is false off x86_64")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::StoredMatrix;
    use crate::weights::format::WeightFormat;
    use crate::weights::scales::ScaleType;

    /// How the kernels read one stored scale type: a type parameter, so the inner loops hold
    /// no branch on it.
    trait ScaleRead {
        /// Scale `i` of those at `at`, widened exactly, in every lane.
        unsafe fn splat(at: *const u8, i: usize) -> __m512;
    }

    struct F32Scales;
    struct F16Scales;
    struct Bf16Scales;

    impl ScaleRead for F32Scales {
        #[inline(always)]
        unsafe fn splat(at: *const u8, i: usize) -> __m512 {
            _mm512_set1_ps((at as *const f32).add(i).read_unaligned())
        }
    }

    impl ScaleRead for F16Scales {
        #[inline(always)]
        unsafe fn splat(at: *const u8, i: usize) -> __m512 {
            let h = (at as *const u16).add(i).read_unaligned();
            _mm512_cvtph_ps(_mm256_set1_epi16(h as i16))
        }
    }

    impl ScaleRead for Bf16Scales {
        #[inline(always)]
        unsafe fn splat(at: *const u8, i: usize) -> __m512 {
            let h = (at as *const u16).add(i).read_unaligned();
            _mm512_castsi512_ps(_mm512_set1_epi32((h as i32) << 16))
        }
    }

    /// Bytes ahead of a row's current chunk to prefetch.
    const PREFETCH: usize = 1024;

    /// A storage format's decoder: a row's pointers, the scale that a span of chunks shares
    /// (FP8: a block's columns; int: a group), then a 32-column chunk as two vectors of f32 in
    /// the accumulators' lane order.
    trait Decode {
        type Row: Copy;
        /// Chunks sharing one scale.
        fn span(&self) -> usize;
        unsafe fn row(&self, r: usize) -> Self::Row;
        /// What `chunk` needs of the scale of chunk `c` (`c` starts a span).
        unsafe fn scale(&self, row: Self::Row, c: usize) -> __m512;
        unsafe fn chunk(&self, row: Self::Row, c: usize, scale: __m512) -> (__m512, __m512);
        /// Where chunk `c` of the row starts.
        unsafe fn at(&self, row: Self::Row, c: usize) -> *const u8;
        /// Accumulators back in `dot`'s lane order (lane `i` of the pair: element `i` mod 32).
        #[inline(always)]
        unsafe fn lanes(a: __m512, b: __m512) -> (__m512, __m512) {
            (a, b)
        }
    }

    struct Fp8<S> {
        bytes: *const u8,
        cols: usize,
        scales: *const u8,
        scale_cols: usize,
        br: usize,
        bc: usize,
        read: std::marker::PhantomData<S>,
    }

    impl<S: ScaleRead> Decode for Fp8<S> {
        /// The row's bytes and the index of its block row's first scale.
        type Row = (*const u8, usize);

        fn span(&self) -> usize {
            self.bc / 32
        }

        #[inline(always)]
        unsafe fn row(&self, r: usize) -> Self::Row {
            (
                self.bytes.add(r * self.cols),
                (r / self.br) * self.scale_cols,
            )
        }

        #[inline(always)]
        unsafe fn scale(&self, (_, s): Self::Row, c: usize) -> __m512 {
            // Times 256, a power of two: the bits of the scalar product.
            _mm512_mul_ps(
                S::splat(self.scales, s + 32 * c / self.bc),
                _mm512_set1_ps(256.0),
            )
        }

        #[inline(always)]
        unsafe fn at(&self, (p, _): Self::Row, c: usize) -> *const u8 {
            p.add(32 * c)
        }

        /// `fp8::decode_scaled_f16c` on 32 codes: the code's exponent and mantissa under an f16
        /// exponent bias (its value times 2^-8, exactly, subnormal codes as f16 subnormals,
        /// which the converter widens to normal f32 without a microcode assist), times
        /// `256 * scale`: the value times the scale rounded once, the table's product.
        #[inline(always)]
        unsafe fn chunk(&self, (p, _): Self::Row, c: usize, scale: __m512) -> (__m512, __m512) {
            // Sign-extended then shifted: bit 15 is the sign, bit 14 a copy of it (cleared),
            // bits 13..7 the exponent and mantissa.
            let q = _mm512_cvtepi8_epi16(_mm256_loadu_si256(p.add(32 * c) as *const __m256i));
            let half = _mm512_and_si512(_mm512_slli_epi16::<7>(q), _mm512_set1_epi16(!0x4000));
            let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
            let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(half));
            (_mm512_mul_ps(lo, scale), _mm512_mul_ps(hi, scale))
        }
    }

    /// Group-wise formats' row: its bytes and the index of its first scale.
    type GroupRow = (*const u8, usize);

    /// A group-wise matrix (a scale per 32 columns).
    struct Grouped<S> {
        bytes: *const u8,
        cols: usize,
        scales: *const u8,
        read: std::marker::PhantomData<S>,
    }

    struct Int4<S>(Grouped<S>);

    /// `q - 8` for each nibble value.
    const NIBBLE_VALUES: [f32; 16] = [
        -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
    ];

    impl<S: ScaleRead> Decode for Int4<S> {
        type Row = GroupRow;

        fn span(&self) -> usize {
            1
        }

        #[inline(always)]
        unsafe fn row(&self, r: usize) -> Self::Row {
            let g = &self.0;
            (g.bytes.add(r * g.cols / 2), r * g.cols / 32)
        }

        #[inline(always)]
        unsafe fn at(&self, (p, _): Self::Row, c: usize) -> *const u8 {
            p.add(16 * c)
        }

        /// The group's table: `(q - 8) * scale` for each nibble, the reference's products.
        #[inline(always)]
        unsafe fn scale(&self, (_, s): Self::Row, c: usize) -> __m512 {
            _mm512_mul_ps(
                _mm512_loadu_ps(NIBBLE_VALUES.as_ptr()),
                S::splat(self.0.scales, s + c),
            )
        }

        /// 16 bytes: the low nibbles (even columns) and the high ones (odd columns), each
        /// looked up in the group's table.
        #[inline(always)]
        unsafe fn chunk(&self, (p, _): Self::Row, c: usize, table: __m512) -> (__m512, __m512) {
            let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(16 * c) as *const __m128i));
            // The permutation reads the low four bits of each index.
            let even = _mm512_permutexvar_ps(b, table);
            let odd = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(b), table);
            (even, odd)
        }

        /// Lane `j` of the even register holds element `2j` of the chunk, of the odd one
        /// `2j + 1`: interleaved back.
        #[inline(always)]
        unsafe fn lanes(a: __m512, b: __m512) -> (__m512, __m512) {
            let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let hi =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            (
                _mm512_permutex2var_ps(a, lo, b),
                _mm512_permutex2var_ps(a, hi, b),
            )
        }
    }

    struct Int8<S>(Grouped<S>);

    impl<S: ScaleRead> Decode for Int8<S> {
        type Row = GroupRow;

        fn span(&self) -> usize {
            1
        }

        #[inline(always)]
        unsafe fn row(&self, r: usize) -> Self::Row {
            let g = &self.0;
            (g.bytes.add(r * g.cols), r * g.cols / 32)
        }

        #[inline(always)]
        unsafe fn scale(&self, (_, s): Self::Row, c: usize) -> __m512 {
            S::splat(self.0.scales, s + c)
        }

        #[inline(always)]
        unsafe fn at(&self, (p, _): Self::Row, c: usize) -> *const u8 {
            p.add(32 * c)
        }

        #[inline(always)]
        unsafe fn chunk(&self, (p, _): Self::Row, c: usize, scale: __m512) -> (__m512, __m512) {
            let p = p.add(32 * c);
            let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
            let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
            (
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), scale),
                _mm512_mul_ps(_mm512_cvtepi32_ps(hi), scale),
            )
        }
    }

    struct Bf16 {
        bytes: *const u8,
        cols: usize,
    }

    impl Decode for Bf16 {
        type Row = *const u8;

        fn span(&self) -> usize {
            usize::MAX
        }

        #[inline(always)]
        unsafe fn row(&self, r: usize) -> Self::Row {
            self.bytes.add(r * self.cols * 2)
        }

        #[inline(always)]
        unsafe fn scale(&self, _: Self::Row, _: usize) -> __m512 {
            _mm512_setzero_ps()
        }

        #[inline(always)]
        unsafe fn at(&self, p: Self::Row, c: usize) -> *const u8 {
            p.add(64 * c)
        }

        #[inline(always)]
        unsafe fn chunk(&self, p: Self::Row, c: usize, _: __m512) -> (__m512, __m512) {
            let p = p.add(64 * c);
            let lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            let hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(32) as *const __m256i));
            (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
            )
        }
    }

    /// `out[(r - r0) * t + j] = dot(row r, x[j])` for the rows `r0..r0 + out.len() / t`.
    ///
    /// # Safety
    /// `m.fused()`; those rows exist; `x` holds `t` rows of `m.cols` (int4: de-interleaved).
    pub(super) unsafe fn rows(
        m: &StoredMatrix<'_>,
        x: &[f32],
        t: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let (bytes, cols) = (m.bytes.as_ptr(), m.cols);
        if m.format == WeightFormat::Bf16 {
            return tiles(&Bf16 { bytes, cols }, x, t, cols, r0, out);
        }
        match m.scales.ty {
            ScaleType::F32 => scaled::<F32Scales>(m, x, t, r0, out),
            ScaleType::F16 => scaled::<F16Scales>(m, x, t, r0, out),
            ScaleType::Bf16 => scaled::<Bf16Scales>(m, x, t, r0, out),
        }
    }

    /// [`rows`] for a format with scales of type `S`.
    unsafe fn scaled<S: ScaleRead>(
        m: &StoredMatrix<'_>,
        x: &[f32],
        t: usize,
        r0: usize,
        out: &mut [f32],
    ) {
        let (bytes, cols, scales) = (m.bytes.as_ptr(), m.cols, m.scales.bytes.as_ptr());
        let grouped = Grouped::<S> {
            bytes,
            cols,
            scales,
            read: std::marker::PhantomData,
        };
        match m.format {
            WeightFormat::Fp8 => {
                let [br, bc] = m.fp8_block;
                let d = Fp8::<S> {
                    bytes,
                    cols,
                    scales,
                    scale_cols: cols.div_ceil(bc),
                    br,
                    bc,
                    read: std::marker::PhantomData,
                };
                tiles(&d, x, t, cols, r0, out)
            }
            WeightFormat::Int4 => tiles(&Int4(grouped), x, t, cols, r0, out),
            WeightFormat::Int8 => tiles(&Int8(grouped), x, t, cols, r0, out),
            f => unreachable!("fused() does not serve {}", f.name()),
        }
    }

    /// The rows in tiles: eight rows at a time for one input row (sixteen accumulators, eight
    /// independent rows in flight), two rows by up to four inputs otherwise.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn tiles<D: Decode>(d: &D, x: &[f32], t: usize, k: usize, r0: usize, out: &mut [f32]) {
        let n = out.len() / t;
        let xp = |j: usize| x.as_ptr().add(j * k);
        let mut r = 0;
        if t == 1 {
            while r + 8 <= n {
                let o: [[f32; 1]; 8] = tile::<D, 8, 1>(d, r0 + r, [xp(0)], k / 32);
                for (i, v) in o.iter().enumerate() {
                    out[r + i] = v[0];
                }
                r += 8;
            }
        }
        while r + 2 <= n {
            inputs::<D, 2>(d, r0 + r, &xp, t, k, &mut out[r * t..(r + 2) * t]);
            r += 2;
        }
        if r < n {
            inputs::<D, 1>(d, r0 + r, &xp, t, k, &mut out[r * t..(r + 1) * t]);
        }
    }

    /// `RW` rows against every input, four inputs at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn inputs<D: Decode, const RW: usize>(
        d: &D,
        r: usize,
        xp: &impl Fn(usize) -> *const f32,
        t: usize,
        k: usize,
        out: &mut [f32],
    ) {
        let chunks = k / 32;
        let mut put = |j: usize, o: &[[f32; 4]; RW], n: usize| {
            for (i, row) in o.iter().enumerate() {
                out[i * t + j..i * t + j + n].copy_from_slice(&row[..n]);
            }
        };
        let mut j = 0;
        while j + 4 <= t {
            let o = tile::<D, RW, 4>(d, r, [xp(j), xp(j + 1), xp(j + 2), xp(j + 3)], chunks);
            put(j, &o, 4);
            j += 4;
        }
        let pad = |o: [[f32; 3]; RW]| o.map(|v| [v[0], v[1], v[2], 0.0]);
        match t - j {
            3 => put(
                j,
                &pad(tile::<D, RW, 3>(
                    d,
                    r,
                    [xp(j), xp(j + 1), xp(j + 2)],
                    chunks,
                )),
                3,
            ),
            2 => {
                let o = tile::<D, RW, 2>(d, r, [xp(j), xp(j + 1)], chunks);
                put(j, &o.map(|v| [v[0], v[1], 0.0, 0.0]), 2)
            }
            1 => {
                let o = tile::<D, RW, 1>(d, r, [xp(j)], chunks);
                put(j, &o.map(|v| [v[0], 0.0, 0.0, 0.0]), 1)
            }
            _ => {}
        }
    }

    /// `RW` weight rows from `r` against `TK` inputs: two 16-lane accumulators per pair, each
    /// chunk of a row decoded once and used by every input, then each pair in `dot`'s lane
    /// order summed as `hsum4` does.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn tile<D: Decode, const RW: usize, const TK: usize>(
        d: &D,
        r: usize,
        xs: [*const f32; TK],
        chunks: usize,
    ) -> [[f32; TK]; RW] {
        let rows: [D::Row; RW] = std::array::from_fn(|i| d.row(r + i));
        let mut acc = [[[_mm512_setzero_ps(); 2]; TK]; RW];
        let mut c0 = 0;
        while c0 < chunks {
            // Each row's scale, held over the chunks that share it.
            let mut scales = [_mm512_setzero_ps(); RW];
            for (s, &row) in scales.iter_mut().zip(&rows) {
                *s = d.scale(row, c0);
            }
            let end = chunks.min(c0.saturating_add(d.span()));
            for c in c0..end {
                for ((a, &row), &scale) in acc.iter_mut().zip(&rows).zip(&scales) {
                    // The row's bytes a few lines ahead: eight rows read side by side are
                    // more streams than the hardware prefetcher follows closely.
                    _mm_prefetch::<_MM_HINT_T0>(d.at(row, c).wrapping_add(PREFETCH) as *const i8);
                    let (w0, w1) = d.chunk(row, c, scale);
                    for (aj, x) in a.iter_mut().zip(&xs) {
                        let x = x.add(32 * c);
                        // fmadd(w, x, acc), the operand order every dot kernel keeps.
                        aj[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), aj[0]);
                        aj[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(16)), aj[1]);
                    }
                }
            }
            c0 = end;
        }
        let mut out = [[0f32; TK]; RW];
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, &[p, q]) in o.iter_mut().zip(a) {
                let (z0, z1) = D::lanes(p, q);
                // dot's accumulators 0..3 are the halves of z0 and z1: (s0 + s1) + (s2 + s3).
                *o = crate::kernels::hsum4(
                    _mm512_castps512_ps256(z0),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z0))),
                    _mm512_castps512_ps256(z1),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(z1))),
                );
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::weights::checkpoint::{decode_f32, RawTensor};
    use crate::weights::scales::{ScaleType, Scales};

    /// xorshift32.
    pub(crate) fn next(s: &mut u32) -> u32 {
        *s ^= *s << 13;
        *s ^= *s >> 17;
        *s ^= *s << 5;
        *s
    }

    /// A matrix of `format` at `[rows, cols]` from pseudo-random bytes (no FP8 NaN codes) and
    /// varied scales stored as `ty`: its bytes, scales and the reference decoder's values.
    pub(crate) fn matrix(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        block: [usize; 2],
        ty: ScaleType,
        s: &mut u32,
    ) -> (Vec<u8>, Scales, Vec<f32>) {
        let stored = format.stored_shape(&[rows, cols]);
        let n_bytes = stored.iter().product::<usize>() * format.dtype().bitsize() / 8;
        let mut bytes: Vec<u8> = (0..n_bytes).map(|_| next(s) as u8).collect();
        match format {
            WeightFormat::Fp8 => bytes.iter_mut().for_each(|b| {
                if *b & 0x7f == 0x7f {
                    *b ^= 0x01
                }
            }),
            // Finite bf16 values of modest size: sign, exponent 112..=143, any mantissa.
            WeightFormat::Bf16 => bytes.chunks_exact_mut(2).for_each(|v| {
                v[1] = (v[1] & 0x80) | (0x38 + (v[1] & 0x07));
            }),
            _ => {}
        }
        let n_scales = format.scale_count(rows, cols, block);
        let wide: Vec<f32> = (0..n_scales)
            .map(|_| (1 + next(s) % 997) as f32 / 3.1e5)
            .collect();
        let scales = Scales::stored_as(&wide, ty);
        // The reference decoder takes the stored scales widened.
        let scales_f32 = scales.all_f32();
        let raw = RawTensor {
            name: "w",
            dtype: format.dtype(),
            shape: &stored,
            bytes: &bytes,
        };
        let scaled = (n_scales > 0).then_some(&scales_f32[..]);
        let values = decode_f32(&raw, scaled, Some(block)).unwrap();
        (bytes, scales, values)
    }

    /// Every format with its scales stored as F32, F16 or BF16, at shapes with ragged FP8 blocks
    /// and row counts that leave remainders, for 1..=9 and 13 input rows and a row range not
    /// starting at 0: each output is the bits of `kernels::dot` over the reference decoder's
    /// row.
    #[test]
    fn every_format_gives_dot_over_the_decoded_rows() {
        if !cpu_has_avx512() {
            eprintln!("skipped: this CPU has no AVX-512 (F, BW, VL)");
            return;
        }
        let mut s = 0x9e37_79b9_u32;
        for format in [
            WeightFormat::Fp8,
            WeightFormat::Int4,
            WeightFormat::Int8,
            WeightFormat::Bf16,
        ] {
            for ((rows, cols, block), ty) in [
                ((19, 96, [8, 32]), ScaleType::F32),
                ((37, 320, [16, 64]), ScaleType::F16),
                ((8, 32, [128, 128]), ScaleType::Bf16),
                ((21, 64, [4, 32]), ScaleType::F16),
                // 37 chunks a row, scales of every stored type.
                ((11, 1184, [8, 32]), ScaleType::F16),
                ((10, 1184, [8, 32]), ScaleType::Bf16),
                ((9, 1184, [8, 32]), ScaleType::F32),
            ] {
                let (bytes, scales, values) = matrix(format, rows, cols, block, ty, &mut s);
                let m = StoredMatrix {
                    format,
                    bytes: &bytes,
                    scales: scales.view(),
                    rows,
                    cols,
                    fp8_block: block,
                };
                assert!(m.fused(), "{} {rows}x{cols} {ty:?}", format.name());
                for t in (1..=9).chain([13]) {
                    let x: Vec<f32> = (0..t * cols)
                        .map(|_| (next(&mut s) % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let (r0, r1) = (1, rows);
                    let width = rows + 3;
                    let mut out = vec![f32::NAN; t * width];
                    m.linear(&x, r0..r1, &mut out, width, 2);
                    for j in 0..t {
                        for r in r0..r1 {
                            let want = crate::kernels::dot(
                                &values[r * cols..(r + 1) * cols],
                                &x[j * cols..(j + 1) * cols],
                            );
                            let got = out[j * width + 2 + r - r0];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{} {rows}x{cols} {ty:?}, {t} inputs, row {r} input {j}: {got} vs {want}",
                                format.name()
                            );
                        }
                        assert!(out[j * width].is_nan() && out[j * width + 1].is_nan());
                    }
                }
            }
        }
    }

    /// Shapes the kernels do not serve say so (the caller decodes rows instead).
    #[test]
    fn ragged_columns_and_split_chunks_are_not_fused() {
        let bytes = vec![0u8; 64 * 48];
        let scales = Scales::from_f32(&[1.0f32; 64]);
        let m = |format, cols, block| StoredMatrix {
            format,
            bytes: &bytes,
            scales: scales.view(),
            rows: 8,
            cols,
            fp8_block: block,
        };
        assert!(!m(WeightFormat::Int8, 48, [1, 1]).fused());
        assert!(!m(WeightFormat::Fp8, 64, [8, 48]).fused());
        assert!(!m(WeightFormat::F16, 64, [1, 1]).fused());
        assert!(has_fp8_nan(&[0x00, 0xff]) && !has_fp8_nan(&[0x7e, 0xfe]));
    }
}
