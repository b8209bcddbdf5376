/* The language model's element-wise operations over a whole prompt
 * (vlbot, engine/cpu/kernels/prefill_ops.py), on bfloat16 or float32 rows, one source for every
 * tier through simd.h.
 *
 * A prompt's prefill runs every layer on all its tokens at once: a 1080p screenshot's prompt is
 * ~1,040 rows of 2,048 values. transformers' RMSNorm is six whole-tensor operators there (up-cast,
 * square, mean, rsqrt, two products, down-cast) and its MLP's silu(gate) * up two more over
 * 6,144 columns; on 2 cores those add up to ~0.5 s of the screenshot's first token. These do each
 * in one pass over the rows (rows shared between threads). In bfloat16 (`bf16` = 1) they round
 * as transformers' bfloat16 operators do:
 *
 *   RMSNorm     out = bfloat16(weight * bfloat16(x / sqrt(mean(x^2) + eps)))  (float inside)
 *   SiLU-gate   out = bfloat16(bfloat16(silu(g)) * u),  silu(g) = g / (1 + e^-g) in float
 *
 * and in float32 (`bf16` = 0: the model that computes in float32 on a tier without bf16
 * arithmetic, engine/cpu/half_weights.py) they are the same formulas without the roundings.
 * The sums of squares are added in another order than torch's, and e^-g is simd.h's vf_exp
 * instead of torch's exponential, so a bfloat16 result can differ from torch's by one bfloat16
 * step now and then, and a float32 one by a few units in the last place (the tests bound both).
 */
#include <math.h>
#include <stdint.h>

#include "simd.h"

#define MAX_HEAD_VECTORS (256 / VF_LANES) /* norm_rotate takes heads of up to 256 channels */

static inline float inverse_rms(const void *x, int64_t at, int64_t dim, float eps, int bf16) {
    vf s0 = vf_zero(), s1 = s0, s2 = s0, s3 = s0;
    int64_t d = 0;
    for (; d + 4 * VF_LANES <= dim; d += 4 * VF_LANES) {
        const vf a = vf_load_as(x, at + d, bf16), b = vf_load_as(x, at + d + VF_LANES, bf16);
        const vf c = vf_load_as(x, at + d + 2 * VF_LANES, bf16), e = vf_load_as(x, at + d + 3 * VF_LANES, bf16);
        s0 = vf_fma(a, a, s0);
        s1 = vf_fma(b, b, s1);
        s2 = vf_fma(c, c, s2);
        s3 = vf_fma(e, e, s3);
    }
    for (; d < dim; d += VF_LANES) {
        const vf a = vf_load_as(x, at + d, bf16);
        s0 = vf_fma(a, a, s0);
    }
    const float squares = vf_sum((s0 + s1) + (s2 + s3));
    return 1.0f / sqrtf(squares / (float)dim + eps);
}

static inline __attribute__((always_inline)) void rms_norm(const void *x, const void *weight, void *out,
                                                          int64_t rows, int64_t dim, float eps,
                                                          const int bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t at = r * dim;
        const vf scale = vf_splat(inverse_rms(x, at, dim, eps, bf16));
        for (int64_t d = 0; d < dim; d += VF_LANES) {
            const vf normed = vf_rounded_as(vf_load_as(x, at + d, bf16) * scale, bf16);
            vf_store_as(out, at + d, vf_load_as(weight, d, bf16) * normed, bf16);
        }
    }
}

/* x (rows, dim) -> out, with a weight of x's type; dim a multiple of 16. `x` and `out` may be
 * the same. */
void vlbot_prefill_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                            float eps, int bf16, int threads) {
    if (bf16) {
        rms_norm(x, weight, out, rows, dim, eps, 1, threads);
    } else {
        rms_norm(x, weight, out, rows, dim, eps, 0, threads);
    }
}

static inline __attribute__((always_inline)) void silu_gate(const void *gate, const void *up,
                                                           int64_t stride, void *out, int64_t rows,
                                                           int64_t columns, const int bf16,
                                                           int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < columns; c += VF_LANES) {
            const vf g = vf_load_as(gate, r * stride + c, bf16), u = vf_load_as(up, r * stride + c, bf16);
            vf_store_as(out, r * columns + c, vf_silu_times(g, u, bf16), bf16);
        }
    }
}

/* gate and up (rows, columns) of one type, rows `stride` elements apart -> out (rows, columns);
 * columns a multiple of 16. */
void vlbot_prefill_silu_gate(const void *gate, const void *up, int64_t stride, void *out,
                             int64_t rows, int64_t columns, int bf16, int threads) {
    if (bf16) {
        silu_gate(gate, up, stride, out, rows, columns, 1, threads);
    } else {
        silu_gate(gate, up, stride, out, rows, columns, 0, threads);
    }
}

static inline __attribute__((always_inline)) void norm_rotate(
    const void *x, const void *weight, const void *cos, const void *sin, void *out, int64_t batch,
    int64_t seq, int64_t heads, int64_t dim, float eps, const int bf16, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t position = 0; position < batch * seq; position++) {
        const int64_t b = position / seq, s = position % seq;
        for (int64_t h = 0; h < heads; h++) {
            const int64_t at = (position * heads + h) * dim;
            vf normed[MAX_HEAD_VECTORS];
            const vf scale = vf_splat(inverse_rms(x, at, dim, eps, bf16));
            for (int64_t d = 0; d < dim; d += VF_LANES) {
                const vf v = vf_rounded_as(vf_load_as(x, at + d, bf16) * scale, bf16);
                normed[d / VF_LANES] = vf_rounded_as(vf_load_as(weight, d, bf16) * v, bf16);
            }
            const int64_t target = ((b * heads + h) * seq + s) * dim;
            for (int64_t d = 0; d < dim; d += VF_LANES) {
                const vf turned = d < half ? -normed[(d + half) / VF_LANES] : normed[(d - half) / VF_LANES];
                const vf a = vf_rounded_as(normed[d / VF_LANES] * vf_load_as(cos, position * dim + d, bf16), bf16);
                const vf e = vf_rounded_as(turned * vf_load_as(sin, position * dim + d, bf16), bf16);
                vf_store_as(out, target + d, a + e, bf16);
            }
        }
    }
}

/* x (batch, seq, heads, dim) -> out (batch, heads, seq, dim): each head's RMSNorm (as above), then
 * the rotary embedding with the position's cos/sin (batch, seq, dim), all of x's type; in
 * bfloat16 each product and the sum rounded as transformers' bfloat16 operators do:
 *   out = bfloat16(bfloat16(n * cos) + bfloat16(rotate_half(n) * sin)),
 *   rotate_half(n) = (-n[half:], n[:half]).
 * dim a multiple of 32 and at most 256. */
void vlbot_prefill_norm_rotate(const void *x, const void *weight, const void *cos, const void *sin,
                               void *out, int64_t batch, int64_t seq, int64_t heads, int64_t dim,
                               float eps, int bf16, int threads) {
    if (bf16) {
        norm_rotate(x, weight, cos, sin, out, batch, seq, heads, dim, eps, 1, threads);
    } else {
        norm_rotate(x, weight, cos, sin, out, batch, seq, heads, dim, eps, 0, threads);
    }
}
