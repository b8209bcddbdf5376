/* Correctness driver for vlbot's portable C kernels, built for one CPU tier (the flags given to
 * the compiler) and run natively or, cross-built for aarch64, under qemu-user
 * (tests/test_kernels_cross.py). Each kernel is compared with a plain scalar C reference on
 * pseudo-random inputs; prints one line per failure and exits 1 on any.
 *
 * Build: cc -O2 -fopenmp [tier flags] -I engine/cpu/kernels tests/native/kernel_check.c -lm
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "bf16_gemm.c"
#include "bf16_matvec.c"
#include "decode_attention.c"
#include "decode_ops.c"
#include "vision_flash_portable.c"

static uint64_t state = 88172645463325252ull;

static float uniform(void) { /* xorshift64: [-1, 1) */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((state >> 40) / 8388608.0 - 1.0);
}

static int failures = 0;

static void check(const char *what, double got, double want, double tolerance, int64_t at) {
    if (fabs(got - want) > tolerance * (1.0 + fabs(want)) || got != got) {
        if (failures < 20) printf("FAIL %s [%lld]: got %.7g want %.7g\n", what, (long long)at, got, want);
        failures++;
    }
}

static void matvec_case(int64_t rows, int64_t k, int64_t n, int with_bias) {
    uint16_t *x = malloc(sizeof(uint16_t) * rows * k), *w = malloc(sizeof(uint16_t) * n * k);
    uint16_t *bias = malloc(sizeof(uint16_t) * n), *y = malloc(sizeof(uint16_t) * rows * n);
    float *xf = malloc(sizeof(float) * rows * k), *yf = malloc(sizeof(float) * rows * n);
    float *wide = malloc(sizeof(float) * n * k), *bias_f = malloc(sizeof(float) * n);
    float *yg = malloc(sizeof(float) * rows * n);
    for (int64_t i = 0; i < rows * k; i++) {
        x[i] = float_to_bf16(uniform());
        xf[i] = uniform();
    }
    for (int64_t i = 0; i < n * k; i++) w[i] = float_to_bf16(uniform());
    for (int64_t i = 0; i < n; i++) bias[i] = float_to_bf16(uniform());
    const uint16_t *b = with_bias ? bias : NULL;
    if (vlbot_bf16_matvec(x, rows, k, n, w, b, y, 2) != 0) failures++;
    vlbot_bf16_matvec_f32(xf, rows, k, n, w, b, yf, 2);
    vlbot_bf16_widen(w, wide, n * k, 2);
    for (int64_t j = 0; j < n; j++) bias_f[j] = bf16_to_float(bias[j]);
    if (vlbot_bf16_gemm(xf, rows, k, w, n, with_bias ? bias_f : NULL, yg, 2) != 0) failures++;
    for (int64_t m = 0; m < rows; m++) {
        for (int64_t j = 0; j < n; j++) {
            double want = with_bias ? bf16_to_float(bias[j]) : 0.0, want_f = want;
            for (int64_t c = 0; c < k; c++) {
                want += (double)bf16_to_float(x[m * k + c]) * bf16_to_float(w[j * k + c]);
                want_f += (double)xf[m * k + c] * bf16_to_float(w[j * k + c]);
            }
            /* bf16 output: one rounding (2^-8 relative) of a sum of k terms of size ~1 */
            check("bf16_matvec", bf16_to_float(y[m * n + j]), want, 1e-2 + 1e-6 * (double)k, m * n + j);
            check("bf16_matvec_f32", yf[m * n + j], want_f, 1e-5 * (double)k, m * n + j);
            check("bf16_gemm", yg[m * n + j], want_f, 1e-5 * (double)k, m * n + j);
        }
    }
    for (int64_t i = 0; i < n * k; i++) check("bf16_widen", wide[i], bf16_to_float(w[i]), 0.0, i);
    free(x), free(w), free(bias), free(y), free(xf), free(yf), free(wide), free(bias_f), free(yg);
}

static void rms_case(int64_t rows, int64_t dim, int bf16) {
    const size_t size = bf16 ? 2 : 4;
    void *x = malloc(size * rows * dim), *weight = malloc(size * dim), *out = malloc(size * rows * dim);
    for (int64_t i = 0; i < rows * dim; i++) store_value(x, i, 3.0f * uniform(), bf16);
    for (int64_t i = 0; i < dim; i++) store_value(weight, i, 1.0f + uniform(), bf16);
    const float eps = 1e-6f;
    vlbot_rms_norm(x, weight, out, rows, dim, eps, bf16);
    for (int64_t r = 0; r < rows; r++) {
        double squares = 0.0;
        for (int64_t i = 0; i < dim; i++) {
            double v = load_value(x, r * dim + i, bf16);
            squares += v * v;
        }
        const double scale = 1.0 / sqrt(squares / (double)dim + eps);
        for (int64_t i = 0; i < dim; i++) {
            double want = load_value(weight, i, bf16) * (load_value(x, r * dim + i, bf16) * scale);
            check(bf16 ? "rms_norm bf16" : "rms_norm f32", load_value(out, r * dim + i, bf16), want,
                  bf16 ? 2e-2 : 1e-5, r * dim + i);
        }
    }
    free(x), free(weight), free(out);
}

/* One query per batch row over a cache of `length` positions with room for more (token stride
 * dim, head stride (length + 3) * dim), row b attending from starts[b]; against double softmax. */
static void attention_case(int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t dim, int64_t length,
                           const int64_t *starts, int bf16) {
    const size_t size = bf16 ? 2 : 4;
    const int64_t room = length + 3, group = q_heads / kv_heads;
    const int64_t cache = batch * kv_heads * room * dim;
    void *q = malloc(size * batch * q_heads * dim), *out = malloc(size * batch * q_heads * dim);
    void *k = malloc(size * cache), *v = malloc(size * cache);
    double *p = malloc(sizeof(double) * length);
    for (int64_t i = 0; i < batch * q_heads * dim; i++) store_value(q, i, 2.0f * uniform(), bf16);
    for (int64_t i = 0; i < cache; i++) {
        store_value(k, i, 2.0f * uniform(), bf16);
        store_value(v, i, uniform(), bf16);
    }
    const float scale = 1.0f / sqrtf((float)dim);
    const int status = bf16 ? vlbot_decode_attention(q, k, v, kv_heads * room * dim, room * dim, dim, starts,
                                                     batch, q_heads, kv_heads, length, dim, scale, out, 2)
                            : vlbot_decode_attention_f32(q, k, v, kv_heads * room * dim, room * dim, dim,
                                                         starts, batch, q_heads, kv_heads, length, dim,
                                                         scale, out, 2);
    if (status != 0) failures++;
    for (int64_t b = 0; b < batch; b++) {
        for (int64_t h = 0; h < q_heads; h++) {
            const int64_t head = (b * kv_heads + h / group) * room * dim, query = (b * q_heads + h) * dim;
            double top = -INFINITY, total = 0.0;
            for (int64_t j = starts[b]; j < length; j++) {
                double dot = 0.0;
                for (int64_t d = 0; d < dim; d++)
                    dot += (double)load_value(q, query + d, bf16) * load_value(k, head + j * dim + d, bf16);
                p[j] = dot * scale;
                top = p[j] > top ? p[j] : top;
            }
            for (int64_t j = starts[b]; j < length; j++) total += (p[j] = exp(p[j] - top));
            for (int64_t d = 0; d < dim; d++) {
                double want = 0.0;
                for (int64_t j = starts[b]; j < length; j++) want += p[j] * load_value(v, head + j * dim + d, bf16);
                check(bf16 ? "decode_attention bf16" : "decode_attention f32", load_value(out, query + d, bf16),
                      want / total, bf16 ? 1e-2 : 1e-5, query + d);
            }
        }
    }
    free(q), free(out), free(k), free(v), free(p);
}

/* The vision attention over `rows` patches of `heads` heads of 64 channels, against a double
 * softmax: partial register blocks, query blocks and key chunks for rows not a multiple of them. */
static void vision_case(int64_t heads, int64_t rows, int bf16) {
    const size_t size = bf16 ? 2 : 4;
    const int64_t count = heads * rows * DIM;
    void *q = malloc(size * count), *k = malloc(size * count), *v = malloc(size * count);
    void *out = malloc(size * count);
    double *p = malloc(sizeof(double) * rows);
    for (int64_t i = 0; i < count; i++) {
        store_value(q, i, 3.0f * uniform(), bf16);
        store_value(k, i, 3.0f * uniform(), bf16);
        store_value(v, i, uniform(), bf16);
    }
    const float scale = 0.125f;
    if (vlbot_vision_attention(q, k, v, heads, rows, rows * DIM, scale, out, heads * DIM, bf16, 2) != 0)
        failures++;
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t r = 0; r < rows; r++) {
            const int64_t query = (h * rows + r) * DIM;
            double top = -INFINITY, total = 0.0;
            for (int64_t j = 0; j < rows; j++) {
                double dot = 0.0;
                for (int64_t d = 0; d < DIM; d++)
                    dot += (double)load_value(q, query + d, bf16) * load_value(k, (h * rows + j) * DIM + d, bf16);
                p[j] = dot * scale;
                top = p[j] > top ? p[j] : top;
            }
            for (int64_t j = 0; j < rows; j++) total += (p[j] = exp(p[j] - top));
            for (int64_t d = 0; d < DIM; d++) {
                double want = 0.0;
                for (int64_t j = 0; j < rows; j++) want += p[j] * load_value(v, (h * rows + j) * DIM + d, bf16);
                check(bf16 ? "vision_attention bf16" : "vision_attention f32",
                      load_value(out, r * heads * DIM + h * DIM + d, bf16), want / total,
                      bf16 ? 1e-2 : 1e-5, r * heads * DIM + h * DIM + d);
            }
        }
    }
    free(q), free(k), free(v), free(out), free(p);
}

int main(void) {
    const int64_t shapes[][3] = {{1, 64, 256}, {1, 37, 100}, {3, 37, 100}, {8, 130, 2048},
                                 {9, 20, 48},  {2, 5, 7},    {1, 1, 1},    {5, 64, 96}, {14, 300, 520}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        matvec_case(shapes[i][0], shapes[i][2], shapes[i][1], 0);
        matvec_case(shapes[i][0], shapes[i][2], shapes[i][1], 1);
    }
    for (int bf16 = 0; bf16 < 2; bf16++) {
        rms_case(1, 128, bf16);
        rms_case(3, 2048, bf16);
        rms_case(2, 7, bf16);
    }
    const int64_t starts[3] = {0, 5, 36};
    for (int bf16 = 0; bf16 < 2; bf16++) {
        attention_case(3, 4, 2, 32, 37, starts, bf16);   /* left padding; one row with only its token */
        attention_case(1, 16, 8, 128, 300, starts, bf16); /* Qwen3-VL-2B's heads */
        vision_case(2, 5, bf16);
        vision_case(3, 301, bf16); /* two key chunks, the second partial */
    }
    printf("%s: %d failure(s), vector of %d floats\n", failures ? "FAILED" : "ok", failures, VF_LANES);
    return failures ? 1 : 0;
}
