/* One decoder layer of a bfloat16 decode step in two calls (vlbot, engine/cpu/kernels/decode_layer.py).
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
 * The products, norms, rotary and attention are the other kernels' own functions (their addresses
 * come from Python, `struct kernels`), so each result is the one the operator-by-operator step
 * gives; the residual additions and silu(g) * u round to bfloat16 as torch does (silu in float,
 * rounded, then the product rounded).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef int (*matvec_fn)(const uint16_t *x, int64_t rows, int64_t k, int64_t n, const uint16_t *w,
                         const uint16_t *bias, uint16_t *y, int threads);
typedef void (*rms_fn)(const void *x, const void *weight, void *out, int64_t rows, int64_t dim,
                       float eps, int bf16);
typedef void (*qk_fn)(void *q, const void *q_weight, int64_t q_heads, void *k,
                      const void *k_weight, int64_t k_heads, const void *cos, const void *sin,
                      int64_t batch, int64_t dim, float eps, int bf16);
typedef int (*attention_fn)(const uint16_t *q, const uint16_t *k, const uint16_t *v,
                            int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                            const int64_t *starts, int64_t batch, int64_t q_heads,
                            int64_t kv_heads, int64_t length, int64_t dim, float scale,
                            uint16_t *out, int threads);

struct kernels {
    matvec_fn matvec;
    rms_fn rms;
    qk_fn qk;
    attention_fn attention;
};

/* The layer's sizes and norm epsilon. */
struct shape {
    int64_t rows, hidden, q_heads, kv_heads, head_dim, intermediate;
    float eps;
    int threads;
};

static uint16_t *scratch(int64_t elements) {
    return malloc(sizeof(uint16_t) * (size_t)(elements > 0 ? elements : 1));
}

/* h = bfloat16(h + d), element by element. */
static void add_into(uint16_t *h, const uint16_t *d, int64_t count) {
    for (int64_t i = 0; i < count; i++) h[i] = float_to_bf16(bf16_to_float(h[i]) + bf16_to_float(d[i]));
}

/* act = bfloat16(bfloat16(silu(g)) * u) for each row's gate and up halves of gu. */
static void silu_times(const uint16_t *gu, int64_t rows, int64_t inter, uint16_t *act) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gu + r * 2 * inter, *up = gate + inter;
        for (int64_t i = 0; i < inter; i++) {
            const float g = bf16_to_float(gate[i]);
            const float s = bf16_to_float(float_to_bf16(g / (1.0f + expf(-g))));
            act[r * inter + i] = float_to_bf16(s * bf16_to_float(up[i]));
        }
    }
}

/* q (rows, q_heads, head_dim), k and v (rows, kv_heads, head_dim) for hidden states h
 * (rows, hidden): q and k normed per head and rotated by cos/sin (rows, head_dim). Returns 0,
 * -1 when scratch memory could not be allocated or a product failed. */
int vlbot_layer_before_attention(const struct kernels *kn, const struct shape *s,
                                 const uint16_t *h, const uint16_t *norm, const uint16_t *w_qkv,
                                 const uint16_t *q_norm, const uint16_t *k_norm,
                                 const uint16_t *cos, const uint16_t *sin, uint16_t *q,
                                 uint16_t *k, uint16_t *v) {
    const int64_t q_size = s->q_heads * s->head_dim, kv_size = s->kv_heads * s->head_dim;
    const int64_t width = q_size + 2 * kv_size;
    uint16_t *x = scratch(s->rows * s->hidden), *qkv = scratch(s->rows * width);
    int status = -1;
    if (x != NULL && qkv != NULL) {
        kn->rms(h, norm, x, s->rows, s->hidden, s->eps, 1);
        status = kn->matvec(x, s->rows, s->hidden, width, w_qkv, NULL, qkv, s->threads);
    }
    if (status == 0) {
        for (int64_t r = 0; r < s->rows; r++) {
            const uint16_t *row = qkv + r * width;
            memcpy(q + r * q_size, row, sizeof(uint16_t) * (size_t)q_size);
            memcpy(k + r * kv_size, row + q_size, sizeof(uint16_t) * (size_t)kv_size);
            memcpy(v + r * kv_size, row + q_size + kv_size, sizeof(uint16_t) * (size_t)kv_size);
        }
        kn->qk(q, q_norm, s->q_heads, k, k_norm, s->kv_heads, cos, sin, s->rows, s->head_dim,
               s->eps, 1);
    }
    free(x);
    free(qkv);
    return status == 0 ? 0 : -1;
}

/* The rest of the layer, in place on h (rows, hidden): attention of q over the cache's keys and
 * values (strides in elements; row b from position starts[b], all when starts is NULL), the
 * output projection and residual, the MLP and its residual. Returns 0, or -1 when scratch memory
 * could not be allocated, the attention refused its inputs or a product failed. */
int vlbot_layer_after_attention(const struct kernels *kn, const struct shape *s, uint16_t *h,
                                const uint16_t *q, const uint16_t *keys, const uint16_t *values,
                                int64_t batch_stride, int64_t head_stride, int64_t token_stride,
                                const int64_t *starts, int64_t length, float scale,
                                const uint16_t *w_o, const uint16_t *norm,
                                const uint16_t *w_gate_up, const uint16_t *w_down) {
    const int64_t rows = s->rows, hidden = s->hidden, inter = s->intermediate;
    const int64_t q_size = s->q_heads * s->head_dim;
    uint16_t *attended = scratch(rows * q_size), *delta = scratch(rows * hidden);
    uint16_t *x = scratch(rows * hidden), *gu = scratch(rows * 2 * inter);
    uint16_t *act = scratch(rows * inter);
    int status = -1;
    if (attended != NULL && delta != NULL && x != NULL && gu != NULL && act != NULL) {
        status = kn->attention(q, keys, values, batch_stride, head_stride, token_stride, starts,
                               rows, s->q_heads, s->kv_heads, length, s->head_dim, scale,
                               attended, s->threads);
    }
    if (status == 0) status = kn->matvec(attended, rows, q_size, hidden, w_o, NULL, delta, s->threads);
    if (status == 0) {
        add_into(h, delta, rows * hidden);
        kn->rms(h, norm, x, rows, hidden, s->eps, 1);
        status = kn->matvec(x, rows, hidden, 2 * inter, w_gate_up, NULL, gu, s->threads);
    }
    if (status == 0) {
        silu_times(gu, rows, inter, act);
        status = kn->matvec(act, rows, inter, hidden, w_down, NULL, delta, s->threads);
    }
    if (status == 0) add_into(h, delta, rows * hidden);
    free(attended);
    free(delta);
    free(x);
    free(gu);
    free(act);
    return status == 0 ? 0 : -1;
}
