/*
 * One-token attention over a bf16 KV cache, in float32, on x86 CPUs with AVX2 + FMA but no native
 * bf16. Compiled on first use by llama/native.py together with bf16_matvec.c.
 *
 * Why: a decode step attends one query per head over the cached keys and values. In torch that is
 * a float32 copy of the cache slice (torch's bf16 matmuls are slow on such CPUs), two small batched
 * matmuls and a softmax: ~200 us a layer for 8 KV heads x 520 positions on 2 cores, mostly fixed
 * costs. This reads the bf16 cache in place, widening in registers: ~85 us (a Llama 3.2 1B step
 * saves ~3 ms of ~80).
 *
 * What: for each row b and query head h, with g = h / (H / G) the KV head it shares,
 *     s_t = (q[b, h] . k[b, g, t]) / sqrt(D),  p = softmax(s),  out[b, h] = sum_t p_t v[b, g, t]
 * over t < T: the math of llama.model.grouped_attention in float32; the order of additions and
 * exp (exp8 below, ~1 ulp) differ from torch's. Threads: OpenMP over (row, KV head) pairs; each
 * output is computed by one thread, so results do not depend on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "kernels.h"

/* 8 bf16 values at p, widened to float32 in order. */
static inline __m256 load8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* exp(x) for x <= 0, to ~1 ulp (tests/test_native.py compares with float64): x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) from its Taylor series to r^7 (next term < 7e-9 relative), times 2^n built
 * in the exponent bits. Results below 2^-126 (x < -87.3) are 0: a softmax weight that small changes
 * no float32 sum. */
static inline __m256 exp8(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504f), ln2_hi = _mm256_set1_ps(0.693145752f),
                 ln2_lo = _mm256_set1_ps(1.42860677e-6f); /* ln2_hi + ln2_lo = ln 2 to ~1e-14 */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    static const float taylor[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m256 y = _mm256_set1_ps(taylor[0]);
    for (int i = 1; i < 8; i++) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(taylor[i]));
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(bits)));
}

/* The 8 sums of 8 vectors' elements, in order: [sum(a[0]), ..., sum(a[7])]. */
static inline __m256 hsum8(const __m256 a[8]) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    /* s0 = [a0 a1 a2 a3 | a0 a1 a2 a3] partial sums of the low and high 128-bit halves; s1 for a4-a7. */
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* q . k_j / scale for one query row and keys k_0 ... k_{n-1} (n <= 8, `stride` apart), D8 = D - D % 8.
 * n is a constant where it is inlined for full blocks, so the 8 accumulators stay in registers. */
static inline __attribute__((always_inline)) void dots(
    const float *q, const uint16_t *k, int64_t stride, int64_t D, int64_t D8, float scale, float *s, const int n) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8) {  /* up to eight independent FMA chains */
        const __m256 qd = _mm256_loadu_ps(q + d);
        for (int j = 0; j < n; j++) acc[j] = _mm256_fmadd_ps(load8(k + j * stride + d), qd, acc[j]);
    }
    float sums[8];
    _mm256_storeu_ps(sums, hsum8(acc));
    for (int j = 0; j < n; j++)
        for (int64_t d = D8; d < D; d++) sums[j] += widen(k[j * stride + d]) * q[d];
    const __m256 scaled = _mm256_div_ps(_mm256_loadu_ps(sums), _mm256_set1_ps(scale));
    if (n == 8) {
        _mm256_storeu_ps(s, scaled);
    } else {
        _mm256_storeu_ps(sums, scaled);
        for (int j = 0; j < n; j++) s[j] = sums[j];
    }
}

/* o[0 .. 8 * n) = sum_t p_t v_t[0 .. 8 * n) over T values (`stride` apart): n <= 8 register accumulators. */
static inline __attribute__((always_inline)) void weighted_sum(
    const float *p, const uint16_t *v, int64_t stride, int64_t T, float *o, const int n) {
    __m256 acc[8];
    for (int j = 0; j < n; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < T; t++) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        for (int j = 0; j < n; j++) acc[j] = _mm256_fmadd_ps(pt, load8(v + t * stride + 8 * j), acc[j]);
    }
    for (int j = 0; j < n; j++) _mm256_storeu_ps(o + 8 * j, acc[j]);
}

/* The queries q [R, D] of one KV head against its keys and values (positions `stride` apart).
 * Also called by decode_layer.c (declared in kernels.h). */
void llama_attend_group(const float *q, const uint16_t *k, const uint16_t *v, int64_t stride, int64_t T,
                         int64_t D, int64_t R, float *scores /* [R, T] */, float *out /* [R, D] */) {
    const int64_t D8 = D - D % 8, T8 = T - T % 8;
    const float scale = (float)sqrt((double)D);
    /* Scores, 8 keys at a time: each block of keys is read from memory once for all R queries. */
    for (int64_t t = 0; t < T8; t += 8)
        for (int64_t r = 0; r < R; r++) dots(q + r * D, k + t * stride, stride, D, D8, scale, scores + r * T + t, 8);
    if (T8 < T)
        for (int64_t r = 0; r < R; r++)
            dots(q + r * D, k + T8 * stride, stride, D, D8, scale, scores + r * T + T8, (int)(T - T8));
    /* Softmax per query: exp(s - max) / sum, 8 at a time; T8 = T - T % 8. */
    for (int64_t r = 0; r < R; r++) {
        float *s = scores + r * T, max = -INFINITY, sum;
        __m256 vmax = _mm256_set1_ps(-INFINITY), vsum = _mm256_setzero_ps();
        for (int64_t t = 0; t < T8; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + t));
        float lanes[8];
        _mm256_storeu_ps(lanes, vmax);
        for (int j = 0; j < 8; j++) max = lanes[j] > max ? lanes[j] : max;
        for (int64_t t = T8; t < T; t++) max = s[t] > max ? s[t] : max;
        const __m256 shift = _mm256_set1_ps(max);
        for (int64_t t = 0; t < T8; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), shift));
            _mm256_storeu_ps(s + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum(vsum);
        for (int64_t t = T8; t < T; t++) {
            _mm256_storeu_ps(lanes, exp8(_mm256_set1_ps(s[t] - max)));
            sum += (s[t] = lanes[0]);
        }
        const __m256 total = _mm256_set1_ps(sum);
        for (int64_t t = 0; t < T8; t += 8) _mm256_storeu_ps(s + t, _mm256_div_ps(_mm256_loadu_ps(s + t), total));
        for (int64_t t = T8; t < T; t++) s[t] /= sum;
    }
    /* out_r = sum_t p_rt v_t, 64 outputs (8 registers) at a time: each pass reads the values in order. */
    for (int64_t r = 0; r < R; r++) {
        const float *p = scores + r * T;
        float *o = out + r * D;
        int64_t d = 0;
        for (; d + 64 <= D8; d += 64) weighted_sum(p, v + d, stride, T, o + d, 8);
        if (d < D8) weighted_sum(p, v + d, stride, T, o + d, (int)((D8 - d) / 8));
        for (d = D8; d < D; d++) {
            float sum = 0.0f;
            for (int64_t t = 0; t < T; t++) sum += p[t] * widen(v[t * stride + d]);
            o[d] = sum;
        }
    }
}

/*
 * q, out: [B, H, D], both float32 (bf16_io = 0) or both bf16 (1); k, v: bf16 with the same strides
 * (elements) between rows, heads and positions, unit stride within a position: views of the cache.
 * Returns 0, or -1 for bad sizes or a failed allocation (out is then untouched or partly written).
 */
int llama_bf16_attention(const void *q, const uint16_t *k, const uint16_t *v, void *out, int64_t B, int64_t H,
                         int64_t G, int64_t T, int64_t D, int64_t batch_stride, int64_t head_stride,
                         int64_t pos_stride, int bf16_io, int threads) {
    if (B < 1 || G < 1 || H % G != 0 || T < 1 || D < 1 || threads < 1) return -1;
    const int64_t R = H / G;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < B * G; task++) {
        const int64_t b = task / G, g = task % G;
        float *scratch = malloc(sizeof(float) * (size_t)(R * (T + 2 * D)));
        if (!scratch) { failed = 1; continue; }
        float *qf = scratch, *o = scratch + R * D, *scores = scratch + 2 * R * D;
        const int64_t first = (b * H + g * R) * D;  /* q[b, g * R] */
        for (int64_t i = 0; i < R * D; i++)
            qf[i] = bf16_io ? widen(((const uint16_t *)q)[first + i]) : ((const float *)q)[first + i];
        const int64_t offset = b * batch_stride + g * head_stride;
        llama_attend_group(qf, k + offset, v + offset, pos_stride, T, D, R, scores, o);
        for (int64_t i = 0; i < R * D; i++) {
            if (bf16_io) ((uint16_t *)out)[first + i] = narrow(o[i]);
            else ((float *)out)[first + i] = o[i];
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
