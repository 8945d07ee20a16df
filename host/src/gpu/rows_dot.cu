// moehost's GPU expert kernel: out[t][r] = dot(w[r, :], x[t, :]) for a row-major weight
// matrix w [n, k] and inputs x [tokens, k], with each dot product computed in exactly the
// order of the CPU's `kernels::dot` (AVX2 path): four 8-lane accumulators over 32-element
// chunks, fused multiply-adds, then 8-element steps into the first accumulator, the fixed
// horizontal sum of `hsum4`, then the scalar tail as separate multiply and add. So a routed
// expert gives the same bits on the GPU as on the CPU, and placement (GPU or CPU) never
// changes a token. One thread per (row, token); speed is secondary to exactness here.
//
// Regenerate the checked-in PTX (any nvcc >= 12; compute_80 PTX is JIT-compiled by the driver
// for Hopper): nvcc -ptx -arch=compute_80 -o rows_dot.ptx rows_dot.cu

extern "C" __global__ void rows_dot(const float* __restrict__ w,
                                    const float* __restrict__ x,
                                    float* __restrict__ out,
                                    int n, int k, int tokens) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    int t = blockIdx.y;
    if (r >= n || t >= tokens) return;
    const float* wr = w + (size_t)r * k;
    const float* xr = x + (size_t)t * k;
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
    out[(size_t)t * n + r] = total;
}
