/* The thin per-ISA layer of vlbot's kernels: one float vector type for every CPU tier, written
 * with GCC's vector extensions, and the few operations they do not spell.
 *
 * The vector is as wide as the tier's registers: 16 floats with AVX-512 (__AVX512F__), 8 with
 * AVX2, 4 with NEON (aarch64) and in plain C (the compiler keeps it in SSE2 registers or scalar).
 * Arithmetic (`a + b * c`, fused into FMA where the target has it and -ffp-contract allows) and
 * comparisons are the compiler's; this header adds unaligned loads and stores, bfloat16 widening
 * (a bf16 is the top 16 bits of a float: widen the 16-bit lanes to 32 and shift left by 16, which
 * GCC turns into vpmovzxwd + vpslld on x86 and ushll on NEON), the horizontal sum and prefetch.
 * Kernels with a better instruction on one tier (AVX-512 BF16's `vdpbf16ps`, AMX tiles) keep it
 * under that tier's macro in the same source.
 */
#ifndef VLBOT_SIMD_H
#define VLBOT_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__AVX512F__)
#define VF_BYTES 64
#elif defined(__AVX2__)
#define VF_BYTES 32
#else
#define VF_BYTES 16
#endif
#define VF_LANES (VF_BYTES / 4)

typedef float vf __attribute__((vector_size(VF_BYTES)));
typedef uint32_t vu __attribute__((vector_size(VF_BYTES)));
typedef uint16_t vh __attribute__((vector_size(VF_BYTES / 2))); /* VF_LANES bf16 values */

static inline vf vf_zero(void) { return (vf){0}; }

static inline vf vf_splat(float value) { return (vf){0} + value; }

static inline vf vf_load(const float *p) {
    vf out;
    memcpy(&out, p, sizeof out);
    return out;
}

static inline void vf_store(float *p, vf value) { memcpy(p, &value, sizeof value); }

/* VF_LANES bfloat16 values at p, as floats (exact). GCC 12 splits the generic widening
 * (`__builtin_convertvector` of 16-bit to 32-bit lanes) into halves joined again (3 extra
 * instructions per vector, measured in the AVX2 and AVX-512 loops' assembly), so each ISA gets
 * its one-instruction zero-extension here. */
static inline vf vf_load_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#elif defined(__ARM_NEON)
    return (vf)vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
#else
    vh half;
    memcpy(&half, p, sizeof half);
    vu wide = __builtin_convertvector(half, vu) << 16;
    vf out;
    memcpy(&out, &wide, sizeof out);
    return out;
#endif
}

static inline float vf_sum(vf value) {
    /* halving adds: log2(lanes) steps, each one the compiler's shuffle + add */
#if VF_LANES == 16
    typedef float v8 __attribute__((vector_size(32)));
    v8 lo, hi;
    memcpy(&lo, &value, 32);
    memcpy(&hi, (const char *)&value + 32, 32);
    lo += hi;
    float s[8];
    memcpy(s, &lo, 32);
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
#elif VF_LANES == 8
    float s[8];
    memcpy(s, &value, 32);
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
#else
    float s[4];
    memcpy(s, &value, 16);
    return (s[0] + s[2]) + (s[1] + s[3]);
#endif
}

static inline void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

typedef int32_t vi __attribute__((vector_size(VF_BYTES)));

/* Lanes of `a` where `pick` (a comparison's all-ones lanes) is set, else of `b`: GCC's vector
 * `?:` is C++ only, so the blend is spelled with bits (the compiler emits one blend). */
static inline vf vf_select(vi pick, vf a, vf b) { return (vf)(((vi)a & pick) | ((vi)b & ~pick)); }

/* exp(y) per lane, for any tier: 2^n * e^r with n = y / ln 2 rounded (half away from zero),
 * r = y - n ln 2 (ln 2 in two parts, |r| <= ~ln 2 / 2) and e^r by its degree-7 Taylor polynomial
 * (error below float rounding there); 2^n is put into the exponent bits in two halves, so that
 * n down to -145 stays a normal float each. y is clamped to [-100, 88] (exp(-100) is 0 to float
 * precision in every use here; exp(88) ~1.6e38 is still a float). */
static inline vf vf_exp(vf y) {
    const vf low = vf_splat(-100.0f), high = vf_splat(88.0f);
    y = vf_select(y < low, low, vf_select(y > high, high, y));
    const vf t = y * 1.44269504088896341f;
    const vf half = (vf)(((vi)t & (int32_t)0x80000000) | (vi)vf_splat(0.5f)); /* +-0.5, t's sign */
    const vi n = __builtin_convertvector(t + half, vi);                     /* truncation */
    const vf nf = __builtin_convertvector(n, vf);
    vf r = y - nf * 0.693145751953125f;
    r = r - nf * 1.428606765330187e-06f;
    vf p = vf_splat(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi first = n >> 1, second = n - first; /* 2^n = 2^first * 2^second, each normal */
    return p * (vf)((first + 127) << 23) * (vf)((second + 127) << 23);
}

#endif
