"""ctypes bindings of engine/cpu/kernels/decode_attention.c: a decode step's attention (one query
per conversation over its cached keys and values) in one call per layer, over a bfloat16 or a
float32 cache (float32 queries may read a bfloat16 one), on every tier with vector floats (AVX2
and above on x86, NEON on aarch64).

engine.cpu.decode_step uses it where the library builds; anything it does not take (another
layout, a mask that is not left padding) goes to torch's `scaled_dot_product_attention`.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from engine.cpu.native import F32, I32, I64, POINTER, active_tier, c_function, load_library

CPU_FLAGS = ("avx2",)  # x86; aarch64 has NEON (`asimd`) on every tier
ARM_FLAGS = ("asimd",)
COMPILE_FLAGS: tuple[str, ...] = ()  # the tier gives the -m flags (engine.cpu.tiers)
# (queries, cache): a bf16 model; a float32 one; a float32 one over bf16 weights (engine.cpu.half_weights)
DTYPE_PAIRS = (
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
)
MAX_DIM = 256
MAX_GROUP = 16


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's first attended position when the mask (rows, length) is left padding (zeros
    then ones) — engine.qwen.batching's masks; None when it is not of that form."""
    length = attention_mask.shape[1]
    starts = length - attention_mask.sum(dim=1)
    expected = torch.arange(length)[None, :] >= starts[:, None]
    if not torch.equal(attention_mask.bool(), expected) or bool((starts >= length).any()):
        return None
    return starts.to(torch.int64).contiguous()


def cache_arguments(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor | None
) -> tuple[int | None, ...]:
    """The addresses of q, keys and values, the cache's strides (batch, head, token) and the
    address of `starts`, in the order the C functions take them."""
    return (
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        None if starts is None else starts.data_ptr(),
    )


class DecodeAttention:
    """The loaded library's function, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        arguments = (
            POINTER, POINTER, POINTER, I64, I64, I64, POINTER, I64, I64, I64, I64, I64, F32, POINTER, I32,
        )  # fmt: skip
        self._attend = c_function(library, "vlbot_decode_attention", I32, *arguments)
        self._attend_f32 = c_function(library, "vlbot_decode_attention_f32", I32, *arguments)
        self._attend_f32_bf16 = c_function(library, "vlbot_decode_attention_f32_bf16", I32, *arguments)

    def function_for(self, activations: torch.dtype, cache: torch.dtype) -> object:
        """The C function for queries of dtype `activations` over a cache of dtype `cache` (a
        pair `takes` accepts); engine.cpu.kernels.decode_layer calls it by address."""
        if activations == torch.bfloat16:
            return self._attend
        return self._attend_f32_bf16 if cache == torch.bfloat16 else self._attend_f32

    @staticmethod
    def takes(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """q (B, H, 1, D) laid out as (B, 1, H, D); keys/values (B, Hkv, L, D) with rows of D
        contiguous values and the same strides; all three bfloat16 or float32, or float32 queries
        over a bfloat16 cache; a supported head size and grouping."""
        if not (keys.dtype == values.dtype and (q.dtype, keys.dtype) in DTYPE_PAIRS):
            return False
        if q.dim() != 4 or keys.dim() != 4 or q.shape[2] != 1 or keys.shape != values.shape:
            return False
        batch, heads, _, dim = q.shape
        kv_heads = keys.shape[1]
        return (
            q.transpose(1, 2).is_contiguous()
            and keys.stride() == values.stride()
            and keys.stride(3) == 1
            and keys.shape[0] == batch
            and keys.shape[3] == dim
            and dim % 16 == 0  # a multiple of every tier's vector width
            and dim <= MAX_DIM
            and heads % kv_heads == 0
            and heads // kv_heads <= MAX_GROUP
        )

    def __call__(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        starts: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Attention output (B, 1, H * D) for q (B, H, 1, D) over keys/values (B, Hkv, L, D);
        row b attends to positions starts[b]: (all when `starts` is None)."""
        batch, heads, _, dim = q.shape
        kv_heads, length = keys.shape[1], keys.shape[2]
        out = q.new_empty((batch, 1, heads * dim))
        attend: Any = self.function_for(q.dtype, keys.dtype)
        status = attend(
            *cache_arguments(q, keys, values, starts),
            batch,
            heads,
            kv_heads,
            length,
            dim,
            scale,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError("the decode attention kernel refused its inputs or ran out of memory")
        return out


@functools.lru_cache(maxsize=1)
def load_attention() -> DecodeAttention | None:
    flags = ARM_FLAGS if active_tier().is_arm else CPU_FLAGS
    library = load_library("decode_attention", COMPILE_FLAGS, flags)
    return None if library is None else DecodeAttention(library)
