/* The one per-ISA layer of vlbot's quantized matrix-vector kernels (int4_matvec.c, int8_matvec.c).
 *
 * The kernels are written once with GCC vector extensions (v16si: 16 int32 lanes, v16sf: 16
 * floats, v64qu/v64qi: 64 bytes). Their weights come in 64-byte chunks that hold 16 rows x 4
 * input channels (byte 4r + i: row r, channel i), so one chunk times 4 broadcast activation bytes
 * gives each of the 16 rows its 4-channel dot product in its own 32-bit lane (no horizontal sums).
 * This header supplies that step for each instruction set, chosen by the compiler's target macros
 * (engine.cpu.native compiles for the process's tier, engine.cpu.tiers):
 *
 * - AVX-512 VNNI: VPDPBUSD, 64 multiply-adds per instruction;
 * - AVX-512BW / AVX2: VPMADDUBSW + VPMADDWD (8-bit products summed in pairs to 16 bits, then to
 *   32 bits), as ggml does; AVX2 takes each chunk in two 32-byte halves;
 * - aarch64 with dotprod: SDOT (vdotq_s32), four 16-byte quarters; without it plain C;
 * - anything else: plain C (the compiler vectorizes what it can).
 *
 * dot_u8s8: unsigned weights (< 128: the kernels pass 4-bit values) x signed activations;
 * dot_s8s8: signed weights in -127..127 x signed activations (-127..127), done as |w| x (x with
 * w's sign) on x86 (ggml's trick: the pair sums stay within 16 bits).
 */
#ifndef VLBOT_QUANT_DOT_H
#define VLBOT_QUANT_DOT_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"

#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors on AVX2: static inline only */

typedef int32_t v16si __attribute__((vector_size(64)));
typedef float v16sf __attribute__((vector_size(64)));
typedef uint8_t v64qu __attribute__((vector_size(64)));
typedef int8_t v64qi __attribute__((vector_size(64)));

static inline v64qu load_chunk(const uint8_t *p) {
    v64qu v;
    memcpy(&v, p, 64);
    return v;
}

static inline v16sf load16f(const float *p) {
    v16sf v;
    memcpy(&v, p, 64);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QUANT_DOT_ISA "avx512_vnni"
static inline v16si dot_u8s8(v16si acc, v64qu w, int32_t x4) {
    return (v16si)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, _mm512_set1_epi32(x4));
}
static inline v16si dot_s8s8(v16si acc, v64qi w, int32_t x4) {
    const __m512i x = _mm512_set1_epi32(x4);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask((__m512i)w), _mm512_setzero_si512(), x);
    return (v16si)_mm512_dpbusd_epi32((__m512i)acc, _mm512_abs_epi8((__m512i)w), signed_x);
}
#elif defined(__AVX512BW__)
#include <immintrin.h>
#define QUANT_DOT_ISA "avx512bw"
static inline v16si dot_u8s8(v16si acc, v64qu w, int32_t x4) {
    const __m512i pairs = _mm512_maddubs_epi16((__m512i)w, _mm512_set1_epi32(x4));
    return acc + (v16si)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
}
static inline v16si dot_s8s8(v16si acc, v64qi w, int32_t x4) {
    const __m512i x = _mm512_set1_epi32(x4);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask((__m512i)w), _mm512_setzero_si512(), x);
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8((__m512i)w), signed_x);
    return acc + (v16si)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define QUANT_DOT_ISA "avx2"
typedef int32_t v8si __attribute__((vector_size(32)));
typedef union {
    v16si whole;
    __m256i half[2];
} halves;
static inline v16si dot_u8s8(v16si acc, v64qu w, int32_t x4) {
    halves a = {.whole = acc}, b = {.whole = (v16si)w};
    const __m256i x = _mm256_set1_epi32(x4), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        a.half[h] = _mm256_add_epi32(a.half[h], _mm256_madd_epi16(_mm256_maddubs_epi16(b.half[h], x), ones));
    }
    return a.whole;
}
static inline v16si dot_s8s8(v16si acc, v64qi w, int32_t x4) {
    halves a = {.whole = acc}, b = {.whole = (v16si)w};
    const __m256i x = _mm256_set1_epi32(x4), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(b.half[h], b.half[h]), _mm256_sign_epi8(x, b.half[h]));
        a.half[h] = _mm256_add_epi32(a.half[h], _mm256_madd_epi16(pairs, ones));
    }
    return a.whole;
}
#elif defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define QUANT_DOT_ISA "neon_dotprod"
typedef union {
    v16si whole;
    int32x4_t quarter[4];
} quarters_si;
typedef union {
    v64qi whole;
    int8x16_t quarter[4];
} quarters_qi;
static inline v16si dot_s8s8(v16si acc, v64qi w, int32_t x4) {
    quarters_si a = {.whole = acc};
    quarters_qi b = {.whole = w};
    const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(x4));
    for (int q = 0; q < 4; q++) a.quarter[q] = vdotq_s32(a.quarter[q], b.quarter[q], x);
    return a.whole;
}
static inline v16si dot_u8s8(v16si acc, v64qu w, int32_t x4) {
    return dot_s8s8(acc, (v64qi)w, x4); /* values < 128: the same bytes as signed */
}
#else
#define QUANT_DOT_ISA "generic"
static inline v16si dot_s8s8(v16si acc, v64qi w, int32_t x4) {
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int r = 0; r < 16; r++) {
        acc[r] += w[4 * r] * x[0] + w[4 * r + 1] * x[1] + w[4 * r + 2] * x[2] + w[4 * r + 3] * x[3];
    }
    return acc;
}
static inline v16si dot_u8s8(v16si acc, v64qu w, int32_t x4) {
    return dot_s8s8(acc, (v64qi)w, x4);
}
#endif

/* Each `group` activations of each row as int8 (scale = max |x| / 127, rounded to nearest) with
 * the scale and the group's exact sum: how the kernels pair 8-bit activations with their weights
 * (llama.cpp's Q8 activations do the same). x is float, or bfloat16 where `x_bf16`. */
static inline void quantize_groups(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t group,
                                   int8_t *xq, float *xs, float *xsum) {
    const int64_t groups = k / group;
    for (int64_t m = 0; m < rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = m * k + g * group;
            float amax = 0.0f, sum = 0.0f;
            for (int64_t i = 0; i < group; i++) {
                const float v = load_value(x, at + i, x_bf16);
                const float a = v < 0 ? -v : v;
                amax = a > amax ? a : amax;
                sum += v;
            }
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t i = 0; i < group; i++) {
                xq[at + i] = (int8_t)__builtin_lrintf(load_value(x, at + i, x_bf16) * inverse);
            }
            xs[m * groups + g] = amax / 127.0f;
            xsum[m * groups + g] = sum;
        }
    }
}

/* 16 outputs of one row block: float, or bfloat16 where `y_bf16`. */
static inline void store16(void *y, int64_t at, v16sf v, int y_bf16) {
    for (int i = 0; i < 16; i++) store_value(y, at + i, v[i], y_bf16);
}

#endif
