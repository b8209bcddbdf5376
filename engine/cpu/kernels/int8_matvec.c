/* 8-bit weight x 8-bit activation matrix products for decode steps (vlbot int8), one source for
 * every CPU tier: the per-ISA step is quant_dot.h's dot_s8s8 (AVX-512 VNNI, AVX-512BW, AVX2,
 * NEON dotprod, plain C).
 *
 * Weights: symmetric int8 per output row, w[n][k] = q * scale[n], q in -127..127.
 * Layout: rows in blocks of 16; for each block, every 4 input channels (k = 4c .. 4c+3) take
 * 64 bytes: byte 4*r + i holds q[16b + r][4c + i], so one 64-byte load and one dot step give all
 * 16 rows their dot product over 4 channels.
 *
 * Activations are quantized per group of G channels to int8 (quant_dot.h), as llama.cpp's Q8_0
 * does with 32; per output: y = scale[n] * sum_g xs_g * dot_g(q, xq).
 *
 * Built at run time by engine.cpu.native for the process's tier and called through ctypes
 * (engine/cpu/kernels/int8_kernel.py); OpenMP shares torch's thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_dot.h"

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024 /* how far ahead of the weights being read to prefetch */
#endif

const char *vlbot_int8_isa(void) { return QUANT_DOT_ISA; }

/* y[m][n] for m < rows, n < n_out; x and y are float, or bfloat16 where `x_bf16` / `y_bf16`;
 * activations quantized per `group` channels. Returns 0, or -1 without scratch memory. */
int vlbot_int8_matmul(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t n_out,
                      int64_t group, const int8_t *packed, const float *row_scales, void *y,
                      int y_bf16, int threads) {
    int8_t *xq = malloc((size_t)(rows * k));
    float *xs = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    float *xsum = malloc(sizeof(float) * (size_t)(rows * (k / group)));
    if (xq == NULL || xs == NULL || xsum == NULL) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    quantize_groups(x, x_bf16, rows, k, group, xq, xs, xsum);
    const int64_t groups = k / group;
    int32_t *xq_sum = (int32_t *)xsum; /* the float sums are not needed here: reuse their space */
    for (int64_t at = 0; at < rows * groups; at++) {
        int32_t total = 0;
        for (int64_t i = 0; i < group; i++) total += xq[at * group + i];
        xq_sum[at] = total;
    }
    const int64_t blocks = n_out / 16;
    const int64_t chunks = group / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *block = packed + b * (k / 4) * 64;
        const v16sf scale = load16f(row_scales + b * 16);
        for (int64_t m = 0; m < rows; m++) {
            const int8_t *xrow = xq + m * k;
            v16sf acc = {0};
            for (int64_t g = 0; g < groups; g++) {
                const int8_t *w = block + g * chunks * 64;
                const int8_t *xg = xrow + g * group;
                acc16 sums[4] = {acc_zero(), acc_zero(), acc_zero(), acc_zero()};
                for (int64_t c = 0; c < chunks; c += 4) {
                    __builtin_prefetch(w + c * 64 + PREFETCH_BYTES);
                    __builtin_prefetch(w + c * 64 + 64 + PREFETCH_BYTES);
                    __builtin_prefetch(w + c * 64 + 128 + PREFETCH_BYTES);
                    __builtin_prefetch(w + c * 64 + 192 + PREFETCH_BYTES);
                    for (int u = 0; u < 4; u++) {
                        int32_t x4;
                        memcpy(&x4, xg + (c + u) * 4, 4);
                        sums[u] = dot_s8s8(sums[u], w + (c + u) * 64, x4);
                    }
                }
                const v16sf dot = acc_float(acc_add(acc_add(sums[0], sums[1]), acc_add(sums[2], sums[3])));
                acc += (dot - (float)(DOT_S8_BIAS * xq_sum[m * groups + g])) * xs[m * groups + g];
            }
            store16(y, m * n_out + b * 16, acc * scale, y_bf16);
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

/* The weights w[n][k] = q * scale[n] row-major, as float (`as_bf16` 0) or bfloat16 (1), for large
 * products (a prompt's prefill: expanded per layer into a reused buffer, multiplied by oneDNN). */
void vlbot_int8_dequantize(int64_t k, int64_t n_out, const int8_t *packed, const float *row_scales,
                           void *w, int as_bf16, int threads) {
    const int64_t blocks = n_out / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int8_t *block = packed + b * (k / 4) * 64;
        float scale[64], f[64];
        spread4(row_scales + b * 16, scale);
        for (int64_t c = 0; c < k / 4; c++) {
            const int8_t *q = block + c * 64;
            for (int l = 0; l < 64; l++) f[l] = (float)q[l] * scale[l];
            store_rows4(w, b * 16, k, c * 4, f, as_bf16);
        }
    }
}
