/* One decoder layer of a decode step in two calls (vlbot, engine/cpu/kernels/decode_layer.py).
 *
 * A decode step of Qwen3-VL-2B runs 28 layers of ~15 small operations each between its matrix
 * products; from Python each costs 10-50 microseconds (more once a product has streamed megabytes
 * through the caches): ~20 ms of a ~135 ms step on the 2-core machine vlbot is measured on. Here
 * the operations of a layer run in C, in two calls around the KV cache's append (which stays in
 * Python, engine/qwen/kvbuffer.py):
 *
 *   before attention: x = RMSNorm(h); q, k, v = x [Wq; Wk; Wv]^T; q and k head norms + rotary
 *   after attention:  a = attention(q, K, V); h += a Wo^T; x = RMSNorm(h);
 *                     g, u = x [Wgate; Wup]^T; h += (silu(g) * u) Wdown^T
 *
 * Each product's weights are bfloat16 (q/k/v and gate/up back to back, one product each) or the
 * int8 / int4 kernels' packed weights (engine/cpu/quant.py; then q, k, v and gate, up are
 * separate products whose outputs are laid side by side): `struct linear`. The activations (h,
 * the norms' weights, cos/sin, the cache) are bfloat16 or, on tiers without bf16 arithmetic
 * (engine/cpu/half_weights.py), float32: `struct shape`'s `bf16`. The products, norms, rotary and
 * attention are the other kernels' own functions for that activation type (their addresses come
 * from Python, `struct kernels`), so each result is the one the operator-by-operator step's
 * kernels give; the residual additions and silu(g) * u round to bfloat16 as torch does (silu in
 * float, rounded, then the product rounded), and in float32 round nowhere.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "simd.h"

/* Activations are `void *`: bfloat16 (uint16_t) or float, as `struct shape`'s `bf16` says. */
typedef int (*matvec_fn)(const void *x, int64_t rows, int64_t k, int64_t n, const uint16_t *w,
                         const uint16_t *bias, void *y, int threads);
typedef void (*rms_fn)(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                       float eps, int bf16);
typedef void (*qk_fn)(void *q, const void *q_weight, int64_t q_heads, void *k,
                      const void *k_weight, int64_t k_heads, const void *cos, const void *sin,
                      int64_t batch, int64_t dim, float eps, int bf16);
typedef int (*attention_fn)(const void *q, const void *k, const void *v, int64_t batch_stride,
                            int64_t head_stride, int64_t token_stride, const int64_t *starts,
                            int64_t batch, int64_t q_heads, int64_t kv_heads, int64_t length,
                            int64_t dim, float scale, void *out, int threads);

/* engine/cpu/kernels/int8_matvec.c and int4_matvec.c (activations bf16 when x_bf16 / y_bf16) */
typedef int (*int8_fn)(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t n_out,
                       int64_t group, const void *packed, const void *row_scales, void *y, int y_bf16,
                       int threads);
typedef int (*int4_fn)(const void *x, int x_bf16, int64_t rows, int64_t k, int64_t n_out,
                       int64_t group, const void *packed, const void *scales, const void *lows, void *y,
                       int y_bf16, int threads);

struct kernels {
    matvec_fn matvec;
    rms_fn rms;
    qk_fn qk;
    attention_fn attention;
    int8_fn int8; /* NULL where the layers are not int8 */
    int4_fn int4;
};

enum weights { BF16 = 0, INT8 = 1, INT4 = 2 };

/* One product's weights: bf16 (n, k) at `w`, or a quantized kernel's packed buffers. */
struct linear {
    int64_t kind, n, group;
    const void *w, *scales, *lows;
};

/* A decoder layer's weights: q/k/v as 1 (back to back) or 3 products, gate/up as 1 or 2. */
struct layer {
    struct linear qkv[3], o, gate_up[2], down;
    int64_t qkv_count, gate_up_count;
    const void *input_norm, *q_norm, *k_norm, *post_norm;
};

/* The layer's sizes and norm epsilon, and the activations' type (bfloat16 when `bf16`, else float). */
struct shape {
    int64_t rows, hidden, q_heads, kv_heads, head_dim, intermediate;
    float eps;
    int threads;
    int bf16;
};

/* Bytes of one activation. */
static size_t unit(const struct shape *s) { return s->bf16 ? sizeof(uint16_t) : sizeof(float); }

/* Cache-line aligned, as torch's tensors are: the bf16 kernel's few-row loads of unaligned
 * activations cost AVX2 ~13 ms more per four-row step of the full-size model (85 vs 72 ms). */
static void *scratch(const struct shape *s, int64_t elements) {
    const size_t bytes = unit(s) * (size_t)(elements > 0 ? elements : 1);
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* Element `i` of `base`, an array of the step's activations. */
static void *at(const struct shape *s, void *base, int64_t i) { return (char *)base + unit(s) * (size_t)i; }

/* h = dtype(h + d), element by element. */
static void add_into(const struct shape *s, void *h, const void *d, int64_t count) {
    if (s->bf16) {
        uint16_t *hb = h;
        const uint16_t *db = d;
        for (int64_t i = 0; i < count; i++) hb[i] = float_to_bf16(bf16_to_float(hb[i]) + bf16_to_float(db[i]));
    } else {
        float *hf = h;
        const float *df = d;
        for (int64_t i = 0; i < count; i++) hf[i] += df[i];
    }
}

/* act = dtype(dtype(silu(g)) * u) for each row's gate and up halves of gu (simd.h's
 * vf_silu_times, as prefill_ops.c's prompt pass) a vector at a time (vf_exp: libm's scalar expf
 * took 1.5 ms of a four-row step), on the step's threads. Loading, rounding and storing a lane at a time took 2.9 ms of a
 * four-row step with AVX2 forced (28 layers x 4 x 6144 values), 0.7 ms of a one-row step. */
static void silu_times(const struct shape *s, const void *gu, int64_t rows, int64_t inter, void *act) {
    const int bf16 = s->bf16;
    const int64_t per_row = inter / VF_LANES, body = per_row * VF_LANES;
#pragma omp parallel for num_threads(s->threads) schedule(static)
    for (int64_t b = 0; b < rows * per_row; b++) {
        const int64_t r = b / per_row, i = b % per_row * VF_LANES, gate = r * 2 * inter + i;
        if (bf16) { /* a constant in each inlined copy */
            const vf g = vf_load_as(gu, gate, 1), u = vf_load_as(gu, gate + inter, 1);
            vf_store_as(act, r * inter + i, vf_silu_times(g, u, 1), 1);
        } else {
            const vf g = vf_load_as(gu, gate, 0), u = vf_load_as(gu, gate + inter, 0);
            vf_store_as(act, r * inter + i, vf_silu_times(g, u, 0), 0);
        }
    }
    for (int64_t r = 0; r < rows && body < inter; r++) { /* each row's last inter % VF_LANES */
        const int64_t n = inter - body, gate = r * 2 * inter + body;
        float g[VF_LANES] = {0}, u[VF_LANES] = {0}, out[VF_LANES];
        for (int64_t j = 0; j < n; j++) {
            g[j] = load_value(gu, gate + j, bf16);
            u[j] = load_value(gu, gate + inter + j, bf16);
        }
        vf_store(out, vf_silu_times(vf_load(g), vf_load(u), bf16));
        for (int64_t j = 0; j < n; j++) store_value(act, r * inter + body + j, out[j], bf16);
    }
}

/* y (rows, n) = x (rows, k) times `l`'s weights transposed. */
static int product(const struct kernels *kn, const struct shape *s, const void *x, int64_t k,
                   const struct linear *l, void *y) {
    switch (l->kind) {
    case BF16: return kn->matvec(x, s->rows, k, l->n, l->w, NULL, y, s->threads);
    case INT8:
        if (kn->int8 == NULL) return -1;
        return kn->int8(x, s->bf16, s->rows, k, l->n, l->group, l->w, l->scales, y, s->bf16, s->threads);
    case INT4:
        if (kn->int4 == NULL) return -1;
        return kn->int4(x, s->bf16, s->rows, k, l->n, l->group, l->w, l->scales, l->lows, y, s->bf16,
                        s->threads);
    default: return -1;
    }
}

/* y (rows, n_0 + ... + n_{count-1}) = the products of x with `count` linears, side by side. */
static int project(const struct kernels *kn, const struct shape *s, const void *x, int64_t k,
                   const struct linear *ls, int64_t count, void *y) {
    if (count == 1) return product(kn, s, x, k, &ls[0], y);
    int64_t width = 0, offset = 0;
    for (int64_t i = 0; i < count; i++) width += ls[i].n;
    int status = 0;
    for (int64_t i = 0; i < count && status == 0; i++) {
        const int64_t n = ls[i].n;
        void *part = scratch(s, s->rows * n);
        status = part == NULL ? -1 : product(kn, s, x, k, &ls[i], part);
        for (int64_t r = 0; r < s->rows && status == 0; r++)
            memcpy(at(s, y, r * width + offset), at(s, part, r * n), unit(s) * (size_t)n);
        free(part);
        offset += n;
    }
    return status;
}

/* q (rows, q_heads, head_dim), k and v (rows, kv_heads, head_dim) for hidden states h
 * (rows, hidden): q and k normed per head and rotated by cos/sin (rows, head_dim). Returns 0,
 * -1 when scratch memory could not be allocated or a product failed. */
int vlbot_layer_before_attention(const struct kernels *kn, const struct shape *s, const void *h,
                                 const struct layer *layer, const void *cos, const void *sin, void *q,
                                 void *k, void *v) {
    const int64_t q_size = s->q_heads * s->head_dim, kv_size = s->kv_heads * s->head_dim;
    const int64_t width = q_size + 2 * kv_size;
    void *x = scratch(s, s->rows * s->hidden), *qkv = scratch(s, s->rows * width);
    int status = -1;
    if (x != NULL && qkv != NULL) {
        kn->rms(h, layer->input_norm, x, s->rows, s->hidden, s->eps, s->bf16);
        status = project(kn, s, x, s->hidden, layer->qkv, layer->qkv_count, qkv);
    }
    if (status == 0) {
        for (int64_t r = 0; r < s->rows; r++) {
            const int64_t row = r * width;
            memcpy(at(s, q, r * q_size), at(s, qkv, row), unit(s) * (size_t)q_size);
            memcpy(at(s, k, r * kv_size), at(s, qkv, row + q_size), unit(s) * (size_t)kv_size);
            memcpy(at(s, v, r * kv_size), at(s, qkv, row + q_size + kv_size), unit(s) * (size_t)kv_size);
        }
        kn->qk(q, layer->q_norm, s->q_heads, k, layer->k_norm, s->kv_heads, cos, sin, s->rows,
               s->head_dim, s->eps, s->bf16);
    }
    free(x);
    free(qkv);
    return status == 0 ? 0 : -1;
}

/* The rest of the layer, in place on h (rows, hidden): attention of q over the cache's keys and
 * values (strides in elements; row b from position starts[b], all when starts is NULL), the
 * output projection and residual, the MLP and its residual. Returns 0, or -1 when scratch memory
 * could not be allocated, the attention refused its inputs or a product failed. */
int vlbot_layer_after_attention(const struct kernels *kn, const struct shape *s, void *h,
                                const void *q, const void *keys, const void *values,
                                int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                                const int64_t *starts, int64_t length, float scale,
                                const struct layer *layer) {
    const int64_t rows = s->rows, hidden = s->hidden, inter = s->intermediate;
    const int64_t q_size = s->q_heads * s->head_dim;
    void *attended = scratch(s, rows * q_size), *delta = scratch(s, rows * hidden);
    void *x = scratch(s, rows * hidden), *gu = scratch(s, rows * 2 * inter);
    void *act = scratch(s, rows * inter);
    int status = -1;
    if (attended != NULL && delta != NULL && x != NULL && gu != NULL && act != NULL) {
        status = kn->attention(q, keys, values, batch_stride, head_stride, token_stride, starts,
                               rows, s->q_heads, s->kv_heads, length, s->head_dim, scale,
                               attended, s->threads);
    }
    if (status == 0) status = product(kn, s, attended, q_size, &layer->o, delta);
    if (status == 0) {
        add_into(s, h, delta, rows * hidden);
        kn->rms(h, layer->post_norm, x, rows, hidden, s->eps, s->bf16);
        status = project(kn, s, x, hidden, layer->gate_up, layer->gate_up_count, gu);
    }
    if (status == 0) {
        silu_times(s, gu, rows, inter, act);
        status = product(kn, s, act, inter, &layer->down, delta);
    }
    if (status == 0) add_into(s, h, delta, rows * hidden);
    free(attended);
    free(delta);
    free(x);
    free(gu);
    free(act);
    return status == 0 ? 0 : -1;
}
