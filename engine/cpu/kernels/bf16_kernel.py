"""bfloat16 decode steps at memory speed: the language model's linear layers through
engine/cpu/kernels/bf16_matvec.c when a step has only a few rows.

On tiers without bf16 arithmetic (AVX2, AVX-512 without BF16, NEON without bf16) the model keeps
its bf16 weights and computes in float32 (engine.cpu.half_weights): a DecodeLinear then takes
float32 activations, multiplies them in the kernel for a decode step (half the bytes of float32
weights) and, over a prompt, widens its weights block by block for torch's float32 product.

A decode step reads every weight of the language model once (3.44 GB in bf16 for Qwen3-VL-2B);
oneDNN's matrix-vector product streams them at ~18-20 GB/s on the 2-core machine vlbot is measured
on, the C loop at ~26-28 GB/s (about a plain float sum's speed). Prefill (many rows) keeps
oneDNN, whose matrix-matrix products are the fast ones. The weights stay the model's own tensors
(the output head stays tied to the embedding).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engine.cpu import onednn_linear
from engine.cpu.kernels import bf16_gemm
from engine.cpu.native import I32, I64, POINTER, active_tier, c_function, load_library

logger = logging.getLogger("vlbot.engine")

# Offered where the tier has vector floats: AVX2 on x86 (and above), NEON on aarch64.
CPU_FLAGS = ("avx2",)
ARM_FLAGS = ("asimd",)
# float32 prompts: weights widened this many elements at a time (16 MiB of float32 scratch)
WIDEN_BLOCK = 4 * 1024 * 1024
# Inputs with more rows than this go to oneDNN (prefill always). With AMX, oneDNN's tile products
# beat this kernel from 7 rows on (the 28 layers' joined shapes, 2.82 GB, 2 cores, kernel vs
# oneDNN: 4 rows 138 vs 163 ms, 5 rows 147 vs 161, 6 rows 155 vs 164, 8 rows 179 vs 171; with
# float multiply-adds instead of `vdpbf16ps` 4 rows took 149 ms and 6 rows 211); without AMX the
# kernel takes batches of up to 8.
MAX_ROWS_WITH_AMX = 6
MAX_ROWS = 8
# Float32 activations over bf16 weights (engine.cpu.half_weights, tiers without bf16 arithmetic):
# inputs up to this many rows (a follow-up's short text prompt) go through the kernel too, MAX_ROWS
# rows per pass over the weights, instead of widening every weight for torch's float32 product.
# The kernel's time grows by one pass over the weights per MAX_ROWS rows, the widened product's
# by its arithmetic. AVX2 forced on Zen5, 2 threads, A/B alternately in one process, best of 5-9
# at load 4-5 (other benchmarks running: the ratios, not the times): the language model's forward
# over a follow-up's new tokens on 344-355 cached ones, full-size model, kernel against widened:
# 12 rows 0.31 / 0.60 s, 16 0.43 / 0.54, 20 0.48 / 0.68, 24 0.62 / 0.75, 32 0.76 / 0.74,
# 40 0.98 / 1.00 s; one layer's 7 matrices alone: 16 rows 0.62x, 24 0.69x, 32 0.83x, 40 1.11x,
# 48 1.10x, 64 1.15x. With bf16 arithmetic (avx512_bf16) oneDNN's bf16 product is ahead from
# 8 rows (1.2x at 8, 1.4x at 16): nothing changes there.
FLOAT_PROMPT_MAX_ROWS = 24


class Bf16Kernel:
    """The loaded library's function, typed."""

    def __init__(self, library: ctypes.CDLL, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self._matvec = c_function(
            library, "vlbot_bf16_matvec", I32, POINTER, I64, I64, I64, POINTER, POINTER, POINTER, I32
        )
        self._matvec_f32 = c_function(
            library, "vlbot_bf16_matvec_f32", I32, POINTER, I64, I64, I64, POINTER, POINTER, POINTER, I32
        )
        self._widen = c_function(library, "vlbot_bf16_widen", None, POINTER, POINTER, I64, I32)

    @property
    def function(self) -> object:
        """The C function itself (engine.cpu.kernels.decode_layer calls it by address)."""
        return self._matvec

    @property
    def function_f32(self) -> object:
        """Its float32-activation variant, likewise."""
        return self._matvec_f32

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (rows, K) bfloat16 or float32 times weight (N, K) bfloat16, transposed: (rows, N) in
        x's dtype."""
        if x.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != torch.bfloat16:
            raise TypeError("the bf16 kernel takes bfloat16 weights and bfloat16 or float32 inputs")
        flat = x.contiguous()
        rows, k = flat.shape
        n = weight.shape[0]
        if weight.shape[1] != k or not weight.is_contiguous():
            raise ValueError(f"weights {tuple(weight.shape)} do not take inputs of {k} features")
        out = torch.empty((rows, n), dtype=x.dtype)
        # held in a name for the call: a temporary's address could be freed before C reads it
        offset = None if bias is None else bias.to(torch.bfloat16).contiguous()
        function = self._matvec if x.dtype == torch.bfloat16 else self._matvec_f32
        status = function(
            flat.data_ptr(),
            rows,
            k,
            n,
            weight.data_ptr(),
            None if offset is None else offset.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("the bf16 kernel could not allocate its scratch memory")
        return out

    def widened_matmul(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x (rows, K) float32 times weight (N, K) bfloat16, transposed, for many rows: blocks of
        the weight widened to float32 in C, each multiplied in float32 by oneDNN
        (engine.cpu.onednn_linear: 12.3 ms against MKL's 15.0 for a 330-row 2048x2048 block with
        AVX2 forced, 6.6 against 14.6 with AVX-512; torch's bf16 product on a tier without bf16
        arithmetic is ~3x slower than either). AVX2 forced on Zen5, 2048->6144, 1 thread, with
        MKL: 300 rows 122.5 ms against torch's float32 linear's 119.9 ms (and its bf16 linear's
        403.9), 1000 rows 263.3 against 278.9 (1000.4) ms.

        On the AVX2 tier engine/cpu/kernels/bf16_gemm.c's product does both in one pass instead
        (a decoder layer's seven products 0.81x the time on a Zen3)."""
        gemm = bf16_gemm.load_kernel()
        if gemm is not None:
            return gemm(x, weight, bias)
        return onednn_linear.on_even_rows(x.contiguous(), lambda rows: self._widened(rows, weight, bias))

    def _widened(self, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows, k = flat.shape
        n = weight.shape[0]
        block = max(1, min(n, WIDEN_BLOCK // max(k, 1)))
        scratch = torch.empty((block, k), dtype=torch.float32)
        out = torch.empty((rows, n), dtype=torch.float32)
        threads = torch.get_num_threads()
        for start in range(0, n, block):
            stop = min(n, start + block)
            part = scratch[: stop - start]
            source = weight[start:stop]
            self._widen(source.data_ptr(), part.data_ptr(), part.numel(), threads)
            out[:, start:stop] = onednn_linear.linear(flat, part)
        if bias is not None:
            out += bias.float()
        return out


@functools.lru_cache(maxsize=1)
def load_kernel() -> Bf16Kernel | None:
    """The kernel, or None where this machine cannot build or run it (reason logged once)."""
    tier = active_tier()
    library = load_library("bf16_matvec", (), ARM_FLAGS if tier.is_arm else CPU_FLAGS)
    if library is None:
        return None
    return Bf16Kernel(library, MAX_ROWS_WITH_AMX if tier.has("amx_bf16") else MAX_ROWS)


class DecodeLinear(nn.Module):
    """A bfloat16 nn.Linear whose few-row inputs go through the kernel; same parameters."""

    def __init__(self, linear: nn.Linear, kernel: Bf16Kernel) -> None:
        super().__init__()
        self.weight = linear.weight  # shared, not copied: a tied output head stays tied
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        half_weights = x.dtype == torch.float32 and self.weight.dtype == torch.bfloat16
        if torch.is_grad_enabled() or x.dtype not in (torch.bfloat16, torch.float32):
            if half_weights:
                bias = None if self.bias is None else self.bias.float()
                return F.linear(x, self.weight.float(), bias)
            return F.linear(x, self.weight, self.bias)
        kernel_rows = self._kernel.max_rows
        if half_weights:  # a short float32 prompt too (FLOAT_PROMPT_MAX_ROWS)
            kernel_rows = max(kernel_rows, FLOAT_PROMPT_MAX_ROWS)
        if flat.shape[0] <= kernel_rows and (half_weights or x.dtype == torch.bfloat16):
            y = self._kernel.matmul(flat, self.weight, self.bias)
        elif half_weights:
            y = self._kernel.widened_matmul(flat, self.weight, self.bias)
        else:  # a bf16 prompt: oneDNN's bf16 product
            y = onednn_linear.on_even_rows(flat, lambda rows: F.linear(rows, self.weight, self.bias))
        return y.reshape(*shape[:-1], self.out_features)


def use_for_decode(model: Any) -> int:
    """Swap the language model's bfloat16 nn.Linear layers and output head for DecodeLinear.

    Returns how many were swapped: 0 where the model is not bfloat16 or the kernel is not
    available here."""
    language_model = model.model.language_model
    if next(language_model.parameters()).dtype != torch.bfloat16:
        return 0
    kernel = load_kernel()
    if kernel is None:
        return 0
    count = swap_bf16_linears(language_model, kernel)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and head.weight.dtype == torch.bfloat16:
        model.lm_head = DecodeLinear(head, kernel)
        count += 1
    logger.info("bf16 decode kernel on %d language-model layers", count)
    return count


def swap_bf16_linears(root: nn.Module, kernel: Bf16Kernel) -> int:
    """Swap every bfloat16 nn.Linear inside `root` for a DecodeLinear; returns how many."""
    parents: list[tuple[nn.Module, str, nn.Linear]] = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16
    ]
    for parent, name, child in parents:
        setattr(parent, name, DecodeLinear(child, kernel))
    return len(parents)


class AdjacentLinears:
    """DecodeLinear layers whose weights lie back to back in memory, read as one matrix: a
    layer's q, k and v projections, or its gate and up projections, are consecutive tensors,
    and engine.cpu.hugepages places them one after the other. One kernel call then reads them all
    (fewer, longer passes over memory: the prefetchers' ramp and the threads' start-up are paid
    once), and each product is the one its own layer gives, bit for bit.

    `project(x)` returns the concatenated outputs, or None where the weights are not adjacent
    (yet) or the input has more rows than the kernel takes: the caller then uses the layers."""

    def __init__(self, linears: list[nn.Module]) -> None:
        self.linears = linears
        self.sizes = [linear.weight.shape[0] for linear in linears if isinstance(linear, DecodeLinear)]
        self._address = -1
        self._weight: torch.Tensor | None = None
        self._kernel: Bf16Kernel | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor | None:
        weight, kernel = self._joined()
        flat = x.reshape(-1, x.shape[-1])
        if weight is None or kernel is None or flat.shape[0] > kernel.max_rows:
            return None
        if x.dtype not in (torch.bfloat16, torch.float32) or torch.is_grad_enabled():
            return None  # float32: the half-size-weights model (engine.cpu.half_weights)
        out = kernel.matmul(flat, weight, None)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @property
    def address(self) -> int:
        """Where the first layer's weight is now (0 where it is not a DecodeLinear)."""
        first = self.linears[0]
        return first.weight.data_ptr() if isinstance(first, DecodeLinear) else 0

    @property
    def weight(self) -> torch.Tensor | None:
        """The joined weight (rows of all layers, in order), or None where not adjacent."""
        return self._joined()[0]

    def parts(self, out: torch.Tensor) -> list[torch.Tensor]:
        """`project`'s output split into each layer's (views)."""
        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        return [out[..., a:b] for a, b in itertools.pairwise(starts)]

    def _joined(self) -> tuple[torch.Tensor | None, Bf16Kernel | None]:
        address = self.address
        if address != self._address:  # computed again when the weights move
            self._address = address
            self._weight, self._kernel = _join(self.linears)
        return self._weight, self._kernel


def _join(linears: list[nn.Module]) -> tuple[torch.Tensor | None, Bf16Kernel | None]:
    layers = [linear for linear in linears if isinstance(linear, DecodeLinear)]
    if len(layers) != len(linears) or any(layer.bias is not None for layer in layers):
        return None, None
    weights: list[torch.Tensor] = [layer.weight for layer in layers]
    first = weights[0]
    columns = int(first.shape[1])
    if any(w.dtype != torch.bfloat16 or not w.is_contiguous() or w.shape[1] != columns for w in weights):
        return None, None
    for before, after in itertools.pairwise(weights):
        if after.data_ptr() != before.data_ptr() + before.numel() * before.element_size():
            return None, None
    rows = sum(int(w.shape[0]) for w in weights)
    try:  # one view over the storage they share (separate storages: not joined)
        joined = torch.as_strided(first.detach(), (rows, columns), (columns, 1))
    except RuntimeError:
        return None, None
    return joined, layers[0]._kernel
