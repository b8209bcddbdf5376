"""The vision MLP's GELU (tanh approximation) in one C pass (engine/cpu/kernels/gelu_tanh.c).

torch's bfloat16 `gelu(approximate="tanh")` runs at ~1 G elements/s on 2 cores here: for a 1080p
screenshot (24 vision layers x 4,032 patches x 4,096) that is ~0.4 s of the first token. The
kernel computes the same function in float (and rounds to bfloat16 for a bf16 tensor); its
float result differs from torch's by a few units in the last place, so a small fraction of bf16
outputs lands one bfloat16 step apart (tests bound both). A 1080p layer's 4,032 x 4,096
activations, 2 threads, best of five, in place (as in the vision MLP) against torch's operator:

| tier | float32 | bfloat16 |
|---|---|---|
| avx512_bf16 | 3.0 vs 25.9 ms | 4.2 vs 11.1 ms |
| avx2 forced | 5.1 vs 34.9 ms | 7.8 vs 20.5 ms |

(~0.7 s of a 1080p screenshot's first token on forced AVX2.)

It replaces the `GELUTanh` of bfloat16 models, and of float32 vision towers on tiers without bf16
arithmetic (the half-size-weights model, engine.cpu.half_weights, computes in float32 there for
speed). A float32 model on a tier with bf16 arithmetic is a choice of precision: it keeps torch's
operator, so its answers stay exactly those of transformers. x86 only, where it was measured.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch
from torch import nn

from engine.cpu.native import I32, I64, POINTER, active_tier, c_function, load_library

logger = logging.getLogger("vlbot.engine")

CPU_FLAGS = ("avx2", "fma")  # x86 tiers (simd.h); not offered on aarch64, where it is unmeasured
COMPILE_FLAGS: tuple[str, ...] = ()  # the tier gives the -m flags (engine.cpu.tiers)
MLP_CLASS = "Qwen3VLVisionMLP"


class GeluKernel:
    """The loaded library's function, typed."""

    def __init__(self, library: ctypes.CDLL) -> None:
        arguments = (POINTER, POINTER, I64, I32)
        self._gelu = {
            torch.bfloat16: c_function(library, "vlbot_gelu_tanh_bf16", None, *arguments),
            torch.float32: c_function(library, "vlbot_gelu_tanh_f32", None, *arguments),
        }

    def __call__(self, x: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """gelu_tanh of a contiguous bfloat16 or float32 tensor, as a new tensor or, `in_place`,
        into x itself (no fresh pages to fault in: a 1080p layer's float32 activations take
        3-5 instead of 19-21 ms)."""
        if x.dtype not in self._gelu or not x.is_contiguous():
            raise ValueError("expected a contiguous bfloat16 or float32 tensor")
        out = x if in_place else torch.empty_like(x)
        self._gelu[x.dtype](x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
        return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> GeluKernel | None:
    library = load_library("gelu_tanh", COMPILE_FLAGS, CPU_FLAGS)
    return None if library is None else GeluKernel(library)


class FastGeluTanh(nn.Module):
    """Drop-in for transformers' `GELUTanh`: the C kernel for CPU tensors of `dtype` without
    autograd, the module it replaces for anything else. `in_place` where the input is read by
    nothing else (the vision MLP's: linear_fc1's fresh output, straight into linear_fc2)."""

    def __init__(
        self,
        replaced: nn.Module,
        kernel: GeluKernel,
        dtype: torch.dtype = torch.bfloat16,
        in_place: bool = False,
    ) -> None:
        super().__init__()
        self.replaced = replaced
        self._kernel = kernel
        self.dtype = dtype
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.dtype and x.device.type == "cpu" and not x.requires_grad:
            return self._kernel(x.contiguous(), in_place=self.in_place)
        out: torch.Tensor = self.replaced(x)
        return out


def use_fast_gelu(model: Any) -> int:
    """Replace the `GELUTanh` activations of a bfloat16 model, or of a float32 one on a tier without
    bf16 arithmetic; returns how many (0: left as they are: another dtype, no such activation, or
    no kernel)."""
    from transformers.activations import ACT2CLS  # imports transformers: only once loading

    gelu_class = ACT2CLS["gelu_pytorch_tanh"]
    if isinstance(gelu_class, tuple):
        gelu_class = gelu_class[0]
    dtype = getattr(model, "dtype", None)
    if dtype != torch.bfloat16 and not (dtype == torch.float32 and not active_tier().bf16_arithmetic):
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
        in_place = type(parent).__name__ == MLP_CLASS  # fc2(act(fc1(x))): act's input is fc1's alone
        setattr(parent, name, FastGeluTanh(getattr(parent, name), kernel, dtype, in_place))
    logger.info("GELU kernel on %d %s activations", len(sites), str(dtype).removeprefix("torch."))
    return len(sites)
