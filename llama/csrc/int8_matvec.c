/*
 * y = (x @ q.T) * scale for int8 weights q [N, K] with one float32 scale per output row, and a few
 * rows x [B, K] (B <= 8, float32 or bf16), on x86 CPUs with AVX2 + FMA. Compiled on first use by
 * llama/native.py together with the bf16 kernels; llama/quantize.py makes q and scale.
 *
 * Why: decoding a token reads every weight once. int8 weights are half the bytes of bf16, so a
 * kernel that keeps up with memory decodes up to twice as fast. torch has no CPU kernel for int8
 * weights times float activations that streams at that speed for one row.
 *
 * How: 16 int8 weights are sign-extended to int32 (vpmovsxbd) and converted to float32, then
 * multiplied into float32 accumulators by FMA, with x in float32 as it is: the activations are not
 * quantized, so the only error is the weights' own rounding. Each row's sum is multiplied by its
 * scale once at the end. Two versions: AVX2 (8 lanes) and AVX-512 (16 lanes, fewer instructions
 * per byte); `variant` picks one (llama/native.py measures which is faster on this CPU).
 *
 * Threads: OpenMP over blocks of weight rows, with the caller's thread count; each output is summed
 * by one thread, so the result does not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_ROWS 8 /* rows of x per call */
#define PREFETCH_AHEAD 128 /* bytes past the matching position in the next block: two cache lines */

/* 8 int8 weights at p as float32. */
static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/*
 * y[b * N + r] = scale[r] * sum_k q[r * K + k] * x[b * K + k] for R weight rows and B <= 4 input
 * rows (compile-time constants at every call site, so the loops unroll and the R * B * 2 <= 16
 * accumulators stay in registers). K16 = K rounded down to 16; the tail is summed in scalar code.
 */
static inline __attribute__((always_inline)) void block_avx2(
    const int8_t *q, const float *scale, int64_t K, int64_t K16, const float *x, float *y, int64_t N,
    const int R, const int B) {
    __m256 acc[4][4][2];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(q + (R + r) * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m256 w0 = load8_i8(q + r * K + k), w1 = load8_i8(q + r * K + k + 8);
            for (int b = 0; b < B; b++) {
                acc[r][b][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + b * K + k), acc[r][b][0]);
                acc[r][b][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + b * K + k + 8), acc[r][b][1]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float s = hsum(_mm256_add_ps(acc[r][b][0], acc[r][b][1]));
            for (int64_t k = K16; k < K; k++) s += (float)q[r * K + k] * x[b * K + k];
            y[b * N + r] = s * scale[r];
        }
}

__attribute__((target("avx512f,avx512bw")))
static inline __attribute__((always_inline)) void block_avx512(
    const int8_t *q, const float *scale, int64_t K, int64_t K16, const float *x, float *y, int64_t N,
    const int R, const int B) {
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(q + (R + r) * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        for (int r = 0; r < R; r++) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + r * K + k))));
            for (int b = 0; b < B; b++) acc[r][b] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * K + k), acc[r][b]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float s = _mm512_reduce_add_ps(acc[r][b]);
            for (int64_t k = K16; k < K; k++) s += (float)q[r * K + k] * x[b * K + k];
            y[b * N + r] = s * scale[r];
        }
}

/* Rows of q per block: 4 for one input row, 2 for more (inputs beyond 4 in a second pass over the
 * same block, which is then in cache). */
#define ROWS_FOR(B) ((B) == 1 ? 4 : 2)

#define DEFINE_RUN(NAME, BLOCK, TARGET)                                                                 \
    TARGET static void NAME(const int8_t *q, const float *scale, const float *x, float *y, int64_t N,   \
                            int64_t K, int B, int threads) {                                            \
        const int64_t K16 = K - K % 16;                                                                 \
        const int R = ROWS_FOR(B), blocks = N / R;                                                      \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                               \
        for (int64_t i = 0; i < blocks; i++)                                                            \
            for (int b0 = 0; b0 < B; b0 += 4) {                                                         \
                const int64_t n = i * R;                                                                \
                const float *xb = x + b0 * K;                                                           \
                float *yb = y + b0 * N + n;                                                             \
                switch ((R == 4) * 10 + (B - b0 < 4 ? B - b0 : 4)) {                                    \
                    case 11: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 4, 1); break;               \
                    case 1: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 2, 1); break;                \
                    case 2: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 2, 2); break;                \
                    case 3: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 2, 3); break;                \
                    case 4: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 2, 4); break;                \
                }                                                                                       \
            }                                                                                           \
        for (int64_t n = (int64_t)blocks * R; n < N; n++)                                               \
            for (int b0 = 0; b0 < B; b0 += 4) {                                                         \
                const float *xb = x + b0 * K;                                                           \
                float *yb = y + b0 * N + n;                                                             \
                switch (B - b0 < 4 ? B - b0 : 4) {                                                      \
                    case 1: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 1, 1); break;                \
                    case 2: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 1, 2); break;                \
                    case 3: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 1, 3); break;                \
                    case 4: BLOCK(q + n * K, scale + n, K, K16, xb, yb, N, 1, 4); break;                \
                }                                                                                       \
            }                                                                                           \
    }

DEFINE_RUN(run_avx2, block_avx2, )
DEFINE_RUN(run_avx512, block_avx512, __attribute__((target("avx512f,avx512bw"))))

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
    float *xf = NULL, *yf = (float *)y;
    if (bf16_io) {
        xf = malloc(sizeof(float) * (size_t)(B * K + B * N));
        if (!xf) return -1;
        yf = xf + B * K;
        for (int64_t i = 0; i < B * K; i++) xf[i] = widen(((const uint16_t *)x)[i]);
    }
    const float *xin = bf16_io ? xf : (const float *)x;
    if (variant == 2)
        run_avx512(q, scale, xin, yf, N, K, B, threads);
    else
        run_avx2(q, scale, xin, yf, N, K, B, threads);
    if (bf16_io) {
        for (int64_t i = 0; i < B * N; i++) ((uint16_t *)y)[i] = narrow(yf[i]);
        free(xf);
    }
    return 0;
}
