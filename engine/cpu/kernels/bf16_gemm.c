/* float32 rows times bfloat16 weights for a prompt: out (rows, n) = x (rows, k) W^T + bias, W the
 * model's own (n, k) bfloat16 tensor, one source for every CPU tier (engine/cpu/kernels/simd.h).
 *
 * On a tier without bf16 arithmetic the half-size-weights model (engine.cpu.half_weights) used
 * to widen each weight block to float32 and hand it to oneDNN's float32 product. This is the
 * usual blocked product (BLIS's loops) with the widening folded into the packing of the weights:
 * - x is packed once into MR-row panels per KC columns (zero rows past the last), shared by the
 *   threads;
 * - each thread takes NC weight rows at a time and, per KC columns, widens them into NR-column
 *   panels (KC x NR floats, each read from L1 by the micro-kernel for every MR rows of x);
 * - the micro-kernel keeps an MR x NR block of sums in registers (6 x 2 vectors: 12 of the 16
 *   AVX2 registers), one broadcast of x and two weight vectors per step.
 * Measured on the tier where it is used (see bf16_gemm.py for the figures and where it is not).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

#define MR 6
#define NR (2 * VF_LANES)
#ifndef KC
#define KC 256
#endif
#ifndef MP
#define MP 16
#endif
#ifndef NC
#define NC 256 /* a multiple of NR on every tier (NR is 8, 16 or 32) */
#endif

/* x rows [0, rows) columns [c0, c0 + kc) into panels of MR rows: panel p holds, for each of
 * the kc columns, its MR rows' values (0 past the last row). */
static void pack_rows(const float *x, int64_t rows, int64_t k, int64_t c0, int64_t kc, float *dst, int64_t panel) {
    const int64_t r0 = panel * MR;
    float *out = dst + panel * MR * kc;
    for (int64_t i = 0; i < MR; i++) {
        const int64_t r = r0 + i;
        if (r < rows) {
            const float *src = x + r * k + c0;
            for (int64_t c = 0; c < kc; c++) out[c * MR + i] = src[c];
        } else {
            for (int64_t c = 0; c < kc; c++) out[c * MR + i] = 0.0f;
        }
    }
}

/* weight rows [j0, j0 + nc) columns [c0, c0 + kc), widened into panels of NR weight rows: for
 * each column, NR floats (0 past the last weight row). */
static void pack_weights(const uint16_t *w, int64_t n, int64_t k, int64_t j0, int64_t nc, int64_t c0, int64_t kc,
                         float *dst) {
    for (int64_t jp = 0; jp < nc; jp += NR) {
        float *panel = dst + jp * kc;
        for (int64_t j = 0; j < NR; j++) {
            const int64_t row = j0 + jp + j;
            if (row < n) {
                const uint16_t *src = w + row * k + c0;
                int64_t c = 0;
                for (; c + VF_LANES <= kc; c += VF_LANES) {
                    float lanes[VF_LANES];
                    vf_store(lanes, vf_load_bf16(src + c));
                    for (int64_t l = 0; l < VF_LANES; l++) panel[(c + l) * NR + j] = lanes[l];
                }
                for (; c < kc; c++) panel[c * NR + j] = bf16_to_float(src[c]);
            } else {
                for (int64_t c = 0; c < kc; c++) panel[c * NR + j] = 0.0f;
            }
        }
    }
}

/* the MR x NR block of sums over kc columns: a (kc x MR), b (kc x NR) packed; written to tile
 * (MR x NR floats) */
static inline __attribute__((always_inline)) void micro_kernel(const float *a, const float *b, int64_t kc,
                                                               float *tile) {
    vf sums[MR][2];
    for (int i = 0; i < MR; i++) sums[i][0] = sums[i][1] = vf_zero();
    for (int64_t p = 0; p < kc; p++) {
        const vf b0 = vf_load(b + p * NR), b1 = vf_load(b + p * NR + VF_LANES);
#pragma GCC unroll 6 /* MR: the sums stay in registers */
        for (int i = 0; i < MR; i++) {
            const vf av = vf_load_splat(a + p * MR + i);
            sums[i][0] = vf_fma(av, b0, sums[i][0]);
            sums[i][1] = vf_fma(av, b1, sums[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        vf_store(tile + i * NR, sums[i][0]);
        vf_store(tile + i * NR + VF_LANES, sums[i][1]);
    }
}

/* tile's valid part into out at (r0, j0): stored (the first columns' sums, plus the bias) or
 * added (later columns) */
static void write_tile(const float *tile, float *out, int64_t rows, int64_t n, int64_t r0, int64_t j0, int first,
                       const float *bias) {
    const int64_t mr = rows - r0 < MR ? rows - r0 : MR;
    const int64_t nr = n - j0 < NR ? n - j0 : NR;
    for (int64_t i = 0; i < mr; i++) {
        float *dst = out + (r0 + i) * n + j0;
        const float *src = tile + i * NR;
        if (nr == NR) {
            for (int v = 0; v < 2; v++) {
                vf sum = vf_load(src + v * VF_LANES);
                if (first) {
                    if (bias) sum += vf_load(bias + j0 + v * VF_LANES);
                } else {
                    sum += vf_load(dst + v * VF_LANES);
                }
                vf_store(dst + v * VF_LANES, sum);
            }
        } else {
            for (int64_t j = 0; j < nr; j++) dst[j] = first ? src[j] + (bias ? bias[j0 + j] : 0.0f) : dst[j] + src[j];
        }
    }
}

/* out (rows, n) = x (rows, k) times w (n, k) bfloat16, transposed, plus bias (float32, n) or
 * NULL. Returns 0, or -1 where working memory could not be allocated (out is then undefined). */
int vlbot_bf16_gemm(const float *x, int64_t rows, int64_t k, const uint16_t *w, int64_t n, const float *bias,
                    float *out, int threads) {
    const int64_t panels = (rows + MR - 1) / MR;
    const int64_t kblocks = (k + KC - 1) / KC;
    /* x packed per KC columns: block c holds panels x MR x kc floats */
    float *packed = aligned_alloc(64, (size_t)(panels * MR * kblocks * KC) * sizeof(float) + 64);
    if (!packed) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t c = 0; c < kblocks; c++)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t kc = k - c * KC < KC ? k - c * KC : KC;
            pack_rows(x, rows, k, c * KC, kc, packed + c * panels * MR * KC, p);
        }
    const int64_t nblocks = (n + NC - 1) / NC;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *weights = aligned_alloc(64, (size_t)(NC * KC) * sizeof(float));
        float tile[MR * NR] __attribute__((aligned(64)));
        if (!weights) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t jb = 0; jb < nblocks; jb++) {
            if (!weights) continue;
            const int64_t j0 = jb * NC;
            const int64_t nc = n - j0 < NC ? n - j0 : NC;
            const int64_t ncr = (nc + NR - 1) / NR * NR;
            for (int64_t c = 0; c < kblocks; c++) {
                const int64_t kc = k - c * KC < KC ? k - c * KC : KC;
                pack_weights(w, n, k, j0, ncr, c * KC, kc, weights);
                const float *xs = packed + c * panels * MR * KC;
                for (int64_t p0 = 0; p0 < panels; p0 += MP) {
                    const int64_t p1 = p0 + MP < panels ? p0 + MP : panels;
                    for (int64_t jp = 0; jp < ncr; jp += NR)
                        for (int64_t p = p0; p < p1; p++) {
                            micro_kernel(xs + p * MR * kc, weights + jp * kc, kc, tile);
                            write_tile(tile, out, rows, n, p * MR, j0 + jp, c == 0, bias);
                        }
                }
            }
        }
        free(weights);
    }
    free(packed);
    return failed ? -1 : 0;
}
