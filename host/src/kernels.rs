//! CPU f32 kernels of the forward pass: linear layers, dot products, norms, activations.
//!
//! Owns: the arithmetic, vectorised where it matters (AVX2+FMA chosen at run time, portable
//! fallback otherwise) and threaded over output rows for large layers.
//! Does not own: model structure or weights. Determinism: every function computes a given
//! output element with the same operations in the same order whatever the thread count, so
//! results never depend on scheduling.
//!
//! Why not candle tensors here: at these sizes a candle op costs ~30 us of fixed overhead
//! (see ARCHITECTURE.md), more than the arithmetic of a whole tiny-k2 decode layer.

use rayon::prelude::*;

/// Up to this many rows, every output element is one `dot` of a weight row and an input row,
/// exactly as a single-row matvec computes it: a row's result does not depend on which other
/// rows share the call (decode batches give the same bits as single-stream decode). Above, gemm.
pub const ROW_INVARIANT_MAX: usize = 64;
/// Multiply-adds below which a multi-row kernel is not worth spreading over threads.
const PAR_MIN_WORK: usize = 1 << 17;
/// The same for one row (a single-stream decode step's matvec): waking another thread costs
/// more than a tiny-k2 lm_head's 1M multiply-adds save (measured: decode 15% slower on 2
/// threads than on 1); a Kimi-K2 layer's matvecs (7168 wide) stay well above it.
const PAR_MIN_MATVEC: usize = 1 << 21;

/// An element of a weight matrix in compute form. Kernels widen it to f32 exactly (in
/// registers), so a matrix gives the same bits in either element type: bf16 only halves the
/// bytes a kernel streams from memory, which is what bounds a decode step.
pub trait Weight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// The slice itself when the weights are f32 already.
    fn as_f32(w: &[Self]) -> Option<&[f32]>;

    /// Eight consecutive weights from `p`, widened.
    ///
    /// # Safety
    /// `p..p + 8` must be readable and the CPU must support AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn as_f32(w: &[f32]) -> Option<&[f32]> {
        Some(w)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

/// A bf16 value's bits: widening is a 16-bit shift, exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Weight for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }

    fn as_f32(_: &[Bf16]) -> Option<&[f32]> {
        None
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let half = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16))
    }
}

/// A weight matrix in compute form, row-major `[rows, cols]` (the checkpoint's `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub enum Matrix {
    /// f32: dequantized FP8 or int weights, or an F32 checkpoint's.
    F32(Vec<f32>),
    /// A BF16 checkpoint's values as they are stored: every bf16 is exactly an f32, so this is
    /// the same matrix in half the bytes.
    Bf16(Vec<Bf16>),
}

impl Matrix {
    pub fn len(&self) -> usize {
        match self {
            Matrix::F32(w) => w.len(),
            Matrix::Bf16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the values occupy.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32(w) => w.len() * 4,
            Matrix::Bf16(w) => w.len() * 2,
        }
    }

    /// The values as f32 (borrowed when they are f32 already).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Matrix::F32(w) => std::borrow::Cow::Borrowed(w),
            Matrix::Bf16(w) => std::borrow::Cow::Owned(w.iter().map(|v| v.to_f32()).collect()),
        }
    }

    /// [`linear`] with this matrix as `w`.
    pub fn linear(&self, x: &[f32], k: usize, out: &mut [f32]) {
        match self {
            Matrix::F32(w) => linear(x, w, k, out),
            Matrix::Bf16(w) => linear(x, w, k, out),
        }
    }

    /// Appends `other`'s rows (same element type, or the result is f32).
    pub fn append(self, other: Matrix) -> Matrix {
        match (self, other) {
            (Matrix::F32(mut a), Matrix::F32(b)) => {
                a.extend(b);
                Matrix::F32(a)
            }
            (Matrix::Bf16(mut a), Matrix::Bf16(b)) => {
                a.extend(b);
                Matrix::Bf16(a)
            }
            (a, b) => {
                let mut v = a.to_f32().into_owned();
                v.extend_from_slice(&b.to_f32());
                Matrix::F32(v)
            }
        }
    }
}

/// Dot product of two equal-length slices, `a` any [`Weight`]. On AVX2: four 8-lane
/// accumulators over 32-element blocks (accumulator j takes the chunk at 8j of each block), the
/// remaining 8-element chunks into the first, [`hsum4`], then the last elements one by one
/// (the order the GPU's `rows_dot` kernel follows). It is [`dot_rows`] with one row, so every
/// multi-row kernel gives its bits.
#[inline]
pub fn dot<W: Weight>(a: &[W], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    dot_rows(a, [b])[0]
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let yes = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            STATE.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
            yes
        }
    }
}

fn dot_portable<W: Weight>(a: &[W], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i].to_f32() * b[c * 8 + i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in chunks * 8..a.len() {
        s += a[i].to_f32() * b[i];
    }
    s
}

/// The sum of four 8-lane accumulators, in the one fixed order every dot kernel uses (so
/// `dot` and `dot_rows` agree bit for bit).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum4(
    s0: std::arch::x86_64::__m256,
    s1: std::arch::x86_64::__m256,
    s2: std::arch::x86_64::__m256,
    s3: std::arch::x86_64::__m256,
) -> f32 {
    reduce1(combine4(s0, s1, s2, s3))
}

/// [`hsum4`]'s first step: the four accumulators added lane by lane, `(s0 + s1) + (s2 + s3)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn combine4(
    s0: std::arch::x86_64::__m256,
    s1: std::arch::x86_64::__m256,
    s2: std::arch::x86_64::__m256,
    s3: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3))
}

/// [`hsum4`]'s second step: the eight lanes of `s` summed as
/// `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce1(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(s, 1);
    let lo = _mm256_castps256_ps128(s);
    let q = _mm_add_ps(lo, hi);
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    _mm_cvtss_f32(q)
}

/// [`reduce1`] of eight vectors at once, each result the same bits (the same additions with the
/// same operands first, in lanes side by side): ~2.5 instructions per result instead of ~8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn reduce8(s: &[std::arch::x86_64::__m256; 8]) -> [f32; 8] {
    use std::arch::x86_64::*;
    // [a.lo + a.hi | b.lo + b.hi]: each vector's q_j = s_j + s_(j+4), two vectors per register.
    let q = |a, b| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    };
    // [x0 + x2, x1 + x3, y0 + y2, y1 + y3] in each half.
    let g = |x, y| {
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(x, y),
            _mm256_shuffle_ps::<0xEE>(x, y),
        )
    };
    let g0 = g(q(s[0], s[1]), q(s[2], s[3]));
    let g1 = g(q(s[4], s[5]), q(s[6], s[7]));
    // Halves [r0, r2, r4, r6 | r1, r3, r5, r7], then in order.
    let h = _mm256_hadd_ps(g0, g1);
    let r = _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), r);
    out
}

/// `[dot(w, xs[0]), .., dot(w, xs[R - 1])]`, bit for bit: each result takes exactly the
/// operations `dot` does, in the same order; the `R` chains share the loads of `w` and run
/// interleaved (more instruction-level parallelism, and `R` rows per weight load). Equal
/// lengths. `R <= 3` keeps the 4 x `R` accumulators and a weight vector in the 16 AVX2
/// registers.
/// `w` may be any [`Weight`]: widened exactly, it takes the same operations.
#[inline]
fn dot_rows<W: Weight, const R: usize>(w: &[W], xs: [&[f32]; R]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { dot_rows_avx2(w, xs) };
        }
    }
    xs.map(|x| dot_portable(w, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2<W: Weight, const R: usize>(w: &[W], xs: [&[f32]; R]) -> [f32; R] {
    let n = xs.iter().fold(w.len(), |n, x| n.min(x.len()));
    let pw = w.as_ptr();
    let px = xs.map(|x| x.as_ptr());
    let (acc, i) = accumulate(pw, n, px);
    let mut out = [0f32; R];
    for ((o, [s0, s1, s2, s3]), p) in out.iter_mut().zip(acc).zip(px) {
        let mut t = hsum4(s0, s1, s2, s3);
        for k in i..n {
            t += (*pw.add(k)).to_f32() * *p.add(k);
        }
        *o = t;
    }
    out
}

/// The vector part of every dot kernel: four 8-lane accumulators per row of `px` over
/// 32-element blocks of `pw[..n]`, then 8-element chunks into the first. Returns them and how
/// many elements they took (the rest, `n % 8`, is added one by one after the horizontal sum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn accumulate<W: Weight, const R: usize>(
    pw: *const W,
    n: usize,
    px: [*const f32; R],
) -> ([[std::arch::x86_64::__m256; 4]; R], usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let mut i = 0;
    // fmadd(w, x, acc), the operand order every dot kernel keeps.
    while i + 32 <= n {
        for j in 0..4 {
            let at = i + 8 * j;
            let wj = W::load8(pw.add(at));
            for (a, p) in acc.iter_mut().zip(&px) {
                a[j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(p.add(at)), a[j]);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        let w0 = W::load8(pw.add(i));
        for (a, p) in acc.iter_mut().zip(&px) {
            a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p.add(i)), a[0]);
        }
        i += 8;
    }
    (acc, i)
}

/// `out[j][r] = dot(w[r * k..(r + 1) * k], xs[j])` for eight consecutive weight rows of `w`,
/// bit for bit: each row's accumulators are [`combine4`]d as [`hsum4`] does, and the eight
/// horizontal sums are done together by [`reduce8`]. `k % 8 == 0` (no element-wise tail),
/// `w.len() >= 8 * k`, every `xs[j].len() >= k`; the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot8_rows_avx2<W: Weight, const R: usize>(
    w: &[W],
    k: usize,
    xs: [&[f32]; R],
) -> [[f32; 8]; R] {
    use std::arch::x86_64::*;
    debug_assert!(k.is_multiple_of(8) && w.len() >= 8 * k && xs.iter().all(|x| x.len() >= k));
    let px = xs.map(|x| x.as_ptr());
    let mut sums = [[_mm256_setzero_ps(); 8]; R];
    for r in 0..8 {
        let (acc, _) = accumulate(w.as_ptr().add(r * k), k, px);
        for (s, [s0, s1, s2, s3]) in sums.iter_mut().zip(acc) {
            s[r] = combine4(s0, s1, s2, s3);
        }
    }
    sums.map(|s| reduce8(&s))
}

/// Whether [`dot8_rows_avx2`] serves rows of length `k` here.
#[inline]
fn dot8_applies(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        k.is_multiple_of(8) && has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        false
    }
}

/// `out[r] = dot(w[r, :], x)` for the rows of `w [out.len(), k]`: eight rows at a time when
/// [`dot8_applies`], the same bits either way. Also `dot(x, w[r, :])` bit for bit (a product
/// inside a fused multiply-add is exact, so the operands' order does not matter): attention's
/// scores of one query against every cached position.
pub fn dots_one_input<W: Weight>(w: &[W], k: usize, x: &[f32], out: &mut [f32]) {
    #[allow(unused_mut)]
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if dot8_applies(k) {
        for (c, o) in out.chunks_exact_mut(8).enumerate() {
            // SAFETY: AVX2/FMA checked; rows 8c..8c + 8 exist; k % 8 == 0.
            let [r] = unsafe { dot8_rows_avx2(&w[8 * c * k..(8 * c + 8) * k], k, [x]) };
            o.copy_from_slice(&r);
        }
        done = out.len() - out.len() % 8;
    }
    for (r, o) in out.iter_mut().enumerate().skip(done) {
        *o = dot(&w[r * k..(r + 1) * k], x);
    }
}

/// `y += a * x`.
#[inline]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// A linear layer without bias, as `torch.nn.functional.linear`: `out[t, :] = w @ x[t, :]`.
/// `x` is `[t, k]`, `w` is `[n, k]` (the checkpoint's `[out, in]` layout), `out` is `[t, n]`.
/// `w` in bf16 ([`Bf16`]) gives the bits of its f32 widening.
pub fn linear<W: Weight>(x: &[f32], w: &[W], k: usize, out: &mut [f32]) {
    let n = w.len() / k;
    let t = x.len() / k;
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(out.len(), t * n);
    if t == 0 || n == 0 {
        return;
    }
    if t == 1 {
        matvec(w, k, x, out);
    } else if t <= ROW_INVARIANT_MAX {
        rows_dot(x, t, w, n, k, out);
    } else if let Some(w) = W::as_f32(w) {
        gemm_xwt(x, t, w, n, k, out.as_mut_ptr(), n);
    } else {
        // Long prefills only: gemm wants f32, so rows are widened a block at a time.
        gemm_decoded(x, k, n, out, n, 0, 1, |rows, buf| {
            for (b, v) in buf.iter_mut().zip(&w[rows.start * k..rows.end * k]) {
                *b = v.to_f32();
            }
            Ok(())
        })
        .expect("widening cannot fail");
    }
}

/// Weight rows decoded at a time for a long prefill's GEMM (at least this many, so no block
/// falls to gemm's small-matrix kernels).
const GEMM_BLOCK_ROWS: usize = 256;

/// `out[:, col..col + n] = x @ w^T` (`out` being `[t, width]`) for `t > ROW_INVARIANT_MAX`,
/// `w`'s `n` rows of `k` decoded to f32 a block at a time by `decode(rows, buf)` (each block
/// starting on a multiple of `align` rows), so a long prefill never holds a widened matrix.
///
/// The bits of one GEMM over the whole decoded matrix: gemm blocks `k` by `k` alone and each
/// output is one chain of FMAs over it, whichever columns it shares a call with; every block
/// spans `GEMM_BLOCK_ROWS` rows or more (or all `n`), above gemm's small-matrix kernels.
#[allow(clippy::too_many_arguments)]
pub fn gemm_decoded(
    x: &[f32],
    k: usize,
    n: usize,
    out: &mut [f32],
    width: usize,
    col: usize,
    align: usize,
    mut decode: impl FnMut(std::ops::Range<usize>, &mut [f32]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let t = x.len() / k;
    assert!(t > ROW_INVARIANT_MAX && col + n <= width && out.len() >= t * width);
    let step = GEMM_BLOCK_ROWS.div_ceil(align.max(1)) * align.max(1);
    let mut buf = vec![0f32; (2 * step).min(n) * k];
    let mut r0 = 0;
    while r0 < n {
        // A short tail joins the block before it.
        let r1 = if n - r0 < 2 * step { n } else { r0 + step };
        let w = &mut buf[..(r1 - r0) * k];
        decode(r0..r1, w)?;
        // SAFETY: `out` holds t rows of `width`; columns col + r0..col + r1 lie inside them.
        gemm_xwt(
            x,
            t,
            w,
            r1 - r0,
            k,
            unsafe { out.as_mut_ptr().add(col + r0) },
            width,
        );
        r0 = r1;
    }
    Ok(())
}

/// `out[i, r] = dot(w[r, :], x[i, :])` for a few rows: each weight row is loaded once and
/// dotted with every input row while it is in cache. Threaded over weight rows when large.
fn rows_dot<W: Weight>(x: &[f32], t: usize, w: &[W], n: usize, k: usize, out: &mut [f32]) {
    const ROWS: usize = 32;
    let row = |i: usize| &x[i * k..(i + 1) * k];
    // Weight row r against every input row into `col` ([t]): three rows per weight load, then
    // a pair or a single row.
    let one_row = |r: usize, col: &mut [f32]| {
        let wr = &w[r * k..(r + 1) * k];
        let mut triples = col.chunks_exact_mut(3);
        for (p, o) in (&mut triples).enumerate() {
            let i = 3 * p;
            o.copy_from_slice(&dot_rows(wr, [row(i), row(i + 1), row(i + 2)]));
        }
        let done = t - t % 3;
        match triples.into_remainder() {
            [a, b] => [*a, *b] = dot_rows(wr, [row(done), row(done + 1)]),
            [a] => *a = dot(wr, row(done)),
            _ => {}
        }
    };
    // Weight rows r0.. into `cols` ([rows, t]): eight at a time (their horizontal sums done
    // together, see `reduce8`) when `dot8_applies`, the same bits either way.
    let block = |r0: usize, cols: &mut [f32]| {
        let rows = cols.len() / t;
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if dot8_applies(k) {
            while done + 8 <= rows {
                let w8 = &w[(r0 + done) * k..(r0 + done + 8) * k];
                let c8 = &mut cols[done * t..(done + 8) * t];
                let mut put = |i: usize, res: &[[f32; 8]]| {
                    for (j, r) in res.iter().enumerate() {
                        for (q, &v) in r.iter().enumerate() {
                            c8[q * t + i + j] = v;
                        }
                    }
                };
                let mut i = 0;
                // SAFETY (each call): AVX2/FMA checked, eight rows of k % 8 == 0 elements.
                while i + 3 <= t {
                    let r = unsafe { dot8_rows_avx2(w8, k, [row(i), row(i + 1), row(i + 2)]) };
                    put(i, &r);
                    i += 3;
                }
                match t - i {
                    2 => put(i, &unsafe { dot8_rows_avx2(w8, k, [row(i), row(i + 1)]) }),
                    1 => put(i, &unsafe { dot8_rows_avx2(w8, k, [row(i)]) }),
                    _ => {}
                }
                done += 8;
            }
        }
        for (j, col) in cols.chunks_exact_mut(t).enumerate().skip(done) {
            one_row(r0 + j, col);
        }
    };
    if n * k * t >= PAR_MIN_WORK && spread() {
        // Transposed result [n, t]: each thread owns a contiguous block of weight rows.
        let mut tr = vec![0f32; n * t];
        tr.par_chunks_mut(ROWS * t)
            .enumerate()
            .for_each(|(c, o)| block(c * ROWS, o));
        for (r, col) in tr.chunks_exact(t).enumerate() {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + r] = v;
            }
        }
    } else {
        // Serial (e.g. inside the MoE's parallel experts): eight weight rows at a time through
        // a stack buffer, nothing to allocate.
        let mut buf = [0f32; 8 * ROW_INVARIANT_MAX];
        for r0 in (0..n).step_by(8) {
            let cols = &mut buf[..(n - r0).min(8) * t];
            block(r0, cols);
            for (j, col) in cols.chunks_exact(t).enumerate() {
                for (i, &v) in col.iter().enumerate() {
                    out[i * n + r0 + j] = v;
                }
            }
        }
    }
}

thread_local! {
    /// Set while this thread runs one of many parallel tasks (see [`as_task`]).
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as one of many parallel tasks (an expert of a MoE layer step, one sequence's
/// attention): the kernels it calls stay on this thread, since splitting a task's few rows
/// again only adds scheduling overhead. Results are the same either way.
pub fn as_task<R>(f: impl FnOnce() -> R) -> R {
    let outer = IN_TASK.with(|c| c.replace(true));
    let r = f();
    IN_TASK.with(|c| c.set(outer));
    r
}

/// Whether to split a kernel over threads: not when there is one, nor inside a task that is
/// already one of many (see [`as_task`]). Either way the results are the same.
fn spread() -> bool {
    rayon::current_num_threads() > 1 && !IN_TASK.with(|c| c.get())
}

/// `out[i] = dot(w[i, :], x)`, threaded over rows when the layer is large.
pub fn matvec<W: Weight>(w: &[W], k: usize, x: &[f32], out: &mut [f32]) {
    let n = out.len();
    if n * k >= PAR_MIN_MATVEC && spread() {
        const ROWS: usize = 64;
        out.par_chunks_mut(ROWS).enumerate().for_each(|(c, o)| {
            let rows = &w[c * ROWS * k..(c * ROWS + o.len()) * k];
            dots_one_input(rows, k, x, o);
        });
    } else {
        dots_one_input(&w[..n * k], k, x, out);
    }
}

/// `out[t, g, :] = w[g] @ x[t, g, ..k]` for `groups` matrices `w [groups, n, k]` and inputs
/// `x [tokens, groups, x_stride]`: MLA's per-head W_UK^T and W_UV, each row a `dot`, in any
/// number of tokens (so the GPU's `rows_dot` kernel gives the same bits).
pub fn grouped_rows(
    w: &[f32],
    groups: usize,
    k: usize,
    x: &[f32],
    x_stride: usize,
    out: &mut [f32],
) {
    let n = w.len() / (groups * k);
    debug_assert_eq!(w.len(), groups * n * k);
    debug_assert_eq!(x.len() / (groups * x_stride), out.len() / (groups * n));
    let one = |(idx, o): (usize, &mut [f32])| {
        let g = idx % groups;
        let xg = &x[idx * x_stride..idx * x_stride + k];
        let wg = &w[g * n * k..(g + 1) * n * k];
        for (r, or) in o.iter_mut().enumerate() {
            *or = dot(&wg[r * k..(r + 1) * k], xg);
        }
    };
    if out.len() * k >= PAR_MIN_WORK && spread() {
        out.par_chunks_mut(n).enumerate().for_each(one);
    } else {
        out.chunks_mut(n).enumerate().for_each(one);
    }
}

/// `out = x @ w^T` through the gemm crate (the engine under candle's CPU matmul), `out`
/// pointing at `[t, n]` values whose rows are `out_stride` apart.
fn gemm_xwt(x: &[f32], t: usize, w: &[f32], n: usize, k: usize, out: *mut f32, out_stride: usize) {
    let par = if t * n * k >= PAR_MIN_WORK * 4 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    debug_assert!(x.len() >= t * k && w.len() >= n * k && out_stride >= n);
    // SAFETY: x and w cover t*k and n*k elements; the callers' `out` covers t rows of
    // `out_stride` from which the n columns are written; strides describe row-major x,
    // transposed row-major w and row-major out.
    unsafe {
        gemm::gemm(
            t,
            n,
            k,
            out,
            1,
            out_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out` (DeepseekV3RMSNorm:
/// `w * x / sqrt(mean(x^2) + eps)`, in f32).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &xi), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = wi * (xi * inv);
        }
    }
}

/// RMSNorm in place.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for (xi, &wi) in xr.iter_mut().zip(w) {
            *xi = wi * (*xi * inv);
        }
    }
}

/// SwiGLU on fused rows `[gate (i) | up (i)]`: `act[r, j] = silu(gate[r, j]) * up[r, j]`, with
/// [`exp_portable`] (the GPU runs it too, between an expert's projections).
pub fn swiglu(gate_up: &[f32], i: usize, act: &mut [f32]) {
    for (gu, a) in gate_up.chunks_exact(2 * i).zip(act.chunks_exact_mut(i)) {
        let (g, u) = gu.split_at(i);
        for ((aj, &gj), &uj) in a.iter_mut().zip(g).zip(u) {
            *aj = gj / (1.0 + exp_portable(-gj)) * uj;
        }
    }
}

/// `e^x` from rounded f32 multiplies and adds only (cephes' `expf`: Cody-Waite reduction by
/// ln 2, a degree-5 polynomial, then a power of two), so the GPU's kernels
/// (`gpu/exp_portable.cuh`: the same constants by their bits, the same operations in the same
/// order) get the same bits; the platform's `exp` (libm here, `expf` there) differs between
/// the two. Within 2 ulp of `e^x`. Branch-free, so loops over it vectorise.
#[inline]
pub fn exp_portable(x: f32) -> f32 {
    const LOG2_E: u32 = 0x3fb8_aa3b;
    // ln 2 in two parts; the first has few enough bits that n * LN2_HI is exact.
    const LN2_HI: u32 = 0x3f31_8000;
    const LN2_LO: u32 = 0xb95e_8083;
    const P: [u32; 6] = [
        0x3950_6968,
        0x3ab7_43ce,
        0x3c08_8908,
        0x3d2a_a9c1,
        0x3e2a_aaaa,
        0x3f00_0000,
    ];
    const MAX: u32 = 0x42b1_7218;
    const MIN: u32 = 0xc2cf_f1b4;
    // 1.5 * 2^23: adding and subtracting it rounds to an integer, ties to even.
    const ROUND: f32 = 12_582_912.0;
    let c = f32::from_bits;
    let xc = x.clamp(c(MIN), c(MAX));
    let n = (xc * c(LOG2_E) + ROUND) - ROUND;
    let r = (xc - n * c(LN2_HI)) - n * c(LN2_LO);
    let z = r * r;
    let p = P[1..].iter().fold(c(P[0]), |p, &k| p * r + c(k));
    let y = (p * z + r) + 1.0;
    // 2^n in two halves, each a normal f32 for n in [-150, 128]: exact where the result is
    // normal, one rounding where it is subnormal.
    let n = n as i32;
    let half = n / 2;
    let pow2 = |e: i32| c(((e + 127) as u32) << 23);
    let e = y * pow2(half) * pow2(n - half);
    if x > c(MAX) {
        f32::INFINITY
    } else if x < c(MIN) {
        0.0
    } else if x.is_nan() {
        x
    } else {
        e
    }
}

/// Numerically stable softmax in place, with [`exp_portable`] (attention's softmax, which the
/// GPU computes too) and the sum in index order.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = exp_portable(*v - max);
    }
    let mut sum = 0.0;
    for v in x.iter() {
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Logistic sigmoid.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
        let n = w.len() / k;
        x.chunks(k)
            .flat_map(|xr| {
                (0..n).map(move |j| {
                    xr.iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>() as f32
                })
            })
            .collect()
    }

    #[test]
    fn linear_matches_naive_on_both_paths() {
        let k = 67;
        let n = 45;
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        for t in [1, 3, 9, 40, 70] {
            let x: Vec<f32> = (0..t * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let mut out = vec![0f32; t * n];
            linear(&x, &w, k, &mut out);
            for (a, b) in out.iter().zip(naive(&x, &w, k)) {
                assert!((a - b).abs() < 1e-4, "t={t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn batched_rows_equal_single_rows_bit_for_bit() {
        let (k, n) = (96, 130);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 37.0)
            .collect();
        let x: Vec<f32> = (0..20 * k)
            .map(|i| ((i * 17 % 53) as f32 - 26.0) / 11.0)
            .collect();
        let mut batched = vec![0f32; 20 * n];
        linear(&x, &w, k, &mut batched);
        for (i, xr) in x.chunks_exact(k).enumerate() {
            let mut single = vec![0f32; n];
            linear(xr, &w, k, &mut single);
            assert_eq!(single, batched[i * n..(i + 1) * n]);
        }
    }

    #[test]
    fn dot_paths_agree() {
        let a: Vec<f32> = (0..100).map(|i| i as f32 * 0.25).collect();
        let b: Vec<f32> = (0..100).map(|i| 1.0 - i as f32 * 0.01).collect();
        assert!((dot(&a, &b) - dot_portable(&a, &b)).abs() < 1e-3);
    }

    #[test]
    fn portable_exp_is_within_two_ulp_of_exp() {
        let ulp = |v: f32| f32::from_bits(v.to_bits() + 1) - v;
        let mut worst = 0f64;
        let mut bits = xorshift(0x2545_f491_4f6c_dd1d);
        let sweep = (-2000..=2000).map(|i| i as f32 * 0.05);
        let random =
            (0..200_000).map(|_| ((bits() >> 40) as f32 / (1u64 << 24) as f32 - 0.8) * 110.0);
        for x in sweep.chain(random).filter(|x| (-87.0..88.0).contains(x)) {
            let want = (x as f64).exp();
            let got = exp_portable(x) as f64;
            worst = worst.max((got - want).abs() / ulp(want as f32) as f64);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_portable(0.0), 1.0);
        assert_eq!(exp_portable(-200.0), 0.0);
        assert_eq!(exp_portable(100.0), f32::INFINITY);
        assert!(exp_portable(f32::NAN).is_nan());
        // Subnormal results and the top of the range stay close too.
        for x in [-100.0f32, -95.5, -88.0, 88.5, 88.72] {
            let (got, want) = (exp_portable(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= want * 1e-6 + 1e-44,
                "{x}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = vec![1000.0, 1001.0, 999.0];
        softmax_inplace(&mut v);
        assert!((v.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(v[1] > v[0] && v[0] > v[2]);
    }

    /// A deterministic xorshift64 stream.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn eight_row_kernels_give_each_rows_dot_bit_for_bit() {
        // Magnitudes from 1e-3 to 1e3 and both signs: a different summation order would show.
        let mut bits = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut next = || {
            let x = bits();
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 10f32.powi((x % 7) as i32 - 3)
        };
        for k in [8, 16, 24, 32, 40, 64, 96, 256, 264] {
            for n in [1, 7, 8, 9, 16, 17, 64, 100] {
                let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
                let wb: Vec<Bf16> = w.iter().map(|v| Bf16((v.to_bits() >> 16) as u16)).collect();
                for t in 1..=5 {
                    let xs: Vec<f32> = (0..t * k).map(|_| next()).collect();
                    let mut got = vec![0f32; t * n];
                    let mut got_b = vec![0f32; t * n];
                    linear(&xs, &w, k, &mut got);
                    linear(&xs, &wb, k, &mut got_b);
                    for i in 0..t {
                        let xi = &xs[i * k..(i + 1) * k];
                        for r in 0..n {
                            let want = dot(&w[r * k..(r + 1) * k], xi);
                            let want_b = dot(&wb[r * k..(r + 1) * k], xi);
                            let at = i * n + r;
                            assert_eq!(got[at].to_bits(), want.to_bits(), "k {k} n {n} t {t}");
                            // The operands swapped (attention's scores): the same bits.
                            let swapped = dot(xi, &w[r * k..(r + 1) * k]);
                            assert_eq!(got[at].to_bits(), swapped.to_bits(), "k {k} n {n}");
                            assert_eq!(got_b[at].to_bits(), want_b.to_bits(), "bf16 k {k} n {n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_rows_are_single_dots_bit_for_bit() {
        let mut bits = xorshift(0x2545f4914f6cdd1d);
        let mut next = || (bits() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 64, 100, 256, 257, 1000] {
            let w: Vec<f32> = (0..n).map(|_| next()).collect();
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next() * 1e3).collect();
            let c: Vec<f32> = (0..n).map(|_| -next()).collect();
            let [da, db] = dot_rows(&w, [&a[..], &b[..]]);
            assert_eq!(da.to_bits(), dot(&w, &a).to_bits(), "n {n}");
            assert_eq!(db.to_bits(), dot(&w, &b).to_bits(), "n {n}");
            assert_eq!(dot_rows(&w, [&a[..]])[0].to_bits(), dot(&w, &a).to_bits());
            let three = dot_rows(&w, [&a[..], &b[..], &c[..]]);
            for (d, x) in three.iter().zip([&a, &b, &c]) {
                assert_eq!(d.to_bits(), dot(&w, x).to_bits(), "n {n}");
            }
        }
    }

    #[test]
    fn bf16_weights_give_the_bits_of_their_f32_widening() {
        // Values that are exactly bf16 (the low 16 bits zero), as a BF16 checkpoint's are.
        let (k, n) = (300, 37);
        let bits: Vec<u16> = (0..n * k)
            .map(|i| {
                let sign = if i % 3 == 0 { 0x8000 } else { 0 };
                (0x3c00 + ((i * 7919) % 0x0800) as u16) | sign
            })
            .collect();
        let bf: Vec<Bf16> = bits.iter().map(|&b| Bf16(b)).collect();
        let wide: Vec<f32> = bf.iter().map(|b| b.to_f32()).collect();
        for t in [1, 2, 3, 4, 7, 64, 65] {
            let x: Vec<f32> = (0..t * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 333.0 - 1.5)
                .collect();
            let mut a = vec![0f32; t * n];
            let mut b = vec![0f32; t * n];
            linear(&x, &wide, k, &mut a);
            Matrix::Bf16(bf.clone()).linear(&x, k, &mut b);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "t {t}");
        }
        // The portable path widens the same way.
        let x: Vec<f32> = (0..k).map(|i| i as f32 * 0.01 - 1.0).collect();
        let one = dot_portable(&bf[..k], &x);
        assert_eq!(one.to_bits(), dot_portable(&wide[..k], &x).to_bits());
        assert_eq!(
            Matrix::Bf16(bf.clone()).bytes() * 2,
            Matrix::F32(wide).bytes()
        );
    }

    #[test]
    fn rows_dot_rows_equal_single_row_matvec() {
        let (k, n) = (300, 37);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1013) as f32 / 517.0 - 1.0)
            .collect();
        for t in [2, 3, 4, 5, 7, 8, 32, 64] {
            let x: Vec<f32> = (0..t * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 333.0 - 1.5)
                .collect();
            let mut out = vec![0f32; t * n];
            linear(&x, &w, k, &mut out);
            for r in 0..t {
                let mut one = vec![0f32; n];
                linear(&x[r * k..(r + 1) * k], &w, k, &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out[r * n..(r + 1) * n]), bits(&one), "t {t} row {r}");
            }
        }
    }

    /// A long prefill's GEMM over weights decoded a block of rows at a time, written into a
    /// column range of a wider output, has the bits of one GEMM over the whole decoded
    /// matrix: at widths with and without a short tail, FP8-style aligned blocks, one and two
    /// threads.
    #[test]
    fn blocked_gemm_has_the_bits_of_the_whole_one() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (t, n, k, align) in [
            (65, 300, 96, 1),
            (100, 700, 160, 128),
            (130, 1031, 64, 1),
            (70, 515, 2048, 128),
        ] {
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1013) as f32 / 517.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..t * k)
                .map(|i| ((i * 104_729) % 997) as f32 / 333.0 - 1.5)
                .collect();
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut whole = vec![0f32; t * n];
                pool.install(|| gemm_xwt(&x, t, &w, n, k, whole.as_mut_ptr(), n));
                let (width, col) = (n + 5, 3);
                let mut blocked = vec![f32::NAN; t * width];
                let mut blocks = 0;
                pool.install(|| {
                    gemm_decoded(&x, k, n, &mut blocked, width, col, align, |rows, buf| {
                        assert!(rows.start % align == 0 && rows.len() >= n.min(GEMM_BLOCK_ROWS));
                        buf.copy_from_slice(&w[rows.start * k..rows.end * k]);
                        blocks += 1;
                        Ok(())
                    })
                })
                .unwrap();
                let want = if n >= 2 * GEMM_BLOCK_ROWS { 2 } else { 1 };
                assert!(blocks >= want, "{blocks} blocks");
                for r in 0..t {
                    let row = &blocked[r * width..(r + 1) * width];
                    assert_eq!(
                        bits(&row[col..col + n]),
                        bits(&whole[r * n..(r + 1) * n]),
                        "t {t} n {n} k {k} threads {threads} row {r}"
                    );
                    assert!(row[..col].iter().chain(&row[col + n..]).all(|v| v.is_nan()));
                }
            }
        }
    }
}
