/* bfloat16 weight x activation products for a few rows (vlbot's decode steps), one source for
 * every CPU tier (engine/cpu/kernels/simd.h: AVX-512, AVX2, NEON, plain C).
 *
 * A decode step multiplies one activation row per conversation by every weight matrix: the time
 * is the time to stream the weights from memory. oneDNN's bf16 matrix-vector product reads them at
 * ~18-20 GB/s on the 2-core machine vlbot is measured on; this loop widens each bfloat16 to float
 * (a 16-bit shift) and accumulates in float. A single activation row (single_row) reads one
 * weight row at a time as one linear stream, widens pairs of weights with two bit operations,
 * keeps two independent accumulator pairs (CHAINS) so that the additions' latency never paces
 * the reading, and prefetches the row 4 below at the same column. Over the 28 layers' decode
 * matrices (benchmarks/bf16_matvec_ab.py, 2 threads, 30 interleaved rounds, medians), against
 * the former four rows at a time with one accumulator pair and prefetch 8 rows below:
 * avx512_bf16 69.3 -> 60.0 ms (a plain float sum over the same bytes: 55.8), forced AVX-512
 * 52.2 -> 41.8 (sum 38.6), forced AVX2 72.2 -> 59.3 (sum 56.3); reading two or four rows
 * together lost on every tier (8 rows: 64.6 against one row's 48.3 natively). Weights are used as they
 * are (row-major (N, K) bfloat16, the model's own tensor): nothing is repacked or copied. A batch
 * of up to MAX_ROWS conversations reads each weight vector once for all of its rows; built for
 * the avx512_bf16 tier, a batch multiplies bf16 pairs with `vdpbf16ps` instead of widening them:
 * 5 rows or more two weight rows at a time (2 threads, interleaved medians over the 28 layers'
 * weights: 6 rows 121 -> 78 ms, 8 rows 160 -> 61), 2-4 rows one weight row at a time as one
 * stream, as single_row reads them (stream_dp; against widening the weights and two rows at a
 * time, 16 interleaved rounds: 4 rows 77.9 -> 75.8 ms, 3 rows 64.5 -> 58.3; 12 rounds: 2 rows
 * 77.3 -> 69.4; the two-row `vdpbf16ps` loop lost at 2-4 rows: 81.0, 56.6, 82.5 ms); a whole
 * 4-chat decode step of the full-size model with its output head, 129.4 -> 118.6 ms (7 of 8
 * alternations in one process; one chat's step unchanged, 90.9 / 89.4 ms).
 *
 * Measured against torch on each tier (Zen5, 2048->6144 weights, 24 matrices cycled, 1 thread,
 * a machine loaded by other work (load ~6-7), so the 2-thread figures were noise): avx512_bf16:
 * 1 row 1.99 ms (12.6 GB/s) against this file's AVX-512-only version's 1.99 and torch's bf16
 * linear's 2.67 ms; 4 rows 1.96 against 2.88 and 2.75 ms. AVX2 forced (ATEN_CPU_CAPABILITY=avx2
 * ONEDNN_MAX_CPU_ISA=AVX2), float32 activations: 1 row 1.68 ms against torch's float32 linear
 * 4.54 ms (the half-size weights' decode) and its bf16 linear 1.82 ms (bf16 activations); 4 rows
 * 2.53 against 7.43 and 6.39 ms; 8 rows 4.43 against 9.80 and 14.56 ms.
 *
 * Two entry points: vlbot_bf16_matvec (bf16 activations in and out: the bf16 model) and
 * vlbot_bf16_matvec_f32 (float activations in and out, bf16 weights: the half-size weights of a
 * float32 model on CPUs without bf16 arithmetic).
 *
 * Built at run time by engine/cpu/native.py and called through ctypes (engine/cpu/kernels/bf16_kernel.py).
 */
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

#ifndef WEIGHT_ROWS
/* Weight rows single_row reads together for one activation row. Two on AVX2: on a real AVX2-only
 * CPU (AMD EPYC Zen3, 2.45 GHz, 2 cores, ~22 GB/s) the 28 layers' decode matrices (2.82 GB, 2
 * threads, 16 interleaved rounds) take 150.9 ms with 2 against 180.9 ms with 1 (16 of 16 rounds;
 * a plain float32 sum over the same bytes 132.5 ms); 4 rows with one chain each is the same as 2
 * (148.8), 3 the same (127.1 vs 124.1 in another run). One elsewhere: on the Zen5 (avx512_bf16,
 * forced AVX-512) 1 row in two chains beat 4 rows by 13-20 %. Zen5 with AVX2 forced preferred 1
 * too (59.3 vs 72.2 ms against 4 rows in one chain), but a forced tier is not a CPU anyone
 * runs, and the real one decides. */
#if defined(__AVX2__) && !defined(__AVX512F__)
#define WEIGHT_ROWS 2
#else
#define WEIGHT_ROWS 1
#endif
#endif
/* weights of a row per loop step: one 64-byte cache line (one prefetch each), or two vectors'
 * worth where a vector is wider (AVX-512: 2 x 16) */
#define STEP (2 * VF_LANES > 32 ? 2 * VF_LANES : 32)
#ifndef CHAINS
#define CHAINS 2 /* independent accumulator pairs per weight row in single_row */
#endif
#ifndef SINGLE_SCHEDULE
#define SINGLE_SCHEDULE static /* how single_row's blocks are shared by the threads */
#endif
#define PRAGMA(text) _Pragma(#text)
#define MAX_ROWS 8    /* activation rows that share one reading of the weights */
#ifndef PREFETCH_ELEMENTS
/* how far ahead each weight row is prefetched: swept over all 28 layers + head (3.44 GB, huge
 * pages, 2 cores): 384 elements (768 bytes) 121 ms, 256 125, 512 125, 1024 130, 2048 128 */
#define PREFETCH_ELEMENTS 384
#endif
#ifndef PREFETCH_ROWS
/* single_row prefetches the rows this many rows below the ones it reads, at the same column */
#define PREFETCH_ROWS 4
#endif
#ifndef FEW_AHEAD
/* few_rows prefetches the weight rows this many rows below, at the same column (as single_row;
 * it used to prefetch 768 bytes ahead in its own two rows). A 4-chat decode step of the full-size
 * model, 2 threads, ms (one run each, load ~1.5, this machine's runs vary by ~15 %): same-row
 * 122.8 natively / 149-163 AVX2 forced; 4 rows below 115 / 107; 8 below 106 / 120; 16 below
 * 80-107 / 109; 32 below 116-127 / 120-139. */
#define FEW_AHEAD 16
#endif
/* Weight rows few_rows reads together for `rows` activation rows: as many as keep rows x weight
 * rows accumulators in registers without spilling, about 12 of them where there are 16 vector
 * registers (AVX2): their additions then wait on each other less. 28 layers' weights, float
 * activations, 2 threads, 10 interleaved rounds: AVX-512 forced 4 weight rows instead of 2: 4
 * rows 69.3 -> 58.0 ms (10 of 10), 8 rows 149.5 -> 112.1 (10/10), 2 rows 75.4 -> 74.0 (8/10);
 * AVX2 forced 4 rows 70.7 -> 89.5 ms and 2 rows 71.5 -> 76.0 with 4 (16 accumulators spill).
 * AVX2 forced, 3 instead of 2 for 2-4 rows, a 1024 x 2048 matrix in cache (the arithmetic
 * alone: a 4-row decode step's products are compute-bound there when memory is fast), 12
 * alternations, GFLOPS: 2 rows 105 -> 120, 3 rows 124 -> 142, 4 rows 153 -> 166; 6 rows 184 ->
 * 149 (18 accumulators), so 2 from 5 rows. NEON has 32 registers too but is unmeasured. A
 * -DFEW_WEIGHT_ROWS=n build uses n for every batch. */
static inline int weight_rows_for(const int rows) {
#if defined(FEW_WEIGHT_ROWS)
    (void)rows;
    return FEW_WEIGHT_ROWS;
#elif defined(__AVX512F__)
    (void)rows;
    return 4;
#else
    return rows <= 4 ? 3 : 2;
#endif
}
#define MAX_WEIGHT_ROWS 4
#ifndef DP_MIN_ROWS
/* batches of at least this many rows multiply bf16 pairs with `vdpbf16ps` two weight rows at a
 * time (few_rows_dp); smaller ones one weight row at a time (stream_dp) (avx512_bf16 tier) */
#define DP_MIN_ROWS 5
#endif
#ifndef PREFETCH_LOCALITY
#define PREFETCH_LOCALITY 3 /* __builtin_prefetch's: 3 all cache levels, 0 non-temporal */
#endif

static inline float dot_tail(const uint16_t *w, const float *x, int64_t from, int64_t k) {
    float sum = 0.0f;
    for (int64_t c = from; c < k; c++) sum += bf16_to_float(w[c]) * x[c];
    return sum;
}

static inline float bias_of(const uint16_t *bias, int64_t n) {
    return bias == NULL ? 0.0f : bf16_to_float(bias[n]);
}

/* One activation row times `wr` weight rows from `first` (wr = WEIGHT_ROWS, or 1 for the rows
 * past the last whole block). Each vector load takes 2 * VF_LANES bf16 weights as VF_LANES
 * 32-bit lanes; a lane's low half is an even-numbered weight, its high half the odd one after it.
 * `lane << 16` is the even weight as a float, `lane & 0xffff0000` the odd one: two plain bit
 * operations instead of a cross-lane widening per half vector. `xs` holds the activations in the
 * same order (each 2 * VF_LANES block: its even elements, then its odd ones; split_activations),
 * so one accumulator per row gathers the even products, one the odd. Each weight row has its own
 * accumulators and the same order of additions whatever `wr` is: a row's sum has the same bits
 * wherever it sits in the matrix (engine/cpu/kernels/output_head.py relies on it). */
static inline __attribute__((always_inline)) void row_block(
    const float *xf, const float *xs, int64_t k, int64_t n_out, const uint16_t *w,
    const uint16_t *bias, void *y, int out_bf16, int64_t first, const int wr) {
    const int64_t body = k - k % (STEP * CHAINS);
    vf acc[WEIGHT_ROWS][CHAINS][2];
    for (int i = 0; i < wr; i++)
        for (int h = 0; h < CHAINS; h++) acc[i][h][0] = acc[i][h][1] = vf_zero();
    const vu high = (vu){0} + 0xffff0000u;
    /* the rows PREFETCH_ROWS below, while they exist (the last blocks prefetch their own) */
    const int64_t ahead = first + PREFETCH_ROWS + wr <= n_out ? PREFETCH_ROWS : 0;
    for (int64_t c0 = 0; c0 < body; c0 += STEP * CHAINS) {
        for (int h = 0; h < CHAINS; h++) {
            const int64_t c = c0 + h * STEP;
            for (int i = 0; i < wr; i++)
                __builtin_prefetch(w + (first + i + ahead) * k + c, 0, PREFETCH_LOCALITY);
            for (int u = 0; u < STEP; u += 2 * VF_LANES) {
                const vf even = vf_load(xs + c + u), odd = vf_load(xs + c + u + VF_LANES);
                for (int i = 0; i < wr; i++) {
                    vu pairs;
                    memcpy(&pairs, w + (first + i) * k + c + u, sizeof pairs);
                    acc[i][h][0] += (vf)(pairs << 16) * even;
                    acc[i][h][1] += (vf)(pairs & high) * odd;
                }
            }
        }
    }
    for (int i = 0; i < wr; i++) {
        vf total = acc[i][0][0] + acc[i][0][1];
        for (int h = 1; h < CHAINS; h++) total += acc[i][h][0] + acc[i][h][1];
        float sum = vf_sum(total);
        sum += dot_tail(w + (first + i) * k, xf, body, k) + bias_of(bias, first + i);
        store_value(y, first + i, sum, out_bf16);
    }
}

/* Block b of one activation row's products: WEIGHT_ROWS weight rows, the last block's rows one
 * at a time. */
static void single_row(const float *xf, const float *xs, int64_t k, int64_t n_out,
                       const uint16_t *w, const uint16_t *bias, void *y, int out_bf16, int64_t b) {
    const int64_t first = b * WEIGHT_ROWS;
    if (n_out - first >= WEIGHT_ROWS) {
        row_block(xf, xs, k, n_out, w, bias, y, out_bf16, first, WEIGHT_ROWS);
        return;
    }
    for (int64_t row = first; row < n_out; row++)
        row_block(xf, xs, k, n_out, w, bias, y, out_bf16, row, 1);
}

/* x's first `body` elements in single_row's order: each block of 2 * VF_LANES, its even
 * elements then its odd ones. */
static void split_activations(const float *x, float *xs, int64_t body) {
    for (int64_t c = 0; c < body; c += 2 * VF_LANES)
        for (int j = 0; j < VF_LANES; j++) {
            xs[c + j] = x[c + 2 * j];
            xs[c + VF_LANES + j] = x[c + 2 * j + 1];
        }
}

/* The two weight rows' sums for each activation row: the accumulators' lanes, the tail past
 * `body`, the bias; stored into y (rounded to bfloat16 where out_bf16). */
static inline __attribute__((always_inline)) void store_pair(
    const vf *a0, const vf *a1, const int rows, const float *xf, int64_t k, int64_t n_out,
    const uint16_t *r0, const uint16_t *r1, int64_t body, const uint16_t *bias, void *y,
    int out_bf16, int64_t first) {
    for (int m = 0; m < rows; m++) {
        const float *xm = xf + m * k;
        float s0 = vf_sum(a0[m]) + dot_tail(r0, xm, body, k);
        store_value(y, m * n_out + first, s0 + bias_of(bias, first), out_bf16);
        if (first + 1 < n_out) {
            float s1 = vf_sum(a1[m]) + dot_tail(r1, xm, body, k);
            store_value(y, m * n_out + first + 1, s1 + bias_of(bias, first + 1), out_bf16);
        }
    }
}

/* Where few_rows prefetches for weight row `row` (of the pair starting at `first`): the row
 * FEW_AHEAD below at the same column while it exists, else the same row PREFETCH_ELEMENTS ahead. */
static inline const uint16_t *prefetched(const uint16_t *row, int64_t first, int64_t k, int64_t n_out) {
    return first + FEW_AHEAD + 1 < n_out ? row + FEW_AHEAD * k : row + PREFETCH_ELEMENTS;
}

/* `rows` (2..MAX_ROWS) activation rows against weight_rows_for(rows) weight rows: each weight
 * vector is loaded once for all of them, so a batch costs about what one row costs (the weights'
 * reading), and each activation vector once for all the weight rows. */
static inline __attribute__((always_inline)) void few_rows(const float *xf, int64_t k,
                                                          int64_t n_out, const uint16_t *w,
                                                          const uint16_t *bias, void *y,
                                                          int out_bf16, int64_t block,
                                                          const int rows) {
    const int weight_rows = weight_rows_for(rows);
    const int64_t body = k - k % STEP;
    const int64_t first = block * weight_rows;
    const uint16_t *r[MAX_WEIGHT_ROWS], *p[MAX_WEIGHT_ROWS];
    for (int i = 0; i < weight_rows; i++) {
        r[i] = w + (first + i < n_out ? first + i : n_out - 1) * k; /* past the end: the last row */
        p[i] = prefetched(r[i], first, k, n_out);
    }
    vf a[MAX_WEIGHT_ROWS][MAX_ROWS];
    for (int i = 0; i < weight_rows; i++)
        for (int m = 0; m < rows; m++) a[i][m] = vf_zero();
    for (int64_t c = 0; c < body; c += STEP) {
        for (int i = 0; i < weight_rows; i++) prefetch(p[i] + c);
        for (int u = 0; u < STEP; u += VF_LANES) {
            vf wv[MAX_WEIGHT_ROWS];
            for (int i = 0; i < weight_rows; i++) wv[i] = vf_load_bf16(r[i] + c + u);
            for (int m = 0; m < rows; m++) {
                const vf xv = vf_held(vf_load(xf + m * k + c + u));
                for (int i = 0; i < weight_rows; i++) a[i][m] += wv[i] * xv;
            }
        }
    }
    for (int i = 0; i < weight_rows && first + i < n_out; i++) {
        for (int m = 0; m < rows; m++) {
            const float sum = vf_sum(a[i][m]) + dot_tail(r[i], xf + m * k, body, k);
            store_value(y, m * n_out + first + i, sum + bias_of(bias, first + i), out_bf16);
        }
    }
}

#ifdef __AVX512BF16__
/* The `vdpbf16ps` loop of few_rows_dp and stream_dp: 32 weights at `a` and 32 at `b` per step
 * (`step` elements apart from the previous ones), each against `rows` bf16 activation rows
 * (row m at x + m * k; b's activations `b_shift` elements after a's), summed into d0 and d1.
 * Products of two bf16 values are exact in float, each pair's sum is rounded once. */
static inline __attribute__((always_inline)) void dp_loop(const uint16_t *x, int64_t k,
                                                         int64_t body, const uint16_t *a,
                                                         const uint16_t *b, int64_t b_shift,
                                                         const uint16_t *pa, const uint16_t *pb,
                                                         const int step, const int rows,
                                                         __m512 *d0, __m512 *d1) {
    for (int m = 0; m < rows; m++) d0[m] = d1[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < body; c += step) {
        __builtin_prefetch(pa + c, 0, PREFETCH_LOCALITY);
        __builtin_prefetch(pb + c, 0, PREFETCH_LOCALITY);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(a + c));
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512((const void *)(b + c));
        for (int m = 0; m < rows; m++) {
            const uint16_t *xm = x + m * k + c;
            d0[m] = _mm512_dpbf16_ps(d0[m], w0, (__m512bh)_mm512_loadu_si512((const void *)xm));
            d1[m] = _mm512_dpbf16_ps(d1[m], w1,
                                     (__m512bh)_mm512_loadu_si512((const void *)(xm + b_shift)));
        }
    }
}

/* As few_rows, with the bf16 pairs multiplied and summed by `vdpbf16ps` (32 weights of each of
 * two weight rows against 32 activations per instruction, no widening). Only where the
 * activations are bf16. */
static inline __attribute__((always_inline)) void few_rows_dp(const uint16_t *x, const float *xf,
                                                             int64_t k, int64_t n_out,
                                                             const uint16_t *w,
                                                             const uint16_t *bias, void *y,
                                                             int out_bf16, int64_t pair,
                                                             const int rows) {
    const int64_t body = k - k % 32;
    const int64_t first = pair * 2;
    const uint16_t *r0 = w + first * k;
    const uint16_t *r1 = first + 1 < n_out ? r0 + k : r0;
    __m512 d0[MAX_ROWS], d1[MAX_ROWS];
    dp_loop(x, k, body, r0, r1, 0, prefetched(r0, first, k, n_out), prefetched(r1, first, k, n_out),
            32, rows, d0, d1);
    vf a0[MAX_ROWS], a1[MAX_ROWS];
    for (int m = 0; m < rows; m++) {
        memcpy(&a0[m], &d0[m], sizeof(vf));
        memcpy(&a1[m], &d1[m], sizeof(vf));
    }
    store_pair(a0, a1, rows, xf, k, n_out, r0, r1, body, bias, y, out_bf16, first);
}

/* 2..DP_MIN_ROWS-1 bf16 activation rows against one weight row, read as one linear stream and
 * prefetched PREFETCH_ROWS rows below (as single_row), its 64-weight blocks multiplied by
 * `vdpbf16ps` into two accumulators per activation row. */
static inline __attribute__((always_inline)) void stream_dp(const uint16_t *x, const float *xf,
                                                           int64_t k, int64_t n_out,
                                                           const uint16_t *w,
                                                           const uint16_t *bias, void *y,
                                                           int out_bf16, int64_t n,
                                                           const int rows) {
    const int64_t body = k - k % 64;
    const uint16_t *r = w + n * k;
    const uint16_t *p = n + PREFETCH_ROWS < n_out ? r + PREFETCH_ROWS * k : r + PREFETCH_ELEMENTS;
    __m512 d0[MAX_ROWS], d1[MAX_ROWS];
    dp_loop(x, k, body, r, r + 32, 32, p, p + 32, 64, rows, d0, d1);
    for (int m = 0; m < rows; m++) {
        const __m512 both = _mm512_add_ps(d0[m], d1[m]);
        vf total;
        memcpy(&total, &both, sizeof total);
        const float sum = vf_sum(total) + dot_tail(r, xf + m * k, body, k);
        store_value(y, m * n_out + n, sum + bias_of(bias, n), out_bf16);
    }
}

static void stream_dp_any(const uint16_t *x, const float *xf, int64_t k, int64_t n_out,
                          const uint16_t *w, const uint16_t *bias, void *y, int out_bf16,
                          int64_t n, int rows) {
    switch (rows) { /* constant row counts: the accumulators stay in registers */
    case 2: stream_dp(x, xf, k, n_out, w, bias, y, out_bf16, n, 2); break;
    case 3: stream_dp(x, xf, k, n_out, w, bias, y, out_bf16, n, 3); break;
    default: stream_dp(x, xf, k, n_out, w, bias, y, out_bf16, n, DP_MIN_ROWS - 1); break;
    }
}
#define FEW_ROWS(rows)                                                                         \
    (x != NULL ? few_rows_dp(x, xf, k, n_out, w, bias, y, out_bf16, block, rows)                \
               : few_rows(xf, k, n_out, w, bias, y, out_bf16, block, rows))
/* weight rows per FEW_ROWS call */
#define BLOCK_ROWS(x, rows) ((x) != NULL ? 2 : weight_rows_for(rows))
#else
#define FEW_ROWS(rows) few_rows(xf, k, n_out, w, bias, y, out_bf16, block, rows)
#define BLOCK_ROWS(x, rows) weight_rows_for(rows)
#endif

/* x: the bf16 activations where there are any (the avx512_bf16 tier multiplies them directly),
 * else NULL; xf: the same as floats. */
static void few_rows_any(const uint16_t *x, const float *xf, int64_t k, int64_t n_out,
                         const uint16_t *w, const uint16_t *bias, void *y, int out_bf16,
                         int64_t block, int rows) {
    switch (rows) { /* constant row counts: the accumulators stay in registers */
    case 2: FEW_ROWS(2); break;
    case 3: FEW_ROWS(3); break;
    case 4: FEW_ROWS(4); break;
    case 5: FEW_ROWS(5); break;
    case 6: FEW_ROWS(6); break;
    case 7: FEW_ROWS(7); break;
    default: FEW_ROWS(MAX_ROWS); break;
    }
}

static int products(const uint16_t *x, const float *xf, int64_t rows, int64_t k, int64_t n_out,
                     const uint16_t *w, const uint16_t *bias, void *y, int out_bf16,
                     int threads) {
    const size_t out_size = out_bf16 ? sizeof(uint16_t) : sizeof(float);
    for (int64_t start = 0; start < rows; start += MAX_ROWS) {
        const int count = rows - start < MAX_ROWS ? (int)(rows - start) : MAX_ROWS;
        const float *xs = xf + start * k;
        const uint16_t *xb = x == NULL ? NULL : x + start * k;
        void *ys = (char *)y + (size_t)(start * n_out) * out_size;
        if (count == 1) {
            const int64_t blocks = (n_out + WEIGHT_ROWS - 1) / WEIGHT_ROWS;
            float *split = malloc(sizeof(float) * (size_t)k);
            if (split == NULL) return -1;
            split_activations(xs, split, k - k % STEP);
            PRAGMA(omp parallel for num_threads(threads) schedule(SINGLE_SCHEDULE))
            for (int64_t b = 0; b < blocks; b++)
                single_row(xs, split, k, n_out, w, bias, ys, out_bf16, b);
            free(split);
        }
#ifdef __AVX512BF16__
        else if (xb != NULL && count < DP_MIN_ROWS) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t n = 0; n < n_out; n++)
                stream_dp_any(xb, xs, k, n_out, w, bias, ys, out_bf16, n, count);
        }
#endif
        else {
            const int64_t blocks = (n_out + BLOCK_ROWS(xb, count) - 1) / BLOCK_ROWS(xb, count);
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t b = 0; b < blocks; b++)
                few_rows_any(xb, xs, k, n_out, w, bias, ys, out_bf16, b, count);
        }
    }
    return 0;
}

/* y[m][n] = sum_k x[m][k] * w[n][k] (+ bias[n]) for m < rows; x, y and bias bfloat16, w (n_out, k)
 * bfloat16. Returns 0, or -1 when its scratch memory could not be allocated. */
int vlbot_bf16_matvec(const uint16_t *x, int64_t rows, int64_t k, int64_t n_out,
                      const uint16_t *w, const uint16_t *bias, uint16_t *y, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)(rows * k));
    if (xf == NULL) return -1;
    for (int64_t i = 0; i < rows * k; i++) xf[i] = bf16_to_float(x[i]);
    const int status = products(x, xf, rows, k, n_out, w, bias, y, 1, threads);
    free(xf);
    return status;
}

/* The same with float activations in and out (bias bfloat16 or NULL): nothing is rounded but
 * the weights, which are bfloat16. Returns 0, or -1 as vlbot_bf16_matvec. */
int vlbot_bf16_matvec_f32(const float *x, int64_t rows, int64_t k, int64_t n_out,
                          const uint16_t *w, const uint16_t *bias, float *y, int threads) {
    return products(NULL, x, rows, k, n_out, w, bias, y, 0, threads);
}

/* dst[i] = float(src[i]) for i < count (exact): a bf16 weight block widened for torch's float
 * matrix products over a prompt (torch's own `.float()` is several times slower). */
void vlbot_bf16_widen(const uint16_t *src, float *dst, int64_t count, int threads) {
    const int64_t blocks = count / VF_LANES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) vf_store(dst + b * VF_LANES, vf_load_bf16(src + b * VF_LANES));
    for (int64_t i = blocks * VF_LANES; i < count; i++) dst[i] = bf16_to_float(src[i]);
}
