/* Attention for one new token per conversation (vlbot's bf16 decode steps), AVX-512.
 *
 * torch's flash attention spends ~0.45 ms per layer on one query over a 1,100-token conversation
 * (12 ms of a ~160 ms step on the full-size Qwen3-VL-2B here); the work is reading the layer's
 * cached keys and values once (~4.5 MB). This loop does, for each conversation and key/value head,
 * the scores of the query heads that share it (grouped-query attention: the cache is read once
 * for the group), a float softmax, and the weighted sum of the values, in float, rounded to
 * bfloat16 at the end, as torch's kernel rounds its float result.
 *
 * Keys and values are read in place from the conversation cache: (batch, kv_heads, length, dim)
 * with any batch and head strides and rows of `dim` contiguous values (engine.qwen.kvbuffer's views).
 * A batch row may start after position 0 (left padding): `starts[b]` is its first real position.
 *
 * Built at run time by engine/cpu/native.py and called through ctypes
 * (engine/cpu/kernels/decode_attention.py).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "exp_avx512.h"

#define MAX_DIM 256  /* head dims up to this (Qwen3-VL: 128) */
#define MAX_GROUP 16 /* query heads per key/value head */
#ifndef AHEAD
#define AHEAD 16 /* positions read ahead (prefetched) */
#endif

static inline __m512 widen(const uint16_t *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* In place: p[j] = exp(p[j] - max) for j < count; returns their sum. */
static float softmax_numerators(float *p, int64_t count) {
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) top = p[j] > top ? p[j] : top;
    const __m512 top_v = _mm512_set1_ps(top);
    __m512 total = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(p + j), top_v));
        _mm512_storeu_ps(p + j, e);
        total = _mm512_add_ps(total, e);
    }
    if (j < count) {
        const __mmask16 mask = (__mmask16)((1u << (count - j)) - 1u);
        __m512 e = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + j), top_v));
        e = _mm512_maskz_mov_ps(mask, e);
        _mm512_mask_storeu_ps(p + j, mask, e);
        total = _mm512_add_ps(total, e);
    }
    return _mm512_reduce_add_ps(total);
}

static inline uint16_t to_bf16(float value) {
    __m128bh packed = _mm_cvtneps_pbh(_mm_set1_ps(value));
    uint16_t out;
    __builtin_memcpy(&out, &packed, 2);
    return out;
}

/* One conversation row, one key/value head, its `group` query heads: each key and value row is
 * widened once for all of them. `scores` holds group * (length - start) floats. */
static void attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t token_stride,
                   int64_t start, int64_t length, int64_t dim, int group, float scale,
                   uint16_t *out, float *scores) {
    const int chunks = (int)(dim / 16);
    const int64_t count = length - start;
    __m512 query[MAX_GROUP][MAX_DIM / 16];
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < chunks; c++) {
            query[g][c] = _mm512_mul_ps(widen(q + g * dim + c * 16), _mm512_set1_ps(scale));
        }
    }
    for (int64_t j = 0; j < count; j++) {
        const uint16_t *key = k + (start + j) * token_stride;
        for (int64_t line = 0; line < dim * 2; line += 64) {
            _mm_prefetch((const char *)(key + AHEAD * token_stride) + line, _MM_HINT_T0);
        }
        __m512 acc[MAX_GROUP];
        for (int g = 0; g < group; g++) acc[g] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            const __m512 part = widen(key + c * 16);
            for (int g = 0; g < group; g++) acc[g] = _mm512_fmadd_ps(query[g][c], part, acc[g]);
        }
        for (int g = 0; g < group; g++) scores[g * count + j] = _mm512_reduce_add_ps(acc[g]);
    }
    float inverse[MAX_GROUP];
    for (int g = 0; g < group; g++) inverse[g] = 1.0f / softmax_numerators(scores + g * count, count);
    __m512 acc[MAX_GROUP][MAX_DIM / 16];
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < count; j++) {
        const uint16_t *value = v + (start + j) * token_stride;
        for (int64_t line = 0; line < dim * 2; line += 64) {
            _mm_prefetch((const char *)(value + AHEAD * token_stride) + line, _MM_HINT_T0);
        }
        for (int c = 0; c < chunks; c++) {
            const __m512 part = widen(value + c * 16);
            for (int g = 0; g < group; g++) {
                acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * count + j]), part, acc[g][c]);
            }
        }
    }
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < chunks; c++) {
            float lanes[16];
            _mm512_storeu_ps(lanes, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inverse[g])));
            for (int i = 0; i < 16; i++) out[g * dim + c * 16 + i] = to_bf16(lanes[i]);
        }
    }
}

/* out (batch, q_heads, dim) = softmax(q k^T * scale) v for one query per batch row.
 * q (batch, q_heads, dim) contiguous; k and v (batch, kv_heads, length, dim) at the given batch
 * and head strides, `token_stride` between positions (elements); starts[b] (or 0 when NULL) the
 * first position row b attends to. dim a multiple of 16 up to MAX_DIM, q_heads / kv_heads up to
 * MAX_GROUP. Returns 0, or -1 for unsupported shapes or when scratch memory is not available. */
int vlbot_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                           int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                           const int64_t *starts, int64_t batch, int64_t q_heads, int64_t kv_heads,
                           int64_t length, int64_t dim, float scale, uint16_t *out, int threads) {
    if (dim % 16 != 0 || dim > MAX_DIM || kv_heads <= 0 || q_heads % kv_heads != 0) return -1;
    const int group = (int)(q_heads / kv_heads);
    if (group > MAX_GROUP) return -1;
    for (int64_t b = 0; b < batch; b++) {
        if (starts != NULL && (starts[b] < 0 || starts[b] >= length)) return -1;
    }
    float *scratch = malloc(sizeof(float) * (size_t)(group * length) * (size_t)(batch * kv_heads));
    if (scratch == NULL) return -1;
    const int64_t tasks = batch * kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        const int64_t start = starts == NULL ? 0 : starts[b];
        const int64_t at = b * batch_stride + h * head_stride;
        attend(q + (b * q_heads + h * group) * dim, k + at, v + at, token_stride, start, length,
               dim, group, scale, out + (b * q_heads + h * group) * dim,
               scratch + task * group * length);
    }
    free(scratch);
    return 0;
}
