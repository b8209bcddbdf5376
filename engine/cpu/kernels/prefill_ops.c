/* The language model's element-wise operations over a whole prompt
 * (vlbot, engine/cpu/kernels/prefill_ops.py).
 *
 * A prompt's prefill runs every layer on all its tokens at once: a 1080p screenshot's prompt is
 * ~1,040 rows of 2,048 values. transformers' RMSNorm is six whole-tensor operators there (up-cast,
 * square, mean, rsqrt, two products, down-cast) and its MLP's silu(gate) * up two more over
 * 6,144 columns; on 2 cores those add up to ~0.5 s of the screenshot's first token. These do each
 * in one pass over the rows (AVX-512, rows shared between threads), with transformers' rounding:
 *
 *   RMSNorm     out = bfloat16(weight * bfloat16(x / sqrt(mean(x^2) + eps)))  (float inside)
 *   SiLU-gate   out = bfloat16(bfloat16(silu(g)) * u),  silu(g) = g / (1 + e^-g) in float
 *
 * The sums of squares are added in another order than torch's, and e^-g comes from exp_avx512.h
 * instead of torch's exponential, so a result can differ from torch's by one bfloat16 step now
 * and then (the tests bound how often).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "exp_avx512.h"

/* 16 bfloat16 values -> 16 floats */
static inline __m512 load16(const uint16_t *p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* 16 floats rounded to bfloat16 precision, to nearest, ties to even (as bf16.h's float_to_bf16):
 * the bits of the rounded value are the top 16 of each lane */
static inline __m512i rounded_bits(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}

static inline __m512 to_bf16_precision(__m512 x) {
    return _mm512_castsi512_ps(_mm512_and_si512(rounded_bits(x), _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __m256i round16(__m512 x) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded_bits(x), 16));
}

/* x (rows, dim) bfloat16 -> out; dim a multiple of 16. `x` and `out` may be the same. */
void vlbot_prefill_rms_norm(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows,
                            int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * dim;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        int64_t d = 0;
        for (; d + 64 <= dim; d += 64) {
            const __m512 a = load16(row + d), b = load16(row + d + 16);
            const __m512 c = load16(row + d + 32), e = load16(row + d + 48);
            s0 = _mm512_fmadd_ps(a, a, s0);
            s1 = _mm512_fmadd_ps(b, b, s1);
            s2 = _mm512_fmadd_ps(c, c, s2);
            s3 = _mm512_fmadd_ps(e, e, s3);
        }
        for (; d < dim; d += 16) {
            const __m512 a = load16(row + d);
            s0 = _mm512_fmadd_ps(a, a, s0);
        }
        const float squares = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(squares / (float)dim + eps));
        for (d = 0; d < dim; d += 16) {
            const __m512 normed = to_bf16_precision(_mm512_mul_ps(load16(row + d), scale));
            const __m256i result = round16(_mm512_mul_ps(load16(weight + d), normed));
            _mm256_storeu_si256((__m256i *)(out + r * dim + d), result);
        }
    }
}

/* gate and up (rows, columns) bfloat16, rows `stride` elements apart -> out (rows, columns);
 * columns a multiple of 16. */
void vlbot_prefill_silu_gate(const uint16_t *gate, const uint16_t *up, int64_t stride,
                             uint16_t *out, int64_t rows, int64_t columns, int threads) {
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g_row = gate + r * stride, *u_row = up + r * stride;
        for (int64_t c = 0; c < columns; c += 16) {
            const __m512 g = load16(g_row + c);
            const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = to_bf16_precision(_mm512_div_ps(g, _mm512_add_ps(one, e)));
            const __m256i result = round16(_mm512_mul_ps(silu, load16(u_row + c)));
            _mm256_storeu_si256((__m256i *)(out + r * columns + c), result);
        }
    }
}

/* x (batch, seq, heads, dim) bfloat16 -> out (batch, heads, seq, dim): each head's RMSNorm (as
 * above), then the rotary embedding with the position's cos/sin (batch, seq, dim), each product and
 * the sum rounded to bfloat16 as transformers' bfloat16 operators do:
 *   out = bfloat16(bfloat16(n * cos) + bfloat16(rotate_half(n) * sin)),
 *   rotate_half(n) = (-n[half:], n[:half]).
 * dim a multiple of 32 and at most 256. */
void vlbot_prefill_norm_rotate(const uint16_t *x, const uint16_t *weight, const uint16_t *cos,
                               const uint16_t *sin, uint16_t *out, int64_t batch, int64_t seq,
                               int64_t heads, int64_t dim, float eps, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t position = 0; position < batch * seq; position++) {
        const int64_t b = position / seq, s = position % seq;
        const uint16_t *c = cos + position * dim, *n = sin + position * dim;
        for (int64_t h = 0; h < heads; h++) {
            const uint16_t *row = x + (position * heads + h) * dim;
            __m512 normed[16];
            __m512 squares = _mm512_setzero_ps();
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 a = load16(row + d);
                squares = _mm512_fmadd_ps(a, a, squares);
            }
            const float mean = _mm512_reduce_add_ps(squares) / (float)dim;
            const __m512 scale = _mm512_set1_ps(1.0f / sqrtf(mean + eps));
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 v = to_bf16_precision(_mm512_mul_ps(load16(row + d), scale));
                normed[d / 16] = to_bf16_precision(_mm512_mul_ps(load16(weight + d), v));
            }
            uint16_t *target = out + ((b * heads + h) * seq + s) * dim;
            for (int64_t d = 0; d < dim; d += 16) {
                const __m512 turned = d < half ? _mm512_xor_ps(normed[(d + half) / 16], _mm512_set1_ps(-0.0f))
                                               : normed[(d - half) / 16];
                const __m512 a = to_bf16_precision(_mm512_mul_ps(normed[d / 16], load16(c + d)));
                const __m512 e = to_bf16_precision(_mm512_mul_ps(turned, load16(n + d)));
                _mm256_storeu_si256((__m256i *)(target + d), round16(_mm512_add_ps(a, e)));
            }
        }
    }
}
