/*
 * y = x @ w.T for bf16 weights w [N, K] and a few rows x [B, K] (B <= 8, float32 or bf16), on x86
 * CPUs with AVX2 + FMA (an AVX-512 loop too). Compiled on first use by llama/native.py; see its docstring.
 *
 * Why: decoding one token reads every weight once, so it runs at the speed the weights stream from
 * memory. torch's bf16 matrix-vector kernel widens bf16 to float32 at ~55% of the machine's read
 * bandwidth on AVX2; this loop keeps up with it.
 *
 * How: a bf16 value is the top half of a float32, so widening is placing the 16 bits above 16 zero
 * bits. One 256-bit load holds 16 weights; interleaving them with zeros (unpacklo/unpackhi_epi16)
 * gives two vectors of 8 float32: elements 0-3,8-11 and 4-7,12-15 (AVX2 unpacks within 128-bit
 * lanes). x is permuted once per call into the same order, so each pair of FMAs lines up.
 * Accumulation is float32, as in torch's kernel; only the summation order differs.
 *
 * AVX-512 (`variant` 2, llama/native.py's LLAMA_BF16_KERNEL): one 512-bit load holds 32 weights; as
 * 16 32-bit lanes, lane i holds weight 2i in its low half and 2i+1 in its high half, so a left
 * shift by 16 gives the even weights as float32 and clearing the low halves the odd ones: two
 * instructions per 32 weights and no shuffle. x is split once per call into its even and odd
 * elements per 32-block to match. With 32 registers, up to 8 input rows run in one pass.
 *
 * Threads: OpenMP over blocks of weight rows, with the thread count the caller passes (torch's);
 * each output is summed by one thread, so the result does not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "kernels.h"

#define MAX_ROWS 8 /* rows of x per call */
#define PREFETCH_AHEAD 64 /* elements past the matching position in the next block: two cache lines */

/*
 * y[b * ldy + r] = sum_k w[r * K + k] * x[b][k] for R weight rows and B input rows; xp holds x
 * permuted per 16-element block ([B][K16]), x the plain rows for the tail K16..K-1. R and B are
 * compile-time constants at every call site, so the loops unroll and the accumulators stay in the
 * 16 ymm registers: with B <= 2, two accumulators per (row, input) pair (R * B * 2 <= 8) keep two
 * independent FMA chains and x stays in registers; with 3 or 4 inputs, one per pair (R * B <= 8),
 * the R widened weight rows stay in registers and x is loaded once per input row (two weight rows
 * per block: 1.2-1.3x faster than one, benchmarks/README.md). More inputs go through `rows`.
 */
static inline __attribute__((always_inline)) void block(
    const uint16_t *w, int64_t K, int64_t K16, const float *xp, const float *x, void *y, int64_t ldy,
    int bf16_out, const int R, const int B) {
    const int split = B <= 2;
    __m256 lo[4][MAX_ROWS], hi[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) lo[r][b] = hi[r][b] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t k = 0; k < K16; k += 16) {
        /* The hardware prefetcher stops at each 4 KiB page (a 2048-wide bf16 row is one page), so
         * ask for the same place in the next block's rows now: 5-15% faster on weights mmapped
         * from a checkpoint. Prefetching past the end of w is harmless (no fault). */
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (R + r) * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        if (split) {  /* x for this k in registers, each weight row widened in turn */
            __m256 xl[2], xh[2];
            for (int b = 0; b < B; b++) {
                xl[b] = _mm256_loadu_ps(xp + b * K16 + k);
                xh[b] = _mm256_loadu_ps(xp + b * K16 + k + 8);
            }
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
                __m256 wl = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
                __m256 wh = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
                for (int b = 0; b < B; b++) {
                    lo[r][b] = _mm256_fmadd_ps(wl, xl[b], lo[r][b]);
                    hi[r][b] = _mm256_fmadd_ps(wh, xh[b], hi[r][b]);
                }
            }
        } else {  /* every weight row widened into registers, then each input row's x loaded once */
            __m256 wl[2], wh[2];
            for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
                wl[r] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
                wh[r] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
            }
            for (int b = 0; b < B; b++) {
                const __m256 xl = _mm256_loadu_ps(xp + b * K16 + k), xh = _mm256_loadu_ps(xp + b * K16 + k + 8);
                for (int r = 0; r < R; r++) lo[r][b] = _mm256_fmadd_ps(wh[r], xh, _mm256_fmadd_ps(wl[r], xl, lo[r][b]));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            float s = hsum(_mm256_add_ps(lo[r][b], hi[r][b]));
            for (int64_t k = K16; k < K; k++) s += widen(w[r * K + k]) * x[b * K + k];
            if (bf16_out)
                ((uint16_t *)y)[b * ldy + r] = narrow(s);
            else
                ((float *)y)[b * ldy + r] = s;
        }
}

/* Rows of w per block: 4 for one input row (8 accumulators), 2 for up to 8 (in two halves). */
#define ROWS_FOR(B) ((B) == 1 ? 4 : 2)

/* R weight rows against B input rows; beyond 4 inputs, in two halves of up to 4: the second half
 * reads the block's weights again from cache (R rows of K bf16: 8 KiB at K = 2048). */
static inline __attribute__((always_inline)) void rows(
    const uint16_t *w, int64_t K, int64_t K16, const float *xp, const float *x, char *y, int64_t ldy,
    size_t ysize, int bf16_out, const int R, const int B) {
    if (B <= 4) {
        block(w, K, K16, xp, x, y, ldy, bf16_out, R, B);
    } else {
        block(w, K, K16, xp, x, y, ldy, bf16_out, R, 4);
        block(w, K, K16, xp + 4 * K16, x + 4 * K, y + 4 * ldy * ysize, ldy, bf16_out, R, B - 4);
    }
}

/*
 * One weight row by one input row (decoding one token), read front to back: one sequential stream
 * per thread, which the hardware prefetcher follows at the machine's full read bandwidth, where
 * four rows read side by side are four streams that each stop at a 4 KiB page. Eight accumulators
 * (64 weights a step) keep eight independent FMA chains. Used when x fits in half of a 32 KiB L1
 * data cache (ROW1_FITS): each weight is multiplied by an x loaded from L1, so a longer x, spilling
 * to L2, is better shared by four rows at a time (`block`). Measured on Zen 4, 2 threads, 1 GB of
 * weights (benchmarks/README.md): K = 2048: 34 GB/s against 27 for `block` (a read-only loop: 33-36);
 * K = 8192: 23 against 31. The choice depends on K alone, so every row of a matrix is summed in the
 * same order whichever thread or range computes it (the fused step's bits equal the plain path's).
 */
#define ROW1_FITS(K, xbytes) ((K) * (int64_t)(xbytes) <= 16384)

static inline __attribute__((always_inline)) void row1(const uint16_t *w, int64_t K, int64_t K16, const float *xp,
                                                        const float *x, void *y, int bf16_out) {
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 64 <= K16; k += 64)
        for (int j = 0; j < 4; j++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k + 16 * j));
            acc[2 * j] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_loadu_ps(xp + k + 16 * j), acc[2 * j]);
            acc[2 * j + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), _mm256_loadu_ps(xp + k + 16 * j + 8), acc[2 * j + 1]);
        }
    for (; k < K16; k += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + k));
        acc[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), _mm256_loadu_ps(xp + k), acc[0]);
        acc[1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), _mm256_loadu_ps(xp + k + 8), acc[1]);
    }
    const __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])),
                                   _mm256_add_ps(_mm256_add_ps(acc[4], acc[5]), _mm256_add_ps(acc[6], acc[7])));
    float sum = hsum(s);
    for (k = K16; k < K; k++) sum += widen(w[k]) * x[k];
    if (bf16_out)
        *(uint16_t *)y = narrow(sum);
    else
        *(float *)y = sum;
}

#define DISPATCH(B)                                                                              \
    case B: {                                                                                    \
        if (B == 1 && ROW1_FITS(K, sizeof(float))) {                                             \
            _Pragma("omp parallel for num_threads(threads) schedule(static)")                    \
            for (int64_t n = 0; n < N; n++) row1(w + n * K, K, K16, xp, xf, (char *)y + n * ysize, bf16_io); \
            break;                                                                               \
        }                                                                                        \
        const int64_t R = ROWS_FOR(B), blocks = N / R;                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
        for (int64_t i = 0; i < blocks; i++)                                                     \
            rows(w + i * R * K, K, K16, xp, xf, (char *)y + i * R * ysize, N, ysize, bf16_io, ROWS_FOR(B), B); \
        for (int64_t n = blocks * R; n < N; n++)                                                 \
            rows(w + n * K, K, K16, xp, xf, (char *)y + n * ysize, N, ysize, bf16_io, 1, B);    \
        break;                                                                                   \
    }

/* A 512-bit loop's sum s of weights w[0..K32) (one row) by x, plus the scalar tail K32..K-1, stored
 * as y[i] in float32 or rounded to bf16. */
static inline __attribute__((always_inline)) void finish(float s, const uint16_t *w, int64_t K32, int64_t K,
                                                          const float *x, void *y, int64_t i, int bf16_out) {
    for (int64_t k = K32; k < K; k++) s += widen(w[k]) * x[k];
    if (bf16_out)
        ((uint16_t *)y)[i] = narrow(s);
    else
        ((float *)y)[i] = s;
}

/*
 * The AVX-512 form of `block`: 32 weights per step, B <= 8 input rows in one pass. xp holds x split
 * per 32-element block into its 16 even then 16 odd elements ([B][K32]), x the plain rows for the
 * tail K32..K-1. With B <= 2, two accumulators per (row, input) pair (even and odd products:
 * independent FMA chains); with more, one per pair (R * B <= 16 of the 32 registers).
 */
__attribute__((target("avx512f,avx512bw")))
static inline __attribute__((always_inline)) void block512(
    const uint16_t *w, int64_t K, int64_t K32, const float *xp, const float *x, void *y, int64_t ldy,
    int bf16_out, const int R, const int B) {
    const int split = B <= 2;
    __m512 ev[4][MAX_ROWS], od[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) ev[r][b] = od[r][b] = _mm512_setzero_ps();
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t k = 0; k < K32; k += 32) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (R + r) * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        __m512 we[4], wo[4];
        for (int r = 0; r < R; r++) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + r * K + k));
            we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));  /* weights k, k+2, ..., k+30 */
            wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, high)); /* weights k+1, k+3, ..., k+31 */
        }
        for (int b = 0; b < B; b++) {
            const __m512 xe = _mm512_loadu_ps(xp + b * K32 + k), xo = _mm512_loadu_ps(xp + b * K32 + k + 16);
            for (int r = 0; r < R; r++) {
                if (split) {
                    ev[r][b] = _mm512_fmadd_ps(we[r], xe, ev[r][b]);
                    od[r][b] = _mm512_fmadd_ps(wo[r], xo, od[r][b]);
                } else {
                    ev[r][b] = _mm512_fmadd_ps(wo[r], xo, _mm512_fmadd_ps(we[r], xe, ev[r][b]));
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) {
            const float s = _mm512_reduce_add_ps(split ? _mm512_add_ps(ev[r][b], od[r][b]) : ev[r][b]);
            finish(s, w + r * K, K32, K, x + b * K, y, b * ldy + r, bf16_out);
        }
}

/* `row1` in 512 bits (xp as for `block512`): four chains, 64 weights a step; y[i] is the output. */
__attribute__((target("avx512f,avx512bw")))
static inline __attribute__((always_inline)) void row1_512(const uint16_t *w, int64_t K, int64_t K32, const float *xp,
                                                            const float *x, void *y, int64_t i, int bf16_out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    int64_t k = 0;
    for (; k + 64 <= K32; k += 64)
        for (int j = 0; j < 2; j++) {
            const __m512i v = _mm512_loadu_si512((const void *)(w + k + 32 * j));
            acc[2 * j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xp + k + 32 * j), acc[2 * j]);
            acc[2 * j + 1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_loadu_ps(xp + k + 32 * j + 16), acc[2 * j + 1]);
        }
    for (; k < K32; k += 32) {
        const __m512i v = _mm512_loadu_si512((const void *)(w + k));
        acc[0] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xp + k), acc[0]);
        acc[1] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, high)), _mm512_loadu_ps(xp + k + 16), acc[1]);
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    finish(_mm512_reduce_add_ps(s), w, K32, K, x, y, i, bf16_out);
}

/* All N rows by a 512-bit loop BLOCK (block512 or block512bf) reading the prepared inputs XS, one
 * input row by its one-row loop ROW1 where x (XBYTES an element) fits in L1 (ROW1_FITS). */
#define DISPATCH_512(BLOCK, ROW1, XS, XBYTES, B)                                                 \
    case B: {                                                                                    \
        if (B == 1 && ROW1_FITS(K, XBYTES)) {                                                    \
            _Pragma("omp parallel for num_threads(threads) schedule(static)")                    \
            for (int64_t n = 0; n < N; n++) ROW1(w + n * K, K, K32, XS, xf, y, n, bf16_io);     \
            break;                                                                               \
        }                                                                                        \
        const int64_t R = ROWS_FOR(B), blocks = N / R;                                           \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
        for (int64_t i = 0; i < blocks; i++)                                                     \
            BLOCK(w + i * R * K, K, K32, XS, xf, (char *)y + i * R * ysize, N, bf16_io, ROWS_FOR(B), B); \
        for (int64_t n = blocks * R; n < N; n++)                                                 \
            BLOCK(w + n * K, K, K32, XS, xf, (char *)y + n * ysize, N, bf16_io, 1, B);          \
        break;                                                                                   \
    }
#define DISPATCH512(B) DISPATCH_512(block512, row1_512, xp, sizeof(float), B)
#define DISPATCH512BF(B) DISPATCH_512(block512bf, row1_512bf, xb, sizeof(uint16_t), B)

/*
 * The AVX512-BF16 form: the CPU's bf16 dot product (vdpbf16ps) multiplies 32 weights by 32 bf16
 * inputs and adds each adjacent pair's products into one of 16 float32 sums, in one instruction
 * where `block512` needs a shift, a mask and two FMAs. The inputs must be bf16: xb holds x rounded
 * to bf16 ([B][K], exact for a bf16 model, whose activations are bf16 already), x the float32 rows
 * for the tail K32..K-1. The products of two bf16 numbers are exact in float32; the instruction
 * treats bf16 denormals (below 1.2e-38) as zero, which changes nothing a model computes.
 */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __attribute__((always_inline)) void block512bf(
    const uint16_t *w, int64_t K, int64_t K32, const uint16_t *xb, const float *x, void *y, int64_t ldy,
    int bf16_out, const int R, const int B) {
    __m512 acc[4][MAX_ROWS];
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) {
        for (int r = 0; r < R; r++) _mm_prefetch((const char *)(w + (R + r) * K + k + PREFETCH_AHEAD), _MM_HINT_T0);
        __m512bh wv[4];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512((const void *)(w + r * K + k));
        for (int b = 0; b < B; b++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xb + b * K + k));
            for (int r = 0; r < R; r++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], wv[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) finish(_mm512_reduce_add_ps(acc[r][b]), w + r * K, K32, K, x + b * K, y, b * ldy + r, bf16_out);
}

/* `row1` with vdpbf16ps (xb as for `block512bf`): four chains, 128 weights a step. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static inline __attribute__((always_inline)) void row1_512bf(const uint16_t *w, int64_t K, int64_t K32,
                                                              const uint16_t *xb, const float *x, void *y, int64_t i,
                                                              int bf16_out) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0;
    for (; k + 128 <= K32; k += 128)
        for (int j = 0; j < 4; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512((const void *)(w + k + 32 * j)),
                                      (__m512bh)_mm512_loadu_si512((const void *)(xb + k + 32 * j)));
    for (; k < K32; k += 32)
        acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                                  (__m512bh)_mm512_loadu_si512((const void *)(xb + k)));
    const __m512 s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    finish(_mm512_reduce_add_ps(s), w, K32, K, x, y, i, bf16_out);
}

/* x rounded to bf16 ([B][K]) for `block512bf`, and all rows run. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void run_avx512bf(const uint16_t *w, const float *xf, uint16_t *xb, void *y, int64_t N, int64_t K, int B,
                         int bf16_io, int threads) {
    const int64_t K32 = K - K % 32;
    const size_t ysize = bf16_io ? sizeof(uint16_t) : sizeof(float);
    for (int64_t i = 0; i < B * K; i++) xb[i] = narrow(xf[i]);
    switch (B) {
        DISPATCH512BF(1) DISPATCH512BF(2) DISPATCH512BF(3) DISPATCH512BF(4)
        DISPATCH512BF(5) DISPATCH512BF(6) DISPATCH512BF(7) DISPATCH512BF(8)
    }
}

/* x [B, K] -> xp [B, K16], permuted per 16-block for `block` (elements 0-3, 8-11, 4-7, 12-15). */
static void permute16(const float *x, float *xp, int B, int64_t K) {
    const int64_t K16 = K - K % 16;
    for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < K16; k += 16) {
            const float *src = x + b * K + k;
            float *dst = xp + b * K16 + k;
            memcpy(dst, src, 4 * sizeof(float));           /* 0-3   */
            memcpy(dst + 4, src + 8, 4 * sizeof(float));   /* 8-11  */
            memcpy(dst + 8, src + 4, 4 * sizeof(float));   /* 4-7   */
            memcpy(dst + 12, src + 12, 4 * sizeof(float)); /* 12-15 */
        }
}

/* x permuted for `block`, and all rows run. */
static void run_avx2(const uint16_t *w, const float *xf, float *xp, void *y, int64_t N, int64_t K, int B,
                     int bf16_io, int threads) {
    const int64_t K16 = K - K % 16;
    const size_t ysize = bf16_io ? sizeof(uint16_t) : sizeof(float);
    permute16(xf, xp, B, K);
    switch (B) {
        DISPATCH(1) DISPATCH(2) DISPATCH(3) DISPATCH(4) DISPATCH(5) DISPATCH(6) DISPATCH(7) DISPATCH(8)
    }
}

/* x split per 32-block into even then odd elements for `block512`, and all rows run. */
__attribute__((target("avx512f,avx512bw")))
static void run_avx512(const uint16_t *w, const float *xf, float *xp, void *y, int64_t N, int64_t K, int B,
                       int bf16_io, int threads) {
    const int64_t K32 = K - K % 32;
    const size_t ysize = bf16_io ? sizeof(uint16_t) : sizeof(float);
    for (int b = 0; b < B; b++)
        for (int64_t k = 0; k < K32; k += 32)
            for (int j = 0; j < 16; j++) {
                xp[b * K32 + k + j] = xf[b * K + k + 2 * j];
                xp[b * K32 + k + 16 + j] = xf[b * K + k + 2 * j + 1];
            }
    switch (B) {
        DISPATCH512(1) DISPATCH512(2) DISPATCH512(3) DISPATCH512(4)
        DISPATCH512(5) DISPATCH512(6) DISPATCH512(7) DISPATCH512(8)
    }
}

/* ONE_ROW_AVX2: variant 3 multiplies one input row with the AVX2 loop where its float32 x fits in
 * L1 beside the stream (ROW1_FITS: K <= 4096). There one row is memory-bound in every loop
 * (measured on Zen 4: vdpbf16ps's one-row loop 0-13% slower than AVX2's on 2048-wide rows). Longer
 * rows (a feed-forward's w2) read 42-43 GB/s in AVX2's four-row blocks and 52-59 in vdpbf16ps's
 * one-row loop (x as bf16: 16 KiB, no widening) where a read-only loop reads 60-64; and from two
 * rows on the bf16 dot product wins everywhere (8 rows 1.5x). benchmarks/README.md. */
#define USES_DPBF16(B, K) ((B) > 1 || !ROW1_FITS(K, sizeof(float)))

/*
 * w: bf16 bits [N, K] row-major; x: [B, K] and y: [B, N], both float32 (bf16_io = 0) or both bf16
 * (bf16_io = 1: x widened on entry, each float32 sum rounded like torch's .to(bfloat16)).
 * variant: 1 = AVX2, 2 = AVX-512, 3 = AVX512-BF16 (x rounded to bf16; refused where the CPU lacks it).
 * Returns 0, or -1 for bad arguments or a failed allocation (y is then untouched).
 */
int llama_bf16_matvec_variant(const uint16_t *w, const void *x, void *y, int64_t N, int64_t K, int B, int bf16_io,
                              int variant, int threads) {
    if (B < 1 || B > MAX_ROWS || threads < 1 || variant < 1 || variant > 3) return -1;
    if ((variant == 2 && !has_avx512()) || (variant == 3 && !has_avx512_bf16())) return -1;
    /* xf: x as float32 [B, K] (the tails read it); xp: x permuted per block, [B, K16] at most. */
    float *xf = malloc(sizeof(float) * (size_t)(B * (2 * K)));
    if (!xf) return -1;
    float *xp = xf + B * K;
    for (int64_t i = 0; i < B * K; i++) xf[i] = bf16_io ? widen(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    if (variant == 3 && USES_DPBF16(B, K)) /* else the AVX2 loop (ONE_ROW_AVX2) */
        run_avx512bf(w, xf, (uint16_t *)xp, y, N, K, B, bf16_io, threads);
    else if (variant == 2)
        run_avx512(w, xf, xp, y, N, K, B, bf16_io, threads);
    else
        run_avx2(w, xf, xp, y, N, K, B, bf16_io, threads);
    free(xf);
    return 0;
}

/* 1 when this CPU has the instructions of variant 3 (llama/native.py asks before offering it). */
int llama_bf16_has_avx512_bf16(void) { return has_avx512_bf16(); }

/* The AVX2 loop (the C entry point other kernels may call). */
int llama_bf16_matvec(const uint16_t *w, const void *x, void *y, int64_t N, int64_t K, int B, int bf16_io, int threads) {
    return llama_bf16_matvec_variant(w, x, y, N, K, B, bf16_io, 1, threads);
}

/* ---- For decode_layer.c (kernels.h): the same loops, called by each thread of its region. ---- */

/* The loop llama_bf16_permute / llama_bf16_matvec_range use: 1 (AVX2) or 3 (AVX512-BF16), set by
 * llama/native.py to the variant chosen for the unfused products, so both paths give the same bits. */
static int range_variant = 1;

int llama_bf16_set_range_variant(int variant) {
    if (variant == 3 ? !has_avx512_bf16() : variant != 1) return -1;
    range_variant = variant;
    return 0;
}

void llama_bf16_permute(const float *x, float *xp, int B, int64_t K) {
    if (range_variant == 3 && USES_DPBF16(B, K)) { /* x rounded to bf16, [B][K] (exact for the bf16 values the model passes) */
        for (int64_t i = 0; i < B * K; i++) ((uint16_t *)xp)[i] = narrow(x[i]);
        return;
    }
    permute16(x, xp, B, K);
}

/* Blocks of ROWS_FOR(B) rows from n0, then single rows up to n1; float32 output. */
#define RANGE(B)                                                                                  \
    case B: {                                                                                     \
        if (B == 1 && ROW1_FITS(K, sizeof(float))) {                                              \
            for (int64_t n = n0; n < n1; n++) row1(w + n * K, K, K16, xp, x, y + n, 0);           \
            break;                                                                                \
        }                                                                                         \
        const int64_t R = ROWS_FOR(B), end = n0 + (n1 - n0) / R * R;                              \
        int64_t n = n0;                                                                           \
        for (; n < end; n += R)                                                                   \
            rows(w + n * K, K, K16, xp, x, (char *)(y + n), ldy, sizeof(float), 0, ROWS_FOR(B), B); \
        for (; n < n1; n++) rows(w + n * K, K, K16, xp, x, (char *)(y + n), ldy, sizeof(float), 0, 1, B); \
        break;                                                                                    \
    }

#define RANGE512BF(B)                                                                             \
    case B: {                                                                                     \
        if (B == 1 && ROW1_FITS(K, sizeof(uint16_t))) {                                           \
            for (int64_t n = n0; n < n1; n++) row1_512bf(w + n * K, K, K32, xb, x, y, n, 0);      \
            break;                                                                                \
        }                                                                                         \
        const int64_t R = ROWS_FOR(B), end = n0 + (n1 - n0) / R * R;                              \
        int64_t n = n0;                                                                           \
        for (; n < end; n += R) block512bf(w + n * K, K, K32, xb, x, y + n, ldy, 0, ROWS_FOR(B), B); \
        for (; n < n1; n++) block512bf(w + n * K, K, K32, xb, x, y + n, ldy, 0, 1, B);            \
        break;                                                                                    \
    }

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void range512bf(const uint16_t *w, int64_t K, const uint16_t *xb, const float *x, float *y, int64_t ldy,
                       int64_t n0, int64_t n1, int B) {
    const int64_t K32 = K - K % 32;
    switch (B) {
        RANGE512BF(1) RANGE512BF(2) RANGE512BF(3) RANGE512BF(4)
        RANGE512BF(5) RANGE512BF(6) RANGE512BF(7) RANGE512BF(8)
    }
}

void llama_bf16_matvec_range(const uint16_t *w, int64_t K, const float *xp, const float *x, float *y, int64_t ldy,
                             int64_t n0, int64_t n1, int B) {
    if (range_variant == 3 && USES_DPBF16(B, K)) { /* else the AVX2 loop (ONE_ROW_AVX2) */
        range512bf(w, K, (const uint16_t *)xp, x, y, ldy, n0, n1, B);
        return;
    }
    const int64_t K16 = K - K % 16;
    switch (B) {
        RANGE(1) RANGE(2) RANGE(3) RANGE(4) RANGE(5) RANGE(6) RANGE(7) RANGE(8)
    }
}
