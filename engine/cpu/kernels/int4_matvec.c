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

/* Rows m0 .. m0 + count - 1 of one block of 16 outputs. Each 64-byte weight chunk is loaded (and
 * its nibbles split) once for the `count` activation rows (a prompt's rows, or a batch's). A row
 * alone keeps four partial sums (two chunks, low and high nibbles); in a block of rows each row
 * adds both nibbles into one sum, the rows being the independent chains. The sums are integers,
 * so a row gets exactly what it gets alone. */
static inline __attribute__((always_inline)) void int4_rows(
    const uint8_t *block, const uint16_t *block_scales, const uint16_t *block_lows,
    const int8_t *xq, const float *xs, const float *xsum, int64_t k, int64_t group,
    int64_t n_out, int64_t b, int64_t m0, void *y, int y_bf16, const int count) {
    const int split = count == 1 ? 2 : 1;
    const int64_t groups = k / group, chunks = group / 8;
    v16sf acc[ROW_BLOCK];
    for (int r = 0; r < count; r++) acc[r] = (v16sf){0};
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *w = block + g * chunks * 64;
        acc16 sums[ROW_BLOCK > 4 ? ROW_BLOCK : 4];
        for (int i = 0; i < (count == 1 ? 4 : count); i++) sums[i] = acc_zero();
        for (int64_t c = 0; c < chunks; c += split) {
            for (int u = 0; u < split; u++) {
                __builtin_prefetch(w + (c + u) * 64 + PREFETCH_BYTES);
                for (int r = 0; r < count; r++) {
                    const int8_t *xg = xq + (m0 + r) * k + g * group + (c + u) * 8;
                    int32_t x_lo, x_hi;
                    memcpy(&x_lo, xg, 4);
                    memcpy(&x_hi, xg + 4, 4);
                    if (count == 1)
                        dot_nibbles(&sums[2 * u], &sums[2 * u + 1], w + (c + u) * 64, x_lo, x_hi);
                    else
                        dot_nibbles(&sums[r], &sums[r], w + (c + u) * 64, x_lo, x_hi);
                }
            }
        }
        const v16sf scale16 = load16h(block_scales + g * 16), low16 = load16h(block_lows + g * 16);
        for (int r = 0; r < count; r++) {
            const acc16 total = count == 1 ? acc_add(acc_add(sums[0], sums[2]), acc_add(sums[1], sums[3])) : sums[r];
            const int64_t at = (m0 + r) * groups + g;
            acc[r] += acc_float(total) * (scale16 * xs[at]);
            acc[r] += low16 * xsum[at];
        }
    }
    for (int r = 0; r < count; r++) store16(y, (m0 + r) * n_out + b * 16, acc[r], y_bf16);
}

/* y[m][n] for m < rows, n < n_out; x and y are float, or bfloat16 where `x_bf16` / `y_bf16`.
 * Returns 0, or -1 when its scratch memory could not be allocated.
 *
 * A prompt's rows go through here too, ROW_BLOCK at a time per weight block (a 16 x K block
 * stays in the first cache levels while the rows pass): figures against widening the weights
 * for torch's product in engine/cpu/kernels/int4_kernel.py. */
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
    quantize_groups(x, x_bf16, rows, k, group, xq, xs, xsum, threads);
    const int64_t groups = k / group;
    const int64_t blocks = n_out / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *block = packed + b * (k / 8) * 64;
        const uint16_t *block_scales = scales + b * groups * 16;
        const uint16_t *block_lows = lows + b * groups * 16;
        for (int64_t m0 = 0; m0 < rows; m0 += ROW_BLOCK) {
            const int64_t left = rows - m0;
            /* constant row counts: the accumulators stay in registers */
            switch (left < ROW_BLOCK ? left : ROW_BLOCK) {
#define ROWS_CASE(n)                                                                               \
    case n:                                                                                        \
        int4_rows(block, block_scales, block_lows, xq, xs, xsum, k, group, n_out, b, m0, y, y_bf16, n); \
        break;
                ROW_CASES
#undef ROWS_CASE
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}
