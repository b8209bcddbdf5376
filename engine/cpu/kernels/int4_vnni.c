/* 4-bit weight x 8-bit activation matrix-vector products with AVX-512 VNNI (vlbot int4 decode).
 *
 * Weights: asymmetric 4-bit in groups of G input channels, w[n][k] = q * scale + low, q in 0..15.
 * Layout: rows in blocks of 16; for each block, every 8 input channels (k = 8c .. 8c+7) take
 * 64 bytes: byte 4*r + i holds q[16b + r][8c + i] in its low nibble and q[16b + r][8c + 4 + i] in
 * its high nibble. One 64-byte load then feeds two VPDPBUSD instructions, each giving all 16 rows
 * their dot product over 4 channels, so no horizontal sums are needed.
 * Scales and lows: float, [block][group][16].
 *
 * Activations are quantized per group to int8 (scale = max |x| / 127), the way llama.cpp's Q4
 * kernels pair 4-bit weights with 8-bit activations; the group's exact float sum carries the
 * `low` term. Per output: y = sum_g scale * xs_g * dot_g(q, xq) + low * sum_g(x).
 *
 * Built at run time by engine/cpu/kernels/int4_kernel.py (cc -O3 -mavx512f -mavx512bw -mavx512vnni -fopenmp)
 * and called through ctypes; OpenMP resolves to the libgomp torch has already loaded, so the
 * kernel shares torch's thread pool.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024 /* how far ahead of the weights being read to prefetch */
#endif

static void quantize_rows(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t group,
                          int8_t *xq, float *xs, float *xsum) {
    const int64_t groups = k / group;
    float values[group];
    for (int64_t m = 0; m < rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = m * k + g * group;
            for (int64_t i = 0; i < group; i++) {
                values[i] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[at + i]) : ((const float *)x)[at + i];
            }
            float amax = 0.0f, sum = 0.0f;
            for (int64_t i = 0; i < group; i++) {
                float a = fabsf(values[i]);
                amax = a > amax ? a : amax;
                sum += values[i];
            }
            float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t i = 0; i < group; i++) {
                xq[at + i] = (int8_t)lrintf(values[i] * inverse);
            }
            xs[m * groups + g] = amax / 127.0f;
            xsum[m * groups + g] = sum;
        }
    }
}

/* y[m][n] for m < rows, n < n_out; x and y are float, or bfloat16 where `x_bf16` / `y_bf16`.
 * Returns 0, or -1 when its scratch memory could not be allocated. */
int vlbot_int4_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t n_out,
                       int64_t group, const uint8_t *packed, const float *scales,
                       const float *lows, void *y, int y_bf16, int threads) {
    int8_t *xq = malloc((size_t)(rows * k));
    float *xs = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    float *xsum = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    if (xq == NULL || xs == NULL || xsum == NULL) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    quantize_rows(x, x_bf16, rows, k, group, xq, xs, xsum);
    const int64_t groups = k / group;
    const int64_t blocks = n_out / 16;
    const int64_t chunks = group / 8;
    const __m512i low_nibbles = _mm512_set1_epi8(0x0f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = packed + b * (k / 8) * 64;
        const float *block_scales = scales + b * groups * 16;
        const float *block_lows = lows + b * groups * 16;
        for (int64_t m = 0; m < rows; m++) {
            const int8_t *xrow = xq + m * k;
            const float *row_xs = xs + m * groups;
            const float *row_sum = xsum + m * groups;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *w = block + g * chunks * 64;
                const int8_t *xg = xrow + g * group;
                __m512i sums[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(),
                                  _mm512_setzero_si512(), _mm512_setzero_si512()};
                for (int64_t c = 0; c < chunks; c += 2) {
                    _mm_prefetch((const char *)(w + c * 64 + PREFETCH_BYTES), _MM_HINT_T0);
                    _mm_prefetch((const char *)(w + c * 64 + 64 + PREFETCH_BYTES), _MM_HINT_T0);
                    for (int u = 0; u < 2; u++) {
                        __m512i v = _mm512_loadu_si512((const void *)(w + (c + u) * 64));
                        __m512i lo = _mm512_and_si512(v, low_nibbles);
                        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
                        int32_t x_lo, x_hi;
                        memcpy(&x_lo, xg + (c + u) * 8, 4);
                        memcpy(&x_hi, xg + (c + u) * 8 + 4, 4);
                        sums[2 * u] = _mm512_dpbusd_epi32(sums[2 * u], lo, _mm512_set1_epi32(x_lo));
                        sums[2 * u + 1] =
                            _mm512_dpbusd_epi32(sums[2 * u + 1], hi, _mm512_set1_epi32(x_hi));
                    }
                }
                __m512i dot_low = _mm512_add_epi32(sums[0], sums[2]);
                __m512i dot_high = _mm512_add_epi32(sums[1], sums[3]);
                __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(dot_low, dot_high));
                __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(block_scales + g * 16),
                                             _mm512_set1_ps(row_xs[g]));
                acc = _mm512_fmadd_ps(dot, scale, acc);
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(block_lows + g * 16),
                                      _mm512_set1_ps(row_sum[g]), acc);
            }
            if (y_bf16) {
                float lanes[16];
                _mm512_storeu_ps(lanes, acc);
                uint16_t *out = (uint16_t *)y + m * n_out + b * 16;
                for (int i = 0; i < 16; i++) out[i] = float_to_bf16(lanes[i]);
            } else {
                _mm512_storeu_ps((float *)y + m * n_out + b * 16, acc);
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* bfloat16 of 16 finite floats, rounded to nearest even (bf16.h's float_to_bf16, vectorized). */
static inline __m256i to_bf16_x16(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
}

/* The 4-bit values of 16 input channels (two 8-channel chunks) of one row, in channel order:
 * each chunk's 4 bytes hold channels 0-3 in their low nibbles and 4-7 in their high ones. */
static inline __m512 nibbles_x16(const uint8_t *first, const uint8_t *second) {
    uint32_t a, b;
    memcpy(&a, first, 4);
    memcpy(&b, second, 4);
    const uint64_t lo = (uint64_t)(a & 0x0f0f0f0fu) | (uint64_t)((a >> 4) & 0x0f0f0f0fu) << 32;
    const uint64_t hi = (uint64_t)(b & 0x0f0f0f0fu) | (uint64_t)((b >> 4) & 0x0f0f0f0fu) << 32;
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x((long long)hi, (long long)lo)));
}

/* The weights w[n][k] row-major, as float (`as_bf16` 0) or bfloat16 (1), for large products
 * (a prompt's prefill expands every layer's weights: 16 channels per step, w = q * scale + low
 * with one fused multiply-add; groups are multiples of 16 channels, so one scale per step). */
void vlbot_int4_dequantize(int64_t k, int64_t n_out, int64_t group, const uint8_t *packed,
                           const float *scales, const float *lows, void *w, int as_bf16,
                           int threads) {
    const int64_t groups = k / group;
    const int64_t blocks = n_out / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = packed + b * (k / 8) * 64;
        for (int64_t r = 0; r < 16; r++) {
            const int64_t n = b * 16 + r;
            for (int64_t c = 0; c < k / 8; c += 2) {
                const uint8_t *bytes = block + c * 64 + 4 * r;
                const int64_t at = b * groups * 16 + (c * 8 / group) * 16 + r;
                const __m512 q = nibbles_x16(bytes, bytes + 64);
                const __m512 v = _mm512_fmadd_ps(q, _mm512_set1_ps(scales[at]), _mm512_set1_ps(lows[at]));
                if (as_bf16) {
                    _mm256_storeu_si256((__m256i *)((uint16_t *)w + n * k + c * 8), to_bf16_x16(v));
                } else {
                    _mm512_storeu_ps((float *)w + n * k + c * 8, v);
                }
            }
        }
    }
}
