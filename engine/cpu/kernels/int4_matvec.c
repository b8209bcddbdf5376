/* 4-bit weight x 8-bit activation matrix products for decode steps (vlbot int4), one source for
 * every CPU tier: the per-ISA step is quant_dot.h's dot_nibbles (AVX-512 VNNI, AVX-512BW, AVX2,
 * NEON dotprod, plain C).
 *
 * Weights: asymmetric 4-bit in groups of G input channels, w[n][k] = q * scale + low, q in 0..15.
 * Layout: rows in blocks of 16; for each block, every 8 input channels (k = 8c .. 8c+7) take
 * 64 bytes: byte 4*r + i holds q[16b + r][8c + i] in its low nibble and q[16b + r][8c + 4 + i] in
 * its high nibble. One 64-byte load feeds two dot steps (low and high nibbles), each giving all
 * 16 rows their dot product over 4 channels. Scales and lows: IEEE half precision (uint16 bits),
 * [block][group][16] (float32 scales and lows were 44 MB of the ~1 GB a Qwen3-VL-2B step reads).
 *
 * Activations are quantized per group to int8 (quant_dot.h), as llama.cpp's Q4 kernels pair 4-bit
 * weights with 8-bit activations; the group's exact float sum carries the `low` term.
 * Per output: y = sum_g scale * xs_g * dot_g(q, xq) + low * sum_g(x).
 *
 * Built at run time by engine.cpu.native for the process's tier and called through ctypes
 * (engine/cpu/kernels/int4_kernel.py); OpenMP shares torch's thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_dot.h"

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024 /* how far ahead of the weights being read to prefetch */
#endif

const char *vlbot_int4_isa(void) { return QUANT_DOT_ISA; }

/* y[m][n] for m < rows, n < n_out; x and y are float, or bfloat16 where `x_bf16` / `y_bf16`.
 * Returns 0, or -1 when its scratch memory could not be allocated. */
int vlbot_int4_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t n_out,
                      int64_t group, const uint8_t *packed, const uint16_t *scales, const uint16_t *lows,
                      void *y, int y_bf16, int threads) {
    int8_t *xq = malloc((size_t)(rows * k));
    float *xs = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    float *xsum = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    if (xq == NULL || xs == NULL || xsum == NULL) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    quantize_groups(x, x_bf16, rows, k, group, xq, xs, xsum);
    const int64_t groups = k / group;
    const int64_t blocks = n_out / 16;
    const int64_t chunks = group / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = packed + b * (k / 8) * 64;
        const uint16_t *block_scales = scales + b * groups * 16;
        const uint16_t *block_lows = lows + b * groups * 16;
        for (int64_t m = 0; m < rows; m++) {
            const int8_t *xrow = xq + m * k;
            v16sf acc = {0};
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *w = block + g * chunks * 64;
                const int8_t *xg = xrow + g * group;
                acc16 sums[4] = {acc_zero(), acc_zero(), acc_zero(), acc_zero()};
                for (int64_t c = 0; c < chunks; c += 2) {
                    __builtin_prefetch(w + c * 64 + PREFETCH_BYTES);
                    __builtin_prefetch(w + c * 64 + 64 + PREFETCH_BYTES);
                    for (int u = 0; u < 2; u++) {
                        int32_t x_lo, x_hi;
                        memcpy(&x_lo, xg + (c + u) * 8, 4);
                        memcpy(&x_hi, xg + (c + u) * 8 + 4, 4);
                        dot_nibbles(&sums[2 * u], &sums[2 * u + 1], w + (c + u) * 64, x_lo, x_hi);
                    }
                }
                const v16sf dot = acc_float(acc_add(acc_add(sums[0], sums[2]), acc_add(sums[1], sums[3])));
                const v16sf scale = load16h(block_scales + g * 16) * xs[m * groups + g];
                acc += dot * scale;
                acc += load16h(block_lows + g * 16) * xsum[m * groups + g];
            }
            store16(y, m * n_out + b * 16, acc, y_bf16);
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* The weights w[n][k] row-major, as float (`as_bf16` 0) or bfloat16 (1), for large products
 * (a prompt's prefill expands each layer's weights into a reused buffer, then multiplies with
 * oneDNN). Groups are multiples of 16 channels, so one scale per 16 channels. */
void vlbot_int4_dequantize(int64_t k, int64_t n_out, int64_t group, const uint8_t *packed,
                           const uint16_t *scales, const uint16_t *lows, void *w, int as_bf16, int threads) {
    const int64_t groups = k / group;
    const int64_t blocks = n_out / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = packed + b * (k / 8) * 64;
        float scale[64], low[64], lo[64], hi[64], values[16];
        for (int64_t g = 0; g < groups; g++) {
            halves_to_floats(scales + (b * groups + g) * 16, values);
            spread4(values, scale);
            halves_to_floats(lows + (b * groups + g) * 16, values);
            spread4(values, low);
            for (int64_t c = g * group / 8; c < (g + 1) * group / 8; c++) {
                const uint8_t *v = block + c * 64;
                for (int l = 0; l < 64; l++) {
                    lo[l] = (float)(v[l] & 0x0f) * scale[l] + low[l];
                    hi[l] = (float)(v[l] >> 4) * scale[l] + low[l];
                }
                store_rows4(w, b * 16, k, c * 8, lo, as_bf16);
                store_rows4(w, b * 16, k, c * 8 + 4, hi, as_bf16);
            }
        }
    }
}
