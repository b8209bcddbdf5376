/* Attention for one new token per conversation (vlbot's decode steps), one source for every CPU
 * tier (engine/cpu/kernels/simd.h: AVX-512, AVX2, NEON, plain C), over a bfloat16 or a float32
 * cache, with bfloat16 or float32 queries.
 *
 * torch's flash attention spends ~0.26-0.45 ms per layer on one query over a few hundred to
 * 1,100 cached tokens (7 ms of a 40 ms float32 int4 step with AVX2 forced, 12 ms of a ~160 ms
 * bf16 step before, on the full-size Qwen3-VL-2B); the work is reading the layer's cached keys
 * and values once (~4.5 MB at 1,100 tokens in bf16). This loop does, for each conversation and
 * key/value head, the scores of the query heads that share it (grouped-query attention: the cache
 * is read once for the group), a float softmax, and the weighted sum of the values, in float,
 * rounded to bfloat16 at the end for bf16 queries, as torch's kernel rounds its float result.
 *
 * The scores are summed KEY_BLOCK keys at a time (each key's sum is a chain of dim / lanes
 * dependent additions: one key at a time waited on them), and the values' weighted sums a few
 * columns at a time, as many accumulators as the tier has registers for (AVX2's 16 registers held
 * half of a group of two heads' 128 columns before: the rest spilled to memory on every key).
 * 28 layers of Qwen3-VL-2B's shape at 400 cached tokens (8 kv heads of 128, 16 query heads),
 * 2 threads, medians of 15 alternations, ms, former loop -> this one: forced AVX2 bf16 cache
 * 1 row 2.92 -> 1.43, 4 rows 9.94 -> 5.68, float32 cache 2.77 -> 2.35 and 10.41 -> 9.54;
 * avx512_bf16 bf16 cache 2.74 -> 1.42 and 7.25 -> 5.23, float32 cache 2.31 -> 2.19 and 9.57 -> 9.36
 * (4 keys at a time: the same for bf16, float32 ~5 % slower; 8 the same as 4).
 *
 * Keys and values are read in place from the conversation cache: (batch, kv_heads, length, dim)
 * with any batch and head strides and rows of `dim` contiguous values (engine.qwen.kvbuffer's views).
 * A batch row may start after position 0 (left padding): `starts[b]` is its first real position.
 *
 * Built at run time by engine/cpu/native.py and called through ctypes
 * (engine/cpu/kernels/decode_attention.py); engine/cpu/kernels/decode_layer.c calls the entry
 * points by address.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#include "simd.h"

#define MAX_DIM 256  /* head dims up to this (Qwen3-VL: 128) */
#define MAX_GROUP 16 /* query heads per key/value head */
#define MAX_CHUNKS (MAX_DIM / VF_LANES)
#ifndef AHEAD
#define AHEAD 16 /* positions read ahead (prefetched) */
#endif

/* In place: p[j] = exp(p[j] - max) for j < count; returns their sum. */
static float softmax_numerators(float *p, int64_t count) {
    float top = -INFINITY;
    for (int64_t j = 0; j < count; j++) top = p[j] > top ? p[j] : top;
    vf total = vf_zero();
    int64_t j = 0;
    for (; j + VF_LANES <= count; j += VF_LANES) {
        const vf e = vf_exp(vf_load(p + j) - top);
        vf_store(p + j, e);
        total += e;
    }
    float sum = vf_sum(total);
    for (; j < count; j++) {
        p[j] = expf(p[j] - top);
        sum += p[j];
    }
    return sum;
}

#ifndef KEY_BLOCK
#define KEY_BLOCK 2 /* keys scored together: independent sums, so no FMA waits on the one before */
#endif
#ifndef VALUE_VECTORS
/* accumulators the value pass keeps in registers (the rest of the register file holds the values
 * read and the broadcast weights): AVX2 has 16 vector registers, AVX-512 and NEON 32 */
#if defined(__AVX512F__) || defined(__ARM_NEON)
#define VALUE_VECTORS 16
#else
#define VALUE_VECTORS 8
#endif
#endif

/* scores[g * count + j] = q_g . k_(start + j) for the group's query heads (already scaled). */
static inline __attribute__((always_inline)) void score_keys(
    const vf query[][MAX_CHUNKS], const void *k, int64_t token_stride, int64_t start,
    int64_t count, int64_t dim, const int group, float *scores, const int kv_bf16) {
    const int chunks = (int)(dim / VF_LANES);
    const int64_t row_bytes = dim * (kv_bf16 ? 2 : 4);
    for (int64_t j = 0; j < count; j += KEY_BLOCK) {
        const int keys = count - j < KEY_BLOCK ? (int)(count - j) : KEY_BLOCK;
        int64_t at[KEY_BLOCK];
        for (int b = 0; b < KEY_BLOCK; b++) at[b] = (start + j + (b < keys ? b : 0)) * token_stride;
        for (int b = 0; b < KEY_BLOCK; b++) {
            const char *ahead = (const char *)k + (at[b] + AHEAD * token_stride) * (kv_bf16 ? 2 : 4);
            for (int64_t line = 0; line < row_bytes; line += 64) prefetch(ahead + line);
        }
        vf acc[MAX_GROUP][KEY_BLOCK];
        for (int g = 0; g < group; g++)
            for (int b = 0; b < KEY_BLOCK; b++) acc[g][b] = vf_zero();
        for (int c = 0; c < chunks; c++) {
            for (int b = 0; b < KEY_BLOCK; b++) {
                const vf part = vf_load_as(k, at[b] + c * VF_LANES, kv_bf16);
                for (int g = 0; g < group; g++) acc[g][b] += query[g][c] * part;
            }
        }
        for (int g = 0; g < group; g++)
            for (int b = 0; b < keys; b++) scores[g * count + j + b] = vf_sum(acc[g][b]);
    }
}

/* acc[g][c] = sum_j scores[g * count + j] * v_(start + j) over `width` vectors from column
 * vector `from`; stored into out (times inverse[g]). */
static inline __attribute__((always_inline)) void weigh_values(
    const void *v, int64_t token_stride, int64_t start, int64_t count, int64_t dim, int from,
    const int width, const int group, const float *scores, const float *inverse, void *out,
    const int out_bf16, const int kv_bf16) {
    const int64_t row_bytes = dim * (kv_bf16 ? 2 : 4);
    vf acc[MAX_GROUP][VALUE_VECTORS];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < width; c++) acc[g][c] = vf_zero();
    for (int64_t j = 0; j < count; j++) {
        const int64_t value = (start + j) * token_stride;
        if (from == 0) { /* the first pass brings each row in; the others find it in cache */
            const char *ahead = (const char *)v + (value + AHEAD * token_stride) * (kv_bf16 ? 2 : 4);
            for (int64_t line = 0; line < row_bytes; line += 64) prefetch(ahead + line);
        }
        vf weight[MAX_GROUP];
        for (int g = 0; g < group; g++) weight[g] = vf_splat(scores[g * count + j]);
        for (int c = 0; c < width; c++) {
            const vf part = vf_load_as(v, value + (from + c) * VF_LANES, kv_bf16);
            for (int g = 0; g < group; g++) acc[g][c] += weight[g] * part;
        }
    }
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < width; c++) {
            float lanes[VF_LANES];
            vf_store(lanes, acc[g][c] * inverse[g]);
            for (int i = 0; i < VF_LANES; i++)
                store_value(out, g * dim + (from + c) * VF_LANES + i, lanes[i], out_bf16);
        }
    }
}

/* One conversation row, one key/value head, its `group` query heads: each key and value row is
 * read from memory once for all of them. `scores` holds group * (length - start) floats. */
static inline __attribute__((always_inline)) void attend(
    const void *q, const void *k, const void *v, int64_t token_stride, int64_t start,
    int64_t length, int64_t dim, const int group, float scale, void *out, float *scores,
    const int q_bf16, const int kv_bf16) {
    const int chunks = (int)(dim / VF_LANES);
    const int64_t count = length - start;
    vf query[MAX_GROUP][MAX_CHUNKS];
    for (int g = 0; g < group; g++) {
        for (int c = 0; c < chunks; c++) query[g][c] = vf_load_as(q, g * dim + c * VF_LANES, q_bf16) * scale;
    }
    score_keys(query, k, token_stride, start, count, dim, group, scores, kv_bf16);
    float inverse[MAX_GROUP];
    for (int g = 0; g < group; g++) inverse[g] = 1.0f / softmax_numerators(scores + g * count, count);
    /* the values a few columns at a time, so that the accumulators stay in registers */
    const int width = VALUE_VECTORS / group > 0 ? VALUE_VECTORS / group : 1;
    int from = 0;
    for (; from + width <= chunks; from += width)
        weigh_values(v, token_stride, start, count, dim, from, width, group, scores, inverse, out,
                     q_bf16, kv_bf16);
    for (; from < chunks; from++)
        weigh_values(v, token_stride, start, count, dim, from, 1, group, scores, inverse, out, q_bf16,
                     kv_bf16);
}

/* attend with the group size a constant where it is a common one (the loops unroll). */
static inline __attribute__((always_inline)) void attend_group(
    const void *q, const void *k, const void *v, int64_t token_stride, int64_t start,
    int64_t length, int64_t dim, int group, float scale, void *out, float *scores, const int q_bf16,
    const int kv_bf16) {
#define ATTEND(g) attend(q, k, v, token_stride, start, length, dim, g, scale, out, scores, q_bf16, kv_bf16)
    switch (group) {
    case 1: ATTEND(1); break;
    case 2: ATTEND(2); break;
    case 4: ATTEND(4); break;
    default: ATTEND(group); break;
    }
#undef ATTEND
}

static inline __attribute__((always_inline)) int decode_attention(
    const void *q, const void *k, const void *v, int64_t batch_stride, int64_t head_stride,
    int64_t token_stride, const int64_t *starts, int64_t batch, int64_t q_heads, int64_t kv_heads,
    int64_t length, int64_t dim, float scale, void *out, int threads, const int q_bf16,
    const int kv_bf16) {
    if (dim % VF_LANES != 0 || dim > MAX_DIM || kv_heads <= 0 || q_heads % kv_heads != 0) return -1;
    const int group = (int)(q_heads / kv_heads);
    if (group > MAX_GROUP) return -1;
    for (int64_t b = 0; b < batch; b++) {
        if (starts != NULL && (starts[b] < 0 || starts[b] >= length)) return -1;
    }
    float *scratch = malloc(sizeof(float) * (size_t)(group * length) * (size_t)(batch * kv_heads));
    if (scratch == NULL) return -1;
    const int64_t tasks = batch * kv_heads;
    const size_t q_size = q_bf16 ? 2 : 4, kv_size = kv_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t b = task / kv_heads, h = task % kv_heads;
        const int64_t start = starts == NULL ? 0 : starts[b];
        const size_t at = (size_t)(b * batch_stride + h * head_stride) * kv_size;
        const size_t heads_at = (size_t)((b * q_heads + h * group) * dim) * q_size;
        float *own = scratch + task * group * length;
        /* the dtypes are constants in each entry point's inlined copy */
        attend_group((const char *)q + heads_at, (const char *)k + at, (const char *)v + at,
                     token_stride, start, length, dim, group, scale, (char *)out + heads_at, own,
                     q_bf16, kv_bf16);
    }
    free(scratch);
    return 0;
}

/* out (batch, q_heads, dim) = softmax(q k^T * scale) v for one query per batch row, all bfloat16.
 * q (batch, q_heads, dim) contiguous; k and v (batch, kv_heads, length, dim) at the given batch
 * and head strides, `token_stride` between positions (elements); starts[b] (or 0 when NULL) the
 * first position row b attends to. dim a multiple of the vector width up to MAX_DIM, q_heads /
 * kv_heads up to MAX_GROUP. Returns 0, or -1 for unsupported shapes or when scratch memory is not
 * available. */
int vlbot_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                           int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                           const int64_t *starts, int64_t batch, int64_t q_heads, int64_t kv_heads,
                           int64_t length, int64_t dim, float scale, uint16_t *out, int threads) {
    return decode_attention(q, k, v, batch_stride, head_stride, token_stride, starts, batch, q_heads,
                            kv_heads, length, dim, scale, out, threads, 1, 1);
}

/* The same over a float32 cache, float32 q and out. */
int vlbot_decode_attention_f32(const float *q, const float *k, const float *v, int64_t batch_stride,
                               int64_t head_stride, int64_t token_stride, const int64_t *starts,
                               int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t length,
                               int64_t dim, float scale, float *out, int threads) {
    return decode_attention(q, k, v, batch_stride, head_stride, token_stride, starts, batch, q_heads,
                            kv_heads, length, dim, scale, out, threads, 0, 0);
}

/* float32 q and out over a bfloat16 cache: a model computing in float32 over bf16 weights on a
 * tier without bf16 arithmetic (engine.cpu.half_weights) keeps its keys and values in bf16, half
 * the bytes a decode step reads from its cache. */
int vlbot_decode_attention_f32_bf16(const float *q, const uint16_t *k, const uint16_t *v,
                                    int64_t batch_stride, int64_t head_stride,
                                    int64_t token_stride, const int64_t *starts, int64_t batch,
                                    int64_t q_heads, int64_t kv_heads, int64_t length, int64_t dim,
                                    float scale, float *out, int threads) {
    return decode_attention(q, k, v, batch_stride, head_stride, token_stride, starts, batch, q_heads,
                            kv_heads, length, dim, scale, out, threads, 0, 1);
}
