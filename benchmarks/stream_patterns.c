/*
 * How fast two cores stream weights through a matrix-vector product, by access pattern: the
 * measurements behind the one-row loops of llama/csrc/bf16_matvec.c and int8_matvec.c
 * (benchmarks/README.md, "One stream per thread"). Standalone C, no torch:
 *
 *     gcc -O3 -mavx2 -mfma -fopenmp -DK=2048 benchmarks/stream_patterns.c -o /tmp/sp && OMP_NUM_THREADS=2 /tmp/sp 1024
 *
 * K (compile time, default 2048) is the row length; the argument is MiB of weights (default
 * 1024: far more than any cache), held in 2 MiB pages (MADV_HUGEPAGE) as llama/hugepages.py holds
 * a model's. Prints the CPU model and GB/s of weight bytes for each pattern, best of 6.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#ifndef K
#define K 2048
#endif
#ifndef PF
#define PF 1024 /* bytes ahead that the software-prefetch patterns ask for */
#endif

static float x[K];    /* the input row, float32 */
static uint16_t xb[K]; /* the same as bf16 */
static int16_t xi[K]; /* the same rounded to int16 (one step per 32: unused here, the cost is the same) */
static float xs[K / 32];
static float y[1 << 22];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* bf16 weights widened by unpacking with zeros (x in the matching order: irrelevant for speed). */
#define WLO(v) _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v))
#define WHI(v) _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v))

/* Four rows side by side, optionally prefetching the next four rows' matching place. */
static void bf16_four_rows(const void *wv, int64_t N, int prefetch) {
    const uint16_t *w = wv;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N / 4; i++) {
        const uint16_t *r0 = w + i * 4 * K;
        __m256 lo[4], hi[4];
        for (int r = 0; r < 4; r++) lo[r] = hi[r] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            if (prefetch)
                for (int r = 0; r < 4; r++) _mm_prefetch((const char *)(r0 + (4 + r) * K + k + 64), _MM_HINT_T0);
            const __m256 xl = _mm256_loadu_ps(x + k), xh = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < 4; r++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(r0 + r * K + k));
                lo[r] = _mm256_fmadd_ps(WLO(v), xl, lo[r]);
                hi[r] = _mm256_fmadd_ps(WHI(v), xh, hi[r]);
            }
        }
        for (int r = 0; r < 4; r++) y[i * 4 + r] = hsum(_mm256_add_ps(lo[r], hi[r]));
    }
}
static void bf16_four_rows_prefetch(const void *w, int64_t N) { bf16_four_rows(w, N, 1); }
static void bf16_four_rows_plain(const void *w, int64_t N) { bf16_four_rows(w, N, 0); }

/*
 * One row front to back, eight accumulators (the patterns below are its instances): x float32
 * (XBF16 0), or held as bf16 (16 KiB at K = 8192: half an L1) and widened in registers like the
 * weights, by unpacks (1) or by a shift for the even and a mask for the odd element of each 32-bit
 * lane (2: no shuffles); the weights asked for PF bytes ahead (PREFETCH 1: prefetchnta, lines that
 * leave L1 first; 2: into L2) or not (0).
 */
#define EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
#define ODD(v) _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000)))
static inline __attribute__((always_inline)) void one_row(const uint16_t *w, int64_t N, const int XBF16, const int PREFETCH) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *r = w + n * K;
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 64) {
            if (PREFETCH == 1) { /* the hint must be a literal (OpenMP outlines the loop) */
                _mm_prefetch((const char *)(r + k) + PF, _MM_HINT_NTA);
                _mm_prefetch((const char *)(r + k) + PF + 64, _MM_HINT_NTA);
            } else if (PREFETCH == 2) {
                _mm_prefetch((const char *)(r + k) + PF, _MM_HINT_T1);
                _mm_prefetch((const char *)(r + k) + PF + 64, _MM_HINT_T1);
            }
            for (int j = 0; j < 4; j++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(r + k + 16 * j));
                __m256 w0 = WLO(v), w1 = WHI(v), x0, x1;
                if (XBF16) {
                    const __m256i u = _mm256_loadu_si256((const __m256i *)(xb + k + 16 * j));
                    if (XBF16 == 2) w0 = EVEN(v), w1 = ODD(v), x0 = EVEN(u), x1 = ODD(u);
                    else x0 = WLO(u), x1 = WHI(u);
                } else {
                    x0 = _mm256_loadu_ps(x + k + 16 * j), x1 = _mm256_loadu_ps(x + k + 16 * j + 8);
                }
                a[2 * j] = _mm256_fmadd_ps(w0, x0, a[2 * j]);
                a[2 * j + 1] = _mm256_fmadd_ps(w1, x1, a[2 * j + 1]);
            }
        }
        for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);
        y[n] = hsum(a[0]);
    }
}
static void bf16_one_row(const void *w, int64_t N) { one_row(w, N, 0, 0); }
static void bf16_one_row_xbf16(const void *w, int64_t N) { one_row(w, N, 1, 0); }
static void bf16_one_row_xbf16_shift(const void *w, int64_t N) { one_row(w, N, 2, 0); }
static void bf16_one_row_xbf16_nta(const void *w, int64_t N) { one_row(w, N, 1, 1); }
static void bf16_one_row_prefetch(const void *w, int64_t N) { one_row(w, N, 0, 2); }

/* x in bf16, one row, the CPU's bf16 dot product (AVX512-BF16: vdpbf16ps, 32 pairs an instruction,
 * no widening): where x as bf16 costs no shuffles. */
__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void bf16_one_row_dpbf16(const void *wv, int64_t N) {
    const uint16_t *w = wv;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *r = w + n * K;
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int k = 0; k < K; k += 128)
            for (int j = 0; j < 4; j++)
                a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)_mm512_loadu_si512((const void *)(r + k + 32 * j)),
                                        (__m512bh)_mm512_loadu_si512((const void *)(xb + k + 32 * j)));
        y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
}

/* Two rows side by side, x in bf16 widened once for both: half the x traffic of one row, two streams. */
static void bf16_two_rows_xbf16(const void *wv, int64_t N) {
    const uint16_t *w = wv;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < N / 2; i++) {
        const uint16_t *r = w + 2 * i * K;
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 32)
            for (int j = 0; j < 2; j++) {
                const __m256i u = _mm256_loadu_si256((const __m256i *)(xb + k + 16 * j));
                const __m256 ul = WLO(u), uh = WHI(u);
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(r + k + 16 * j));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(r + K + k + 16 * j));
                a[2 * j] = _mm256_fmadd_ps(WLO(v0), ul, a[2 * j]);
                a[2 * j + 1] = _mm256_fmadd_ps(WHI(v0), uh, a[2 * j + 1]);
                a[4 + 2 * j] = _mm256_fmadd_ps(WLO(v1), ul, a[4 + 2 * j]);
                a[5 + 2 * j] = _mm256_fmadd_ps(WHI(v1), uh, a[5 + 2 * j]);
            }
        y[2 * i] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
        y[2 * i + 1] = hsum(_mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])));
    }
}

/* One row front to back, x float32, in chunks of CHUNK columns: every row of the thread's share for
 * the first chunk (its x in L1), then the next chunk, partial sums in y. */
#define CHUNK 4096
#ifndef CHUNK_PF
#define CHUNK_PF 0 /* 1: prefetch the next row's chunk into L1, 2: into L2 */
#endif
static void bf16_one_row_chunks(const void *wv, int64_t N) {
    const uint16_t *w = wv;
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t n0 = N * t / T, n1 = N * (t + 1) / T;
        for (int c = 0; c < K; c += CHUNK) {
            const int len = K - c < CHUNK ? K - c : CHUNK;
            for (int64_t n = n0; n < n1; n++) {
                const uint16_t *r = w + n * K + c;
                const float *xc = x + c;
                __m256 a[8];
                for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
                for (int k = 0; k < len; k += 64) {
                    if (CHUNK_PF) { /* the same place in the next row's chunk: the stream's jump asked for early */
                        _mm_prefetch((const char *)(r + K + k), CHUNK_PF == 1 ? _MM_HINT_T0 : _MM_HINT_T1);
                        _mm_prefetch((const char *)(r + K + k + 32), CHUNK_PF == 1 ? _MM_HINT_T0 : _MM_HINT_T1);
                    }
                    for (int j = 0; j < 4; j++) {
                        const __m256i v = _mm256_loadu_si256((const __m256i *)(r + k + 16 * j));
                        a[2 * j] = _mm256_fmadd_ps(WLO(v), _mm256_loadu_ps(xc + k + 16 * j), a[2 * j]);
                        a[2 * j + 1] = _mm256_fmadd_ps(WHI(v), _mm256_loadu_ps(xc + k + 16 * j + 8), a[2 * j + 1]);
                    }
                }
                for (int j = 1; j < 8; j++) a[0] = _mm256_add_ps(a[0], a[j]);
                y[n] = (c ? y[n] : 0.0f) + hsum(a[0]);
            }
        }
    }
}

/* int8 widened to float32 (sign extend, convert, FMA): one row front to back. */
static void int8_float(const void *wv, int64_t N) {
    const int8_t *q = wv;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *r = q + n * K;
        __m256 a[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 32)
            for (int j = 0; j < 4; j++) {
                const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(r + k + 8 * j))));
                a[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + k + 8 * j), a[j]);
            }
        y[n] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    }
}

/* int8 by int16 x in integers (vpmaddwd), a float step per 32: one row front to back. */
static void int8_int16(const void *wv, int64_t N) {
    const int8_t *q = wv;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *r = q + n * K;
        __m256 f[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int k = 0; k < K; k += 64)
            for (int h = 0; h < 2; h++) { /* two blocks of 32, two chains (h a constant once unrolled) */
                const int8_t *p = r + k + 32 * h;
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
                const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
                const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(xi + k + 32 * h))),
                                                   _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xi + k + 32 * h + 16))));
                f[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(xs[k / 32 + h]), f[h]);
            }
        y[n] = hsum(_mm256_add_ps(f[0], f[1]));
    }
}

/* Only reading: the ceiling. */
static void read_only(const void *wv, int64_t bytes) {
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const __m256i *p = wv;
        const int64_t total = bytes / 32, s = total * t / T / 4 * 4, e = total * (t + 1) / T / 4 * 4;
        __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
        for (int64_t i = s; i < e; i += 4) {
            a = _mm256_add_epi32(a, _mm256_load_si256(p + i));
            b = _mm256_add_epi32(b, _mm256_load_si256(p + i + 1));
            c = _mm256_add_epi32(c, _mm256_load_si256(p + i + 2));
            d = _mm256_add_epi32(d, _mm256_load_si256(p + i + 3));
        }
        y[t] = (float)_mm256_extract_epi32(_mm256_add_epi32(_mm256_add_epi32(a, b), _mm256_add_epi32(c, d)), 0);
    }
}

int main(int argc, char **argv) {
    const int64_t bytes = (argc > 1 ? atol(argv[1]) : 1024) << 20;
    char *w = mmap(0, bytes + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (w == MAP_FAILED) return 1;
    w += -(uintptr_t)w % (2 << 20);
    madvise(w, bytes, MADV_HUGEPAGE);
    for (int64_t i = 0; i < bytes; i++) w[i] = (char)(i * 7 % 251 - 125); /* finite bf16 and int8 values */
    for (int k = 0; k < K; k++) x[k] = 1.0f / (k + 1), xi[k] = (int16_t)(k % 200 - 100), xb[k] = 0x3f80;
    for (int k = 0; k < K / 32; k++) xs[k] = 1e-3f;
    char model[128] = "?", line[256];
    FILE *f = fopen("/proc/cpuinfo", "r");
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "model name", 10)) { sscanf(strchr(line, ':') + 2, "%127[^\n]", model); break; }
    if (f) fclose(f);
    printf("%s, %d threads, K = %d, %lld MiB in huge pages\n", model, omp_get_max_threads(), K, (long long)(bytes >> 20));
    struct { const char *name; void (*fn)(const void *, int64_t); int64_t rows; } runs[] = {
        {"bf16, four rows side by side + prefetch", bf16_four_rows_prefetch, bytes / 2 / K},
        {"bf16, four rows side by side", bf16_four_rows_plain, bytes / 2 / K},
        {"bf16, one row front to back", bf16_one_row, bytes / 2 / K},
        {"bf16, one row, x in bf16", bf16_one_row_xbf16, bytes / 2 / K},
        {"bf16, one row, x in bf16, shift and mask", bf16_one_row_xbf16_shift, bytes / 2 / K},
        {"bf16, one row, x in bf16, prefetchnta", bf16_one_row_xbf16_nta, bytes / 2 / K},
        {"bf16, two rows, x in bf16", bf16_two_rows_xbf16, bytes / 2 / K},
        {"bf16, one row, x in bf16, vdpbf16ps", bf16_one_row_dpbf16, bytes / 2 / K},
        {"bf16, one row in chunks of 4096", bf16_one_row_chunks, bytes / 2 / K},
        {"bf16, one row + prefetch to L2", bf16_one_row_prefetch, bytes / 2 / K},
        {"int8 widened to float32, one row", int8_float, bytes / K},
        {"int8 x int16 (vpmaddwd), one row", int8_int16, bytes / K},
        {"read only", read_only, bytes},
    };
    const int n = sizeof runs / sizeof runs[0];
    double best[16];
    for (int i = 0; i < n; i++) best[i] = 1e9;
    for (int rep = 0; rep < 6; rep++) /* patterns in turn within each round: the same minute for all */
        for (int i = 0; i < n; i++) {
            const double t = now();
            if (runs[i].fn == bf16_one_row_dpbf16 && !__builtin_cpu_supports("avx512bf16")) continue;
            runs[i].fn(w, runs[i].rows);
            const double took = now() - t;
            if (took < best[i]) best[i] = took;
        }
    for (int i = 0; i < n; i++) /* a pattern this CPU cannot run was skipped */
        if (best[i] < 1e9) printf("| %-42s | %5.1f GB/s |\n", runs[i].name, bytes / best[i] / 1e9);
    float check = 0; /* the outputs are used: otherwise the compiler may drop the loops */
    for (int64_t i = 0; i < (int64_t)(sizeof y / sizeof y[0]); i++) check += y[i];
    printf("(checksum %g)\n", check);
    return 0;
}
