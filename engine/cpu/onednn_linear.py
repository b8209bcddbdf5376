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

A bf16 model's vision linears (engine.cpu.half_weights) come here with their bf16 weights: the
float32 copy is made in the same idle-time preparation, or at a layer's first product if a request
comes first (`widen`), not at load. Converting Qwen3-VL-2B's vision linears takes ~0.95 s on a
2.45 GHz Zen3 (a third of what vlbot adds to load-to-ready there).

Prompt products run over an even number of rows (`on_even_rows`): oneDNN's matrix product
(torch 2.13's, `brg_matmul`) over some odd row counts runs at 0.6-0.8x its speed over one row
more — 287, 301, 305, 329 (a 640x480 photo's prompt), 343, 365, 371, 1073 rows among those
measured; no odd count under ~260 rows — in float32 on AVX2 and AVX-512 and in bf16 alike. A language-model
layer's seven products (Qwen3-VL-2B, 2 threads, Zen5, ms, as they are / one zero row appended):

| rows | bf16 (avx512_bf16) | float32, AVX-512 forced | float32, AVX2 forced |
|---|---|---|---|
| 287 | 56.4 / 40.2 | 107.1 / 82.3 | |
| 305 | | | 176.8 / 152.1 |
| 329 | 62.8 / 46.4 | 117.7 / 90.6 | 200.1 / 159.1 |
| 365 | | | 221.5 / 188.4 |
| 371 | 66.4 / 49.5 | 128.6 / 95.6 | |
| 1073 | 203.4 / 140.7 | 391.0 / 269.1 | 735.4 / 522.2 |

Other counts from 64 to 1100 rows: the extra row costs 0-4 % (one row more, the copy); under
EVEN_ROWS_FROM the extra row is not appended (2-5 % lost there, nothing to gain).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu.hugepages import file_mappings, release_file_pages
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


# prompts of at least this many rows are multiplied over an even number of rows
EVEN_ROWS_FROM = 256


def on_even_rows(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """product(x) for x (rows, K), computed over one zero row more where rows is odd and at least
    EVEN_ROWS_FROM (oneDNN's slow odd counts, above): the extra output row is dropped, the other
    rows are the same products."""
    rows = x.shape[0]
    if rows % 2 == 0 or rows < EVEN_ROWS_FROM:
        return product(x)
    padded = x.new_empty((rows + 1, x.shape[1]))
    padded[:rows] = x
    padded[rows] = 0
    return product(padded)[:rows]


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
    over the plain weight (a dense copy of a reordered one, which gets no gradient).

    The source's weight may be bf16 (its bias float32): it is converted to float32 by `widen()`,
    at the first product or by the idle-time preparation, whichever comes first."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.weight: torch.Tensor = source.weight
        self.bias = source.bias
        self.in_features, self.out_features = source.in_features, source.out_features

    @property
    def reordered(self) -> bool:
        return bool(self.weight.is_mkldnn)

    @property
    def widened(self) -> bool:
        return self.weight.dtype == torch.float32

    def widen(self, mappings: list[tuple[int, int]] | None = None) -> None:
        """Hold the weight in float32 from now on; a bf16 original's pages in a safetensors file
        mapping (`mappings`, else read now) are released, so it is not resident twice."""
        if self.widened:
            return
        half = self.weight.data
        # a normal tensor even when the first product runs under inference mode
        with torch.inference_mode(False), torch.no_grad():
            self.weight.data = half.float()
        release_file_pages([half], mappings)  # nothing reads the bf16 original again

    def reorder(self, mappings: list[tuple[int, int]] | None = None) -> None:
        """Hold the weight in oneDNN's layout from now on (same bytes, same results)."""
        if self.reordered:
            return
        self.widen(mappings)
        with torch.no_grad():
            reordered = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), ROWS_HINT)
        del self.weight  # the parameter, released
        self.register_buffer("weight", reordered)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.widen()
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            flat = x.reshape(-1, x.shape[-1])  # (a merger's rows can be an odd count: 21x15)
            return on_even_rows(flat, self._product).reshape(*x.shape[:-1], self.out_features)
        weight = self.weight.to_dense() if self.reordered else self.weight
        return F.linear(x, weight.to(x.dtype), self.bias)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return out


def reorder_weights(model: nn.Module, should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Reorder every OneDnnLinear's weight inside `model` (`OneDnnLinear.reorder`, widening a bf16
    one first), checking `should_stop` between linears; returns whether all are done (False:
    stopped, call again)."""
    mappings: list[tuple[int, int]] | None = None
    for module in model.modules():
        if isinstance(module, OneDnnLinear) and not module.reordered:
            if should_stop():
                return False
            if mappings is None:
                mappings = file_mappings()
            module.reorder(mappings)
    return True


def use_onednn_linears(module: nn.Module, widen_later: bool = False) -> int:
    """Replace every float32 nn.Linear inside `module` with a OneDnnLinear (where `available()`;
    same parameters, reordered later by `reorder_weights`); returns how many. `widen_later`: bf16
    ones too (with float32 biases, if any), converted to float32 later (`OneDnnLinear.widen`)."""
    if not available():
        return 0
    dtypes = (torch.float32, torch.bfloat16) if widen_later else (torch.float32,)
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype in dtypes:
                setattr(parent, name, OneDnnLinear(child))
                count += 1
    return count
