/* Screening the output head with an 8-bit copy of its weights (vlbot's bf16 decode steps).
 *
 * The output head of Qwen3-VL-2B is 151,936 rows of 2,048 bfloat16 weights: 622 MB, a sixth of
 * the bytes a decode step reads. A greedy step only needs the row with the largest logit (a
 * sampled one the top k). This file reads an 8-bit copy of the head instead (half the bytes) and
 * gives, for every row v, an interval that provably holds the logit the bfloat16 head computes:
 *
 *   w_v = s_v q_v + e_v  (q_v int8, s_v its scale, e_v the rounding left over)
 *   x   = t1 p1 + t2 p2 + d   (the activation row in two 8-bit pieces)
 *   x.w_v = s_v (t1 p1.q_v + t2 p2.q_v) + s_v (d.q_v) + x.e_v
 *   |s_v (d.q_v) + x.e_v| <= s_v |q_v| |d| + |e_v| |x|      (Cauchy-Schwarz)
 *
 * plus the float rounding of the bf16 kernel's own sum (at most k 2^-24 |x| |w_v|). The caller
 * computes the exact bfloat16 logits of the few rows whose interval reaches the top (see
 * engine/cpu/kernels/output_head.py); every other row is below them by more than one bfloat16 step, so
 * rounding cannot tie it with them either.
 *
 * p.q_v is computed with AVX-512 VNNI (`vpdpbusd`: unsigned x signed bytes), where p + 128 is the
 * unsigned operand and 128 sum(q_v) is taken off again; elsewhere (AVX2, AVX-512 without VNNI)
 * with ggml's `vpmaddubsw` trick: |q| x (p with q's sign), whose pair sums stay within 16 bits
 * (|p|, |q| <= 127), then `vpmaddwd` to 32 bits. Both are exact. The copy is read once for all
 * pieces and rows: the reading, not the arithmetic, takes the time. Rows are padded to a
 * multiple of 64 channels (zeros).
 *
 * The activations come as bfloat16 (a bf16 model) or float32 (a bf16 model computing in float32
 * where the CPU has no bf16 arithmetic, engine/cpu/half_weights.py); the bound holds for either:
 * the bf16 kernel sums in float32 both ways.
 *
 * Built at run time by engine/cpu/native.py and called through ctypes (engine/cpu/kernels/output_head.py).
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "quant_dot.h" /* DOT_S8_BIAS, dot_s8s8_32 */

#define MAX_ROWS 8       /* activation rows that share one reading of the copy */
#define MAX_TOP 64       /* largest k of a top-k screen */
#ifndef PREFETCH_BYTES
/* how far ahead the copy is prefetched (one stream per thread): the full-size head, 2 cores,
 * median of 8: 768 bytes 13.9 ms, 1536 12.9, 2048 13.1, 3072 12.8, 3584 12.8, 4608 13.1 */
#define PREFETCH_BYTES 3072
#endif
/* relative slack for the float and double rounding of the bounds themselves */
#define SLACK 1e-5

static inline double padded(double value) { return value * (1.0 + SLACK); }

static inline float scale_of(float amax) { return amax > 0.0f ? amax / 127.0f : 1.0f; }

static inline float to_int8(float value, float scale) {
    return fminf(127.0f, fmaxf(-127.0f, nearbyintf(value / scale)));
}

/* Row v of the copy: q (kp bytes, zero padded), its scale and error terms. */
static void build_row(const uint16_t *w, int64_t k, int64_t kp, int8_t *q, float *scale,
                      float *qnorm, float *resid, int32_t *rowsum) {
    float amax = 0.0f;
    for (int64_t c = 0; c < k; c++) amax = fmaxf(amax, fabsf(bf16_to_float(w[c])));
    const float s = scale_of(amax);
    double q2 = 0.0, e2 = 0.0, w2 = 0.0;
    int32_t sum = 0;
    for (int64_t c = 0; c < k; c++) {
        const float wf = bf16_to_float(w[c]);
        const float qf = to_int8(wf, s);
        q[c] = (int8_t)qf;
        const double e = (double)wf - (double)s * (double)qf; /* exact in double */
        q2 += (double)qf * qf;
        e2 += e * e;
        w2 += (double)wf * wf;
        sum += (int32_t)qf;
    }
    memset(q + k, 0, (size_t)(kp - k));
    *scale = s;
    *qnorm = (float)padded((double)s * sqrt(q2));
    *resid = (float)padded(sqrt(e2) + (double)k * 0x1p-24 * sqrt(w2));
    *rowsum = sum;
}

/* The copy of w (n, k) bfloat16: q (n, kp) int8 with kp = k rounded up to 64, and per row the
 * scale, s|q|, |e| + k 2^-24 |w| and sum(q). Returns 0. */
int vlbot_int8_screen_build(const uint16_t *w, int64_t n, int64_t k, int64_t kp, int8_t *q,
                            float *scale, float *qnorm, float *resid, int32_t *rowsum,
                            int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t v = 0; v < n; v++)
        build_row(w + v * k, k, kp, q + v * kp, scale + v, qnorm + v, resid + v, rowsum + v);
    return 0;
}

/* Activation c of a bfloat16 (x_f32 = 0) or float32 row. */
static inline float activation(const void *x, int x_f32, int64_t c) {
    return x_f32 ? ((const float *)x)[c] : bf16_to_float(((const uint16_t *)x)[c]);
}

/* One activation row in two 8-bit pieces, x = t1 p1 + t2 p2 + d (p2 quantizes what p1 leaves,
 * so |d| is ~1/127 of a single piece's and the activations add next to nothing to the bound):
 * u1 = p1 + DOT_S8_BIAS and u2 = p2 + DOT_S8_BIAS (kp bytes each, padding p = 0; the bias is
 * 128 with VNNI, vpdpbusd's unsigned operand, 0 elsewhere), t1, t2, |d| and |x|. */
static void quantize_row(const void *x, int x_f32, int64_t k, int64_t kp, uint8_t *u1, uint8_t *u2,
                         double *t1_out, double *t2_out, double *dnorm, double *xnorm) {
    float amax = 0.0f, rmax = 0.0f;
    for (int64_t c = 0; c < k; c++) amax = fmaxf(amax, fabsf(activation(x, x_f32, c)));
    const float t1 = scale_of(amax);
    for (int64_t c = 0; c < k; c++) {
        const float xf = activation(x, x_f32, c);
        rmax = fmaxf(rmax, fabsf((float)((double)xf - (double)t1 * to_int8(xf, t1))));
    }
    const float t2 = scale_of(rmax);
    double d2 = 0.0, x2 = 0.0;
    for (int64_t c = 0; c < k; c++) {
        const float xf = activation(x, x_f32, c);
        const float p1 = to_int8(xf, t1);
        const double r = (double)xf - (double)t1 * p1;
        const float p2 = to_int8((float)r, t2);
        u1[c] = (uint8_t)((int)p1 + DOT_S8_BIAS);
        u2[c] = (uint8_t)((int)p2 + DOT_S8_BIAS);
        const double d = r - (double)t2 * p2;
        d2 += d * d;
        x2 += (double)xf * xf;
    }
    memset(u1 + k, DOT_S8_BIAS, (size_t)(kp - k));
    memset(u2 + k, DOT_S8_BIAS, (size_t)(kp - k));
    *t1_out = t1;
    *t2_out = t2;
    *dnorm = padded(sqrt(d2));
    *xnorm = padded(sqrt(x2));
}

/* Integer dot products of `rows` activation rows (two pieces each: u holds 2 * rows rows of kp
 * bytes, piece 1 of row m at 2m, piece 2 at 2m + 1) with weight row v of the copy. */
#if defined(__AVX512VNNI__)
static inline __attribute__((always_inline)) void dots(const uint8_t *u, int64_t kp,
                                                      const int8_t *qv, int32_t *out,
                                                      const int rows) {
    __m512i acc[2 * MAX_ROWS];
    for (int m = 0; m < 2 * rows; m++) acc[m] = _mm512_setzero_si512();
    for (int64_t c = 0; c < kp; c += 64) {
        _mm_prefetch((const char *)(qv + c + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512((const void *)(qv + c));
        for (int m = 0; m < 2 * rows; m++)
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_loadu_si512((const void *)(u + m * kp + c)),
                                         wv);
    }
    for (int m = 0; m < 2 * rows; m++) out[m] = _mm512_reduce_add_epi32(acc[m]);
}
#else
static inline __attribute__((always_inline)) void dots(const uint8_t *u, int64_t kp,
                                                      const int8_t *qv, int32_t *out,
                                                      const int rows) {
    __m256i acc[2 * MAX_ROWS];
    for (int m = 0; m < 2 * rows; m++) acc[m] = _mm256_setzero_si256();
    for (int64_t c = 0; c < kp; c += 64) {
        _mm_prefetch((const char *)(qv + c + PREFETCH_BYTES), _MM_HINT_T0);
        for (int64_t h = c; h < c + 64; h += 32) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(qv + h));
            for (int m = 0; m < 2 * rows; m++)
                acc[m] = dot_s8s8_32(acc[m], wv, _mm256_loadu_si256((const __m256i *)(u + m * kp + h)));
        }
    }
    for (int m = 0; m < 2 * rows; m++) {
        const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[m]), _mm256_extracti128_si256(acc[m], 1));
        const __m128i quarter = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
        out[m] = _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 0xb1)));
    }
}
#endif

static void dots_any(const uint8_t *u, int64_t kp, const int8_t *qv, int32_t *out, int rows) {
    switch (rows) { /* constant row counts: the accumulators stay in registers */
    case 1: dots(u, kp, qv, out, 1); break;
    case 2: dots(u, kp, qv, out, 2); break;
    case 3: dots(u, kp, qv, out, 3); break;
    case 4: dots(u, kp, qv, out, 4); break;
    case 5: dots(u, kp, qv, out, 5); break;
    case 6: dots(u, kp, qv, out, 6); break;
    case 7: dots(u, kp, qv, out, 7); break;
    default: dots(u, kp, qv, out, MAX_ROWS); break;
    }
}

/* The `top`-th largest of values (n of them, top <= MAX_TOP <= n). */
static float kth_largest(const float *values, int64_t n, int64_t top) {
    float best[MAX_TOP];
    int64_t held = 0;
    for (int64_t v = 0; v < n; v++) {
        const float x = values[v];
        if (held == top && x <= best[held - 1]) continue;
        int64_t at = held < top ? held++ : top - 1;
        while (at > 0 && best[at - 1] < x) {
            best[at] = best[at - 1];
            at--;
        }
        best[at] = x;
    }
    return best[top - 1];
}

/* For each of `rows` activation rows x (rows, k; bfloat16, or float32 where x_f32): the rows v of the head whose bf16
 * logit can be among the row's `top` largest (ties included), ascending, in found[m * cap ...];
 * counts[m] is how many there are (when more than cap, only the first cap are written).
 * bounds: scratch of 2 * MAX_ROWS * n floats, kept by the caller between calls. Returns 0, -1
 * when scratch memory could not be allocated, -2 for a top outside 1..MAX_TOP or n, -3 when a
 * bound is not finite. */
int vlbot_int8_screen(const void *x, int x_f32, int64_t rows, int64_t k, int64_t kp, int64_t n,
                      const int8_t *q, const float *scale, const float *qnorm, const float *resid,
                      const int32_t *rowsum, int64_t top, int64_t cap, int64_t *found,
                      int64_t *counts, float *bounds, int threads) {
    if (top < 1 || top > MAX_TOP || top > n) return -2;
    uint8_t *u = aligned_alloc(64, (size_t)(2 * MAX_ROWS * kp));
    if (u == NULL) return -1;
    float *lower = bounds, *upper = bounds + MAX_ROWS * n;
    int status = 0;
    for (int64_t start = 0; start < rows && status == 0; start += MAX_ROWS) {
        const int count = rows - start < MAX_ROWS ? (int)(rows - start) : MAX_ROWS;
        double t1[MAX_ROWS], t2[MAX_ROWS], dnorm[MAX_ROWS], xnorm[MAX_ROWS];
        for (int m = 0; m < count; m++)
            quantize_row((const char *)x + (start + m) * k * (x_f32 ? 4 : 2), x_f32, k, kp,
                         u + 2 * m * kp, u + (2 * m + 1) * kp, &t1[m], &t2[m], &dnorm[m], &xnorm[m]);
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t v = 0; v < n; v++) {
            int32_t dot[2 * MAX_ROWS];
            dots_any(u, kp, q + v * kp, dot, count);
            const int32_t offset = DOT_S8_BIAS * rowsum[v];
            for (int m = 0; m < count; m++) {
                const double pq = (double)(dot[2 * m] - offset) * t1[m] +
                                  (double)(dot[2 * m + 1] - offset) * t2[m];
                const double approx = pq * (double)scale[v];
                const double bound = (double)qnorm[v] * dnorm[m] + (double)resid[v] * xnorm[m];
                const double slack = SLACK * (fabs(approx) + bound);
                lower[m * n + v] = (float)(approx - bound - slack);
                upper[m * n + v] = (float)(approx + bound + slack);
            }
        }
        for (int m = 0; m < count && status == 0; m++) {
            const float *lo = lower + m * n, *up = upper + m * n;
            float high = -FLT_MAX;
            for (int64_t v = 0; v < n; v++) high = fmaxf(high, up[v]);
            const float floor_k = kth_largest(lo, n, top);
            if (!isfinite(high) || !isfinite(floor_k)) {
                status = -3;
                break;
            }
            /* two values more than one bfloat16 step apart cannot round to the same one (float32
             * logits are not rounded: for them the margin is wider than it needs to be) */
            const float step = 0x1p-7f * fmaxf(fabsf(floor_k), fabsf(high)) * 1.01f + FLT_MIN;
            const float threshold = floor_k - step;
            int64_t held = 0;
            int64_t *mine = found + (start + m) * cap;
            for (int64_t v = 0; v < n; v++) {
                if (up[v] >= threshold) {
                    if (held < cap) mine[held] = v;
                    held++;
                }
            }
            counts[start + m] = held;
        }
    }
    free(u);
    return status;
}
