/* The small per-layer operations of a decode step (vlbot, engine/cpu/decode_step.py).
 *
 * A decode step has one token per conversation: its RMSNorms and rotary embedding work on a few
 * thousand numbers, and in torch each is 5-10 operator calls of a few microseconds, ~35 per layer.
 * These functions do them in one call each, with the rounding of transformers' code: float32
 * normalisation rounded to the model's dtype, then scaled by the weight in that dtype; the
 * rotary products and their sum each rounded to the dtype (bfloat16 when `bf16`, else float32,
 * where rounding is the identity). Built with -ffp-contract=off: no fused multiply-adds.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* One row: out = weight * dtype(x * rsqrt(mean(x^2) + eps)). `x` and `out` may be the same. */
static void norm_row(const void *x, int64_t row, const void *weight, void *out, int64_t dim,
                     float eps, int bf16) {
    const int64_t at = row * dim;
    float squares = 0.0f;
    for (int64_t d = 0; d < dim; d++) {
        float v = load_value(x, at + d, bf16);
        squares += v * v;
    }
    const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t d = 0; d < dim; d++) {
        float normed = round_to(load_value(x, at + d, bf16) * scale, bf16);
        store_value(out, at + d, load_value(weight, d, bf16) * normed, bf16);
    }
}

/* RMSNorm of `rows` rows of `dim` values. */
void vlbot_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                    float eps, int bf16) {
    for (int64_t row = 0; row < rows; row++) norm_row(x, row, weight, out, dim, eps, bf16);
}

/* In place on `x` (batch, heads, dim): each head's RMSNorm, then the rotary embedding with the
 * batch row's cos/sin (batch, dim): x * cos + rotate_half(x) * sin. */
static void norm_rotate(void *x, const void *weight, const void *cos, const void *sin,
                        int64_t batch, int64_t heads, int64_t dim, float eps, int bf16) {
    const int64_t half = dim / 2;
    float row[dim];
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < heads; h++) {
            const int64_t line = b * heads + h;
            norm_row(x, line, weight, x, dim, eps, bf16);
            for (int64_t d = 0; d < dim; d++) row[d] = load_value(x, line * dim + d, bf16);
            for (int64_t d = 0; d < dim; d++) {
                float turned = d < half ? -row[d + half] : row[d - half];
                float a = round_to(row[d] * load_value(cos, b * dim + d, bf16), bf16);
                float c = round_to(turned * load_value(sin, b * dim + d, bf16), bf16);
                store_value(x, line * dim + d, a + c, bf16);
            }
        }
    }
}

/* The query's and the key's head norms and rotary embedding, in place. */
void vlbot_qk_norm_rotate(void *q, const void *q_weight, int64_t q_heads, void *k,
                          const void *k_weight, int64_t k_heads, const void *cos, const void *sin,
                          int64_t batch, int64_t dim, float eps, int bf16) {
    norm_rotate(q, q_weight, cos, sin, batch, q_heads, dim, eps, bf16);
    norm_rotate(k, k_weight, cos, sin, batch, k_heads, dim, eps, bf16);
}
