// `kernels::exp_portable` on the GPU, constant for constant (by their bits) and operation for
// operation (each an explicitly rounded intrinsic, so nothing is fused): the same bits as the
// CPU, where the platform's `expf` would differ. Included by mla.cu and rows_dot.cu.
#pragma once

// 2^e for e in [-126, 127].
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((unsigned)(e + 127) << 23); }

// `kernels::exp_portable`, constant for constant.
__device__ __forceinline__ float exp_portable(float x) {
    const float max = __uint_as_float(0x42b17218u), min = __uint_as_float(0xc2cff1b4u);
    const float round = 12582912.0f;  // 1.5 * 2^23
    float xc = fminf(fmaxf(x, min), max);
    float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, __uint_as_float(0x3fb8aa3bu)), round), round);
    float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, __uint_as_float(0x3f318000u))),
                        __fmul_rn(n, __uint_as_float(0xb95e8083u)));
    float z = __fmul_rn(r, r);
    float p = __uint_as_float(0x39506968u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3ab743ceu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088908u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aa9c1u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaaau));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3f000000u));
    float y = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    int e = (int)n, half = e / 2;
    float v = __fmul_rn(__fmul_rn(y, pow2(half)), pow2(e - half));
    if (x > max) return __uint_as_float(0x7f800000u);
    if (x < min) return 0.0f;
    if (isnan(x)) return x;
    return v;
}
