"""A prompt's last decoder layer computes its attention output projection and MLP for the last
position only.

A prefill needs the last position's hidden state (the first token's logits) and every position's
keys and values (the cache). The last decoder layer's keys and values come from its input, before
its attention; what follows — the attention output's projection, the MLP — feeds only that layer's
output, of which the next token reads one row. So, while a prefill runs (`LastPositionPrefill.active`),
those two modules of the last layer take the last row alone; their output is that row expanded
over the positions (a view), so the layer's residual sums keep their shapes. The last row is the
same product as before up to summation order (one row may take another kernel than 330 rows);
the other rows of the model's output are not meaningful while it is active.

Qwen3-VL-2B: the projection and the MLP are 42 M of a layer's 50 M weights, one layer of 28: ~3 %
of a prompt's language-model products (640x480 photo, 330 rows: ~0.1 s of the first token with
float32 products on AVX-512, ~0.17 s on AVX2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class LastPositionPrefill:
    """Hooks on the language model's last decoder layer (its `self_attn.o_proj` and `mlp`); inert
    until `active()`; `hooked` says whether the model had that layer."""

    def __init__(self, model: Any) -> None:
        self._active = False
        self._rows = 0
        self.hooked = False
        layers = getattr(getattr(getattr(model, "model", None), "language_model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return
        last = layers[-1]
        modules = [getattr(getattr(last, "self_attn", None), "o_proj", None), getattr(last, "mlp", None)]
        if not all(isinstance(module, nn.Module) for module in modules):
            return
        for module in modules:
            assert isinstance(module, nn.Module)
            module.register_forward_pre_hook(self._last_row)
            module.register_forward_hook(self._expanded)
        self.hooked = True

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While a prefill runs: only the last position's output is read."""
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def _last_row(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0] if args else None
        if not self._active or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-2] <= 1:
            self._rows = 0
            return None
        self._rows = x.shape[-2]
        return (x[..., -1:, :], *args[1:])

    def _expanded(self, _module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if self._rows == 0 or not isinstance(output, torch.Tensor):
            return None
        return output.expand(*output.shape[:-2], self._rows, output.shape[-1])
