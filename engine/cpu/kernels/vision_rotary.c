/* The vision encoder's rotary embedding in one pass (vlbot, engine/cpu/kernels/vision_attention.py).
 *
 * transformers applies it to the query and key of every vision layer in float32 with seven
 * whole-tensor operations (up-cast, two products, rotate-half = slice + negate + concatenate, sum,
 * down-cast) and then copies them head-major for attention: ~30 ms per layer for a 1080p
 * screenshot's 4,032 patches on 2 cores, 0.7 s of the encoder's 4.6 s. This reads the fused
 * q/k/v projection once and writes q and k rotated and v, each head-major, with the same float32
 * arithmetic in the same order (built with -ffp-contract=off: no fused multiply-adds), so the
 * results are bit for bit those of transformers.
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* qkv: (seq, 3, heads, dim) float or bfloat16 (`bf16`); cos, sin: (seq, dim) float.
 * q, k, v: (heads, seq, dim) in qkv's dtype; q and k rotated: x * cos + rotate_half(x) * sin. */
void vlbot_vision_rotary(const void *qkv, const float *cos, const float *sin, int64_t seq,
                         int64_t heads, int64_t dim, void *q, void *k, void *v, int bf16,
                         int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t s = 0; s < seq; s++) {
        const float *c = cos + s * dim;
        const float *n = sin + s * dim;
        float x[dim], rotated[dim];
        for (int64_t h = 0; h < heads; h++) {
            const int64_t out = (h * seq + s) * dim;
            for (int part = 0; part < 2; part++) {
                const int64_t in = ((s * 3 + part) * heads + h) * dim;
                for (int64_t d = 0; d < dim; d++) x[d] = load_value(qkv, in + d, bf16);
                for (int64_t d = 0; d < half; d++) {
                    rotated[d] = -x[d + half];
                    rotated[d + half] = x[d];
                }
                void *target = part == 0 ? q : k;
                for (int64_t d = 0; d < dim; d++) {
                    float a = x[d] * c[d];
                    float b = rotated[d] * n[d];
                    store_value(target, out + d, a + b, bf16);
                }
            }
            const int64_t in = ((s * 3 + 2) * heads + h) * dim;
            const int64_t size = bf16 ? 2 : 4;
            memcpy((char *)v + out * size, (const char *)qkv + in * size, (size_t)(dim * size));
        }
    }
}
