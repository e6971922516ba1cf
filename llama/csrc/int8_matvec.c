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

/*
 * The AVX512-BF16 loop (variant 3), for two to eight bf16 input rows (a batch of a bf16 model):
 * each int8 weight becomes a bf16 exactly (|q| <= 127 needs 7 significant bits; bf16 has 8), and
 * the CPU's bf16 dot product (vdpbf16ps) multiplies 32 of them by 32 bf16 inputs in one
 * instruction, where the int16 loop needs a multiply-add, a conversion and an FMA per input row
 * and block. The conversion (five instructions per 32 weights) is paid once per weight and block
 * of R weight rows and shared by every input row: R = 4 rows for up to 4 inputs (16
 * accumulators), 3 for 5-8 (24; 2 rows measured 13% slower at 8 inputs on Zen 4). The inputs are
 * bf16 already, so nothing is rounded, and the sums are more exact than the int16 blocks' (each
 * input keeps its own significand however large its block's largest): 1e-7 of the largest output
 * against 2e-5 (tests/test_native.py). Products of two bf16 numbers are exact in float32, summed
 * in float32; the tail K32..K-1 and the row scale as in row_avx2. One input row stays on the int16
 * loop (row_avx512): memory-bound either way, and its integer work per weight is the cheaper.
 */
#define ROWS_BF 4 /* most weight rows per block */
#define ROWS_BF_FOR(B) ((B) <= 4 ? 4 : 3)

/* 32 int8 weights as 32 bf16, in order. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __m512bh widen_bf16(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* lanes 0-15 from lo, 16-31 from hi (exact: no rounding) */
}

/* R weight rows from q by B input rows (xb: x in bf16, [B][K32]); y[b * ldy + r]. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __attribute__((always_inline)) void block_bf16(
    const int8_t *q, const float *scale, int64_t K, int64_t K32, const uint16_t *xb, const float *x,
    float *y, int64_t ldy, const int R, const int B) {
    __m512 acc[ROWS_BF][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
        __m512bh wv[ROWS_BF];
        for (int r = 0; r < R; r++) wv[r] = widen_bf16(q + r * K + k);
        for (int b = 0; b < B; b++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + b * K32 + k));
            for (int r = 0; r < R; r++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++)
            y[b * ldy + r] = (_mm512_reduce_add_ps(acc[r][b]) + tail(q + r * K, x + b * K, K32, K)) * scale[r];
}

#define RANGE_BF(B)                                                                               \
    case B: {                                                                                     \
        int64_t n = n0;                                                                           \
        for (; n + ROWS_BF_FOR(B) <= n1; n += ROWS_BF_FOR(B))                                     \
            block_bf16(q + n * K, scale + n, K, K32, xb, x, y + n, ldy, ROWS_BF_FOR(B), B);       \
        for (; n < n1; n++) block_bf16(q + n * K, scale + n, K, K32, xb, x, y + n, ldy, 1, B);    \
        break;                                                                                    \
    }

/* Rows n0 <= n < n1 by 2 <= B <= 8 input rows with the bf16 dot product; xb as for block_bf16. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void range_bf16(const int8_t *q, const float *scale, const uint16_t *xb, const float *x, float *y,
                       int64_t ldy, int64_t K, int B, int64_t n0, int64_t n1) {
    const int64_t K32 = K - K % 32;
    switch (B) {
        RANGE_BF(2) RANGE_BF(3) RANGE_BF(4) RANGE_BF(5) RANGE_BF(6) RANGE_BF(7) RANGE_BF(8)
    }
}

/* x [B, K] float32 -> xb [B, K32] bf16 (rounded to nearest even: exact for bf16 values). */
static void to_bf16(const float *x, uint16_t *xb, int B, int64_t K) {
    const int64_t K32 = K - K % 32;
    for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < K32; k++) xb[b * K32 + k] = narrow(x[b * K + k]);
}

/* Every row of q in blocks of ROWS_BF split over `threads` threads. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void run_bf16(const int8_t *q, const float *scale, const uint16_t *xb, const float *x, float *y, int64_t N,
                     int64_t K, int B, int threads) {
    const int64_t R = ROWS_BF_FOR(B), blocks = (N + R - 1) / R;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t i = 0; i < blocks; i++) {
        const int64_t n0 = i * R, n1 = n0 + R < N ? n0 + R : N;
        range_bf16(q, scale, xb, x, y, N, K, B, n0, n1);
    }
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
 * torch's .to(bfloat16)). variant: 1 = AVX2, 2 = AVX-512, 3 = AVX512-BF16 (two bf16 rows and more:
 * block_bf16; one row, or float32 rows: the AVX-512 loop), each refused where the CPU lacks it.
 * Returns 0, or -1 for bad arguments or a failed allocation (y is then untouched).
 */
int llama_int8_matvec(const int8_t *q, const float *scale, const void *x, void *y, int64_t N, int64_t K, int B,
                      int bf16_io, int variant, int threads) {
    if (B < 1 || B > MAX_ROWS || threads < 1 || variant < 1 || variant > 3) return -1;
    if ((variant == 2 && !has_avx512()) || (variant == 3 && !has_avx512_bf16())) return -1;
    const int64_t K32 = K - K % 32;
    /* One scratch block: x in float32 [B, K] (when bf16), y in float32 [B, N] (when bf16), x in
     * int16 [B, K32] and its steps [B, K32 / 32] (or x in bf16 [B, K32] where the steps would be). */
    const size_t nf = bf16_io ? (size_t)(B * K + B * N) : 0;
    float *scratch = malloc(sizeof(float) * (nf + (size_t)(B * (K32 / 32))) + sizeof(int16_t) * (size_t)(B * K32));
    if (!scratch) return -1;
    float *xf = scratch, *yf = bf16_io ? scratch + B * K : (float *)y, *step = scratch + nf;
    int16_t *xi = (int16_t *)(step + B * (K32 / 32));
    if (bf16_io)
        for (int64_t i = 0; i < B * K; i++) xf[i] = widen(((const uint16_t *)x)[i]);
    const float *xin = bf16_io ? xf : (const float *)x;
    if (variant == 3 && B > 1 && bf16_io) { /* float32 rows keep the int16 loop: bf16 would round them */
        to_bf16(xin, (uint16_t *)step, B, K);
        run_bf16(q, scale, (const uint16_t *)step, xin, yf, N, K, B, threads);
    } else {
        quantize_x(xin, xi, step, B, K, K32);
        if (variant >= 2)
            run_avx512(q, scale, xi, step, xin, yf, N, K, B, threads);
        else
            run_avx2(q, scale, xi, step, xin, yf, N, K, B, threads);
    }
    if (bf16_io)
        for (int64_t i = 0; i < B * N; i++) ((uint16_t *)y)[i] = narrow(yf[i]);
    free(scratch);
    return 0;
}

/* 1 when this CPU has the instructions of variant 3 (llama/native.py asks before offering it). */
int llama_int8_has_avx512_bf16(void) { return has_avx512_bf16(); }

/* ---- For decode_layer.c (kernels.h): the same loops, called by each thread of its region. ---- */

/* The loop llama_int8_prepare / llama_int8_matvec_range use: 1 (AVX2), 2 (AVX-512) or 3
 * (AVX512-BF16), set by llama/native.py to the variant of the unfused products, so that both paths
 * give the same bits. */
static int range_variant = 1;

int llama_int8_set_range_variant(int variant) {
    if (variant == 3 ? !has_avx512_bf16() : variant == 2 ? !has_avx512() : variant != 1) return -1;
    range_variant = variant;
    return 0;
}

/* range_avx512 in a function of its own target (it cannot be inlined into a plain AVX2 one). */
__attribute__((target("avx512f,avx512bw")))
static void range512_call(const int8_t *q, const float *scale, const int16_t *xi, const float *step, const float *x,
                          float *y, int64_t ldy, int64_t K, int B, int64_t n0, int64_t n1) {
    range_avx512(q, scale, xi, step, x, y, ldy, K, B, n0, n1);
}

/* Where llama_int8_prepare puts x's int16 blocks: after the B * (K32 / 32) steps. (The bf16 loop's
 * x [B, K32] starts at `prepared` itself, and is no longer than the steps and blocks together.) */
static int16_t *prepared_xi(const float *prepared, int B, int64_t K) {
    return (int16_t *)(prepared + B * ((K - K % 32) / 32));
}

void llama_int8_prepare(const float *x, float *prepared, int B, int64_t K) {
    if (range_variant == 3 && B > 1) {
        to_bf16(x, (uint16_t *)prepared, B, K);
        return;
    }
    quantize_x(x, prepared_xi(prepared, B, K), prepared, B, K, K - K % 32);
}

void llama_int8_matvec_range(const int8_t *q, const float *scale, int64_t K, const float *prepared, const float *x,
                             float *y, int64_t ldy, int64_t n0, int64_t n1, int B) {
    if (range_variant == 3 && B > 1)
        range_bf16(q, scale, (const uint16_t *)prepared, x, y, ldy, K, B, n0, n1);
    else if (range_variant >= 2)
        range512_call(q, scale, prepared_xi(prepared, B, K), prepared, x, y, ldy, K, B, n0, n1);
    else
        range_avx2(q, scale, prepared_xi(prepared, B, K), prepared, x, y, ldy, K, B, n0, n1);
}
