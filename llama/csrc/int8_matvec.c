/*
 * y = (x @ q.T) * scale for int8 weights q [N, K] with one float32 scale per output row, and a few
 * rows x [B, K] (B <= 8, float32 or bf16), on x86 CPUs with AVX2 + FMA. Compiled on first use by
 * llama/native.py together with the bf16 kernels; llama/quantize makes q and scale.
 *
 * Why: decoding a token reads every weight once. int8 weights are half the bytes of bf16, so a
 * kernel that keeps up with memory decodes up to twice as fast. torch has no CPU kernel for int8
 * weights times float activations that streams at that speed for one row.
 *
 * How: widening each int8 weight to float32 costs three instructions per 8 weights on AVX2 (sign
 * extend, convert, FMA), which on two Zen 4 cores read 26 GB/s while memory gives 36. Integer
 * products cost less: each 32-element block of x is rounded once per call to int16 with its own
 * float32 step (block max |x| / 32767), the int8 weights are sign-extended to int16 and multiplied
 * pairwise into int32 sums (vpmaddwd: 16 weights per instruction on AVX2, 32 on AVX-512), and each
 * block's sum is converted to float32 and multiplied by its step into float32 accumulators. That
 * reads 36-37 GB/s, as fast as a loop that only reads (benchmarks/README.md).
 *
 * Accuracy: the int16 rounding moves each x by at most half a step, 1/65534 of the largest |x| of
 * its 32-element block: 256 times finer than the weights' own int8 rounding (1/254 of the row's
 * largest weight), and per block, so one large activation (Llama's residual stream has some) only
 * coarsens its own 32 neighbours. The K % 32 tail is multiplied in float32 as it is. Integer sums
 * are exact (|sum| <= 32 * 127 * 32767 < 2^31); a block holding a NaN or an infinity makes its
 * output rows NaN. Each row's sum is multiplied by its scale once at the end.
 *
 * Threads: OpenMP over weight rows, each read front to back (one sequential stream per thread),
 * with the caller's thread count; each output is summed by one thread, in an order that does not
 * depend on the thread count.
 */
#include <immintrin.h>
#include <math.h> /* fabsf, NAN (no libm call) */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_ROWS 8 /* rows of x per call */
#define PASS 4     /* input rows per pass over a weight row (accumulators in registers) */

/*
 * x [B, K] float32 -> xi [B, K32] int16 and step [B, K32 / 32]: x[b, k] ~ xi[b, k] * step[b, k / 32].
 * A block of zeros has step 0; a block with a NaN or an infinity has step NaN (its sums become NaN).
 */
static void quantize_x(const float *x, int16_t *xi, float *step, int B, int64_t K, int64_t K32) {
    for (int b = 0; b < B; b++)
        for (int64_t k0 = 0; k0 < K32; k0 += 32) {
            const float *v = x + b * K + k0;
            float m = 0.0f;
            int finite = 1;
            for (int j = 0; j < 32; j++) {
                const float a = fabsf(v[j]);
                finite &= a <= 3.4e38f; /* false for NaN and infinities */
                m = a > m ? a : m;
            }
            int16_t *out = xi + b * K32 + k0;
            float *s = step + b * (K32 / 32) + k0 / 32;
            if (!finite || m == 0.0f) {
                for (int j = 0; j < 32; j++) out[j] = 0;
                *s = finite ? 0.0f : NAN;
                continue;
            }
            const float inv = 32767.0f / m;
            /* rounded to nearest even (the default MXCSR mode); |v * inv| <= 32767 */
            for (int j = 0; j < 32; j++) out[j] = (int16_t)_mm_cvt_ss2si(_mm_set_ss(v[j] * inv));
            *s = m / 32767.0f;
        }
}

/* The float32 tail k = K32..K-1 of one weight row by one input row. */
static inline float tail(const int8_t *q, const float *x, int64_t K32, int64_t K) {
    float s = 0.0f;
    for (int64_t k = K32; k < K; k++) s += (float)q[k] * x[k];
    return s;
}

/* One block of 32: the int32 pair sums of q[k..k+32) by xi[k..k+32) as 8 float32 (AVX2). */
static inline __m256 block32_avx2(__m256i w0, __m256i w1, const int16_t *xi) {
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xi)),
                                       _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xi + 16))));
    return _mm256_cvtepi32_ps(a);
}

/*
 * y[b * N] = scale * sum_k q[k] x[b, k] for one weight row q and B <= PASS input rows (a
 * compile-time constant at every call site, so the 2 * B float32 accumulators stay in registers:
 * two chains per input row, even and odd blocks).
 */
static inline __attribute__((always_inline)) void row_avx2(
    const int8_t *q, float scale, int64_t K, int64_t K32, const int16_t *xi, const float *step, const float *x,
    float *y, int64_t N, const int B) {
    __m256 acc[PASS][2];
    for (int b = 0; b < B; b++) acc[b][0] = acc[b][1] = _mm256_setzero_ps();
    const int64_t nb = K32 / 32;
    for (int64_t j = 0; j < nb; j += 2) /* block j into chain 0, block j + 1 into chain 1 */
        for (int h = 0; h < 2 && j + h < nb; h++) {
            const int8_t *p = q + (j + h) * 32;
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
            for (int b = 0; b < B; b++)
                acc[b][h] = _mm256_fmadd_ps(block32_avx2(w0, w1, xi + b * K32 + (j + h) * 32),
                                            _mm256_set1_ps(step[b * nb + j + h]), acc[b][h]);
        }
    for (int b = 0; b < B; b++) y[b * N] = (hsum(_mm256_add_ps(acc[b][0], acc[b][1])) + tail(q, x + b * K, K32, K)) * scale;
}

/* One block of 32 in 512 bits: the 32 widened weights w by xi[0..32) as 16 float32 pair sums. */
__attribute__((target("avx512f,avx512bw")))
static inline __m512 block32_avx512(__m512i w, const int16_t *xi) {
    return _mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512((const void *)xi)));
}

/* `row_avx2` in 512 bits: one block of 32 weights is one vector of 32 int16. */
__attribute__((target("avx512f,avx512bw")))
static inline __attribute__((always_inline)) void row_avx512(
    const int8_t *q, float scale, int64_t K, int64_t K32, const int16_t *xi, const float *step, const float *x,
    float *y, int64_t N, const int B) {
    __m512 acc[PASS][2];
    for (int b = 0; b < B; b++) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    const int64_t nb = K32 / 32;
    int64_t j = 0; /* pairs of blocks, then an odd last one: written out, since with the bound inside
                    * the pair loop (as in row_avx2) GCC kept these accumulators in memory (15-20% slower) */
    for (; j + 2 <= nb; j += 2)
        for (int h = 0; h < 2; h++) {
            const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + (j + h) * 32)));
            for (int b = 0; b < B; b++)
                acc[b][h] = _mm512_fmadd_ps(block32_avx512(w, xi + b * K32 + (j + h) * 32), _mm512_set1_ps(step[b * nb + j + h]), acc[b][h]);
        }
    if (j < nb) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + j * 32)));
        for (int b = 0; b < B; b++)
            acc[b][0] = _mm512_fmadd_ps(block32_avx512(w, xi + b * K32 + j * 32), _mm512_set1_ps(step[b * nb + j]), acc[b][0]);
    }
    for (int b = 0; b < B; b++)
        y[b * N] = (_mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1])) + tail(q, x + b * K, K32, K)) * scale;
}

/* Rows n0 <= n < n1 of q by every input row, PASS rows of x at a time (or fewer), for ROW =
 * row_avx2 or row_avx512; y[b * ldy + n]. Inlined into the parallel loop below (one row at a time)
 * and into llama_int8_matvec_range (a thread's rows of the fused step): one loop for both. */
#define DEFINE_RANGE(NAME, ROW, TARGET)                                                                \
    TARGET static inline __attribute__((always_inline)) void NAME(                                    \
        const int8_t *q, const float *scale, const int16_t *xi, const float *step, const float *x,     \
        float *y, int64_t ldy, int64_t K, int B, int64_t n0, int64_t n1) {                             \
        const int64_t K32 = K - K % 32, nb = K32 / 32;                                                 \
        for (int64_t n = n0; n < n1; n++)                                                              \
            for (int b0 = 0; b0 < B; b0 += PASS) {                                                     \
                const int16_t *xb = xi + b0 * K32;                                                     \
                const float *sb = step + b0 * nb, *fb = x + b0 * K;                                    \
                float *yb = y + b0 * ldy + n;                                                          \
                switch (B - b0 < PASS ? B - b0 : PASS) {                                               \
                    case 1: ROW(q + n * K, scale[n], K, K32, xb, sb, fb, yb, ldy, 1); break;           \
                    case 2: ROW(q + n * K, scale[n], K, K32, xb, sb, fb, yb, ldy, 2); break;           \
                    case 3: ROW(q + n * K, scale[n], K, K32, xb, sb, fb, yb, ldy, 3); break;           \
                    case 4: ROW(q + n * K, scale[n], K, K32, xb, sb, fb, yb, ldy, 4); break;           \
                }                                                                                      \
            }                                                                                          \
    }

DEFINE_RANGE(range_avx2, row_avx2, )
DEFINE_RANGE(range_avx512, row_avx512, __attribute__((target("avx512f,avx512bw"))))

/* Every row n of q, split over `threads` threads (OpenMP's static schedule), for RANGE above. */
#define DEFINE_RUN(NAME, RANGE, TARGET)                                                                \
    TARGET static void NAME(const int8_t *q, const float *scale, const int16_t *xi, const float *step,  \
                            const float *x, float *y, int64_t N, int64_t K, int B, int threads) {      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                              \
        for (int64_t n = 0; n < N; n++) RANGE(q, scale, xi, step, x, y, N, K, B, n, n + 1);            \
    }

DEFINE_RUN(run_avx2, range_avx2, )
DEFINE_RUN(run_avx512, range_avx512, __attribute__((target("avx512f,avx512bw"))))

/* 1 when this CPU can run the AVX-512 version (llama/native.py asks before choosing it). */
int llama_int8_has_avx512(void) { return has_avx512(); }

/*
 * q: int8 [N, K] row-major; scale: float32 [N]; x: [B, K] and y: [B, N], both float32
 * (bf16_io = 0) or both bf16 (bf16_io = 1: x widened on entry, each float32 result rounded like
 * torch's .to(bfloat16)). variant: 1 = AVX2, 2 = AVX-512 (refused where the CPU lacks it).
 * Returns 0, or -1 for bad arguments or a failed allocation (y is then untouched).
 */
int llama_int8_matvec(const int8_t *q, const float *scale, const void *x, void *y, int64_t N, int64_t K, int B,
                      int bf16_io, int variant, int threads) {
    if (B < 1 || B > MAX_ROWS || threads < 1 || (variant != 1 && variant != 2)) return -1;
    if (variant == 2 && !has_avx512()) return -1;
    const int64_t K32 = K - K % 32;
    /* One scratch block: x in float32 [B, K] (when bf16), y in float32 [B, N] (when bf16), x in
     * int16 [B, K32] and its steps [B, K32 / 32]. */
    const size_t nf = bf16_io ? (size_t)(B * K + B * N) : 0;
    float *scratch = malloc(sizeof(float) * (nf + (size_t)(B * (K32 / 32))) + sizeof(int16_t) * (size_t)(B * K32));
    if (!scratch) return -1;
    float *xf = scratch, *yf = bf16_io ? scratch + B * K : (float *)y, *step = scratch + nf;
    int16_t *xi = (int16_t *)(step + B * (K32 / 32));
    if (bf16_io)
        for (int64_t i = 0; i < B * K; i++) xf[i] = widen(((const uint16_t *)x)[i]);
    const float *xin = bf16_io ? xf : (const float *)x;
    quantize_x(xin, xi, step, B, K, K32);
    if (variant == 2)
        run_avx512(q, scale, xi, step, xin, yf, N, K, B, threads);
    else
        run_avx2(q, scale, xi, step, xin, yf, N, K, B, threads);
    if (bf16_io)
        for (int64_t i = 0; i < B * N; i++) ((uint16_t *)y)[i] = narrow(yf[i]);
    free(scratch);
    return 0;
}

/* ---- For decode_layer.c (kernels.h): the same loops, called by each thread of its region. ---- */

/* The loop llama_int8_matvec_range runs: 1 (AVX2) or 2 (AVX-512), set by llama/native.py to the
 * variant of the unfused products, so that both paths give the same bits. */
static int range_variant = 1;

int llama_int8_set_range_variant(int variant) {
    if (variant == 2 ? !has_avx512() : variant != 1) return -1;
    range_variant = variant;
    return 0;
}

/* range_avx512 in a function of its own target (it cannot be inlined into a plain AVX2 one). */
__attribute__((target("avx512f,avx512bw")))
static void range512_call(const int8_t *q, const float *scale, const int16_t *xi, const float *step, const float *x,
                          float *y, int64_t ldy, int64_t K, int B, int64_t n0, int64_t n1) {
    range_avx512(q, scale, xi, step, x, y, ldy, K, B, n0, n1);
}

/* Where llama_int8_prepare puts x's int16 blocks: after the B * (K32 / 32) steps. */
static int16_t *prepared_xi(const float *prepared, int B, int64_t K) {
    return (int16_t *)(prepared + B * ((K - K % 32) / 32));
}

void llama_int8_prepare(const float *x, float *prepared, int B, int64_t K) {
    const int64_t K32 = K - K % 32;
    quantize_x(x, prepared_xi(prepared, B, K), prepared, B, K, K32);
}

void llama_int8_matvec_range(const int8_t *q, const float *scale, int64_t K, const float *prepared, const float *x,
                             float *y, int64_t ldy, int64_t n0, int64_t n1, int B) {
    const int16_t *xi = prepared_xi(prepared, B, K);
    if (range_variant == 2)
        range512_call(q, scale, xi, prepared, x, y, ldy, K, B, n0, n1);
    else
        range_avx2(q, scale, xi, prepared, x, y, ldy, K, B, n0, n1);
}
