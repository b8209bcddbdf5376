/* The vision encoder's attention on every CPU tier (vlbot, engine/cpu/kernels/vision_flash.py),
 * one source through simd.h: float arithmetic over float32 or bfloat16 inputs.
 *
 * Qwen3-VL's vision layers attend over all of an image's patches (16 heads of 64 channels; a
 * 640x480 photo is 1,200 patches, a 1080p screenshot 4,032). torch's CPU flash attention runs at
 * ~150-175 GFLOPS on the 2-core Zen5 vlbot is measured on whatever the tier (its products are
 * MKL's AVX2 code on AMD): 38 ms a layer at 1,200 patches, ~390 ms at 4,032, 9.3 s of a 1080p
 * screenshot's first token over 24 layers. This kernel is flash attention with the products as
 * register-blocked multiply-adds of the tier's vector width (bf16 pairs with `vdpbf16ps` where
 * the inputs are bf16 and the CPU has AVX-512-BF16: PAIRS_PATH). For each head and block of
 * QBLOCK queries it goes through the keys KEYS at a time:
 *
 *   S = scale q k^T      float sums over the 64 channels, keys packed channel-major per head
 *   p = exp(S - m)       m the row's running maximum (simd.h's vf_exp), the row sum in float
 *   acc = acc a + p v    a = exp(m_before - m) rescales what the earlier keys gave; out = acc / sum
 *
 * The probabilities stay float (torch's bf16 flash attention rounds them to bf16; so does the
 * pairs path), so the result is as close to exact attention as torch's or closer. Exponents are clamped at -87 (exp > 1e-38):
 * no subnormal probabilities (microcode assists on some CPUs) and padded keys get exactly 0.
 * Where the CPU has AMX, engine/cpu/kernels/vision_flash.c (tile products) is used instead.
 *
 * Layouts: q, k, v are (heads, rows, 64), a head `head_stride` elements from the next, float32
 * or bfloat16 (`bf16`); out is (rows, heads x 64) of the same type with rows `out_stride`
 * elements apart (what the output projection reads).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

#define DIM 64
#ifndef KEYS
#define KEYS 256 /* keys per softmax step */
#endif
#ifndef QROWS
#if VF_LANES == 8 /* AVX2: 16 vector registers */
#define QROWS 6   /* query rows per register block */
#define KVECS 2   /* key vectors per register block */
#else /* AVX-512, NEON: 32 */
#define QROWS 4
#define KVECS 4
#endif
#endif
#define QBLOCK (8 * QROWS) /* query rows per task */
#define KBLOCK (KVECS * VF_LANES) /* keys per register block of the first product */
#define PVECS KVECS               /* channel vectors per register block of the second */
#define CVECS (DIM / VF_LANES)    /* vectors per row of 64 channels */
#define LOWEST (-87.0f)           /* exp(-87) = 1.6e-38, still a normal float */

static inline float vf_max(vf value) {
    float lanes[VF_LANES], top = -INFINITY;
    vf_store(lanes, value);
    for (int i = 0; i < VF_LANES; i++) top = lanes[i] > top ? lanes[i] : top;
    return top;
}

/* One head's keys as floats, channel-major (DIM x padded, padded keys 0), and values as floats,
 * row-major (padded x DIM, padded rows 0). */
static void pack_head(const void *k, const void *v, int64_t rows, int64_t padded, int bf16,
                      float *kt, float *vf32) {
    for (int64_t j = 0; j < padded; j++) {
        for (int d = 0; d < DIM; d++) {
            const float key = j < rows ? load_value(k, j * DIM + d, bf16) : 0.0f;
            kt[d * padded + j] = key;
            vf32[j * DIM + d] = j < rows ? load_value(v, j * DIM + d, bf16) : 0.0f;
        }
    }
}

/* s[r][0..KBLOCK) = scale * q[r] . kt[., first..first + KBLOCK) for QROWS rows of q. */
static inline void score_block(const float *q, const void *keys, int64_t padded, int64_t first,
                               float scale, float *s) {
    const float *kt = keys;
    vf acc[QROWS][KVECS];
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < KVECS; i++) acc[r][i] = vf_zero();
    for (int d = 0; d < DIM; d++) {
        const float *row = kt + d * padded + first;
        vf keys[KVECS];
        for (int i = 0; i < KVECS; i++) keys[i] = vf_load(row + i * VF_LANES);
        for (int r = 0; r < QROWS; r++) {
            const vf query = vf_splat(q[r * DIM + d]);
            for (int i = 0; i < KVECS; i++) acc[r][i] += query * keys[i];
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < KVECS; i++) vf_store(s + r * KEYS + i * VF_LANES, acc[r][i] * scale);
}

/* acc[r][channels of pass c] += sum_j p[r][j] v[j][...] for QROWS rows and `width` keys. */
static inline void weigh_block(const float *p, const float *v, int64_t width, int pass, float *acc) {
    vf out[QROWS][PVECS];
    const int offset = pass * PVECS * VF_LANES;
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < PVECS; i++) out[r][i] = vf_load(acc + r * DIM + offset + i * VF_LANES);
    for (int64_t j = 0; j < width; j++) {
        const float *row = v + j * DIM + offset;
        vf values[PVECS];
        for (int i = 0; i < PVECS; i++) values[i] = vf_load(row + i * VF_LANES);
        for (int r = 0; r < QROWS; r++) {
            const vf weight = vf_splat(p[r * KEYS + j]);
            for (int i = 0; i < PVECS; i++) out[r][i] += weight * values[i];
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < PVECS; i++) vf_store(acc + r * DIM + offset + i * VF_LANES, out[r][i]);
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define PAIRS_PATH 1
#define PAIRS (DIM / 2)
/* bfloat16 inputs where the CPU multiplies bf16 pairs (`vdpbf16ps`: two products summed in float
 * per lane, half the instructions of the float multiply-adds): keys packed as channel pairs, per
 * block of KBLOCK keys (kp[block][pair][key]), values as key pairs per channel (vp[pair][channel]),
 * each pair one 32-bit word; padded keys 0. The probabilities are rounded to bf16 for the second
 * product (as torch's bf16 flash attention and vision_flash.c do); the row sums stay float.
 * 4,032 patches, 16 heads, 2 threads: 214 ms with the float path, 145 ms with this one. */
static void pack_head_pairs(const uint16_t *k, const uint16_t *v, int64_t rows, int64_t padded,
                            uint32_t *kp, uint32_t *vp) {
    for (int64_t key = 0; key < padded; key++) {
        const int64_t block = key / KBLOCK, lane = key % KBLOCK;
        for (int p = 0; p < PAIRS; p++) {
            uint32_t word = 0;
            if (key < rows) memcpy(&word, k + key * DIM + 2 * p, sizeof word);
            kp[(block * PAIRS + p) * KBLOCK + lane] = word;
        }
    }
    for (int64_t pair = 0; pair < padded / 2; pair++) {
        const int64_t even = 2 * pair, odd = even + 1;
        for (int c = 0; c < DIM; c++) {
            const uint32_t low = even < rows ? v[even * DIM + c] : 0, high = odd < rows ? v[odd * DIM + c] : 0;
            vp[pair * DIM + c] = low | high << 16;
        }
    }
}

/* As score_block, from query channel pairs q (PAIRS words a row) and one packed key block. */
static inline void score_block_pairs(const uint32_t *q, const uint32_t *kp, float scale, float *s) {
    __m512 acc[QROWS][KVECS];
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < KVECS; i++) acc[r][i] = _mm512_setzero_ps();
    for (int p = 0; p < PAIRS; p++) {
        __m512bh keys[KVECS];
        for (int i = 0; i < KVECS; i++) keys[i] = (__m512bh)_mm512_load_si512((const void *)(kp + p * KBLOCK + i * 16));
        for (int r = 0; r < QROWS; r++) {
            const __m512bh query = (__m512bh)_mm512_set1_epi32((int)q[r * PAIRS + p]);
            for (int i = 0; i < KVECS; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], keys[i], query);
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < KVECS; i++)
            _mm512_storeu_ps(s + r * KEYS + i * 16, _mm512_mul_ps(acc[r][i], _mm512_set1_ps(scale)));
}

/* QROWS rows of float probabilities (KEYS apart) -> bf16, `width` (a multiple of 32) each. */
static inline void round_probabilities(const float *s, uint16_t *p, int64_t width) {
    for (int r = 0; r < QROWS; r++)
        for (int64_t j = 0; j < width; j += 32) {
            const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + r * KEYS + j + 16),
                                                      _mm512_loadu_ps(s + r * KEYS + j));
            _mm512_storeu_si512((void *)(p + r * KEYS + j), (__m512i)pair);
        }
}

/* As weigh_block (all 64 channels), from bf16 probabilities p (rows KEYS apart) and packed values. */
static inline void weigh_block_pairs(const uint16_t *p, const uint32_t *vp, int64_t width, float *acc) {
    __m512 out[QROWS][CVECS];
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < CVECS; i++) out[r][i] = _mm512_loadu_ps(acc + r * DIM + i * 16);
    for (int64_t pair = 0; pair < width / 2; pair++) {
        __m512bh values[CVECS];
        for (int i = 0; i < CVECS; i++)
            values[i] = (__m512bh)_mm512_load_si512((const void *)(vp + pair * DIM + i * 16));
        for (int r = 0; r < QROWS; r++) {
            uint32_t word;
            memcpy(&word, p + r * KEYS + 2 * pair, sizeof word);
            const __m512bh weight = (__m512bh)_mm512_set1_epi32((int)word);
            for (int i = 0; i < CVECS; i++) out[r][i] = _mm512_dpbf16_ps(out[r][i], values[i], weight);
        }
    }
    for (int r = 0; r < QROWS; r++)
        for (int i = 0; i < CVECS; i++) _mm512_storeu_ps(acc + r * DIM + i * 16, out[r][i]);
}
#else
#define PAIRS_PATH 0
#endif

/* One row's softmax step over `width` scores (the first `valid` real keys): the scores become
 * exp(s - m) with m the new running maximum; returns the factor exp(m_before - m) by which the
 * row's earlier sums must be scaled, and updates *maximum and *sum. */
static float softmax_step(float *s, int64_t width, int64_t valid, float *maximum, float *sum) {
    vf tops = vf_splat(*maximum);
    int64_t j = 0;
    for (; j + VF_LANES <= valid; j += VF_LANES) {
        const vf value = vf_load(s + j);
        tops = vf_select(value > tops, value, tops);
    }
    float top = vf_max(tops);
    for (; j < valid; j++) top = s[j] > top ? s[j] : top;
    const float rescale = *maximum == -INFINITY ? 0.0f : expf(*maximum - top);
    const vf shift = vf_splat(top), lowest = vf_splat(LOWEST);
    vf total = vf_zero();
    for (j = 0; j + VF_LANES <= valid; j += VF_LANES) {
        vf t = vf_load(s + j) - shift;
        t = vf_select(t < lowest, lowest, t);
        const vf e = vf_exp(t);
        vf_store(s + j, e);
        total += e;
    }
    float rest = 0.0f;
    for (; j < valid; j++) {
        const float t = s[j] - top;
        s[j] = expf(t < LOWEST ? LOWEST : t);
        rest += s[j];
    }
    for (; j < width; j++) s[j] = 0.0f; /* padded keys */
    *maximum = top;
    *sum = *sum * rescale + vf_sum(total) + rest;
    return rescale;
}

/* Attention of `count` (<= QBLOCK) queries q (rows DIM apart) over one head's packed keys and
 * values (pack_head's floats, or pack_head_pairs' words where `pairs`); results to out (rows
 * `out_stride` elements apart). */
static void attend_block(const void *q, int64_t count, const void *keys, const void *values,
                         int64_t rows, int64_t padded, float scale, int bf16, int pairs, void *out,
                         int64_t out_stride, float *work) {
    float *queries = work, *acc = queries + QBLOCK * DIM, *s = acc + QBLOCK * DIM;
    float maximum[QBLOCK], sum[QBLOCK];
    for (int64_t r = 0; r < QBLOCK; r++) {
        for (int d = 0; d < DIM; d++) {
            queries[r * DIM + d] = r < count && !pairs ? load_value(q, r * DIM + d, bf16) : 0.0f;
            acc[r * DIM + d] = 0.0f;
        }
        maximum[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    if (pairs) memcpy(queries, q, sizeof(uint16_t) * (size_t)(count * DIM)); /* as channel pairs */
    const int64_t blocks = (count + QROWS - 1) / QROWS;
    for (int64_t first = 0; first < padded; first += KEYS) {
        const int64_t width = padded - first < KEYS ? padded - first : KEYS;
        const int64_t valid = rows - first < width ? rows - first : width;
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t r0 = b * QROWS;
            for (int64_t key = 0; key < width; key += KBLOCK) {
#if PAIRS_PATH
                if (pairs) {
                    const uint32_t *block = (const uint32_t *)keys + (first + key) / KBLOCK * PAIRS * KBLOCK;
                    score_block_pairs((const uint32_t *)queries + r0 * PAIRS, block, scale, s + r0 * KEYS + key);
                    continue;
                }
#endif
                score_block(queries + r0 * DIM, keys, padded, first + key, scale, s + r0 * KEYS + key);
            }
            for (int r = 0; r < QROWS; r++) {
                float *row = s + (r0 + r) * KEYS;
                const float rescale = softmax_step(row, width, valid, &maximum[r0 + r], &sum[r0 + r]);
                for (int d = 0; d < DIM; d++) acc[(r0 + r) * DIM + d] *= rescale;
            }
#if PAIRS_PATH
            if (pairs) {
                uint16_t *rounded = (uint16_t *)(s + QBLOCK * KEYS) + r0 * KEYS;
                round_probabilities(s + r0 * KEYS, rounded, width);
                weigh_block_pairs(rounded, (const uint32_t *)values + first / 2 * DIM, width, acc + r0 * DIM);
                continue;
            }
#endif
            for (int pass = 0; pass < CVECS / PVECS; pass++)
                weigh_block(s + r0 * KEYS, (const float *)values + first * DIM, width, pass, acc + r0 * DIM);
        }
    }
    for (int64_t r = 0; r < count; r++) {
        const float inverse = 1.0f / sum[r];
        for (int d = 0; d < DIM; d++) store_value(out, r * out_stride + d, acc[r * DIM + d] * inverse, bf16);
    }
}

/* out = softmax(scale q k^T) v per head; returns 0, or -1 when memory could not be allocated. */
int vlbot_vision_attention(const void *q, const void *k, const void *v, int64_t heads, int64_t rows,
                           int64_t head_stride, float scale, void *out, int64_t out_stride,
                           int bf16, int threads) {
    const int64_t padded = (rows + KBLOCK - 1) / KBLOCK * KBLOCK;
    const size_t unit = bf16 ? sizeof(uint16_t) : sizeof(float);
    const size_t head_floats = (size_t)(2 * padded * DIM);
    const int pairs = PAIRS_PATH && bf16; /* keys and values as bf16 pairs: half of head_floats */
    const int64_t values_at = pairs ? padded * DIM / 2 : padded * DIM; /* floats or words */
    float *packed = aligned_alloc(64, sizeof(float) * head_floats * (size_t)heads);
    if (packed == NULL) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t h = 0; h < heads; h++) {
        const size_t at = (size_t)(h * head_stride) * unit;
        float *kt = packed + (size_t)h * head_floats;
#if PAIRS_PATH
        if (pairs) {
            pack_head_pairs((const uint16_t *)((const char *)k + at), (const uint16_t *)((const char *)v + at),
                            rows, padded, (uint32_t *)kt, (uint32_t *)kt + values_at);
            continue;
        }
#endif
        pack_head((const char *)k + at, (const char *)v + at, rows, padded, bf16, kt, kt + values_at);
    }
    const int64_t blocks = (rows + QBLOCK - 1) / QBLOCK;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        /* queries, sums, scores and (pairs) the rounded probabilities */
        float *work = aligned_alloc(64, sizeof(float) * (size_t)(QBLOCK * (2 * DIM + KEYS + KEYS / 2)));
        if (work == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t task = 0; task < heads * blocks; task++) {
            if (work == NULL) continue;
            const int64_t h = task / blocks, first = (task % blocks) * QBLOCK;
            const int64_t count = rows - first < QBLOCK ? rows - first : QBLOCK;
            const float *kt = packed + (size_t)h * head_floats;
            const char *queries = (const char *)q + (size_t)(h * head_stride + first * DIM) * unit;
            char *target = (char *)out + (size_t)(first * out_stride + h * DIM) * unit;
            attend_block(queries, count, kt, kt + values_at, rows, padded, scale, bf16, pairs, target,
                         out_stride, work);
        }
        free(work);
    }
    free(packed);
    return failed ? -1 : 0;
}
