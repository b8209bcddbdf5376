"""Opt-in weight-only int8 / int4 quantization of the language model's linear layers (CPU).

Decode on a CPU is bound by reading the weights once per token: 8-bit weights halve the bytes read,
4-bit weights quarter them. Every input goes through vlbot's own byte kernels
(engine.cpu.kernels.int8_kernel, int4_kernel: one C source for every CPU tier, 8-bit activations,
products of bytes): decode steps at the speed of reading the weights, and a prompt's prefill
several rows per weight load, which is faster than torch's product over weights expanded to the
activations' dtype on every tier measured (so quantizing makes the first token faster, not
slower: figures in the kernels' modules). Where no kernel builds (no C compiler), torch's packed
kernels take every input (`_weight_int8pack_mm`: per-output-channel scales;
`_weight_int4pack_mm_for_cpu`: groups of up to 128 input channels with a scale and a zero point
each).

The kernels' figures against torch's (and torchao's) are in their modules' docstrings.

The quantized weights are kept (engine.cpu.quant_store): the first start with a mode quantizes and
writes them to the cache, later starts map them from there without quantizing again.

What it trades: answers are no longer those of the published weights (small reading errors can
change OCR output). The vision encoder and the token embedding are left untouched; the output head,
tied to the embedding in Qwen3-VL-2B, gets its own quantized copy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from engine.cpu.hugepages import file_mappings, release_file_pages
from engine.cpu.kernels import int4_kernel, int8_kernel
from engine.cpu.kernels.bf16_kernel import DecodeLinear
from engine.cpu.kernels.int4_kernel import Int4Kernel, PackedInt4
from engine.cpu.kernels.int8_kernel import QUANTIZE_ROWS, Int8Kernel, PackedInt8

logger = logging.getLogger("vlbot.engine")

Quantize = Literal["none", "int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4")
_INT4_GROUPS = (128, 64, 32)
# what quantization replaces: nn.Linear, or the bf16 kernel's DecodeLinear (engine.cpu.half_weights
# swaps the language model's linears for it first on tiers without bf16 arithmetic)
LinearLike = nn.Linear | DecodeLinear


def check_mode(mode: str) -> Quantize:
    key = mode.strip().lower()
    if key not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize setting {mode!r}: use none, int8 or int4")
    return key  # type: ignore[return-value]


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 per output channel."""

    def __init__(
        self, out_features: int, in_features: int, tensors: dict[str, torch.Tensor], kernel: Int8Kernel | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._kernel = kernel
        self.bias = nn.Parameter(tensors["bias"], requires_grad=False) if "bias" in tensors else None
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.qweight: torch.Tensor
        self.scale: torch.Tensor
        for name in ("packed", "scales") if kernel is not None else ("qweight", "scale"):
            self.register_buffer(name, tensors[name])  # buffers: counted with the model's state

    @classmethod
    def from_linear(cls, linear: LinearLike, kernel: Int8Kernel | None, dtype: torch.dtype) -> Int8Linear:
        q, scale = int8_kernel.quantize(linear.weight)
        n, k = q.shape
        if kernel is not None and not int8_kernel.fits(n, k):
            kernel = None
        tensors: dict[str, torch.Tensor] = {}
        if kernel is not None:
            packed = int8_kernel.pack(q, scale)
            tensors.update(packed=packed.packed, scales=packed.scales)
        else:
            compute = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
            tensors.update(qweight=q.contiguous(), scale=scale.to(compute))
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        return cls(n, k, tensors, kernel)

    @property
    def kernel_name(self) -> str:
        return f"vlbot {self._kernel.isa}" if self._kernel is not None else "torch"

    def _weights(self) -> PackedInt8:
        return PackedInt8(self.packed, self.scales, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        kernel = self._kernel
        if kernel is None:
            scale = self.scale
            y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat.to(scale.dtype), self.qweight, scale)
        else:
            y = kernel.matmul(flat, self._weights())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _int4_quantize(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scale and low float32 (N, K/group)): w ~ q * scale + low per
    group of a row; computed QUANTIZE_ROWS rows at a time (the float temporaries of Qwen3-VL-2B's
    whole output head were ~4 GB at the first start)."""
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.uint8)
    scale = torch.empty((n, k // group), dtype=torch.float32)
    low = torch.empty((n, k // group), dtype=torch.float32)
    for start in range(0, n, QUANTIZE_ROWS):
        stop = min(n, start + QUANTIZE_ROWS)
        grouped = weight[start:stop].float().reshape(stop - start, k // group, group)
        lowest, highest = grouped.amin(dim=-1), grouped.amax(dim=-1)
        step = ((highest - lowest) / 15.0).clamp(min=1e-8)
        part = torch.round((grouped - lowest[..., None]) / step[..., None]).clamp(0, 15)
        q[start:stop] = part.reshape(stop - start, k)
        scale[start:stop], low[start:stop] = step, lowest
    return q, scale, low


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups along the input channels.

    With the byte kernel (engine.cpu.kernels.int4_kernel) the weights are kept in its layout;
    without it, in torch's (`_weight_int4pack_mm_for_cpu` takes every input).
    """

    def __init__(
        self,
        out_features: int,
        in_features: int,
        group: int,
        tensors: dict[str, torch.Tensor],
        kernel: Int4Kernel | None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self._kernel = kernel
        self.bias = nn.Parameter(tensors["bias"], requires_grad=False) if "bias" in tensors else None
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.lows: torch.Tensor
        self.scales_zeros: torch.Tensor
        for name in ("packed", "scales", "lows") if kernel is not None else ("packed", "scales_zeros"):
            self.register_buffer(name, tensors[name])

    @classmethod
    def from_linear(cls, linear: LinearLike, group: int, kernel: Int4Kernel | None) -> Int4Linear:
        q, scale, low = _int4_quantize(linear.weight.detach(), group)
        n, k = q.shape
        if kernel is not None and not int4_kernel.fits(n, k, group):
            kernel = None
        if kernel is not None and not (scale.abs().amax() < 6e4 and low.abs().amax() < 6e4):
            kernel = None  # beyond float16, the kernel's scales (never so for a language model)
        tensors: dict[str, torch.Tensor] = {}
        if kernel is not None:
            packed = int4_kernel.pack(q, scale, low, group)
            tensors.update(packed=packed.packed, scales=packed.scales, lows=packed.lows)
        else:
            zero = low + 8.0 * scale  # torch's kernel computes (q - 8) * scale + zero
            tensors["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
            tensors["scales_zeros"] = scales_zeros.to(torch.bfloat16)
        if linear.bias is not None:
            tensors["bias"] = linear.bias.detach().clone()
        return cls(n, k, group, tensors, kernel)

    def _weights(self) -> PackedInt4:
        """The kernel's weights as the buffers are now (engine.cpu.hugepages may have moved them)."""
        return PackedInt4(
            self.packed, self.scales, self.lows, self.out_features, self.in_features, self.group
        )

    @property
    def kernel_name(self) -> str:
        return f"vlbot {self._kernel.isa}" if self._kernel is not None else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        kernel = self._kernel
        if kernel is None:
            y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group, self.scales_zeros
            )
        else:
            # the buffers' addresses, not a PackedInt4, for the ~200 calls of a decode step
            pointers = (self.packed.data_ptr(), self.scales.data_ptr(), self.lows.data_ptr())
            y = kernel.matmul_at(flat, pointers, self.out_features, self.in_features, self.group)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        y = y.view(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)


QuantizedLinear = Int8Linear | Int4Linear


def int4_group(linear: nn.Module) -> int | None:
    k, n = int(linear.in_features), int(linear.out_features)  # type: ignore[arg-type]
    if n % 8:
        return None
    return next((g for g in _INT4_GROUPS if k % g == 0), None)


def quantize_one(
    linear: LinearLike, mode: Quantize, dtype: torch.dtype, kernel: Any
) -> Int8Linear | Int4Linear | None:
    """`linear` quantized (None where its shape cannot be)."""
    if mode == "int8":
        return Int8Linear.from_linear(linear, kernel, dtype)
    group = int4_group(linear)
    return None if group is None else Int4Linear.from_linear(linear, group, kernel)


def load_mode_kernel(mode: Quantize) -> Int8Kernel | Int4Kernel | None:
    """The byte kernel of `mode` for this process's tier (None: torch's kernels)."""
    if mode == "int8":
        return int8_kernel.load_kernel()
    return int4_kernel.load_kernel() if mode == "int4" else None


def quantizable(model: Any) -> Iterator[tuple[str, nn.Module, str, LinearLike]]:
    """(path, parent, attribute, linear) of every layer quantization replaces: the language
    model's linear layers, then the output head ("lm_head", replaced by a quantized copy)."""
    language_model = model.model.language_model
    for parent_name, parent in list(language_model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, DecodeLinear)):
                path = ".".join(p for p in ("model.language_model", parent_name, name) if p)
                yield path, parent, name, child
    head = getattr(model, "lm_head", None)
    if isinstance(head, (nn.Linear, DecodeLinear)):
        yield "lm_head", model, "lm_head", head


def quantize_in_place(model: Any, mode: Quantize, kernel: Any) -> dict[str, Int8Linear | Int4Linear]:
    """Quantize every layer of `quantizable(model)` and swap it in; returns the new modules by
    path."""
    dtype = next(model.model.language_model.parameters()).dtype
    done: dict[str, Int8Linear | Int4Linear] = {}
    mappings = file_mappings()  # the model file's; quantizing maps no new files
    for path, parent, name, linear in quantizable(model):
        replacement = quantize_one(linear, mode, dtype, kernel)
        if replacement is None:
            continue
        setattr(parent, name, replacement)
        done[path] = replacement
        # its bf16 weights' pages of the model file stop counting as this process's memory now,
        # not after the last layer (full-size model: loading peaks at 6.1 GB instead of 8.9 GB);
        # the head's too (0.6 GB): its tied embedding reads a few rows, paged in again from the file
        release_file_pages([linear.weight.data], mappings)
    return done
