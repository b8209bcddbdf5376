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

`OneDnnLinear` (the vision tower's linears) has its weight reordered once into the blocked layout
oneDNN's product reads (`mkldnn._reorder_linear_weight`, what torch's compiler does when it freezes
a CPU model) instead of inside every call; the plain float32 copy is released, so the bytes held
are the same, and the results are the same bits. The whole vision tower of Qwen3-VL-2B, 2 threads,
Zen5, alternating in one process: 640x480 forced AVX-512 2.63 -> 2.45 s, forced AVX2 4.68 ->
4.46 s; 1920x1080 forced AVX-512 13.0 -> 12.1 s. The reordering takes ~1 s for the 104 linears,
so it is part of the engine's idle-time preparation after load (`reorder_weights`, from
engine.cpu.swap), not of load-to-ready; until then the plain weights serve.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

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
    """A float32 nn.Linear whose product goes through oneDNN; the same parameters until
    `reorder()` replaces the weight with oneDNN's reordered copy (a buffer `weight`, an opaque
    mkldnn tensor; the plain parameter released). For inference: with autograd on, F.linear runs
    over the plain weight (a dense copy of a reordered one, which gets no gradient)."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.weight: torch.Tensor = source.weight
        self.bias = source.bias
        self.in_features, self.out_features = source.in_features, source.out_features

    @property
    def reordered(self) -> bool:
        return bool(self.weight.is_mkldnn)

    def reorder(self) -> None:
        """Hold the weight in oneDNN's layout from now on (same bytes, same results)."""
        if self.reordered:
            return
        with torch.no_grad():
            reordered = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), ROWS_HINT)
        del self.weight  # the parameter, released
        self.register_buffer("weight", reordered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            return out
        weight = self.weight.to_dense() if self.reordered else self.weight
        return F.linear(x, weight.to(x.dtype), self.bias)


def reorder_weights(model: nn.Module, should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Reorder every OneDnnLinear's weight inside `model` (`OneDnnLinear.reorder`), checking
    `should_stop` between linears; returns whether all are done (False: stopped, call again)."""
    for module in model.modules():
        if isinstance(module, OneDnnLinear) and not module.reordered:
            if should_stop():
                return False
            module.reorder()
    return True


def use_onednn_linears(module: nn.Module) -> int:
    """Replace every float32 nn.Linear inside `module` with a OneDnnLinear (where `available()`;
    same parameters, reordered later by `reorder_weights`); returns how many."""
    if not available():
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, OneDnnLinear(child))
                count += 1
    return count
