"""float32 linear layers through oneDNN's matrix product instead of torch's default BLAS (MKL).

On tiers without bf16 arithmetic the vision tower and the language model's prompt products run in
float32 (engine.cpu.half_weights). torch sends a float32 `F.linear` to MKL's sgemm, which on this
AMD CPU runs its AVX2 code whatever the tier: the same ~45 ms for a 330x2048 by 2048x6144 product
with AVX2 forced, AVX-512 forced or native. oneDNN's float32 product (`mkldnn._linear_pointwise`,
the op torch's own compiler uses for CPU linears) uses the tier's widest vectors. 2 threads, Zen5,
ms per call, MKL against oneDNN:

| product | AVX2 forced | AVX-512 forced (no BF16) |
|---|---|---|
| 330x2048 by 2048x6144 (a prompt's MLP) | 47.8 / 37.0 | 45.8 / 19.2 |
| 1200x1024 by 1024x4096 (vision fc1, 640x480) | 51.2 / 44.6 | 53.8 / 24.2 |
| 1200x4096 by 4096x1024 (vision fc2) | 49.8 / 45.3 | 50.4 / 23.7 |
| 330x2048 by 2048x2048 (a widened prompt block) | 15.0 / 12.3 | 14.6 / 6.6 |

The results are float32 products with another summation order (a few units in the last place).
Used on x86 only, where it was measured; torch builds without oneDNN keep `F.linear`.

`OneDnnLinear` (the vision tower's linears) holds its weight reordered once, at load, into the
blocked layout oneDNN's product reads (`mkldnn._reorder_linear_weight`, what torch's compiler does
when it freezes a CPU model) instead of reordering it inside every call; the plain float32 copy is
released, so the bytes held are the same. The results are the same bits. The whole vision tower of
Qwen3-VL-2B, 2 threads, Zen5, alternating in one process: 640x480 forced AVX-512 2.63 -> 2.45 s,
forced AVX2 4.68 -> 4.46 s; 1920x1080 forced AVX-512 13.0 -> 12.1 s.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu.tiers import active_tier

logger = logging.getLogger("vlbot.engine")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether oneDNN's float32 linear runs here (x86, torch built with it): tried once on a
    small product against F.linear."""
    if active_tier().is_arm or not torch._C._has_mkldnn:
        return False
    try:
        x, weight, bias = torch.randn(3, 32), torch.randn(16, 32), torch.randn(16)
        got = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    except (AttributeError, RuntimeError) as e:
        logger.info("oneDNN float32 linear not available (%s): torch's F.linear stays", e)
        return False
    return bool(torch.allclose(got, F.linear(x, weight, bias), atol=1e-4))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for float32 inputs and weights, through oneDNN where `available()`."""
    if x.dtype == weight.dtype == torch.float32 and available() and not torch.is_grad_enabled():
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


# the rows oneDNN's reordered weights are laid out for (a 640x480 photo's vision patches); any
# other count of rows gets the same result, and in the measurements above as fast
ROWS_HINT = 1200


class OneDnnLinear(nn.Module):
    """A float32 nn.Linear whose product goes through oneDNN with its weight reordered once into
    oneDNN's layout: a buffer `weight` (an opaque mkldnn tensor, the source's parameter released),
    the same bias parameter. For inference: with autograd on, F.linear runs over a dense copy and
    the weight, a buffer now, gets no gradient."""

    weight: torch.Tensor

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(source.weight.detach(), ROWS_HINT)
        self.register_buffer("weight", packed)
        self.bias = source.bias
        self.in_features, self.out_features = source.in_features, source.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight.to_dense().to(x.dtype), self.bias)


def use_onednn_linears(module: nn.Module) -> int:
    """Replace every float32 nn.Linear inside `module` with a OneDnnLinear (where `available()`),
    each linear's plain weight released as it goes; returns how many."""
    if not available():
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, OneDnnLinear(child))
                count += 1
    return count
