/* The one per-ISA layer of vlbot's quantized matrix-vector kernels (int4_matvec.c, int8_matvec.c).
 *
 * The kernels are written once (their float arithmetic with GCC vector extensions, v16sf: 16
 * floats). Their weights come in 64-byte chunks that hold 16 rows x 4
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
 acc16 holds 16 int32 row sums in the ISA's registers (one zmm, two ymm, four NEON q registers);
 * dot_s8s8(acc, w64, x4): signed weights in -127..127 x 4 signed activations, done as |w| x (x
 * with w's sign) on AVX2/AVX-512BW (ggml's trick: the pair sums stay within 16 bits), as
 * (w + 128) x x on VNNI, the kernel then taking DOT_S8_BIAS * sum(x) off;
 * dot_nibbles(lo, hi, w64, x_lo, x_hi): a chunk of 4-bit weights, low nibbles x x_lo into `lo`,
 * high nibbles x x_hi into `hi`; acc_float: the 16 sums as floats (v16sf).
 */
#ifndef VLBOT_QUANT_DOT_H
#define VLBOT_QUANT_DOT_H

#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors on AVX2: static inline only */

#include <stdint.h>
#include <string.h>

#include "bf16.h"


typedef int32_t v16si __attribute__((vector_size(64)));
typedef float v16sf __attribute__((vector_size(64)));

static inline v16sf load16f(const float *p) {
    v16sf v;
    memcpy(&v, p, 64);
    return v;
}

#if defined(__AVX2__)
#include <immintrin.h>
/* 32 signed bytes w times 32 signed bytes x, both in -127..127, summed in fours into 8 int32
 * lanes added to acc: VPMADDUBSW of |w| and x with w's sign (ggml's trick: each pair sum of
 * products stays within 16 bits, so it is exact), then VPMADDWD to 32 bits. On every x86 tier
 * from AVX2 up (engine/cpu/kernels/int8_screen.c uses it where there is no VNNI). */
static inline __m256i dot_s8s8_32(__m256i acc, __m256i w, __m256i x) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

#if defined(__AVX512BW__)
#include <immintrin.h>
typedef __m512i acc16;
static inline acc16 acc_zero(void) { return _mm512_setzero_si512(); }
static inline acc16 acc_add(acc16 a, acc16 b) { return _mm512_add_epi32(a, b); }
static inline v16sf acc_float(acc16 a) { return (v16sf)_mm512_cvtepi32_ps(a); }
#if defined(__AVX512VNNI__)
#define QUANT_DOT_ISA "avx512_vnni"
static inline acc16 dot_u8(acc16 acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }
#else
#define QUANT_DOT_ISA "avx512bw"
static inline acc16 dot_u8(acc16 acc, __m512i w, __m512i x) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
}
#endif
#if defined(__AVX512VNNI__)
/* VPDPBUSD multiplies unsigned by signed bytes without saturating: w + 128 (w ^ 0x80) times x,
 * and the kernel takes 128 * sum(x) off each group's sums (DOT_S8_BIAS). */
#define DOT_S8_BIAS 128
static inline acc16 dot_s8s8(acc16 acc, const int8_t *w64, int32_t x4) {
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512((const void *)w64), _mm512_set1_epi8((char)0x80));
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(x4));
}
#else
static inline acc16 dot_s8s8(acc16 acc, const int8_t *w64, int32_t x4) {
    const __m512i w = _mm512_loadu_si512((const void *)w64), x = _mm512_set1_epi32(x4);
    const __m512i signed_x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    return dot_u8(acc, _mm512_abs_epi8(w), signed_x);
}
#endif
static inline void dot_nibbles(acc16 *lo, acc16 *hi, const uint8_t *w64, int32_t x_lo, int32_t x_hi) {
    const __m512i v = _mm512_loadu_si512((const void *)w64), mask = _mm512_set1_epi8(0x0f);
    *lo = dot_u8(*lo, _mm512_and_si512(v, mask), _mm512_set1_epi32(x_lo));
    *hi = dot_u8(*hi, _mm512_and_si512(_mm512_srli_epi16(v, 4), mask), _mm512_set1_epi32(x_hi));
}
#elif defined(__AVX2__)
#include <immintrin.h>
#define QUANT_DOT_ISA "avx2"
typedef struct {
    __m256i half[2];
} acc16;
static inline acc16 acc_zero(void) { return (acc16){{_mm256_setzero_si256(), _mm256_setzero_si256()}}; }
static inline acc16 acc_add(acc16 a, acc16 b) {
    return (acc16){{_mm256_add_epi32(a.half[0], b.half[0]), _mm256_add_epi32(a.half[1], b.half[1])}};
}
static inline v16sf acc_float(acc16 a) {
    float out[16];
    _mm256_storeu_ps(out, _mm256_cvtepi32_ps(a.half[0]));
    _mm256_storeu_ps(out + 8, _mm256_cvtepi32_ps(a.half[1]));
    return load16f(out);
}
static inline __m256i dot_u8(__m256i acc, __m256i w, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
static inline acc16 dot_s8s8(acc16 acc, const int8_t *w64, int32_t x4) {
    const __m256i x = _mm256_set1_epi32(x4);
    for (int h = 0; h < 2; h++)
        acc.half[h] = dot_s8s8_32(acc.half[h], _mm256_loadu_si256((const __m256i *)(w64 + 32 * h)), x);
    return acc;
}
static inline void dot_nibbles(acc16 *lo, acc16 *hi, const uint8_t *w64, int32_t x_lo, int32_t x_hi) {
    const __m256i mask = _mm256_set1_epi8(0x0f), xl = _mm256_set1_epi32(x_lo), xh = _mm256_set1_epi32(x_hi);
    for (int h = 0; h < 2; h++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w64 + 32 * h));
        lo->half[h] = dot_u8(lo->half[h], _mm256_and_si256(v, mask), xl);
        hi->half[h] = dot_u8(hi->half[h], _mm256_and_si256(_mm256_srli_epi16(v, 4), mask), xh);
    }
}
#elif defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define QUANT_DOT_ISA "neon_dotprod"
typedef struct {
    int32x4_t q[4];
} acc16;
static inline acc16 acc_zero(void) {
    const int32x4_t z = vdupq_n_s32(0);
    return (acc16){{z, z, z, z}};
}
static inline acc16 acc_add(acc16 a, acc16 b) {
    for (int i = 0; i < 4; i++) a.q[i] = vaddq_s32(a.q[i], b.q[i]);
    return a;
}
static inline v16sf acc_float(acc16 a) {
    float out[16];
    for (int i = 0; i < 4; i++) vst1q_f32(out + 4 * i, vcvtq_f32_s32(a.q[i]));
    return load16f(out);
}
static inline acc16 dot_s8s8(acc16 acc, const int8_t *w64, int32_t x4) {
    const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(x4));
    for (int i = 0; i < 4; i++) acc.q[i] = vdotq_s32(acc.q[i], vld1q_s8(w64 + 16 * i), x);
    return acc;
}
static inline void dot_nibbles(acc16 *lo, acc16 *hi, const uint8_t *w64, int32_t x_lo, int32_t x_hi) {
    const int8x16_t xl = vreinterpretq_s8_s32(vdupq_n_s32(x_lo)), xh = vreinterpretq_s8_s32(vdupq_n_s32(x_hi));
    const uint8x16_t mask = vdupq_n_u8(0x0f);
    for (int i = 0; i < 4; i++) {
        const uint8x16_t v = vld1q_u8(w64 + 16 * i);
        lo->q[i] = vdotq_s32(lo->q[i], vreinterpretq_s8_u8(vandq_u8(v, mask)), xl);
        hi->q[i] = vdotq_s32(hi->q[i], vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), xh);
    }
}
#else
#define QUANT_DOT_ISA "generic"
typedef v16si acc16;
static inline acc16 acc_zero(void) { return (acc16){0}; }
static inline acc16 acc_add(acc16 a, acc16 b) { return a + b; }
static inline v16sf acc_float(acc16 a) { return __builtin_convertvector(a, v16sf); }
static inline acc16 dot_s8s8(acc16 acc, const int8_t *w, int32_t x4) {
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int r = 0; r < 16; r++) {
        acc[r] += w[4 * r] * x[0] + w[4 * r + 1] * x[1] + w[4 * r + 2] * x[2] + w[4 * r + 3] * x[3];
    }
    return acc;
}
static inline void dot_nibbles(acc16 *lo, acc16 *hi, const uint8_t *w, int32_t x_lo, int32_t x_hi) {
    int8_t xl[4], xh[4];
    memcpy(xl, &x_lo, 4);
    memcpy(xh, &x_hi, 4);
    for (int r = 0; r < 16; r++) {
        for (int i = 0; i < 4; i++) {
            (*lo)[r] += (w[4 * r + i] & 0x0f) * xl[i];
            (*hi)[r] += (w[4 * r + i] >> 4) * xh[i];
        }
    }
}
#endif

#ifndef DOT_S8_BIAS
#define DOT_S8_BIAS 0 /* dot_s8s8 gives the plain signed dot product */
#endif

/* Activation rows that share each weight load in the kernels' prompt path (ROW_BLOCK), and the
 * accumulators (acc16) kept in flight to hide the dot steps' latency (ACC_CHAINS): 32 vector
 * registers of 16 lanes on AVX-512, 16 of 8 lanes on AVX2 (an acc16 is two), 32 of 4 on NEON
 * (an acc16 is four). ROW_CASES lists the row counts 1..ROW_BLOCK for a switch. */
#if defined(__AVX512BW__)
#define ROW_BLOCK 8
#define ACC_CHAINS 8
#define ROW_CASES ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#else
#define ROW_BLOCK 4
#define ACC_CHAINS 4
#define ROW_CASES ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#endif
/* A prompt's rows on AVX-512 (int8_matvec.c): PROMPT_ROWS rows against PROMPT_BLOCKS blocks of 16
 * outputs at a time, each activation load serving both blocks (10 accumulators). One 330-row
 * layer of Qwen3-VL-2B (7 products, 2 threads, Zen5, alternating, median ms): avx512_bf16 40.8 ->
 * 32.6 (14 rounds; 2 blocks of 6 rows 36.1, of 7 37.0, of 8 44.6; 4 blocks of 4 rows 45.8, 3 of 5
 * 48.3), AVX-512 forced (no VNNI) 65.7 -> 59.9. With AVX2's 16 registers two blocks spill
 * (2 of 2 rows 165 ms against 122): one block there. */
#if defined(__AVX512BW__)
#define PROMPT_BLOCKS 2
#define PROMPT_ROWS 5
#define PROMPT_ROW_CASES ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5)
#else
#define PROMPT_BLOCKS 1
#define PROMPT_ROWS ROW_BLOCK
#define PROMPT_ROW_CASES ROW_CASES
#endif

/* 16 IEEE half-precision values (the int4 kernel's scales and lows) as floats: F16C's VCVTPH2PS on
 * x86 (every x86 tier with a byte kernel has it), FCVTL on aarch64, else exact bit arithmetic. */
#if defined(__F16C__)
#include <immintrin.h>
static inline void halves_to_floats(const uint16_t *h, float *out) {
    _mm256_storeu_ps(out, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
    _mm256_storeu_ps(out + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8))));
}
#elif defined(__aarch64__)
#include <arm_neon.h>
static inline void halves_to_floats(const uint16_t *h, float *out) {
    for (int i = 0; i < 4; i++) vst1q_f32(out + 4 * i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + 4 * i))));
}
#else
static inline void halves_to_floats(const uint16_t *h, float *out) {
    for (int l = 0; l < 16; l++) {
        const uint32_t sign = (uint32_t)(h[l] & 0x8000u) << 16, exponent = (h[l] >> 10) & 0x1fu;
        const uint32_t mantissa = h[l] & 0x3ffu;
        if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24, exact in float */
            const float value = (float)mantissa * 0x1p-24f;
            out[l] = sign ? -value : value;
            continue;
        }
        const uint32_t bits = sign | ((exponent == 31 ? 255u : exponent + 112u) << 23) | (mantissa << 13);
        memcpy(out + l, &bits, 4);
    }
}
#endif

static inline v16sf load16h(const uint16_t *h) {
    float f[16];
    halves_to_floats(h, f);
    return load16f(f);
}

/* 16 activations from `at` on as float (x float, or bfloat16 where `x_bf16`). */
static inline void load16_values(const void *x, int64_t at, int x_bf16, float *out) {
    if (x_bf16) {
        for (int l = 0; l < 16; l++) out[l] = bf16_to_float(((const uint16_t *)x)[at + l]);
    } else {
        memcpy(out, (const float *)x + at, 64);
    }
}

/* v rounded to the nearest integer, ties to even (lrintf's rounding), as int8, for |v| <= 127.5:
 * after adding 1.5 * 2^23 the float's low mantissa bits are that integer (two's complement), so
 * its low byte is the int8. lrintf itself is a libm call per value (GCC does not inline it
 * without -fno-math-errno): ~9 us of a 2048-channel decode matrix-vector call and ~30 us of a
 * 6144-channel one, on one thread before the product starts (Zen5). */
static inline int8_t round_to_int8(float v) {
    const float shifted = v + 12582912.0f;
    uint32_t bits;
    memcpy(&bits, &shifted, 4);
    return (int8_t)(uint8_t)bits;
}

/* Each `group` activations of each row as int8 (scale = max |x| / 127, rounded to nearest) with
 * the scale and the group's exact sum: how the kernels pair 8-bit activations with their weights
 * (llama.cpp's Q8 activations do the same). x is float, or bfloat16 where `x_bf16`. `group` is a
 * multiple of 16: the loops work on 16 values (the compiler vectorizes them), |x| compared as
 * the integers of its bits (what a vector max of non-negative floats gives), the sum in 16
 * lanes added pairwise at the end. */
static inline void quantize_groups(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t group,
                                   int8_t *xq, float *xs, float *xsum, int threads) {
    const int64_t groups = k / group;
/* a prompt's rows are shared by the threads; a decode step's few rows stay on one thread (a
 * parallel region per call would cost more than their quantizing, ~200 calls a step) */
#define QUANTIZE_PARALLEL_ROWS 16
#pragma omp parallel for if (rows >= QUANTIZE_PARALLEL_ROWS) num_threads(threads) schedule(static)
    for (int64_t m = 0; m < rows; m++) {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t at = m * k + g * group;
            uint32_t top[16] = {0};
            float lanes[16] = {0}, f[16];
            for (int64_t i = 0; i < group; i += 16) {
                load16_values(x, at + i, x_bf16, f);
                for (int l = 0; l < 16; l++) {
                    uint32_t bits;
                    memcpy(&bits, f + l, 4);
                    bits &= 0x7fffffffu;
                    top[l] = bits > top[l] ? bits : top[l];
                    lanes[l] += f[l];
                }
            }
            for (int width = 8; width > 0; width /= 2) {
                for (int l = 0; l < width; l++) {
                    top[l] = top[l + width] > top[l] ? top[l + width] : top[l];
                    lanes[l] += lanes[l + width];
                }
            }
            float amax;
            memcpy(&amax, top, 4);
            const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t i = 0; i < group; i += 16) {
                load16_values(x, at + i, x_bf16, f);
                for (int l = 0; l < 16; l++) xq[at + i + l] = round_to_int8(f[l] * inverse);
            }
            xs[m * groups + g] = amax / 127.0f;
            xsum[m * groups + g] = lanes[0];
        }
    }
}

/* 16 outputs of one row block: float, or bfloat16 where `y_bf16`. */
static inline void store16(void *y, int64_t at, v16sf v, int y_bf16) {
    for (int i = 0; i < 16; i++) store_value(y, at + i, v[i], y_bf16);
}

#endif
