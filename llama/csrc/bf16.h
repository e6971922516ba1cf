/* bf16 <-> float32, an AVX horizontal sum and the AVX-512 check, shared by the kernels in this folder (llama/native.py). */
#ifndef LLAMA_BF16_H
#define LLAMA_BF16_H

#include <immintrin.h>
#include <stdint.h>

/* The sum of a vector's 8 floats. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* bf16 -> float32 is exact: a bf16 value is the top half of a float32. */
static inline float widen(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* float32 -> bf16 rounded to nearest even, as torch rounds (bit for bit on every non-NaN value,
 * tests/test_native.py); a NaN becomes the quiet NaN 0x7FC0. */
static inline uint16_t narrow(float f) {
    union { float f; uint32_t u; } v = {f};
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* 1 when this CPU can run the AVX-512 loops (F and BW); llama/native.py asks before choosing them. */
static inline int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

/* 1 when this CPU also has AVX512-BF16 (vdpbf16ps: bf16 pairs multiplied and summed into float32). */
static inline int has_avx512_bf16(void) {
    __builtin_cpu_init();
    return has_avx512() && __builtin_cpu_supports("avx512bf16");
}

#endif
