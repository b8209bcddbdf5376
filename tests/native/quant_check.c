/* The quantized byte kernels (int8_matvec.c, int4_matvec.c) against a scalar C reference of
 * their arithmetic, built for whichever target the compiler is given (x86 tiers, aarch64 under
 * qemu-user): activations quantized per group as the kernels do, then plain integer dot products.
 * Prints "ok: 0 failure(s), isa <name>" or the first differences. Used by tests/test_quant_cross.py. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "int4_matvec.c"
#include "int8_matvec.c"

static uint32_t state = 12345u;
static float uniform(void) { /* -1 .. 1 */
    state = state * 1664525u + 1013904223u;
    return (float)(state >> 8) / (float)(1u << 23) - 1.0f;
}

static int failures = 0;
static void check(const char *what, int64_t at, double got, double want, double tolerance) {
    if (fabs(got - want) > tolerance) {
        if (failures < 10) printf("%s[%lld]: %.7g, want %.7g\n", what, (long long)at, got, want);
        failures++;
    }
}

int main(void) {
    enum { ROWS = 11, K = 256, N = 48, G = 128 }; /* 11 rows: whole row blocks (8 or 4) and a part */
    float x[ROWS * K];
    for (int i = 0; i < ROWS * K; i++) x[i] = uniform() * (i % 37 == 0 ? 20.0f : 1.0f);
    int8_t xq[ROWS * K];
    float xs[ROWS * K / G], xsum[ROWS * K / G];
    quantize_groups(x, 0, ROWS, K, G, xq, xs, xsum, 1);

    /* int8: w[n][k] = q * scale[n]; packed (N/16, K/4, 64), byte 4r + i = q[16b + r][4c + i] */
    static int8_t q8[N * K], packed8[N * K];
    float scale8[N], y8[ROWS * N];
    for (int n = 0; n < N; n++) {
        scale8[n] = 0.001f + 0.01f * (uniform() + 1.0f);
        for (int k = 0; k < K; k++) q8[n * K + k] = (int8_t)lrintf(uniform() * 127.0f);
    }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) packed8[(n / 16) * (K / 4) * 64 + (k / 4) * 64 + 4 * (n % 16) + k % 4] = q8[n * K + k];
    if (vlbot_int8_matmul(x, 0, ROWS, K, N, G, packed8, scale8, y8, 0, 2) != 0) return 2;
    for (int m = 0; m < ROWS; m++)
        for (int n = 0; n < N; n++) {
            double want = 0;
            for (int g = 0; g < K / G; g++) {
                long dot = 0;
                for (int i = 0; i < G; i++) dot += (long)q8[n * K + g * G + i] * xq[m * K + g * G + i];
                want += (double)dot * xs[m * (K / G) + g];
            }
            want *= scale8[n];
            check("int8 y", m * N + n, y8[m * N + n], want, 1e-5 * (fabs(want) + 1.0));
        }

    /* int4: w = q * scale + low per group; packed (N/16, K/8, 64), byte 4r + i = q[.][8c + i] |
     * q[.][8c + 4 + i] << 4; scales and lows (N/16, K/G, 16) */
    static uint8_t q4[N * K], packed4[N * K / 2];
    float scale4[N * K / G], low4[N * K / G], y4[ROWS * N];
    uint16_t scale4h[N * K / G], low4h[N * K / G]; /* the kernel's: IEEE half precision */
    for (int i = 0; i < N * K; i++) q4[i] = (uint8_t)((uniform() + 1.0f) * 7.99f);
    for (int n = 0; n < N; n++)
        for (int g = 0; g < K / G; g++) {
            const int at = (n / 16) * (K / G) * 16 + g * 16 + n % 16;
            /* values float16 holds exactly: scale 2^-17 x 1024..2047, low a multiple of 2^-14 */
            scale4[at] = (float)(1024 + (int)((uniform() + 1.0f) * 511.0f)) * 0x1p-17f;
            low4[at] = (float)(int)((-8.0f * scale4[at] + 0.001f * uniform()) * 0x1p14f) * 0x1p-14f;
            const _Float16 hs = (_Float16)scale4[at], hl = (_Float16)low4[at];
            memcpy(scale4h + at, &hs, 2);
            memcpy(low4h + at, &hl, 2);
        }
    for (int n = 0; n < N; n++)
        for (int c = 0; c < K / 8; c++)
            for (int i = 0; i < 4; i++)
                packed4[(n / 16) * (K / 8) * 64 + c * 64 + 4 * (n % 16) + i] =
                    (uint8_t)(q4[n * K + 8 * c + i] | q4[n * K + 8 * c + 4 + i] << 4);
    if (vlbot_int4_matmul(x, 0, ROWS, K, N, G, packed4, scale4h, low4h, y4, 0, 2) != 0) return 2;
    for (int m = 0; m < ROWS; m++)
        for (int n = 0; n < N; n++) {
            double want = 0;
            for (int g = 0; g < K / G; g++) {
                const int at = (n / 16) * (K / G) * 16 + g * 16 + n % 16;
                long dot = 0;
                for (int i = 0; i < G; i++) dot += (long)q4[n * K + g * G + i] * xq[m * K + g * G + i];
                want += (double)dot * xs[m * (K / G) + g] * scale4[at] + (double)low4[at] * xsum[m * (K / G) + g];
            }
            check("int4 y", m * N + n, y4[m * N + n], want, 1e-5 * (fabs(want) + 1.0));
        }
    printf("ok: %d failure(s), isa %s\n", failures, vlbot_int8_isa());
    return failures != 0;
}
