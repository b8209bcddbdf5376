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

/* VF_LANES copies of *p: one broadcast load (vf_splat's addition to 0, which keeps -0 from
 * reaching the lanes, costs an instruction more in an inner loop; GCC 12 builds a generic
 * lane-by-lane copy from inserts) */
static inline vf vf_load_splat(const float *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(*p);
#elif defined(__AVX2__)
    return (vf)_mm256_broadcast_ss(p);
#elif defined(__ARM_NEON)
    return (vf)vld1q_dup_f32(p);
#else
    return vf_splat(*p);
#endif
}

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

/* value rounded to bfloat16 precision, to nearest even (bf16.h's float_to_bf16 a vector at a
 * time), still as floats: the low 16 bits of every lane are 0. */
static inline vf vf_round_bf16(vf value) {
    vu bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    memcpy(&value, &bits, sizeof bits);
    return value;
}

/* VF_LANES floats stored at p as bfloat16, rounded to nearest even. The narrowing of the 32-bit
 * lanes to 16 is one instruction per ISA where GCC's generic conversion is not. */
static inline void vf_store_bf16(uint16_t *p, vf value) {
    vu bits;
    memcpy(&bits, &value, sizeof bits);
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
#if defined(__AVX512F__)
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16((__m512i)bits));
#elif defined(__AVX2__)
    const __m256i wide = (__m256i)bits;
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1)));
#elif defined(__ARM_NEON)
    uint32x4_t wide;
    memcpy(&wide, &bits, sizeof wide);
    vst1_u16(p, vmovn_u32(wide));
#else
    const vh half = __builtin_convertvector(bits, vh);
    memcpy(p, &half, sizeof half);
#endif
}

/* a * b + c rounded once where the tier has fused multiply-adds (as the compiler contracts
 * `a * b + c` by default), so that a kernel built with -ffp-contract=off for its own rounding
 * still gets them in shared helpers such as vf_exp. */
static inline vf vf_fma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__ARM_NEON)
    float32x4_t x, y, z;
    memcpy(&x, &a, 16);
    memcpy(&y, &b, 16);
    memcpy(&z, &c, 16);
    x = vfmaq_f32(z, x, y);
    memcpy(&a, &x, 16);
    return a;
#else
    return a * b + c;
#endif
}

/* The value, held in a register: where a loaded vector feeds several multiply-adds, gcc may
 * instead fold the load into each of them (one load per use). bf16_matvec's few_rows with 4
 * activation rows, 28 layers' weights, AVX2 forced on Zen5, 12 interleaved rounds: 81.0 ->
 * 76.3 ms (10 of 12 faster); AVX-512 forced 64.8 -> 61.9 (6 of 12); 2 rows unchanged. */
static inline vf vf_held(vf value) {
#if defined(__AVX2__)
    __asm__("" : "+v"(value));
#elif defined(__ARM_NEON)
    __asm__("" : "+w"(value));
#endif
    return value;
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

/* exp(y) per lane, for any tier: 2^n * e^r with n = y / ln 2 rounded to an integer, r = y - n ln 2
 * (ln 2 in two parts, |r| <= ~ln 2 / 2) and e^r by its degree-7 Taylor polynomial (error below
 * float rounding there). y is clamped to [-100, 88] (exp(-100) is 0 to float precision in every
 * use here; exp(88) ~1.6e38 is still a float). With AVX-512, n is rounded (to nearest even) and
 * 2^n applied by one instruction each (VRNDSCALEPS, VSCALEFPS); elsewhere n is rounded half away
 * from zero by truncation and 2^n is put into the exponent bits in two halves, so that n down to
 * -145 stays a normal float each. Both give the same value but where y / ln 2 is exactly half
 * way, and there e^r's polynomial covers either n. */
static inline vf vf_exp(vf y) {
#if defined(__AVX512F__)
    y = (vf)_mm512_min_ps(_mm512_max_ps((__m512)y, _mm512_set1_ps(-100.0f)), _mm512_set1_ps(88.0f));
    const vf nf = (vf)_mm512_roundscale_ps((__m512)(y * 1.44269504088896341f),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    const vf low = vf_splat(-100.0f), high = vf_splat(88.0f);
    y = vf_select(y < low, low, vf_select(y > high, high, y));
    const vf t = y * 1.44269504088896341f;
    const vf half = (vf)(((vi)t & (int32_t)0x80000000) | (vi)vf_splat(0.5f)); /* +-0.5, t's sign */
    const vi n = __builtin_convertvector(t + half, vi);                     /* truncation */
    const vf nf = __builtin_convertvector(n, vf);
#endif
    vf r = vf_fma(nf, vf_splat(-0.693145751953125f), y);
    r = vf_fma(nf, vf_splat(-1.428606765330187e-06f), r);
    vf p = vf_splat(1.0f / 5040.0f);
    p = vf_fma(p, r, vf_splat(1.0f / 720.0f));
    p = vf_fma(p, r, vf_splat(1.0f / 120.0f));
    p = vf_fma(p, r, vf_splat(1.0f / 24.0f));
    p = vf_fma(p, r, vf_splat(1.0f / 6.0f));
    p = vf_fma(p, r, vf_splat(0.5f));
    p = vf_fma(p, r, vf_splat(1.0f));
    p = vf_fma(p, r, vf_splat(1.0f));
#if defined(__AVX512F__)
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)nf);
#else
    const vi first = n >> 1, second = n - first; /* 2^n = 2^first * 2^second, each normal */
    return p * (vf)((first + 127) << 23) * (vf)((second + 127) << 23);
#endif
}

/* VF_LANES values of a bfloat16 (`bf16`) or float32 array from element `at`, as floats; and
 * stored there (rounded to bfloat16, to nearest even, where `bf16`). Kernels that take either
 * activation type call them with `bf16` a constant in each inlined copy. */
static inline __attribute__((always_inline)) vf vf_load_as(const void *p, int64_t at, const int bf16) {
    return bf16 ? vf_load_bf16((const uint16_t *)p + at) : vf_load((const float *)p + at);
}

static inline __attribute__((always_inline)) void vf_store_as(void *p, int64_t at, vf value, const int bf16) {
    if (bf16) {
        vf_store_bf16((uint16_t *)p + at, value);
    } else {
        vf_store((float *)p + at, value);
    }
}

/* value rounded to bfloat16 precision (to nearest even) where `bf16`, else unchanged */
static inline vf vf_rounded_as(vf value, const int bf16) { return bf16 ? vf_round_bf16(value) : value; }

/* The middle of a SwiGLU MLP, silu(g) * u with silu(g) = g / (1 + e^-g) in float, rounded to
 * bfloat16 before the product where `bf16` (as transformers' bfloat16 operators round). */
static inline __attribute__((always_inline)) vf vf_silu_times(vf g, vf u, const int bf16) {
    return vf_rounded_as(g / (1.0f + vf_exp(-g)), bf16) * u;
}

#endif
