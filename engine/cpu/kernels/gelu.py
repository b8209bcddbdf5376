"""The vision MLP's GELU (tanh approximation) on bfloat16 in one C pass (engine/cpu/kernels/gelu_tanh.c).

torch's bfloat16 `gelu(approximate="tanh")` runs at ~1 G elements/s on 2 cores here: for a 1080p
screenshot (24 vision layers x 4,032 patches x 4,096) that is ~0.4 s of the first token. The
kernel computes the same function in float and rounds to bfloat16 (~4 ms per layer instead of
15); its float result differs from torch's by a few units in the last place, so a small fraction
of outputs lands one bfloat16 step apart (tests bound both). float32 models keep torch's
operator, so their answers stay exactly those of transformers.

Only `GELUTanh` activations are replaced, only where the kernel builds (engine.cpu.native).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch
from torch import nn

from engine.cpu.native import I32, I64, POINTER, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
COMPILE_FLAGS: tuple[str, ...] = ()  # the tier gives the -m flags (engine.cpu.tiers)


class GeluKernel:
    """The loaded library's function, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._gelu = c_function(library, "vlbot_gelu_tanh_bf16", None, POINTER, POINTER, I64, I32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """gelu_tanh of a contiguous bfloat16 tensor, as a new tensor."""
        if x.dtype != torch.bfloat16 or not x.is_contiguous():
            raise ValueError("expected a contiguous bfloat16 tensor")
        out = torch.empty_like(x)
        self._gelu(x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
        return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> GeluKernel | None:
    library = load_library("gelu_tanh", COMPILE_FLAGS, CPU_FLAGS)
    return None if library is None else GeluKernel(library)


class FastGeluTanh(nn.Module):
    """Drop-in for transformers' `GELUTanh`: the C kernel for bfloat16 CPU tensors without
    autograd, the module it replaces for anything else."""

    def __init__(self, replaced: nn.Module, kernel: GeluKernel) -> None:
        super().__init__()
        self.replaced = replaced
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not x.requires_grad:
            return self._kernel(x.contiguous())
        out: torch.Tensor = self.replaced(x)
        return out


def use_fast_gelu(model: Any) -> int:
    """Replace the bfloat16 model's `GELUTanh` activations; returns how many (0: left as they are:
    another dtype, no such activation, or no kernel)."""
    from transformers.activations import ACT2CLS  # imports transformers: only once loading

    gelu_class = ACT2CLS["gelu_pytorch_tanh"]
    if isinstance(gelu_class, tuple):
        gelu_class = gelu_class[0]
    if getattr(model, "dtype", None) != torch.bfloat16:
        return 0
    sites = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is gelu_class
    ]
    if not sites:
        return 0
    kernel = load_kernel()
    if kernel is None:
        return 0
    for parent, name in sites:
        setattr(parent, name, FastGeluTanh(getattr(parent, name), kernel))
    logger.info("GELU kernel on %d activations", len(sites))
    return len(sites)
