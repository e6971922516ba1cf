/*
 * One decode step of whole transformer blocks (llama.model.TransformerBlock) for B <= 8 rows at one
 * shared position, in one C call and one OpenMP team; compiled with the other kernels of this
 * folder by llama/native.py and used by llama/fused.py.
 *
 * Why: a small model's decode step is overhead-bound. The demo model (30 layers of dim 576) runs
 * ~40 torch operators a layer, each a few microseconds of Python and dispatch, and each matrix
 * product its own parallel region; its weights stream from memory in a fraction of that time.
 * Here a layer is 5 barriers of one parallel region, with no allocation (the caller's scratch); a
 * call runs any number of layers in order, and optionally the final norm and output product.
 *
 * What, per layer, as the plain model computes it (llama/model.py, with llama/fast.py's kernels):
 *     a = RMSNorm(x) -> q, k, v = a wq^T, a wk^T, a wv^T -> RoPE(q), RoPE(k) -> k, v into the
 *     cache at `pos` -> o = attention of q over positions 0 ... pos -> h = x + o wo^T
 *     -> f = RMSNorm(h) -> y = h + (silu(f w1^T) * f w3^T) w2^T
 * Arithmetic is float32, and every value is rounded to bf16 where the plain bf16 model rounds it
 * (each product's output, RoPE's output, the attention output, silu, the gate product, both
 * residual adds, the norm before and after its weight), so the result differs from the plain model
 * only by the order of float32 additions (and expf's last bit), which now and then moves a value
 * across a bf16 rounding boundary (tests/test_fused.py). The matrix products and the attention are
 * the loops of bf16_matvec.c and bf16_attention.c (kernels.h).
 *
 * int8 blocks (llama/quantize's Int8Linear: int8 weights, float32 row scales): a layer's seven
 * products may instead be int8, all of them (llama_layer.int8), and so may the head's output product
 * (its own scale pointer: keep_output=True leaves it bf16). They run the loops of int8_matvec.c,
 * their input rounded to int16 blocks once per product as the unfused kernel does per call, and each
 * output is rounded to bf16 as Int8Linear's bf16 output is: the same bits as the per-operator path.
 *
 * Threads: each product's weight rows are split into one contiguous range per thread (multiples of
 * 4 rows, so RoPE's pairs stay in one thread); the elementwise work that follows a product is done
 * by the thread that computed those outputs, so only 5 barriers a layer remain. Every output is
 * summed by one thread in a fixed order: results do not depend on the thread count.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"
#include "kernels.h"

#define MAX_ROWS 8 /* rows (sequences) per call, as the matvec loop's */

/* One layer's weights and cache, and the model's sizes (llama/fused.py fills it; ctypes mirrors it). */
typedef struct {
    const void *wq, *wk, *wv, *wo, *w1, *w2, *w3; /* bf16, or int8 (int8 = 1), [out, in], row-major */
    /* int8: each weight's float32 row scales [out] (llama/quantize: w ~ q * scale[:, None]); else NULL */
    const float *wq_scale, *wk_scale, *wv_scale, *wo_scale, *w1_scale, *w2_scale, *w3_scale;
    const uint16_t *attention_norm, *ffn_norm; /* bf16 [dim] */
    uint16_t *cache_k, *cache_v;               /* bf16 [max_batch, n_kv_heads, max_seq, head_dim] */
    int64_t dim, n_heads, n_kv_heads, head_dim, hidden, max_batch, max_seq;
    int64_t int8; /* 1: all seven products int8 with scales, 0: all bf16 (a block is one or the other) */
    float eps;
} llama_layer;

/* The model's final norm and output product, for a call that returns logits (llama/fused.py). */
typedef struct {
    const uint16_t *norm;       /* bf16 [dim] */
    const void *output;         /* bf16, or int8 (output_scale not NULL), [vocab, dim] */
    const float *output_scale;  /* int8: float32 [vocab] row scales; bf16: NULL */
    int64_t vocab;
    float eps;
} llama_head;

/* Where each buffer lives in the caller's float32 scratch. Shared by the team: the residual stream
 * (float32 holding bf16 values), q/k/v, the attention output, the FFN's two hidden rows and a
 * product's output; private to each thread: a normalized or gathered input row block, its permuted
 * copy (the bf16 loop's order) or int16 blocks and steps (the int8 loop's input, fewer floats), and
 * one attention task's scores. */
typedef struct {
    float *resid, *h, *q, *k, *v, *att, *gate, *up, *proj, *priv;
    int64_t widest, priv_floats, heads_per_task, tasks;
} spaces;

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static int64_t shared_floats(const llama_layer *L) {
    const int64_t qd = L->n_heads * L->head_dim, kvd = L->n_kv_heads * L->head_dim;
    return MAX_ROWS * (3 * L->dim + 2 * qd + 2 * kvd + 2 * L->hidden);
}

/* The widest input row of a product: dim, n_heads * head_dim or hidden. */
static int64_t widest(const llama_layer *L) { return max3(L->dim, L->n_heads * L->head_dim, L->hidden); }

/* Per thread: an input block [MAX_ROWS, widest], its permuted copy, scores [group, max_seq]. */
static int64_t private_floats(const llama_layer *L) {
    return 2 * MAX_ROWS * widest(L) + (L->n_heads / L->n_kv_heads) * L->max_seq;
}

/* Floats of scratch that llama_decode_layers needs for these sizes and up to `threads` threads. */
int64_t llama_decode_scratch_floats(const llama_layer *L, int threads) {
    return shared_floats(L) + (int64_t)threads * private_floats(L);
}

static spaces carve(const llama_layer *L, float *scratch, int B, int threads) {
    const int64_t qd = L->n_heads * L->head_dim, kvd = L->n_kv_heads * L->head_dim;
    spaces s;
    float *p = scratch;
    s.resid = p, p += MAX_ROWS * L->dim;
    s.h = p, p += MAX_ROWS * L->dim;
    s.proj = p, p += MAX_ROWS * L->dim;
    s.q = p, p += MAX_ROWS * qd;
    s.att = p, p += MAX_ROWS * qd;
    s.k = p, p += MAX_ROWS * kvd;
    s.v = p, p += MAX_ROWS * kvd;
    s.gate = p, p += MAX_ROWS * L->hidden;
    s.up = p, p += MAX_ROWS * L->hidden;
    s.priv = p;
    s.widest = widest(L);
    s.priv_floats = private_floats(L);
    /* Attention tasks: (row, KV head, slice of its query heads). Whole groups unless that leaves
     * fewer than 4 tasks a thread (the demo model's 3 KV heads on 2 threads), then thinner slices. */
    const int64_t group = L->n_heads / L->n_kv_heads;
    int64_t slices = 1;
    for (int64_t n = 1; n <= group; n++) {
        if (group % n) continue;
        slices = n;
        if (B * L->n_kv_heads * n >= 4 * threads) break;
    }
    s.heads_per_task = group / slices;
    s.tasks = B * L->n_kv_heads * slices;
    return s;
}

/* bf16 rounding of a float32 value, kept as float32: what storing it in a bf16 tensor does. */
static inline float round_bf16(float f) { return widen(narrow(f)); }

/* The sum of x[i]^2 in torch's order for a contiguous float32 sum (ATen's SumKernel.cpp, with 8-lane
 * vectors as torch 2.x runs it on x86): the squares rounded, then 4 columns of vectors summed in
 * a cascade of 4 levels (2^power vectors a level), the tail vectors into column 0, the columns
 * into column 0, then the scalar tail and the 8 lanes one by one. The same order gives the same
 * float32 sum bit for bit, so the norm (hence the whole step) usually equals the plain model's
 * exactly (tests/test_fused.py); any other order moves the norm's scale by an ulp now and then. */
__attribute__((optimize("fp-contract=off"))) static float sum_squares(const float *x, int64_t n) {
    const int64_t vecs = n / 8, size = vecs / 4; /* 8-float vectors; rows of 4 vectors */
    int power = size <= 1 ? 0 : 64 - __builtin_clzll((unsigned long long)(size - 1)); /* ceil(log2(size)) */
    power = power / 4 > 4 ? power / 4 : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    __m256 acc[4][4]; /* [level][column] */
    for (int j = 0; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[j][k] = _mm256_setzero_ps();
    int64_t i = 0;
#define SQUARE(v) _mm256_mul_ps(_mm256_loadu_ps(x + (v) * 8), _mm256_loadu_ps(x + (v) * 8))
    while (i + step <= size) {
        for (int64_t r = 0; r < step; r++, i++)
            for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], SQUARE(i * 4 + k));
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++) {
                acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = _mm256_setzero_ps();
            }
            if (i & (mask << (j * power))) break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], SQUARE(i * 4 + k));
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
    __m256 column = acc[0][0];
    for (int64_t v = size * 4; v < vecs; v++) column = _mm256_add_ps(column, SQUARE(v));
    for (int k = 1; k < 4; k++) column = _mm256_add_ps(column, acc[0][k]);
#undef SQUARE
    float s = 0.0f, lanes[8];
    for (int64_t k = vecs * 8; k < n; k++) {
        const float square = x[k] * x[k];
        s += square;
    }
    _mm256_storeu_ps(lanes, column);
    for (int k = 0; k < 8; k++) s += lanes[k];
    return s;
}

/* out[b] = bf16(bf16(x[b] / sqrt(mean(x[b]^2) + eps)) * w) for B rows of n: RMSNorm in a bf16 model. */
static void rms_norm(const float *x, const uint16_t *w, int64_t n, int B, float eps, float *out) {
    for (int b = 0; b < B; b++) {
        const float *xb = x + b * n;
        const float scale = 1.0f / sqrtf(sum_squares(xb, n) / (float)n + eps);
        for (int64_t i = 0; i < n; i++) out[b * n + i] = round_bf16(round_bf16(xb[i] * scale) * widen(w[i]));
    }
}

/* This thread's rows [*n0, *n1) of N: contiguous ranges, multiples of 4 rows (the matvec block). */
static void split(int64_t N, int t, int T, int64_t *n0, int64_t *n1) {
    const int64_t chunk = ((N + T - 1) / T + 3) / 4 * 4;
    *n0 = t * chunk < N ? t * chunk : N;
    *n1 = *n0 + chunk < N ? *n0 + chunk : N;
}

/* Rotate pairs (n, n+1) of rows [n0, n1) of y [B, N] by the position's angles (llama.model.apply_rope:
 * (y0 + i y1)(cos + i sin), products rounded before the sum as torch's complex multiply does). */
__attribute__((optimize("fp-contract=off"))) static void rope(
    float *y, int64_t N, int64_t n0, int64_t n1, int B, int64_t head_dim, const float *cos, const float *sin) {
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n += 2) {
            const int64_t i = (n % head_dim) / 2;
            const float y0 = y[b * N + n], y1 = y[b * N + n + 1];
            y[b * N + n] = round_bf16(y0 * cos[i] - y1 * sin[i]);
            y[b * N + n + 1] = round_bf16(y0 * sin[i] + y1 * cos[i]);
        }
}

/* x [B, K] float32 -> xp, what a product's loop reads: permuted for the bf16 loop, rounded to int16
 * blocks for the int8 one (int8 = 1). */
static void prepare(int64_t int8, const float *x, float *xp, int B, int64_t K) {
    if (int8)
        llama_int8_prepare(x, xp, B, K);
    else
        llama_bf16_permute(x, xp, B, K);
}

/* Rows [n0, n1) of y = in @ w.T (float32 in [B, K], already prepared into xp), rounded to bf16:
 * w bf16 where scale is NULL, else int8 with its row scales (as Int8Linear with the native kernel,
 * whose bf16 output rounds each float32 result the same way). */
static void product(const void *w, const float *scale, int64_t K, const float *in, const float *xp, float *y,
                    int64_t N, int64_t n0, int64_t n1, int B) {
    if (scale)
        llama_int8_matvec_range(w, scale, K, xp, in, y, N, n0, n1, B);
    else
        llama_bf16_matvec_range(w, K, xp, in, y, N, n0, n1, B);
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n++) y[b * N + n] = round_bf16(y[b * N + n]);
}

/* Keys or values [B, n_kv * hd] rows [n0, n1) into the cache at `pos`. */
static void store(const llama_layer *L, uint16_t *cache, const float *y, int64_t n0, int64_t n1, int B, int64_t pos) {
    const int64_t N = L->n_kv_heads * L->head_dim;
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n++) {
            const int64_t g = n / L->head_dim, d = n % L->head_dim;
            cache[((b * L->n_kv_heads + g) * L->max_seq + pos) * L->head_dim + d] = narrow(y[b * N + n]);
        }
}

/* Thread t's private input block and its permuted copy. */
static float *private_input(const spaces *s, int t) { return s->priv + t * s->priv_floats; }
static float *private_permuted(const spaces *s, int t) { return s->priv + t * s->priv_floats + MAX_ROWS * s->widest; }

/* logits [B, vocab] = bf16(output(norm(resid))) as float32: Transformer's output(norm(h)).float(). */
static void head_step(const llama_head *H, const spaces *s, int64_t dim, int B, float *logits, int t, int T) {
    float *xn = private_input(s, t), *xp = private_permuted(s, t);
    int64_t n0, n1;
    rms_norm(s->resid, H->norm, dim, B, H->eps, xn);
    prepare(H->output_scale != 0, xn, xp, B, dim);
    split(H->vocab, t, T, &n0, &n1);
    product(H->output, H->output_scale, dim, xn, xp, logits, H->vocab, n0, n1, B);
}

/* One layer, run by every thread of the team (thread t of T); resid holds its input and gets its output. */
static void layer(const llama_layer *L, const spaces *s, int B, int64_t pos, const float *cos, const float *sin,
                  uint16_t *out, int t, int T) {
    const int64_t dim = L->dim, hd = L->head_dim, qd = L->n_heads * hd, kvd = L->n_kv_heads * hd;
    float *xn = private_input(s, t);           /* this thread's [B, K] input, K <= widest */
    float *xp = private_permuted(s, t);        /* its permuted copy */
    float *scores = xp + MAX_ROWS * s->widest; /* [heads_per_task, pos + 1] */
    int64_t n0, n1;

    /* 1. attention norm (every thread, of every row), q k v for this thread's rows, RoPE, cache. */
    rms_norm(s->resid, L->attention_norm, dim, B, L->eps, xn);
    prepare(L->int8, xn, xp, B, dim);
    split(qd, t, T, &n0, &n1);
    product(L->wq, L->wq_scale, dim, xn, xp, s->q, qd, n0, n1, B);
    rope(s->q, qd, n0, n1, B, hd, cos, sin);
    split(kvd, t, T, &n0, &n1);
    product(L->wk, L->wk_scale, dim, xn, xp, s->k, kvd, n0, n1, B);
    rope(s->k, kvd, n0, n1, B, hd, cos, sin);
    store(L, L->cache_k, s->k, n0, n1, B, pos);
    product(L->wv, L->wv_scale, dim, xn, xp, s->v, kvd, n0, n1, B);
    store(L, L->cache_v, s->v, n0, n1, B, pos);
#pragma omp barrier

    /* 2. attention over positions 0 ... pos, one task per (row, KV head, slice of its query heads). */
    const int64_t group = L->n_heads / L->n_kv_heads, per = s->heads_per_task, slices = group / per;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < s->tasks; task++) {
        const int64_t b = task / (L->n_kv_heads * slices), g = task / slices % L->n_kv_heads, slice = task % slices;
        const int64_t first = (b * L->n_heads + g * group + slice * per) * hd; /* q[b, head] */
        const int64_t offset = (b * L->n_kv_heads + g) * L->max_seq * hd;      /* cache[b, g, 0] */
        llama_attend_group(s->q + first, L->cache_k + offset, L->cache_v + offset, hd, pos + 1, hd, per, scores,
                           s->att + first);
        for (int64_t i = first; i < first + per * hd; i++) s->att[i] = round_bf16(s->att[i]);
    } /* the loop's implicit barrier: the whole attention output is ready */

    /* 3. h = x + o wo^T for this thread's columns of the residual stream. */
    prepare(L->int8, s->att, xp, B, qd);
    split(dim, t, T, &n0, &n1);
    product(L->wo, L->wo_scale, qd, s->att, xp, s->proj, dim, n0, n1, B);
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n++) s->h[b * dim + n] = round_bf16(s->resid[b * dim + n] + s->proj[b * dim + n]);
#pragma omp barrier

    /* 4. FFN norm, then silu(f w1^T) * f w3^T for this thread's hidden units. */
    rms_norm(s->h, L->ffn_norm, dim, B, L->eps, xn);
    prepare(L->int8, xn, xp, B, dim);
    split(L->hidden, t, T, &n0, &n1);
    product(L->w1, L->w1_scale, dim, xn, xp, s->gate, L->hidden, n0, n1, B);
    product(L->w3, L->w3_scale, dim, xn, xp, s->up, L->hidden, n0, n1, B);
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n++) {
            const int64_t i = b * L->hidden + n;
            const float a = s->gate[i];
            s->gate[i] = round_bf16(round_bf16(a / (1.0f + expf(-a))) * s->up[i]);
        }
#pragma omp barrier

    /* 5. y = h + gate w2^T for this thread's columns: the layer's output, and the call's on the last layer. */
    prepare(L->int8, s->gate, xp, B, L->hidden);
    split(dim, t, T, &n0, &n1);
    product(L->w2, L->w2_scale, L->hidden, s->gate, xp, s->proj, dim, n0, n1, B);
    for (int b = 0; b < B; b++)
        for (int64_t n = n0; n < n1; n++) {
            const float y = round_bf16(s->h[b * dim + n] + s->proj[b * dim + n]);
            s->resid[b * dim + n] = y;
            if (out) out[b * dim + n] = narrow(y);
        }
#pragma omp barrier
}

/* The seven scales all set (int8) or all NULL (bf16), as the flag says. */
static int scales_ok(const llama_layer *L) {
    const float *scales[7] = {L->wq_scale, L->wk_scale, L->wv_scale, L->wo_scale, L->w1_scale, L->w2_scale, L->w3_scale};
    if (L->int8 != 0 && L->int8 != 1) return 0;
    for (int i = 0; i < 7; i++)
        if ((scales[i] != 0) != (L->int8 == 1)) return 0;
    return 1;
}

static int sizes_ok(const llama_layer *L, const llama_layer *first) {
    if (!scales_ok(L)) return 0;
    if (L->dim < 1 || L->n_kv_heads < 1 || L->n_heads % L->n_kv_heads || L->head_dim < 2 || L->head_dim % 2 ||
        L->hidden < 1 || L->max_seq < 1 || L->max_batch < 1)
        return 0;
    return L->dim == first->dim && L->n_heads == first->n_heads && L->n_kv_heads == first->n_kv_heads &&
           L->head_dim == first->head_dim && L->hidden == first->hidden && L->max_seq == first->max_seq &&
           L->max_batch == first->max_batch;
}

/*
 * x, out: bf16 [B, dim] (the residual stream before the first layer and after the last; out may be
 * NULL); cos, sin: float32 [head_dim / 2], RoPE's angles at `pos`; scratch:
 * llama_decode_scratch_floats(layers, threads) floats. The n_layers layers run in order (all of one
 * model's sizes); each writes its keys and values at `pos` of its cache for rows 0 ... B - 1 and
 * attends over positions 0 ... pos. With `head` (else NULL), also the logits: float32 [B, vocab].
 * Returns 0, or -1 (nothing written) for bad sizes or scale pointers, a position outside the cache
 * or too little scratch.
 */
int llama_decode_layers(const llama_layer *layers, int n_layers, const uint16_t *x, uint16_t *out, const float *cos,
                        const float *sin, int64_t pos, int B, float *scratch, int64_t scratch_floats, int threads,
                        const llama_head *head, float *logits) {
    if (n_layers < 1 || B < 1 || B > MAX_ROWS || threads < 1) return -1;
    for (int l = 0; l < n_layers; l++)
        if (!sizes_ok(&layers[l], &layers[0])) return -1;
    const llama_layer *L = &layers[0];
    if (B > L->max_batch || pos < 0 || pos >= L->max_seq || scratch_floats < llama_decode_scratch_floats(L, threads))
        return -1;
    if (head && (head->vocab < 1 || !logits)) return -1;
    const spaces s = carve(L, scratch, B, threads);
    for (int64_t i = 0; i < B * L->dim; i++) s.resid[i] = widen(x[i]);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        for (int l = 0; l < n_layers; l++)
            layer(&layers[l], &s, B, pos, cos, sin, l == n_layers - 1 ? out : 0, t, T);
        if (head) head_step(head, &s, L->dim, B, logits, t, T); /* after the last layer's barrier */
    }
    return 0;
}
