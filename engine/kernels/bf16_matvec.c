/* bfloat16 weight x activation products for a few rows (vlbot's bf16 decode steps), AVX-512F.
 *
 * A decode step multiplies one activation row per conversation by every weight matrix: the time
 * is the time to stream the weights from memory. oneDNN's bf16 matrix-vector product reads them at
 * ~18-20 GB/s on the 2-core machine vlbot is measured on; this loop reads four weight rows at a
 * time, widens each bfloat16 to float (a 16-bit shift) and accumulates in float, at ~25 GB/s
 * (29 GB/s measured for a plain float sum there). Weights are used as they are (row-major
 * (N, K) bfloat16, the model's own tensor): nothing is repacked or copied.
 *
 * Built at run time by engine/native.py and called through ctypes (engine/bf16_kernel.py).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WEIGHT_ROWS 4       /* output rows computed together */
#ifndef PREFETCH_ELEMENTS
#define PREFETCH_ELEMENTS 1024
#endif
#define PREFETCH_ELEMENTS_DOC /* how far ahead in a weight row to prefetch (2 KiB) */

static inline __m512 widen(const uint16_t *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

static inline uint16_t to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even (values are finite) */
    return (uint16_t)(bits >> 16);
}

static inline float dot_tail(const uint16_t *w, const float *x, int64_t from, int64_t k) {
    float sum = 0.0f;
    for (int64_t c = from; c < k; c++) {
        uint32_t bits = (uint32_t)w[c] << 16;
        float value;
        memcpy(&value, &bits, 4);
        sum += value * x[c];
    }
    return sum;
}

/* y[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]) for m < rows; x, y and bias bfloat16, w (n_out, k)
 * bfloat16. Returns 0, or -1 when its scratch memory could not be allocated. */
int vlbot_bf16_matvec(const uint16_t *x, int64_t rows, int64_t k, int64_t n_out,
                      const uint16_t *w, const uint16_t *bias, uint16_t *y, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    if (xf == NULL) return -1;
    for (int64_t i = 0; i < rows * k; i++) {
        uint32_t bits = (uint32_t)x[i] << 16;
        memcpy(xf + i, &bits, 4);
    }
    const int64_t body = k - k % 32;
    const int64_t blocks = (n_out + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t first = b * WEIGHT_ROWS;
        const int64_t count = n_out - first < WEIGHT_ROWS ? n_out - first : WEIGHT_ROWS;
        for (int64_t m = 0; m < rows; m++) {
            const float *xm = xf + m * k;
            __m512 acc[WEIGHT_ROWS][2];
            for (int i = 0; i < WEIGHT_ROWS; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
            if (count == WEIGHT_ROWS) {
                for (int64_t c = 0; c < body; c += 32) {
                    __m512 x0 = _mm512_loadu_ps(xm + c), x1 = _mm512_loadu_ps(xm + c + 16);
                    for (int i = 0; i < WEIGHT_ROWS; i++) {
                        const uint16_t *row = w + (first + i) * k + c;
                        if (m == 0) _mm_prefetch((const char *)(row + PREFETCH_ELEMENTS), _MM_HINT_T0);
                        acc[i][0] = _mm512_fmadd_ps(widen(row), x0, acc[i][0]);
                        acc[i][1] = _mm512_fmadd_ps(widen(row + 16), x1, acc[i][1]);
                    }
                }
            }
            for (int64_t i = 0; i < count; i++) {
                const uint16_t *row = w + (first + i) * k;
                const int64_t done = count == WEIGHT_ROWS ? body : 0;
                float sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1]));
                sum += dot_tail(row, xm, done, k);
                if (bias != NULL) {
                    uint32_t bits = (uint32_t)bias[first + i] << 16;
                    float value;
                    memcpy(&value, &bits, 4);
                    sum += value;
                }
                y[m * n_out + first + i] = to_bf16(sum);
            }
        }
    }
    free(xf);
    return 0;
}
