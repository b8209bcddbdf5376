"""One decode step of Qwen3-VL's language model, written out for speed.

A decode step feeds one new token per conversation. transformers' forward for it spends ~20 ms
per step on the full-size model outside the matrix products (building masks and rotary tables for
the general case, RMSNorm in eight operators, output records, keyword plumbing through 28 layers);
with the weights read at memory speed (engine.bf16_kernel, engine.int4_kernel) that was a fifth of
an int4 step. This module does the same arithmetic with the model's own weights and modules in
fewer operators:

- decode tokens are text, so their M-RoPE position is the same on all three axes and the rotary
  table is the plain one: cos/sin of position x inverse frequency, computed once per step;
- attention is `scaled_dot_product_attention` over the conversation cache (`cache.update`, so the
  in-place cache of engine.kvbuffer works unchanged), with a padding mask only when the batch
  has padding; in bfloat16 engine.decode_attention's C loop instead;
- each layer's MLP is called as its module (its hooks run: tests slow it down, for instance).

`DecodeStep.for_model` returns None for a model it does not know exactly (another architecture,
sliding windows, a rotary scaling other than the default): the scheduler then uses the model's
forward. Tests check the logits (through the output head) against transformers' forward (float32
and bfloat16, one row and a padded batch) and the engine's answers against `generate`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from engine.decode_attention import DecodeAttention, left_padding, load_attention
from engine.decode_ops import DecodeOps, load_ops

SUPPORTED_LAYER = "Qwen3VLTextDecoderLayer"


class DecodeStep:
    """Every row's last hidden states (B, H), normalized, for the output head (the scheduler
    applies it: engine.output_head): `step(input_ids (B, 1), attention_mask (B, W + 1),
    position_ids (3, B, 1), cache)`, the inputs engine.batching prepares."""

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
        # float32 keeps torch's operators, whose results are transformers' to the last bit or two
        # (4-bit weights round activations to 8 bits, which turns any difference into tokens)
        self.ops: DecodeOps | None = load_ops() if model.dtype == torch.bfloat16 else None
        # and their attention in C too, reading each layer's cache once for the query heads that
        # share it (full-size model, 1,100 tokens of context: ~8 instead of ~12 ms per step)
        bf16 = model.dtype == torch.bfloat16
        self.attention: DecodeAttention | None = load_attention() if bf16 else None

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
        for index, layer in enumerate(self.layers):
            attention = layer.self_attn
            x = self._rms(hidden, layer.input_layernorm.weight)
            q = attention.q_proj(x).view(rows, 1, heads, head_dim)
            k = attention.k_proj(x).view(rows, 1, kv_heads, head_dim)
            v = attention.v_proj(x).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = self._query_key(attention, q, k, cos, sin)
            keys, values = cache.update(k, v, index)
            if kernel is not None and kernel.takes(q, keys, values):
                out = kernel(q, keys, values, starts, self.scaling)  # (B, 1, H * D)
            else:
                out = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True
                ).transpose(1, 2).reshape(rows, 1, heads * head_dim)
            hidden = hidden + attention.o_proj(out)
            x = self._rms(hidden, layer.post_attention_layernorm.weight)
            hidden = hidden + layer.mlp(x)
        last: torch.Tensor = self.norm(hidden)[:, -1]
        return last
