// moehost's GPU linear kernel: out[t][g][r] = dot(w[g][r, :], x[t][g][:k]) for `groups`
// row-major weight matrices w [groups, n, k] and inputs x [tokens, groups, x_stride] (a plain
// linear layer is one group with x_stride = k; MLA's per-head W_UK and W_UV are one group per
// head), with each dot product computed in exactly the
// order of the CPU's `kernels::dot` (AVX2 path): four 8-lane accumulators over 32-element
// chunks, fused multiply-adds, then 8-element steps into the first accumulator, the fixed
// horizontal sum of `hsum4`, then the scalar tail as separate multiply and add. So a routed
// expert gives the same bits on the GPU as on the CPU, and placement (GPU or CPU) never
// changes a token. One thread per (row, token); speed is secondary to exactness here.
//
// Regenerate the checked-in PTX (any nvcc >= 12; compute_80 PTX is JIT-compiled by the driver
// for Hopper): nvcc -ptx -arch=compute_80 -o rows_dot.ptx rows_dot.cu
// No GPU is needed: PyPI's nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt and
// nvidia-cuda-runtime 13.0 wheels, unpacked into one tree, give nvcc 13.0.88, which reproduces
// the checked-in PTX byte for byte.

extern "C" __global__ void rows_dot(const float* __restrict__ w,
                                    const float* __restrict__ x,
                                    float* __restrict__ out,
                                    int n, int k, int tokens, int groups, int x_stride) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    int g = blockIdx.z;
    if (r >= n || t >= tokens || g >= groups) return;
    const float* wr = w + ((size_t)g * n + r) * k;
    const float* xr = x + ((size_t)t * groups + g) * x_stride;
    float s[4][8];
    #pragma unroll
    for (int j = 0; j < 4; ++j)
        #pragma unroll
        for (int l = 0; l < 8; ++l) s[j][l] = 0.0f;
    int i = 0;
    for (; i + 32 <= k; i += 32) {
        #pragma unroll
        for (int j = 0; j < 4; ++j)
            #pragma unroll
            for (int l = 0; l < 8; ++l)
                s[j][l] = __fmaf_rn(wr[i + j * 8 + l], xr[i + j * 8 + l], s[j][l]);
    }
    for (; i + 8 <= k; i += 8) {
        #pragma unroll
        for (int l = 0; l < 8; ++l) s[0][l] = __fmaf_rn(wr[i + l], xr[i + l], s[0][l]);
    }
    // hsum4: lanes (s0 + s1) + (s2 + s3); then high half onto low half; then movehl; then
    // lane 1 onto lane 0.
    float v[8];
    #pragma unroll
    for (int l = 0; l < 8; ++l)
        v[l] = __fadd_rn(__fadd_rn(s[0][l], s[1][l]), __fadd_rn(s[2][l], s[3][l]));
    float q0 = __fadd_rn(v[0], v[4]);
    float q1 = __fadd_rn(v[1], v[5]);
    float q2 = __fadd_rn(v[2], v[6]);
    float q3 = __fadd_rn(v[3], v[7]);
    float total = __fadd_rn(__fadd_rn(q0, q2), __fadd_rn(q1, q3));
    for (; i < k; ++i) total = __fadd_rn(total, __fmul_rn(wr[i], xr[i]));
    out[((size_t)t * groups + g) * n + r] = total;
}

// An expert's FP8 (e4m3) weights to f32 on the GPU, bit for bit as the CPU's
// `fp8::dequantize_blocks`: `out[r][c] = table[q[r][c]] * scale[r / br][c / bc]`, one rounded
// f32 multiply, with the CPU's own 256-entry e4m3 table (copied to the device once).
extern "C" __global__ void dequant_fp8(const unsigned char* __restrict__ q,
                                       const float* __restrict__ scales,
                                       const float* __restrict__ table,
                                       float* __restrict__ out,
                                       int rows, int cols, int br, int bc) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * cols) return;
    int r = (int)(i / cols);
    int c = (int)(i % cols);
    int scale_cols = (cols + bc - 1) / bc;
    out[i] = __fmul_rn(table[q[i]], scales[(r / br) * scale_cols + c / bc]);
}

// bf16 weights to f32: the bf16 bits are the high half of the f32 (exact, as on the CPU).
extern "C" __global__ void dequant_bf16(const unsigned short* __restrict__ q,
                                        float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = __uint_as_float(((unsigned int)q[i]) << 16);
}
