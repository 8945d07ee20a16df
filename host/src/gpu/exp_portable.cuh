// `kernels::exp_portable` on the GPU, constant for constant (by their bits) and operation for
// operation (each an explicitly rounded intrinsic, so nothing is fused): the same bits as the
// CPU, where the platform's `expf` would differ. Included by mla.cu and rows_dot.cu.
#pragma once

// 2^e for e in [-126, 127].
__device__ __forceinline__ float pow2(int e) { return __uint_as_float((unsigned)(e + 127) << 23); }

// `kernels::exp_portable`, constant for constant.
__device__ __forceinline__ float exp_portable(float x) {
    if (isnan(x)) return x;
    if (x > __uint_as_float(0x42b17218u)) return __uint_as_float(0x7f800000u);
    if (x < __uint_as_float(0xc2cff1b4u)) return 0.0f;
    float n = rintf(__fmul_rn(x, __uint_as_float(0x3fb8aa3bu)));
    float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, __uint_as_float(0x3f318000u))),
                        __fmul_rn(n, __uint_as_float(0xb95e8083u)));
    float z = __fmul_rn(r, r);
    float p = __uint_as_float(0x39506968u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3ab743ceu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088908u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aa9c1u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaaau));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3f000000u));
    float y = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    int e = (int)n;
    if (e > 127) return __fmul_rn(__fmul_rn(y, pow2(127)), pow2(e - 127));
    if (e < -126) return __fmul_rn(__fmul_rn(y, pow2(e + 64)), pow2(-64));
    return __fmul_rn(y, pow2(e));
}

