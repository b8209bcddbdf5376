"""Qwen3-VL's vision attention with the rotary embedding in one C pass (engine/cpu/kernels/vision_rotary.c).

transformers rotates each vision layer's queries and keys with seven float32 whole-tensor
operations and then lays them out head-major for attention; for a 1080p screenshot (4,032 patches)
that is ~0.7 s of the encoder's ~4.6 s on 2 cores. `VisionAttention` keeps the layer's own
projections and attention (`scaled_dot_product_attention` per image, as transformers' "sdpa" path
does) and does the rotation and layout in one pass with the same arithmetic.

The attention itself runs in a kernel instead of `scaled_dot_product_attention` where one beats it
(64-channel heads): in bfloat16 where the CPU has AMX, engine/cpu/kernels/vision_flash.py (about
half the time); else on AVX-512 tiers, float32 or bfloat16, engine/cpu/kernels/vision_flash_portable.py
(0.4-0.6x the time). Both are as close to exact attention as torch's, but not bit for bit torch's.
Elsewhere (AVX2, aarch64, other head sizes) the outputs are bit for bit those of transformers' module.

Only the "sdpa" attention of `Qwen3VLVisionAttention` is replaced, and only where the kernel
builds (engine.cpu.native); anything else keeps transformers' module.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu.kernels.vision_flash import FlashKernel
from engine.cpu.kernels.vision_flash import load_kernel as load_flash_kernel
from engine.cpu.kernels.vision_flash_portable import PortableFlash
from engine.cpu.kernels.vision_flash_portable import load_kernel as load_portable_flash
from engine.cpu.native import I32, I64, POINTER, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx2", "fma")
COMPILE_FLAGS = ("-ffp-contract=off",)  # no fused multiply-adds: same rounding (-m flags: the tier)
REPLACED_CLASS = "Qwen3VLVisionAttention"


class RotaryKernel:
    """The loaded library's function, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._rotate = c_function(
            library, "vlbot_vision_rotary", None, POINTER, POINTER, POINTER, I64, I64, I64,
            POINTER, POINTER, POINTER, I32, I32,
        )  # fmt: skip

    def split_rotated(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv (seq, 3, heads, dim) -> q, k rotated and v, each (heads, seq, dim) contiguous."""
        seq, three, heads, dim = qkv.shape
        if three != 3 or qkv.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError("expected a float32 or bfloat16 (seq, 3, heads, dim) projection")
        source = qkv.contiguous()
        cos32 = cos.to(torch.float32).reshape(seq, dim).contiguous()
        sin32 = sin.to(torch.float32).reshape(seq, dim).contiguous()
        q, k, v = (qkv.new_empty((heads, seq, dim)) for _ in range(3))
        self._rotate(
            source.data_ptr(),
            cos32.data_ptr(),
            sin32.data_ptr(),
            seq,
            heads,
            dim,
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            int(qkv.dtype == torch.bfloat16),
            torch.get_num_threads(),
        )
        return q, k, v


@functools.lru_cache(maxsize=1)
def load_kernel() -> RotaryKernel | None:
    library = load_library("vision_rotary", COMPILE_FLAGS, CPU_FLAGS)
    return None if library is None else RotaryKernel(library)


class VisionAttention(nn.Module):
    """Drop-in for Qwen3VLVisionAttention (sdpa) with the rotary pass in C; same parameters."""

    def __init__(
        self, attention: Any, kernel: RotaryKernel, flash: FlashKernel | PortableFlash | None = None
    ) -> None:
        super().__init__()
        self.qkv: nn.Module = attention.qkv
        self.proj: nn.Module = attention.proj
        self.num_heads = int(attention.num_heads)
        self.head_dim = int(attention.head_dim)
        self.scaling = float(attention.scaling)
        self._kernel = kernel
        self._flash = flash

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **_: Any,
    ) -> torch.Tensor:
        if position_embeddings is None:
            raise ValueError("the vision attention needs its rotary position embeddings")
        seq = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, self.head_dim)
        q, k, v = self._kernel.split_rotated(qkv, *position_embeddings)
        bounds = [int(b) for b in cu_seqlens.tolist()]  # one image per window
        windows = [(start, end - start) for start, end in itertools.pairwise(bounds)]
        out = None
        if self._flash is not None and self._flash.supports(q):
            out = self._flash(q, k, v, windows, self.scaling)
        if out is None:
            out = self._torch_attention(q, k, v, windows)
        projected: torch.Tensor = self.proj(out)
        return projected

    def _torch_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: list[tuple[int, int]]
    ) -> torch.Tensor:
        outputs = []
        for start, length in windows:  # one attention per image: patches see only their own image
            window = slice(start, start + length)
            outputs.append(
                F.scaled_dot_product_attention(
                    q[None, :, window], k[None, :, window], v[None, :, window], scale=self.scaling
                )
            )
        out = torch.cat(outputs, dim=2)[0] if len(outputs) > 1 else outputs[0][0]
        return out.transpose(0, 1).reshape(q.shape[1], self.num_heads * self.head_dim)


def use_fast_vision_attention(model: Any) -> int:
    """Replace the vision tower's sdpa attention modules; returns how many (0: left as they are)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None:
        return 0
    if getattr(visual.config, "_attn_implementation", None) != "sdpa":
        return 0
    blocks = [b for b in getattr(visual, "blocks", []) if type(b.attn).__name__ == REPLACED_CLASS]
    if not blocks:
        return 0
    kernel = load_kernel()
    if kernel is None:
        return 0
    amx = load_flash_kernel()
    flash = amx or load_portable_flash()
    for block in blocks:
        block.attn = VisionAttention(block.attn, kernel, flash)
    attention = {
        type(None): "", FlashKernel: ", AMX attention for bfloat16 64-channel heads",
        PortableFlash: ", vector attention for 64-channel heads",
    }[type(flash)]  # fmt: skip
    logger.info("vision rotary kernel on %d vision layers%s", len(blocks), attention)
    return len(blocks)
