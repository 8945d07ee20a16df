// moehost's GPU linear kernels: out[t][g][r] = dot(w[g][r, :], x[t][g][:k]) for `groups`
// row-major weight matrices w [groups, n, k] and inputs x [tokens, groups, x_stride] (a plain
// linear layer is one group with x_stride = k; MLA's per-head W_UK and W_UV are one group per
// head; an expert's gate_up is two stored tensors, rows [0, split) from `a` and the rest from
// `b`).
//
// Exactness. Each dot product is summed in exactly the order of the CPU's `kernels::dot` (AVX2
// path): four 8-lane accumulators over 32-element chunks (accumulator lane m = 8j + l takes
// elements m, m + 32, m + 64, ...), fused multiply-adds, then 8-element steps into the first
// accumulator, the fixed horizontal sum of `hsum4`, then the scalar tail as separate multiply
// and add. A warp computes one row: its lane m *is* accumulator lane m, so the 32 partial sums
// are the CPU's and the loads are coalesced (whole 32-bit words, redistributed by shuffles).
// The weights stay in their storage format (f32, bf16, FP8 e4m3 with 128x128 block scales,
// moehost's int8/int4 with a scale per 32 columns) and each is decoded in a register exactly
// as the CPU decodes it (one rounded f32 multiply by its scale; e4m3 values built from their
// bits, as the CPU's table holds them), so a routed expert gives the same bits on the GPU as
// on the CPU whatever its format, and placement (GPU or CPU) never changes a token.
//
// Regenerate the checked-in PTX (any nvcc >= 12; compute_80 PTX is JIT-compiled by the driver
// for Hopper) with ptx.sh: nvcc -ptx -arch=compute_80, then the source digest build.rs checks.
// No GPU is needed: PyPI's nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt and
// nvidia-cuda-runtime 13.0 wheels, unpacked into one tree, give nvcc 13.0.88, which reproduces
// the checked-in PTX byte for byte.

#include "exp_portable.cuh"

#define FULL 0xffffffffu
// Rows per block (a warp each). Tokens per warp (TT, a template parameter: 1 for decode
// steps, 8 otherwise): each weight is loaded once for up to that many inputs.
#define WARPS 8

// Format codes, the order of `gpu::KERNEL_FORMATS` in Rust.
#define F32 0
#define BF16 1
#define FP8 2
#define INT8 3
#define INT4 4

// An e4m3 code's value, built from its bits (exactly the CPU's table entry: the values are
// all representable in f32); NaN codes read the CPU's table itself.
__device__ __forceinline__ float e4m3(unsigned int q, const float* __restrict__ table) {
    unsigned int em = q & 0x7fu, sign = (q & 0x80u) << 24;
    if (em == 0x7fu) return table[q];
    // Normal: exponent e - 7 + 127 over the 3 mantissa bits; subnormal: m * 2^-9.
    if (em >= 8u) return __uint_as_float(sign | ((em + (120u << 3)) << 20));
    return __uint_as_float(sign | __float_as_uint(__uint2float_rn(em) * 0.001953125f));
}

template <int F>
__device__ __forceinline__ float weight(const unsigned char* __restrict__ d,
                                        const float* __restrict__ s,
                                        const float* __restrict__ table, size_t row, int c,
                                        int k, int br, int bc, int scale_cols) {
    if (F == F32) return ((const float*)d)[row * k + c];
    if (F == BF16)
        return __uint_as_float(((unsigned int)((const unsigned short*)d)[row * k + c]) << 16);
    if (F == FP8)
        return __fmul_rn(e4m3(d[row * k + c], table), s[(row / br) * scale_cols + c / bc]);
    if (F == INT8)
        return __fmul_rn((float)(signed char)d[row * k + c], s[row * scale_cols + c / 32]);
    // INT4: two per byte, low nibble first, stored with an offset of 8.
    unsigned char b = d[row * (size_t)((k + 1) / 2) + c / 2];
    int nib = (c & 1) ? (b >> 4) : (b & 15);
    return __fmul_rn((float)(nib - 8), s[row * scale_cols + c / 32]);
}

// Elements of format F in one 32-bit word, and bytes per stored row of k.
template <int F> __device__ constexpr int per_word() {
    return F == F32 ? 1 : F == BF16 ? 2 : F == INT4 ? 8 : 4;
}
template <int F> __device__ __forceinline__ size_t row_bytes(int k) {
    return F == F32 ? 4 * (size_t)k : F == BF16 ? 2 * (size_t)k : F == INT4 ? (k + 1) / 2 : k;
}

// Element `sub` of a little-endian 32-bit word of format F, with its scale: the same value
// `weight` gives.
template <int F>
__device__ __forceinline__ float unpack(unsigned int w, int sub, float scale,
                                        const float* __restrict__ table) {
    if (F == F32) return __uint_as_float(w);
    if (F == BF16) return __uint_as_float(((w >> (16 * sub)) & 0xffffu) << 16);
    if (F == FP8) return __fmul_rn(e4m3((w >> (8 * sub)) & 0xffu, table), scale);
    if (F == INT8) return __fmul_rn((float)(signed char)((w >> (8 * sub)) & 0xffu), scale);
    return __fmul_rn((float)((int)((w >> (4 * sub)) & 15u) - 8), scale);
}

// One 32 * E-element stretch of a row: lane m brought word m; shuffles hand accumulator lane
// a its element of each 32-element chunk in turn. `xp` is the stretch's first input of token 0,
// `xstride` the distance between tokens.
template <int F, int TT>
__device__ __forceinline__ void stretch(float (&acc)[TT], unsigned int word, int c0, int nt,
                                        const float* xp, size_t xstride,
                                        const float* __restrict__ row_scales, int bc_log2,
                                        const float* __restrict__ table, int lane) {
    const int E = per_word<F>();
    // FP8 blocks are at least a stretch wide (bc_log2 >= 7 on the vector path): one scale.
    float fp8_scale = F == FP8 ? row_scales[c0 >> bc_log2] : 0.0f;
#pragma unroll
    for (int q = 0; q < E; ++q) {
        int c = c0 + q * 32;  // this chunk's first element, the same in every lane
        float scale = fp8_scale;
        if (F == INT8 || F == INT4) scale = row_scales[c >> 5];
        unsigned int mine = E == 1 ? word : __shfl_sync(FULL, word, q * (32 / E) + lane / E);
        float w = unpack<F>(mine, lane % E, scale, table);
#pragma unroll
        for (int j = 0; j < TT; ++j)
            if (j < nt) acc[j] = __fmaf_rn(w, xp[j * xstride + q * 32 + lane], acc[j]);
    }
}

// One job of a grouped launch (`gpu::Job`): blockIdx.z picks it. Every job has the launch's
// shape and format (a MoE layer step's experts), its own weights, inputs, outputs and tokens.
struct Job {
    const unsigned char* a;
    const float* as;
    const unsigned char* b;
    const float* bs;
    const float* x;
    float* out;
    int tokens;
    int pad;
};

// `stretch` for one token with its inputs and scales already in registers (`xv`, `sv`: one
// per 32-element chunk), so a warp can have several stretches' loads in flight.
template <int F>
__device__ __forceinline__ float stretch1(float acc, unsigned int word, const float (&xv)[8],
                                          const float (&sv)[8], const float* __restrict__ table,
                                          int lane) {
    const int E = per_word<F>();
#pragma unroll
    for (int q = 0; q < E; ++q) {
        unsigned int mine = E == 1 ? word : __shfl_sync(FULL, word, q * (32 / E) + lane / E);
        acc = __fmaf_rn(unpack<F>(mine, lane % E, sv[q], table), xv[q], acc);
    }
    return acc;
}

// Inputs per shared-memory tile of the multi-token kernels (a multiple of every 32 * E).
#define XTILE 512

template <int F, int TT>
__device__ void rows_dot(const unsigned char* __restrict__ a, const float* __restrict__ as,
                         const unsigned char* __restrict__ b, const float* __restrict__ bs,
                         int split, int br, int bc, int bc_log2, int scale_cols,
                         const float* __restrict__ e4m3_table, const float* __restrict__ x,
                         float* __restrict__ out, int n, int k, int tokens, int groups,
                         int x_stride, const Job* __restrict__ jobs) {
    int g = blockIdx.z;
    if (jobs) {
        const Job& job = jobs[g];
        a = job.a;
        as = job.as;
        b = job.b;
        bs = job.bs;
        x = job.x;
        out = job.out;
        tokens = job.tokens;
        groups = 1;
        g = 0;
    }
    // Blocks past this job's tokens leave whole, before any barrier.
    if (blockIdx.y * TT >= tokens) return;
    const float* table = e4m3_table;
    int lane = threadIdx.x & 31;
    int r = blockIdx.x * WARPS + threadIdx.x / 32;
    int t0 = blockIdx.y * TT;
    // A warp past the last row still joins the block's barriers, then leaves whole, so the
    // shuffles always see all 32 lanes.
    bool active = r < n;
    const unsigned char* d = a;
    const float* s = as;
    size_t row = (size_t)g * n + (active ? r : 0);
    if (active && r >= split) {
        d = b;
        s = bs;
        row = r - split;
    }
    int nt = min(TT, tokens - t0);
    size_t xt = (size_t)groups * x_stride;
    const float* xs = x + ((size_t)t0 * groups + g) * x_stride;
    float acc[TT];
#pragma unroll
    for (int j = 0; j < TT; ++j) acc[j] = 0.0f;
    int k32 = k & ~31;
    // Whole words per lane where rows are word-aligned (and, for FP8, scale blocks are a
    // power of two wide, >= a 128-element stretch): lane m loads word m of each stretch,
    // and shuffles hand accumulator lane a its element of each 32-element chunk in turn, so
    // the sums keep the order above with a quarter (FP8) of the load instructions.
    const int E = per_word<F>();
    size_t rb = row_bytes<F>(k);
    int vec = (rb % 4 == 0 && (F != FP8 || bc_log2 >= 7)) ? k / (32 * E) : 0;
    const unsigned int* words = (const unsigned int*)(d + row * rb);
    const float* row_scales = s + (F == FP8 ? (row / br) : row) * scale_cols;
    int nvec = vec * 32 * E;
    if (TT > 1) {
        // Several tokens: the block's 8 rows share each input, staged once in shared memory
        // rather than read by every warp from L2.
        __shared__ float xsm[TT][XTILE];
        for (int base = 0; base < nvec; base += XTILE) {
            int len = min(XTILE, nvec - base);
            __syncthreads();
            for (int i = threadIdx.x; i < TT * len; i += blockDim.x) {
                int j = i / len, c = i % len;
                xsm[j][c] = j < nt ? xs[j * xt + base + c] : 0.0f;
            }
            __syncthreads();
            if (!active) continue;
            // The tile's weight words are all loaded before the first is used.
            constexpr int S = XTILE / (32 * per_word<F>());
            int ns = len / (32 * E);
            unsigned int wv[S];
#pragma unroll
            for (int u = 0; u < S; ++u)
                if (u < ns) wv[u] = words[(base + u * 32 * E) / E + lane];
#pragma unroll
            for (int u = 0; u < S; ++u)
                if (u < ns)
                    stretch<F, TT>(acc, wv[u], base + u * 32 * E, nt, &xsm[0][u * 32 * E], XTILE,
                                   row_scales, bc_log2, table, lane);
        }
    } else if (active) {
        // One token: U stretches' weight words, inputs and scales are loaded before any is
        // used, then summed stretch by stretch in the same order.
        const int U = 4;
        int c0 = 0;
        for (; c0 + U * 32 * E <= nvec; c0 += U * 32 * E) {
            unsigned int wv[U];
            float xv[U][8], sv[U][8];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                int cu = c0 + u * 32 * E;
                wv[u] = words[cu / E + lane];
#pragma unroll
                for (int q = 0; q < E; ++q) {
                    xv[u][q] = xs[cu + q * 32 + lane];
                    sv[u][q] = F == FP8 ? row_scales[cu >> bc_log2]
                               : (F == INT8 || F == INT4) ? row_scales[(cu + q * 32) >> 5]
                                                          : 0.0f;
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) acc[0] = stretch1<F>(acc[0], wv[u], xv[u], sv[u], table, lane);
        }
        for (; c0 < nvec; c0 += 32 * E)
            stretch<F, TT>(acc, words[c0 / E + lane], c0, nt, xs + c0, xt, row_scales, bc_log2,
                           table, lane);
    }
    if (!active) return;
#pragma unroll 8
    for (int c = vec * 32 * E + lane; c < k32; c += 32) {
        float w = weight<F>(d, s, table, row, c, k, br, bc, scale_cols);
#pragma unroll
        for (int j = 0; j < TT; ++j)
            if (j < nt) acc[j] = __fmaf_rn(w, xs[j * xt + c], acc[j]);
    }
    // 8-element steps go into the first accumulator: lanes 0..7.
    int k8 = k32 + ((k - k32) & ~7);
    if (lane < 8) {
#pragma unroll 1
        for (int c = k32 + lane; c < k8; c += 8) {
            float w = weight<F>(d, s, table, row, c, k, br, bc, scale_cols);
#pragma unroll
            for (int j = 0; j < TT; ++j)
                if (j < nt) acc[j] = __fmaf_rn(w, xs[j * xt + c], acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < TT; ++j) {
        if (j >= nt) break;  // nt is the same in every lane: the warp stays converged.
        // hsum4, in its order, by shuffles: lane m = 8j + l holds accumulator j's lane l.
        // (s0 + s1) and (s2 + s3) per lane, then their sum; then the high half onto the low
        // half; then movehl; then lane 1 onto lane 0.
        float v = acc[j];
        v = __fadd_rn(v, __shfl_down_sync(FULL, v, 8));
        v = __fadd_rn(v, __shfl_down_sync(FULL, v, 16));
        v = __fadd_rn(v, __shfl_down_sync(FULL, v, 4));
        v = __fadd_rn(v, __shfl_down_sync(FULL, v, 2));
        float total = __fadd_rn(v, __shfl_down_sync(FULL, v, 1));
        if (lane == 0) {
#pragma unroll 1
            for (int c = k8; c < k; ++c) {
                float w = weight<F>(d, s, table, row, c, k, br, bc, scale_cols);
                total = __fadd_rn(total, __fmul_rn(w, xs[j * xt + c]));
            }
            out[((size_t)(t0 + j) * groups + g) * n + r] = total;
        }
    }
}

#define ROWS_DOT(name, F, TT)                                                                 \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                  \
        name(const unsigned char* a, const float* as, const unsigned char* b,                 \
             const float* bs, int split, int br, int bc, int bc_log2, int scale_cols,         \
             const float* e4m3, const float* x, float* out, int n, int k, int tokens,         \
             int groups, int x_stride, const Job* jobs) {                                     \
        rows_dot<F, TT>(a, as, b, bs, split, br, bc, bc_log2, scale_cols, e4m3, x, out, n, k, \
                        tokens, groups, x_stride, jobs);                                      \
    }

ROWS_DOT(rows_dot_f32, F32, 8)
ROWS_DOT(rows_dot_bf16, BF16, 8)
ROWS_DOT(rows_dot_fp8, FP8, 8)
ROWS_DOT(rows_dot_int8, INT8, 8)
ROWS_DOT(rows_dot_int4, INT4, 8)
ROWS_DOT(rows_dot_f32_t1, F32, 1)
ROWS_DOT(rows_dot_bf16_t1, BF16, 1)
ROWS_DOT(rows_dot_fp8_t1, FP8, 1)
ROWS_DOT(rows_dot_int8_t1, INT8, 1)
ROWS_DOT(rows_dot_int4_t1, INT4, 1)

// One job of `swiglu_rows` (`gpu::SwigluJob`): an expert's fused [gate | up] rows and its
// activations.
struct SwigluJob {
    const float* gate_up;
    float* act;
    int rows;
    int inter;
};

// `kernels::swiglu` for every job of the table (blockIdx.y picks it): act[r, j] =
// gate[r, j] / (1 + exp_portable(-gate[r, j])) * up[r, j], the CPU's operations in its order.
extern "C" __global__ void swiglu_rows(const SwigluJob* jobs) {
    SwigluJob job = jobs[blockIdx.y];
    size_t n = (size_t)job.rows * job.inter;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t r = e / job.inter, c = e % job.inter;
        const float* row = job.gate_up + r * 2 * job.inter;
        float g = row[c], u = row[job.inter + c];
        job.act[e] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, exp_portable(-g))), u);
    }
}
