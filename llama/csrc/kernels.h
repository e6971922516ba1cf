/* Internal functions shared between the kernels of this folder (one shared library, llama/native.py):
 * decode_layer.c runs a whole transformer block with the matvec and attention loops of the others. */
#ifndef LLAMA_KERNELS_H
#define LLAMA_KERNELS_H

#include <stdint.h>

/* x [B, K] float32 -> xp [B, K16] (K16 = K - K % 16) in the per-16-block order that the matvec
 * loop reads (bf16_matvec.c); with the AVX512-BF16 loop (llama_bf16_set_range_variant), x rounded
 * to bf16, [B, K] (xp must then hold B * K / 2 floats). */
void llama_bf16_permute(const float *x, float *xp, int B, int64_t K);

/* Weight rows n0 <= n < n1 of y = x @ w.T, in float32, by the calling thread alone (inside the
 * caller's parallel region): y[b * ldy + n] for b < B <= 8. w: bf16 [N, K]; x: float32 [B, K];
 * xp: llama_bf16_permute of x. Results equal llama_bf16_matvec's bit for bit. */
void llama_bf16_matvec_range(const uint16_t *w, int64_t K, const float *xp, const float *x, float *y, int64_t ldy,
                             int64_t n0, int64_t n1, int B);

/* x [B, K] float32 -> `prepared`, what the int8 loop multiplies (int8_matvec.c): the int16 blocks and
 * steps (each 32-element block of x rounded to int16 with its own step), or with the AVX512-BF16
 * variant and B > 1, x in bf16 (x holds bf16 values: the fused step runs bf16 models); in B * K
 * floats at most. */
void llama_int8_prepare(const float *x, float *prepared, int B, int64_t K);

/* Weight rows n0 <= n < n1 of y = (x @ q.T) * scale, in float32, by the calling thread alone (inside
 * the caller's parallel region): y[b * ldy + n] for b < B <= 8. q: int8 [N, K]; scale: float32 [N];
 * x: float32 [B, K] (the K % 32 tail is read from it); prepared: llama_int8_prepare of x. Results
 * equal llama_int8_matvec's bit for bit (x given as bf16, float32 output), with the variant
 * llama/native.py set. */
void llama_int8_matvec_range(const int8_t *q, const float *scale, int64_t K, const float *prepared, const float *x,
                             float *y, int64_t ldy, int64_t n0, int64_t n1, int B);

/* softmax(q k^T / sqrt(D)) v for R queries q [R, D] (float32) of one KV head over T bf16 keys and
 * values `stride` elements apart; scores: scratch [R, T]; out: float32 [R, D] (bf16_attention.c). */
void llama_attend_group(const float *q, const uint16_t *k, const uint16_t *v, int64_t stride, int64_t T,
                        int64_t D, int64_t R, float *scores, float *out);

#endif
