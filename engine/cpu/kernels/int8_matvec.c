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

/* How far ahead of the weights being read to prefetch. One decode step's products (28 layers of
 * Qwen3-VL-2B, 1.41 GB, read cold, 2 threads, alternating, median ms), 1024 against 2048 bytes:
 * AVX2 forced 36.9 -> 34.5 (7 of 8) and 39.0 -> 36.4 (9 of 10), avx512_bf16 40.2 -> 38.5 (7 of 8),
 * AVX-512 forced 44.7 -> 44.4; 4096 as 2048 on AVX2. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048
#endif

const char *vlbot_int8_isa(void) { return QUANT_DOT_ISA; }

/* Rows m0 .. m0 + count - 1 of `blocks` consecutive blocks of 16 outputs (from block b). Each
 * 64-byte weight chunk is loaded once for the `count` activation rows (a prompt's rows, or a
 * batch's), and each activation load serves the `blocks` blocks; with one block each row keeps
 * `split` partial sums so that at least ACC_CHAINS accumulators are in flight. The sums are
 * integers, so the result is the same for any count, blocks and split: a row gets exactly what it
 * gets alone. */
static inline __attribute__((always_inline)) void int8_rows(
    const int8_t *first, const float *row_scales, const int8_t *xq, const float *xs,
    const int32_t *xq_sum, int64_t k, int64_t group, int64_t n_out, int64_t b, int64_t m0,
    void *y, int y_bf16, const int count, const int blocks) {
    const int split = blocks > 1 ? 1 : count == 1 ? 4 : (ACC_CHAINS / count > 1 ? ACC_CHAINS / count : 1);
    const int64_t groups = k / group, chunks = group / 4, stride = (k / 4) * 64;
    v16sf acc[PROMPT_BLOCKS][ROW_BLOCK];
    for (int j = 0; j < blocks; j++)
        for (int r = 0; r < count; r++) acc[j][r] = (v16sf){0};
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *w = first + g * chunks * 64;
        acc16 sums[PROMPT_BLOCKS][ACC_CHAINS > 4 ? ACC_CHAINS : 4];
        for (int j = 0; j < blocks; j++)
            for (int i = 0; i < count * split; i++) sums[j][i] = acc_zero();
        for (int64_t c = 0; c < chunks; c += split) {
            for (int s = 0; s < split; s++) {
                for (int j = 0; j < blocks; j++) __builtin_prefetch(w + j * stride + (c + s) * 64 + PREFETCH_BYTES);
                for (int r = 0; r < count; r++) {
                    int32_t x4;
                    memcpy(&x4, xq + (m0 + r) * k + g * group + (c + s) * 4, 4);
                    for (int j = 0; j < blocks; j++)
                        sums[j][r * split + s] = dot_s8s8(sums[j][r * split + s], w + j * stride + (c + s) * 64, x4);
                }
            }
        }
        for (int r = 0; r < count; r++) {
            const int64_t at = (m0 + r) * groups + g;
            const float bias = (float)(DOT_S8_BIAS * xq_sum[at]);
            for (int j = 0; j < blocks; j++) {
                acc16 total = sums[j][r * split];
                for (int s = 1; s < split; s++) total = acc_add(total, sums[j][r * split + s]);
                acc[j][r] += (acc_float(total) - bias) * xs[at];
            }
        }
    }
    for (int j = 0; j < blocks; j++) {
        const v16sf scale = load16f(row_scales + (b + j) * 16);
        for (int r = 0; r < count; r++) store16(y, (m0 + r) * n_out + (b + j) * 16, acc[j][r] * scale, y_bf16);
    }
}

/* y[m][n] for m < rows, n < n_out; x and y are float, or bfloat16 where `x_bf16` / `y_bf16`;
 * activations quantized per `group` channels. Returns 0, or -1 without scratch memory.
 *
 * A prompt's rows go through here too, ROW_BLOCK at a time per weight block (a 16 x K block
 * stays in the first cache levels while the rows pass): on tiers without bf16 arithmetic it
 * beats widening the weights for torch's float32 product, and natively it matches oneDNN's bf16
 * product over the expanded weights (figures in engine/cpu/kernels/int8_kernel.py). */
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
    quantize_groups(x, x_bf16, rows, k, group, xq, xs, xsum, threads);
    const int64_t groups = k / group;
    int32_t *xq_sum = (int32_t *)xsum; /* the float sums are not needed here: reuse their space */
    for (int64_t at = 0; at < rows * groups; at++) {
        int32_t total = 0;
        for (int64_t i = 0; i < group; i++) total += xq[at * group + i];
        xq_sum[at] = total;
    }
    const int64_t blocks = n_out / 16;
    /* a prompt (more rows than a decode batch): PROMPT_BLOCKS blocks share each activation load */
    const int64_t together = rows > ROW_BLOCK && blocks % PROMPT_BLOCKS == 0 ? PROMPT_BLOCKS : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < blocks / together; p++) {
        const int64_t b = p * together;
        const int8_t *first = packed + b * (k / 4) * 64;
        const int64_t step = together > 1 ? PROMPT_ROWS : ROW_BLOCK;
        for (int64_t m0 = 0; m0 < rows; m0 += step) {
            const int64_t left = rows - m0;
            /* constant row and block counts: the accumulators stay in registers */
            if (together > 1) {
                switch (left < PROMPT_ROWS ? left : PROMPT_ROWS) {
#define ROWS_CASE(n)                                                                               \
    case n: int8_rows(first, row_scales, xq, xs, xq_sum, k, group, n_out, b, m0, y, y_bf16, n, PROMPT_BLOCKS); break;
                    PROMPT_ROW_CASES
#undef ROWS_CASE
                }
                continue;
            }
            switch (left < ROW_BLOCK ? left : ROW_BLOCK) {
#define ROWS_CASE(n)                                                                               \
    case n: int8_rows(first, row_scales, xq, xs, xq_sum, k, group, n_out, b, m0, y, y_bf16, n, 1); break;
                ROW_CASES
#undef ROWS_CASE
            }
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}
