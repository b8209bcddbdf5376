/* GELU, tanh approximation (the Qwen3-VL vision MLP's activation), on bfloat16 or float32 tensors,
 * one source for every tier through simd.h.
 *
 * torch computes 0.5 x (1 + tanh(b (x + k x^3))) at ~1 G elements/s on two cores here (15 ms for
 * one vision layer's 4032 x 4096 activations at 1080p, ~0.4 s of a first token); this loop does the
 * same function in float, as x / (1 + exp(-2 b (x + k x^3))) (the identity
 * 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), which also avoids the cancellation in 1 + tanh(u) for
 * negative x), with simd.h's degree-7 polynomial exp (error below float's rounding), and rounds to
 * bfloat16 to nearest even where the tensor is bf16. It differs from torch's float result by a
 * few float units in the last place: after rounding to bfloat16 a small fraction of values (near a
 * rounding boundary) land one bfloat16 step apart.
 *
 * Built at run time by engine/cpu/native.py and called through ctypes (engine/cpu/kernels/gelu.py).
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

static inline vf gelu_tanh(vf x) {
    const vf inner = (x + 0.044715f * (x * x * x)) * 0.7978845608028654f; /* sqrt(2 / pi) */
    return x / (1.0f + vf_exp(inner * -2.0f));
}

/* y = gelu_tanh(x) for n values, bfloat16 when `bf16` else float (x and y may be the same array). */
static void gelu(const void *x, void *y, int64_t n, int bf16, int threads) {
    const int64_t blocks = n / VF_LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t at = b * VF_LANES;
        if (bf16) {
            vf_store_bf16((uint16_t *)y + at, gelu_tanh(vf_load_bf16((const uint16_t *)x + at)));
        } else {
            vf_store((float *)y + at, gelu_tanh(vf_load((const float *)x + at)));
        }
    }
    float tail[VF_LANES] = {0};
    const int64_t done = blocks * VF_LANES;
    for (int64_t i = done; i < n; i++) tail[i - done] = load_value(x, i, bf16);
    vf_store(tail, gelu_tanh(vf_load(tail)));
    for (int64_t i = done; i < n; i++) store_value(y, i, tail[i - done], bf16);
}

void vlbot_gelu_tanh_bf16(const uint16_t *x, uint16_t *y, int64_t n, int threads) { gelu(x, y, n, 1, threads); }

void vlbot_gelu_tanh_f32(const float *x, float *y, int64_t n, int threads) { gelu(x, y, n, 0, threads); }
