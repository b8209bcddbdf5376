/* The small per-layer operations of a decode step (vlbot, engine/decode_step.py).
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

static inline float load_value(const void *base, int64_t at, int bf16) {
    if (!bf16) return ((const float *)base)[at];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[at] << 16;
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

static inline float rounded(float value, int bf16) {
    if (!bf16) return value;
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    bits &= 0xffff0000u;
    memcpy(&value, &bits, 4);
    return value;
}

static inline void store_value(void *base, int64_t at, float value, int bf16) {
    if (!bf16) {
        ((float *)base)[at] = value;
        return;
    }
    uint32_t bits;
    value = rounded(value, 1);
    memcpy(&bits, &value, 4);
    ((uint16_t *)base)[at] = (uint16_t)(bits >> 16);
}

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
        float normed = rounded(load_value(x, at + d, bf16) * scale, bf16);
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
                float a = rounded(row[d] * load_value(cos, b * dim + d, bf16), bf16);
                float c = rounded(turned * load_value(sin, b * dim + d, bf16), bf16);
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
