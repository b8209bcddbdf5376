"""Opt-in weight-only int8 / int4 quantization of the language model's linear layers (CPU).

Decode on a CPU is bound by reading the weights once per token: 8-bit weights halve the bytes read,
4-bit weights quarter them. This uses torch's own packed CPU kernels
(`_weight_int8pack_mm`: per-output-channel scales; `_weight_int4pack_mm_for_cpu`: groups of up to
128 input channels with a scale and a zero point each). Activations stay in bf16.

What it trades: answers are no longer those of the published weights (small reading errors can
change OCR output), and the packed kernels make the language model's part of a long prefill slower.
The vision encoder and the token embedding are left untouched; the output head, tied to the
embedding in Qwen3-VL-2B, gets its own quantized copy.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu.hugepages import file_mappings, release_file_pages
from engine.cpu.kernels.int4_kernel import Int4Kernel, PackedInt4, fits, load_kernel, pack

logger = logging.getLogger("vlbot.engine")

Quantize = Literal["none", "int8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = ("none", "int8", "int4")
_INT4_GROUPS = (128, 64, 32)
VNNI_MAX_ROWS = 16  # inputs up to this many rows use the VNNI kernel, larger ones expand weights


def check_mode(mode: str) -> Quantize:
    key = mode.strip().lower()
    if key not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize setting {mode!r}: use none, int8 or int4")
    return key  # type: ignore[return-value]


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 per output channel."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.qweight: torch.Tensor
        self.scale: torch.Tensor
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.to(compute_dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit weights in groups along the input channels.

    Where the AVX-512 VNNI kernel loads (engine.cpu.kernels.int4_kernel), the weights are kept in its layout:
    up to `VNNI_MAX_ROWS` rows (decode steps, batched or not) go through it, and larger inputs
    (prefill) multiply with the weights expanded to the activations' dtype for that call, which
    keeps oneDNN's fast matrix products for the prompt. Elsewhere torch's CPU int4 kernel
    (`_weight_int4pack_mm_for_cpu`) takes every input.
    """

    def __init__(self, linear: nn.Linear, group: int, *, kernel: Int4Kernel | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        n, k = weight.shape
        grouped = weight.reshape(n, k // group, group)
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
        scale = ((high - low) / 15.0).clamp(min=1e-8)
        q = torch.round((grouped - low[..., None]) / scale[..., None]).clamp(0, 15)
        q = q.to(torch.int32).reshape(n, k)
        self.group = group
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.in_features, self.out_features = k, n
        self._kernel = kernel if kernel is not None and fits(n, k, group) else None
        self.packed: torch.Tensor
        self.scales: torch.Tensor
        self.lows: torch.Tensor
        if self._kernel is not None:
            packed = pack(q, scale, low, group)
            for name in ("packed", "scales", "lows"):  # buffers: counted with the model's state
                self.register_buffer(name, getattr(packed, name))
            return
        zero = low + 8.0 * scale  # torch's kernel computes (q - 8) * scale + zero
        self.scales_zeros: torch.Tensor
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("scales_zeros", scales_zeros.to(torch.bfloat16))

    @property
    def _packed(self) -> PackedInt4 | None:
        """The VNNI weights as the buffers are now (engine.cpu.hugepages may have moved them)."""
        if self._kernel is None:
            return None
        return PackedInt4(
            self.packed, self.scales, self.lows, self.out_features, self.in_features, self.group
        )

    @property
    def kernel_name(self) -> str:
        return "vnni" if self._kernel is not None else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        packed = self._packed
        if self._kernel is not None and packed is not None:
            if flat.shape[0] <= VNNI_MAX_ROWS:
                y = self._kernel.matmul(flat, packed)
            else:
                weight = self._kernel.dequantize(packed, x.dtype)
                y = F.linear(flat.to(weight.dtype), weight)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(torch.bfloat16), self.packed, self.group, self.scales_zeros
            )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def _int4_group(linear: nn.Linear) -> int | None:
    k, n = linear.in_features, linear.out_features
    if n % 8:
        return None
    return next((g for g in _INT4_GROUPS if k % g == 0), None)


def _quantized(
    linear: nn.Linear, mode: Quantize, dtype: torch.dtype, kernel: Int4Kernel | None
) -> nn.Module | None:
    if mode == "int8":
        return Int8Linear(linear, torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    group = _int4_group(linear)
    return None if group is None else Int4Linear(linear, group, kernel=kernel)


def quantize_language_model(model: Any, mode: str) -> int:
    """Replace the language model's nn.Linear layers (and the output head) in place.

    Returns how many layers were quantized; 0 for "none". Layers whose shape the kernel cannot
    take are left as they are.
    """
    key = check_mode(mode)
    if key == "none":
        return 0
    language_model = model.model.language_model
    dtype = next(language_model.parameters()).dtype
    kernel = load_kernel() if key == "int4" else None
    count = 0
    mappings = file_mappings()  # the model file's; quantizing maps no new files
    for parent in list(language_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                replacement = _quantized(child, key, dtype, kernel)
                if replacement is not None:
                    setattr(parent, name, replacement)
                    # its bf16 weights' pages of the model file stop counting as this process's
                    # memory now, not after the last layer (full-size model: loading peaks at
                    # 6.1 GB instead of 8.9 GB)
                    release_file_pages([child.weight.data], mappings)
                    count += 1
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear):
        # quantize a copy: the (tied) token embedding keeps its full-precision weights
        replacement = _quantized(head, key, dtype, kernel)
        if replacement is not None:
            model.lm_head = replacement
            count += 1
    detail = "" if key != "int4" else f", {'VNNI' if kernel else 'torch'} kernel"
    logger.info("quantized %d language-model layers to %s (weight-only%s)", count, key, detail)
    return count
