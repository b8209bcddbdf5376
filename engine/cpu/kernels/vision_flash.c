/* The vision encoder's attention with AMX tiles (vlbot, engine/cpu/kernels/vision_flash.py).
 *
 * Qwen3-VL's vision layers attend over all of an image's patches: a 1080p screenshot is 4,032
 * patches, 16 heads of 64 channels, so each layer computes 16 x 4,032^2 scores. torch's CPU flash
 * attention takes ~110 ms per layer here (2.6 s of a 1080p screenshot's first token), most of it
 * in the softmax around its matrix products. This kernel takes ~45 ms. For each head and block of
 * 32 queries it goes through the keys 512 at a time (flash attention):
 *
 *   S = q k^T              AMX bfloat16 tile products with float sums
 *   p = 2^(scale' (S - m)) float, scale' = scale log2(e), m the row's shift (see softmax_row); the
 *                          row sum adds the float values and p is rounded to bfloat16
 *   acc += p v             AMX bfloat16 tile products with float sums;  out = acc / sum
 *
 * which is the arithmetic of torch's flash attention (float scores and sums, bfloat16
 * probabilities) with another blocking and exponential: 2^t is 2^floor(t) (vscalefps) times a
 * degree-4 polynomial of t - floor(t) (vreduceps), relative error 2.7e-6.
 *
 * Layouts: q, k, v are (heads, rows, 64) bfloat16, a head `head_stride` elements from the next;
 * out is (rows, heads x 64) bfloat16 with rows `out_stride` elements apart (what the output
 * projection reads). Per head, k is first packed as the tile products' B operand (pairs of
 * channels, 16 keys per tile row) and v as pairs of keys per channel, both padded with zeros to a
 * multiple of 32 keys, in the caller's scratch memory; padded keys are left out of the maxima,
 * the exponentials and the sums.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define DIM 64
#define ROWS 32  /* query rows per block: two tiles' rows */
#define KEYS 32  /* keys per step of the second product: one bfloat16 A tile's columns */
#define CHUNK 512 /* keys per softmax step */
/* score and probability rows 64 bytes longer than a chunk: rows 2 KB apart would share cache sets */
#define SCORE_ROW (CHUNK + 16)
#define PROBABILITY_ROW (CHUNK + 32)
/* exponentials below 2^-126 become 0 instead of subnormals (which cost a microcode assist each):
 * such a probability is below 1e-38 of the row's largest, which is 1 */
#define FLUSH_DENORMALS 0x8040 /* MXCSR flush-to-zero and denormals-are-zero */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out the AMX tile state only on request; 0 when granted. */
int vlbot_vision_flash_enable(void) {
    return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
}

static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) { /* every tile: 16 rows of 64 bytes */
        config.bytes_per_row[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

static inline __mmask16 valid_lanes(int64_t column, int64_t valid) {
    const int64_t left = valid - column;
    return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* k (rows, 64) -> per block of 16 keys, two 16 x 16 tiles of channel pairs (channels 0-31, 32-63):
 * packed[block][pair][key] = (k[key][2 pair], k[key][2 pair + 1]) as one 32-bit word. */
static void pack_keys(const uint16_t *k, int64_t rows, int64_t padded, uint32_t *packed) {
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7,
                                                                6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(DIM / 2));
    for (int64_t block = 0; block < padded / 16; block++) {
        uint32_t *tile = packed + block * 16 * (DIM / 2);
        const int64_t first = block * 16;
        const __mmask16 present = valid_lanes(first, rows);
        const int *words = (const int *)(k + first * DIM);
        for (int pair = 0; pair < DIM / 2; pair++)
            _mm512_store_si512((void *)(tile + pair * 16),
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present,
                                                           offsets, words + pair, 4));
    }
}

/* v (rows, 64) -> per block of 32 keys, four 16 x 16 tiles of key pairs (channels 0-15, 16-31, ...):
 * packed[block][quarter][pair][channel] = (v[2 pair][channel], v[2 pair + 1][channel]). */
static void pack_values(const uint16_t *v, int64_t rows, int64_t padded, uint16_t *packed) {
    static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512((const void *)order);
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t block = 0; block < padded / KEYS; block++) {
        uint16_t *tiles = packed + block * KEYS * DIM;
        for (int pair = 0; pair < 16; pair++) {
            const int64_t row = block * KEYS + 2 * pair;
            const uint16_t *even = v + row * DIM, *odd = even + DIM;
            for (int quarter = 0; quarter < DIM / 16; quarter++) {
                const __m256i a = row < rows ? _mm256_loadu_si256((const __m256i *)(even + quarter * 16)) : zero;
                const __m256i b = row + 1 < rows ? _mm256_loadu_si256((const __m256i *)(odd + quarter * 16)) : zero;
                const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
                _mm512_store_si512((void *)(tiles + (quarter * 16 + pair) * 32),
                                   _mm512_permutexvar_epi16(interleave, both));
            }
        }
    }
}

/* 2^t: 2^floor(t) (vscalefps) times a degree-4 polynomial of the fraction t - floor(t) in [0, 1)
 * (vreduceps), fitted for relative error (2.7e-6 at most: 1/1,400 of a bfloat16 step, and the
 * probabilities are rounded to bfloat16). */
static inline __m512 exp2_ps(__m512 t) {
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(0.013520962558686733f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.05203673988580704f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24142789840698242f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6930065751075745f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000025033950806f));
    return _mm512_scalef_ps(p, t);
}

static inline float exp2_scalar(float t) { return _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(t))); }


/* The largest of a row's first `valid` scores. */
static float chunk_maximum(const float *s, int64_t valid) {
    /* four running maxima: one would wait on vmaxps's latency at every step */
    __m512 h0 = _mm512_set1_ps(-__builtin_inff()), h1 = h0, h2 = h0, h3 = h0;
    int64_t i = 0;
    for (; i + 64 <= valid; i += 64) {
        h0 = _mm512_max_ps(h0, _mm512_loadu_ps(s + i));
        h1 = _mm512_max_ps(h1, _mm512_loadu_ps(s + i + 16));
        h2 = _mm512_max_ps(h2, _mm512_loadu_ps(s + i + 32));
        h3 = _mm512_max_ps(h3, _mm512_loadu_ps(s + i + 48));
    }
    for (; i < valid; i += 16)
        h0 = _mm512_mask_max_ps(h0, valid_lanes(i, valid), h0, _mm512_loadu_ps(s + i));
    return _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(h0, h1), _mm512_max_ps(h2, h3)));
}

/* p = bfloat16(2^(factor (s - shift))) for a row's `width` scores (those past `valid`: 0);
 * returns the sum of the float values. */
static float exponentials(const float *s, int64_t width, int64_t valid, float factor, float shift,
                          uint16_t *p) {
    const __m512 scale = _mm512_set1_ps(factor), offset = _mm512_set1_ps(shift * factor);
    __m512 total_a = _mm512_setzero_ps(), total_b = total_a; /* two sums: see the maxima */
    int64_t j = 0;
    for (; j + 32 <= valid; j += 32) {
        const __m512 a = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale, offset));
        const __m512 b = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), scale, offset));
        total_a = _mm512_add_ps(total_a, a);
        total_b = _mm512_add_ps(total_b, b);
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    for (; j < width; j += 32) { /* the last keys: those past `valid` are padding, probability 0 */
        __m512 a = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), scale, offset));
        __m512 b = exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + 16), scale, offset));
        a = _mm512_maskz_mov_ps(valid_lanes(j, valid), a);
        b = _mm512_maskz_mov_ps(valid_lanes(j + 16, valid), b);
        total_a = _mm512_add_ps(total_a, a);
        total_b = _mm512_add_ps(total_b, b);
        _mm512_storeu_si512((void *)(p + j), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(total_a, total_b));
}

/* One row's scores for `width` keys (the first `valid` real) -> bfloat16 probabilities relative to
 * the row's `shift`, adding them to its `sum`; returns the factor that rescales what was summed
 * before (0 for the first chunk, 1 while the shift stays).
 *
 * The shift is the first chunk's maximum, and a later chunk's exponentials are first computed
 * against it without looking for that chunk's maximum (a pass less over the scores): they are kept
 * unless one passes 2^64 (their sum tells), and only then is the shift raised to the new maximum
 * and the chunk done again. Probabilities above 1 change nothing but the scale of the sums (all
 * floats, far from overflowing); the result is the same softmax. */
static float softmax_row(const float *s, int64_t width, int64_t valid, float factor, float *shift,
                         float *sum, int first, uint16_t *p) {
    if (!first) {
        const float total = exponentials(s, width, valid, factor, *shift, p);
        if (total <= 0x1p64f) { /* also false for a NaN */
            *sum += total;
            return 1.0f;
        }
    }
    const float chunk_top = chunk_maximum(s, valid);
    const float m = first || chunk_top > *shift ? chunk_top : *shift;
    const float rescale = first ? 0.0f : exp2_scalar((*shift - m) * factor);
    *shift = m;
    *sum = *sum * rescale + exponentials(s, width, valid, factor, m, p);
    return rescale;
}

/* Buffers of one thread: scores, probabilities and rescale factors for two chunks at a time. */
typedef struct {
    float scores[2][ROWS * SCORE_ROW] __attribute__((aligned(64)));
    uint16_t probabilities[2][ROWS * PROBABILITY_ROW] __attribute__((aligned(64)));
    float rescale[2][ROWS];
    float part[ROWS * DIM] __attribute__((aligned(64)));
    float acc[ROWS * DIM] __attribute__((aligned(64)));
    uint16_t query[ROWS * DIM] __attribute__((aligned(64)));
} workspace;

/* The tile products of one chunk: q k^T in steps of 16 keys (queries in tiles 2-5, scores out of
 * tiles 0 and 1), or p v in steps of 32 keys, channels 0-31 and then 32-63 (sums in tiles 0-3). */
typedef struct {
    const void *source; /* the chunk's packed keys or values */
    int64_t steps, per_half;
    float *target;                 /* scores, or part */
    const uint16_t *probabilities; /* for p v */
} products;

static void score_step(const products *work, int64_t step) {
    const uint32_t *block = (const uint32_t *)work->source + step * 16 * (DIM / 2);
    _tile_loadd(6, block, 64);
    _tile_loadd(7, block + 256, 64);
    _tile_zero(0);
    _tile_zero(1);
    _tile_dpbf16ps(0, 2, 6);
    _tile_dpbf16ps(0, 3, 7);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(1, 5, 7);
    _tile_stored(0, work->target + step * 16, SCORE_ROW * 4);
    _tile_stored(1, work->target + 16 * SCORE_ROW + step * 16, SCORE_ROW * 4);
}

static void weigh_step(const products *work, int64_t step) {
    const int64_t half = step / work->per_half, n = step % work->per_half * KEYS;
    if (n == 0) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    const uint16_t *block = (const uint16_t *)work->source + n * DIM + half * 1024;
    _tile_loadd(4, work->probabilities + n, PROBABILITY_ROW * 2);
    _tile_loadd(5, work->probabilities + 16 * PROBABILITY_ROW + n, PROBABILITY_ROW * 2);
    _tile_loadd(6, block, 64);
    _tile_loadd(7, block + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    if (step % work->per_half == work->per_half - 1) {
        float *part = work->target + half * 32;
        _tile_stored(0, part, DIM * 4);
        _tile_stored(1, part + 16, DIM * 4);
        _tile_stored(2, part + 16 * DIM, DIM * 4);
        _tile_stored(3, part + 16 * DIM + 16, DIM * 4);
    }
}

static void load_queries(const uint16_t *a) {
    _tile_loadd(2, a, DIM * 2);
    _tile_loadd(3, a + 32, DIM * 2);
    _tile_loadd(4, a + 16 * DIM, DIM * 2);
    _tile_loadd(5, a + 16 * DIM + 32, DIM * 2);
}

/* acc = acc x rescale + part, per row. */
static void accumulate(float *acc, const float *part, const float *rescale) {
    for (int r = 0; r < ROWS; r++) {
        const __m512 alpha = _mm512_set1_ps(rescale[r]);
        for (int c = 0; c < DIM; c += 16) {
            float *x = acc + r * DIM + c;
            _mm512_store_ps(x, _mm512_fmadd_ps(_mm512_load_ps(x), alpha,
                                               _mm512_load_ps(part + r * DIM + c)));
        }
    }
}

/* One block of 32 query rows (`queries` real) of one head against all its `rows` keys, CHUNK keys
 * at a time with the running maximum per row (flash attention's rescaling).
 *
 * The tile unit and the vector units run side by side when their instructions are interleaved: the
 * softmax of chunk c (vector instructions, rows 0-31) is issued a row at a time, and between rows
 * the tile products of chunk c + 1's scores (beside rows 0-15) and of chunk c - 1's p v (beside
 * rows 16-31). The 8 tiles cannot hold both kinds of product at once, hence the two halves. */
static void attend_block(const uint16_t *q, int64_t queries, const uint32_t *keys,
                         const uint16_t *values, int64_t rows, int64_t padded, float factor,
                         workspace *w, uint16_t *out, int64_t out_stride) {
    const uint16_t *a = q;
    if (queries < ROWS) {
        memset(w->query, 0, sizeof w->query);
        memcpy(w->query, q, (size_t)(queries * DIM * 2));
        a = w->query;
    }
    const int64_t chunks = (padded + CHUNK - 1) / CHUNK;
    float shift[ROWS], sums[ROWS];
    memset(sums, 0, sizeof sums);
    memset(w->acc, 0, sizeof w->acc);
    load_queries(a);
    const products first = {keys, (padded < CHUNK ? padded : CHUNK) / 16, 0, w->scores[0], NULL};
    for (int64_t step = 0; step < first.steps; step++) score_step(&first, step);
    for (int64_t c = 0; c <= chunks; c++) {
        const int64_t start = c * CHUNK, width = padded - start < CHUNK ? padded - start : CHUNK;
        const int64_t valid = rows - start < width ? rows - start : width;
        const int64_t after = start + CHUNK, before = start - CHUNK;
        const int64_t next_width = padded - after < CHUNK ? padded - after : CHUNK;
        const products next = {keys + after * (DIM / 2), c + 1 < chunks ? next_width / 16 : 0, 0,
                               w->scores[(c + 1) % 2], NULL};
        const int64_t previous_width = padded - before < CHUNK ? padded - before : CHUNK;
        const products previous = {values + before * DIM, c > 0 ? 2 * (previous_width / KEYS) : 0,
                                   previous_width / KEYS, w->part, w->probabilities[(c + 1) % 2]};
        if (next.steps > 0) load_queries(a);
        for (int r = 0; r < ROWS; r++) {
            const int half = r / (ROWS / 2), j = r % (ROWS / 2);
            const products *work = half == 0 ? &next : &previous;
            for (int64_t step = j * work->steps / (ROWS / 2);
                 step < (j + 1) * work->steps / (ROWS / 2); step++)
                (half == 0 ? score_step : weigh_step)(work, step);
            if (c < chunks)
                w->rescale[c % 2][r] = softmax_row(
                    w->scores[c % 2] + r * SCORE_ROW, width, valid, factor, &shift[r], &sums[r],
                    c == 0, w->probabilities[c % 2] + r * PROBABILITY_ROW);
        }
        if (previous.steps > 0) accumulate(w->acc, w->part, w->rescale[(c + 1) % 2]);
    }
    for (int64_t r = 0; r < queries; r++) {
        const __m512 inverse = _mm512_set1_ps(1.0f / sums[r]);
        for (int c = 0; c < DIM; c += 16) {
            const __m512 x = _mm512_mul_ps(_mm512_load_ps(w->acc + r * DIM + c), inverse);
            _mm256_storeu_si256((__m256i *)(out + r * out_stride + c),
                                (__m256i)_mm512_cvtneps_pbh(x));
        }
    }
}

/* Attention of `heads` heads over `rows` patches; `scratch` holds vlbot_vision_flash_scratch(heads,
 * rows) bytes (the packed keys and values). Returns 0, or -1 where memory ran out. */
int64_t vlbot_vision_flash_scratch(int64_t heads, int64_t rows) {
    return 2 * heads * ((rows + KEYS - 1) / KEYS * KEYS) * DIM * 2;
}

int vlbot_vision_flash(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t heads,
                       int64_t rows, int64_t head_stride, float scale, uint16_t *out,
                       int64_t out_stride, void *scratch, int threads) {
    const int64_t padded = (rows + KEYS - 1) / KEYS * KEYS;
    const int64_t blocks = (rows + ROWS - 1) / ROWS;
    uint32_t *keys = scratch;
    uint16_t *values = (uint16_t *)scratch + heads * padded * DIM;
    int failed = 0;
    {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t h = 0; h < heads; h++) {
            pack_keys(k + h * head_stride, rows, padded, keys + h * padded * (DIM / 2));
            pack_values(v + h * head_stride, rows, padded, values + h * padded * DIM);
        }
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            static __thread workspace *kept; /* one per thread, kept: no page faults per call */
            if (kept == NULL) kept = aligned_alloc(64, sizeof(workspace));
            workspace *w = kept;
            failed |= w == NULL;
            if (w != NULL) configure_tiles();
            const unsigned int control = _mm_getcsr();
            _mm_setcsr(control | FLUSH_DENORMALS);
#pragma omp for schedule(static)
            for (int64_t item = 0; item < heads * blocks; item++) {
                if (w == NULL) continue;
                const int64_t h = item / blocks, first = item % blocks * ROWS;
                const int64_t queries = rows - first < ROWS ? rows - first : ROWS;
                attend_block(q + h * head_stride + first * DIM, queries,
                             keys + h * padded * (DIM / 2), values + h * padded * DIM, rows, padded,
                             scale * 1.4426950408889634f, w, out + first * out_stride + h * DIM,
                             out_stride);
            }
            _mm_setcsr(control);
            if (w != NULL) _tile_release();
        }
    }
    return failed ? -1 : 0;
}
