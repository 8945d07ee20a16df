// moehost's MLA attention core on the GPU (`gpu::mla`): everything of DeepseekV3Attention
// between its projections, over a KV cache in device memory, with the CPU's bits.
//
// Exactness. Each step is the CPU's (`deepseek_v3::attend`, `kernels`) operation for operation:
// dot products in `kernels::dot`'s order (`warp_dot`, the f32 case of rows_dot.cu), RMSNorm as
// `w * (x * (1 / sqrt(ss / d + eps)))`, RoPE's rotations as two rounded products and a rounded
// sum, softmax with `kernels::exp_portable` (the same constants, by their bits, and the same
// operations) summed in position order, and the context as `ctx += p * latent` position by
// position. Every operation is an explicitly rounded intrinsic, so nothing is contracted into a
// fused multiply-add the CPU does not do.
//
// Regenerate the checked-in PTX with ptx.sh (nvcc -ptx -arch=compute_80, then the source digest
// build.rs checks).

#include "exp_portable.cuh"

#define FULL 0xffffffffu
// Warps per block of mla_attend and rms_norm_rows.
#define WARPS 8

// One token of a call: its sequence's cache for this layer (rows of [latent (lora) | rope key
// (rope_d)]) and its position, as `gpu::mla::Tok`.
struct Tok {
    float* cache;
    int pos;
    int pad;
};

// dot(a, b) over k f32s in `kernels::dot`'s order: lane m sums elements m, m + 32, ... by
// fused multiply-adds, lanes 0..7 the 8-element steps after the last 32-element chunk, then
// `hsum4`'s fixed order by shuffles, then the tail one by one. The result in every lane.
__device__ __forceinline__ float warp_dot(const float* __restrict__ a, const float* __restrict__ b,
                                          int k, int lane) {
    float acc = 0.0f;
    int k32 = k & ~31;
    for (int c = lane; c < k32; c += 32) acc = __fmaf_rn(a[c], b[c], acc);
    int k8 = k32 + ((k - k32) & ~7);
    if (lane < 8)
        for (int c = k32 + lane; c < k8; c += 8) acc = __fmaf_rn(a[c], b[c], acc);
    float v = acc;
    v = __fadd_rn(v, __shfl_down_sync(FULL, v, 8));
    v = __fadd_rn(v, __shfl_down_sync(FULL, v, 16));
    v = __fadd_rn(v, __shfl_down_sync(FULL, v, 4));
    v = __fadd_rn(v, __shfl_down_sync(FULL, v, 2));
    float total = __fadd_rn(v, __shfl_down_sync(FULL, v, 1));
    if (lane == 0)
        for (int c = k8; c < k; ++c) total = __fadd_rn(total, __fmul_rn(a[c], b[c]));
    return __shfl_sync(FULL, total, 0);
}

// `kernels::rms_norm` of one d-wide row by one warp (out may be x).
__device__ __forceinline__ void norm_row(const float* x, const float* __restrict__ w, int d,
                                         float eps, float* out, int lane) {
    float ss = warp_dot(x, x, d, lane);
    float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)d), eps)));
    for (int c = lane; c < d; c += 32) out[c] = __fmul_rn(w[c], __fmul_rn(x[c], inv));
}

// RoPE's rotation of the pair (a, b) by (cos, sin), as `Rope::rotate`.
__device__ __forceinline__ void rotate(float* x, int i0, int i1, float c, float s) {
    float a = x[i0], b = x[i1];
    x[i0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    x[i1] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// q_a_layernorm: each of `rows` rows (stride apart) normalised in place, a warp per row.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    rms_norm_rows(float* x, const float* w, int d, float eps, int rows, int stride) {
    int r = blockIdx.x * WARPS + threadIdx.x / 32;
    if (r >= rows) return;  // whole warps leave together
    norm_row(x + (size_t)r * stride, w, d, eps, x + (size_t)r * stride, threadIdx.x & 31);
}

// One block per token: kv_a_layernorm of its latent and RoPE of its key, both into its cache
// row at its position; RoPE of its queries' rope parts in place. `cs` holds each token's cos
// (half) then sin (half).
extern "C" __global__ void __launch_bounds__(128)
    mla_append(const float* kv, const float* kv_norm, float eps, const float* cs, float* q,
               const Tok* toks, int lora, int rope_d, int nh, int qk, int interleave) {
    int i = blockIdx.x, half = rope_d / 2, w = lora + rope_d;
    Tok tk = toks[i];
    const float* row = kv + (size_t)i * w;
    float* dst = tk.cache + (size_t)tk.pos * w;
    const float* cos = cs + (size_t)i * rope_d;
    const float* sin = cos + half;
    if (threadIdx.x < 32) norm_row(row, kv_norm, lora, eps, dst, threadIdx.x);
    for (int c = threadIdx.x; c < rope_d; c += blockDim.x) dst[lora + c] = row[lora + c];
    __syncthreads();
    // Pair p of the key (head -1), then of each query head.
    for (int p = threadIdx.x; p < (nh + 1) * half; p += blockDim.x) {
        int head = p / half - 1, j = p % half;
        float* x = head < 0 ? dst + lora : q + ((size_t)i * nh + head) * qk + (qk - rope_d);
        if (interleave)
            rotate(x, 2 * j, 2 * j + 1, cos[j], sin[j]);
        else
            rotate(x, j, j + half, cos[j], sin[j]);
    }
}

// One block per (head, token tok0 + blockIdx.y): scores against every cached position up to
// the token's own, softmax, and the context sum over the latents: ctx [t, heads, lora].
// `scores` is scratch of max_ctx per (head, token of this launch).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    mla_attend(const float* q, const float* q_lat, const Tok* toks, int tok0, float* scores,
               int max_ctx, float* ctx, int nh, int qk, int lora, int rope_d, float scale) {
    int head = blockIdx.x, i = tok0 + blockIdx.y, lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    size_t idx = (size_t)i * nh + head;
    Tok tk = toks[i];
    int n_ctx = tk.pos + 1, w = lora + rope_d;
    const float* ql = q_lat + idx * lora;
    const float* qr = q + idx * qk + (qk - rope_d);
    float* s = scores + ((size_t)blockIdx.y * nh + head) * max_ctx;
    // (dot(latent_j, ql) + dot(rope_j, qr)) * scale, a warp per position.
    for (int j = warp; j < n_ctx; j += WARPS) {
        const float* cached = tk.cache + (size_t)j * w;
        float a = warp_dot(cached, ql, lora, lane);
        float r = warp_dot(cached + lora, qr, rope_d, lane);
        if (lane == 0) s[j] = __fmul_rn(__fadd_rn(a, r), scale);
    }
    __syncthreads();
    __shared__ float part[WARPS];
    __shared__ float inv_sum;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) m = fmaxf(m, s[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_down_sync(FULL, m, o));
    if (lane == 0) part[warp] = m;
    __syncthreads();
    m = part[0];
    for (int k = 1; k < WARPS; ++k) m = fmaxf(m, part[k]);
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) s[j] = exp_portable(__fsub_rn(s[j], m));
    __syncthreads();
    if (threadIdx.x == 0) {
        // In position order, as the CPU sums them.
        float sum = 0.0f;
        for (int j = 0; j < n_ctx; ++j) sum = __fadd_rn(sum, s[j]);
        inv_sum = __fdiv_rn(1.0f, sum);
    }
    __syncthreads();
    float inv = inv_sum;
    for (int j = threadIdx.x; j < n_ctx; j += blockDim.x) s[j] = __fmul_rn(s[j], inv);
    __syncthreads();
    for (int c = threadIdx.x; c < lora; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < n_ctx; ++j)
            acc = __fadd_rn(acc, __fmul_rn(s[j], tk.cache[(size_t)j * w + c]));
        ctx[idx * lora + c] = acc;
    }
}
