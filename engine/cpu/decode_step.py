"""One decode step of Qwen3-VL's language model, written out for speed.

A decode step feeds one new token per conversation. transformers' forward for it spends ~20 ms
per step on the full-size model outside the matrix products (building masks and rotary tables for
the general case, RMSNorm in eight operators, output records, keyword plumbing through 28 layers);
with the weights read at memory speed (engine.cpu.kernels: bf16_kernel, int4_kernel) that was a
fifth of an int4 step. This module does the same arithmetic with the model's own weights and modules in
fewer operators:

- decode tokens are text, so their M-RoPE position is the same on all three axes and the rotary
  table is the plain one: cos/sin of position x inverse frequency, computed once per step;
- attention is `scaled_dot_product_attention` over the conversation cache (`cache.update`, so the
  in-place cache of engine.qwen.kvbuffer works unchanged), with a padding mask only when the batch
  has padding; engine.cpu.kernels.decode_attention's C loop instead where it builds, reading the
  keys and values as the cache stores them (`append`: bfloat16 under float32 activations);
- the bf16 kernel reads each layer's q, k and v projections in one pass, and its gate and up
  projections in another, once engine.cpu.hugepages has placed their weights back to back
  (engine.cpu.kernels.bf16_kernel.AdjacentLinears); the down projection is called as its module;
- and then, with at most as many rows as the bf16 kernel takes, each layer runs in two C calls
  around the cache append (engine.cpu.kernels.decode_layer): the same kernels, without Python between them.

`DecodeStep.for_model` returns None for a model it does not know exactly (another architecture,
sliding windows, a rotary scaling other than the default): the scheduler then uses the model's
forward. Tests check the logits (through the output head) against transformers' forward (float32
and bfloat16, one row and a padded batch) and the engine's answers against `generate`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch.nn import functional as F

from engine.cpu.kernels.bf16_kernel import AdjacentLinears
from engine.cpu.kernels.bf16_kernel import load_kernel as load_bf16_kernel
from engine.cpu.kernels.decode_attention import DecodeAttention, left_padding, load_attention
from engine.cpu.kernels.decode_layer import LayerKernel, LayerWeights, Shape, load_layer
from engine.cpu.kernels.decode_ops import DecodeOps, load_ops
from engine.cpu.layer_weights import layer_weights, quantized_kernels, weights_key

SUPPORTED_LAYER = "Qwen3VLTextDecoderLayer"


@runtime_checkable
class StoringLayer(Protocol):
    """A cache layer that hands out its keys and values as it stores them (engine.qwen.kvbuffer's
    AppendingLayer), where transformers' `update` returns them in the incoming dtype."""

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def _append(cache: Any, k: torch.Tensor, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `index`'s keys and values with k, v appended, as stored where the layer says."""
    layer = cache.layers[index]
    if isinstance(layer, StoringLayer):
        return layer.append(k, v)
    keys, values = cache.update(k, v, index)
    return keys, values


class DecodeStep:
    """Every row's last hidden states (B, H), normalized, for the output head (the scheduler
    applies it: engine.cpu.kernels.output_head): `step(input_ids (B, 1), attention_mask (B, W + 1),
    position_ids (3, B, 1), cache)`, the inputs engine.qwen.batching prepares."""

    def __init__(self, model: Any) -> None:
        language_model = model.model.language_model
        config = language_model.config
        self.embed = language_model.embed_tokens
        self.layers = list(language_model.layers)
        self.norm = language_model.norm
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.eps = float(config.rms_norm_eps)
        rotary = language_model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rotary_scale = float(rotary.attention_scaling)
        self.scaling = self.head_dim**-0.5
        # bfloat16 steps use the C norms and rotary (~10 ms less per step on the full-size model);
        # float32 operator steps keep torch's, whose results are transformers' to the last bit or
        # two (4-bit weights round activations to 8 bits, which turns any difference into
        # tokens). The C layer below uses the C ones in float32 too: its answers are as close to
        # exact, not bit for bit transformers'.
        self.ops: DecodeOps | None = load_ops() if model.dtype == torch.bfloat16 else None
        # attention in C, reading each layer's cache once for the query heads that share it, in
        # bfloat16 and float32 (full-size model: bf16, 1,100 tokens of context, ~8 instead of
        # ~12 ms per step; float32 int4 with AVX2 forced, ~250 tokens, ~1 instead of ~7 ms)
        self.attention: DecodeAttention | None = load_attention()
        # q/k/v and gate/up each in one pass of the bf16 kernel once their weights sit back to
        # back (after engine.cpu.hugepages moved them): 112 instead of 196 calls per step
        self.qkv = [
            AdjacentLinears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
            for layer in self.layers
        ]
        self.gate_up = [AdjacentLinears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        # and then the operators between the products in C as well, two calls per layer
        # (engine.cpu.kernels.decode_layer: ~20 ms less per step on the full-size model in
        # bfloat16; in float32 over bf16 weights, engine.cpu.half_weights, ~10 ms of ~66 with
        # AVX2; with int4 weights ~8 of 23.5 ms), over bf16 or int8/int4 weights
        # (engine.cpu.layer_weights)
        matvec = load_bf16_kernel()
        layer_ops = self.ops or load_ops()
        self.layer_kernel: LayerKernel | None = None
        self.layer_rows = 0  # most rows a step runs in C: what the bf16 kernel takes
        if matvec is not None and layer_ops is not None and self.attention is not None:
            int8, int4 = quantized_kernels(self.layers)
            self.layer_kernel = load_layer(matvec, layer_ops, self.attention, int8, int4)
            self.layer_rows = matvec.max_rows
        self.hidden_size = int(config.hidden_size)
        self._layer_weights: list[LayerWeights] = []
        self._layer_key: tuple[object, ...] = ()  # what _layer_weights were collected for
        self.fast_steps = 0  # steps that ran their layers in C (for tests and profiles)

    @classmethod
    def for_model(cls, model: Any) -> DecodeStep | None:
        try:
            language_model = model.model.language_model
            config = language_model.config
            layers = list(language_model.layers)
            rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        except AttributeError:
            return None
        if not layers or any(type(layer).__name__ != SUPPORTED_LAYER for layer in layers):
            return None
        if rope_type != "default" or getattr(config, "sliding_window", None):
            return None
        if not hasattr(model, "lm_head"):
            return None
        return cls(model)

    def _shape(self, rows: int, dtype: torch.dtype) -> Shape:
        inter = int(self.layers[0].mlp.gate_proj.out_features)
        return Shape(
            rows, self.hidden_size, self.heads, self.kv_heads, self.head_dim, inter, self.eps,
            torch.get_num_threads(), dtype == torch.bfloat16,
        )  # fmt: skip

    def _fast_layers(self, rows: int, dtype: torch.dtype) -> list[LayerWeights] | None:
        """Every layer's weights for the C layer kernel, or None where it cannot run this step
        (activations neither bfloat16 nor float32, more rows than the bf16 kernel takes, a
        product it cannot call, bf16 weights not back to back yet)."""
        if self.layer_kernel is None or torch.is_grad_enabled():
            return None
        if dtype not in (torch.bfloat16, torch.float32) or rows > self.layer_rows:
            return None
        key = (dtype, *weights_key(self.layers))
        if key != self._layer_key:  # another dtype, or the weights moved (engine.cpu.hugepages)
            self._layer_key = key
            self._layer_weights = self._collect_layer_weights(dtype)
        if len(self._layer_weights) != len(self.layers):
            return None
        return self._layer_weights

    def _collect_layer_weights(self, dtype: torch.dtype) -> list[LayerWeights]:
        found: list[LayerWeights] = []
        for index, layer in enumerate(self.layers):
            weights = layer_weights(layer, self.qkv[index], self.gate_up[index], dtype)
            if weights is None:
                return []
            found.append(weights)
        return found

    def _projections(
        self, index: int, attention: Any, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        joined = self.qkv[index]
        out = joined.project(x)
        if out is None:
            return attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        q, k, v = joined.parts(out)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def _mlp(self, index: int, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """Qwen3VLTextMLP: down(act(gate(x)) * up(x))."""
        joined = self.gate_up[index]
        out = joined.project(x)
        if out is None:
            result: torch.Tensor = mlp(x)
            return result
        gate, up = joined.parts(out)
        down: torch.Tensor = mlp.down_proj(mlp.act_fn(gate) * up)
        return down

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # transformers' Qwen3VLTextRMSNorm: normalize in float32, back to the input dtype, scale
        if self.ops is not None and self.ops.takes(x, weight):
            return self.ops.rms_norm(x, weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * normed.to(x.dtype)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B, head_dim) for text positions (equal on the three M-RoPE axes)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        table = torch.cat((freqs, freqs), dim=-1)
        cos = (table.cos() * self.rotary_scale).to(dtype)
        sin = (table.sin() * self.rotary_scale).to(dtype)
        return cos, sin

    def _query_key(
        self, attention: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head norms and rotary embedding; q (B, 1, H, D) -> (B, H, 1, D), k likewise."""
        q_weight, k_weight = attention.q_norm.weight, attention.k_norm.weight
        if self.ops is not None and self.ops.takes(q, k, q_weight, k_weight, cos, sin):
            self.ops.qk_norm_rotate(q, q_weight, k, k_weight, cos, sin, self.eps)
            return q.transpose(1, 2), k.transpose(1, 2)
        cos4, sin4 = cos[:, None, None, :], sin[:, None, None, :]
        q = self._rotate(self._rms(q, q_weight).transpose(1, 2), cos4, sin4)
        k = self._rotate(self._rms(k, k_weight).transpose(1, 2), cos4, sin4)
        return q, k

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        **_: Any,
    ) -> torch.Tensor:
        rows = input_ids.shape[0]
        hidden = self.embed(input_ids)  # (B, 1, hidden)
        cos, sin = self._rotary(position_ids[0, :, 0], hidden.dtype)
        mask = None
        if not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]
        starts = None if mask is None or self.attention is None else left_padding(attention_mask)
        kernel = self.attention if mask is None or starts is not None else None
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        fast = self._fast_layers(rows, hidden.dtype)
        layer_kernel = self.layer_kernel if fast is not None else None
        shape = self._shape(rows, hidden.dtype)
        self.fast_steps += fast is not None
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            if layer_kernel is not None and fast is not None:
                q, k, v = (hidden.new_empty((rows, 1, n, head_dim)) for n in (heads, kv_heads, kv_heads))
                layer_kernel.before_attention(shape, hidden, fast[index], cos, sin, (q, k, v))
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            else:
                x = self._rms(hidden, layer.input_layernorm.weight)
                q, k, v = self._projections(index, attention, x)
                q = q.view(rows, 1, heads, head_dim)
                k = k.view(rows, 1, kv_heads, head_dim)
                v = v.view(rows, 1, kv_heads, head_dim).transpose(1, 2)
                q, k = self._query_key(attention, q, k, cos, sin)
            keys, values = _append(cache, k, v, index)
            in_c = kernel is not None and kernel.takes(q, keys, values)
            if in_c and layer_kernel is not None and fast is not None:
                weights = fast[index]
                layer_kernel.after_attention(shape, hidden, q, keys, values, starts, self.scaling, weights)
                continue
            if in_c and kernel is not None:
                out = kernel(q, keys, values, starts, self.scaling)  # (B, 1, H * D)
            else:
                out = (
                    F.scaled_dot_product_attention(
                        q,
                        keys.to(q.dtype),  # a cache kept in another dtype (engine.qwen.kvbuffer)
                        values.to(q.dtype),
                        attn_mask=mask,
                        scale=self.scaling,
                        enable_gqa=True,
                    )
                    .transpose(1, 2)
                    .reshape(rows, 1, heads * head_dim)
                )
            hidden = hidden + attention.o_proj(out)
            x = self._rms(hidden, layer.post_attention_layernorm.weight)
            hidden = hidden + self._mlp(index, layer.mlp, x)
        last: torch.Tensor = self.norm(hidden)[:, -1]
        return last
