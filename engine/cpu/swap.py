"""The one place where engine/cpu/ goes into a loaded transformers Qwen-VL model, and the one list
of what it swaps.

At load, `swap_modules` applies `MODULE_SWAPS` in order. Each swap replaces a module (or a
module's forward) with one that computes the same thing faster on this CPU, and leaves the model
as it is where its kernel does not build here, the dtype is not the one it serves or the module
is not the one it knows (every swap checks for itself; tests compare each with the code it
replaces).

After the swaps, `decode_parts` gives the scheduler what replaces transformers' code at decode
time: the written-out decode step (engine.cpu.decode_step; None for a model it does not know),
the output head screened through an 8-bit copy (engine.cpu.kernels.output_head), and the
idle-time preparation that makes that copy, reorders the float32 vision linears' weights for
oneDNN (engine.cpu.onednn_linear) and then moves the language model's weights onto huge pages
(engine.cpu.hugepages); and the dtype the KV cache keeps (bfloat16 under float32 activations over
bf16 weights, engine.cpu.half_weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.cpu.decode_step import DecodeStep
from engine.cpu.half_weights import cache_dtype, compute_in_float32
from engine.cpu.hugepages import move_to_huge_pages
from engine.cpu.kernels.bf16_kernel import use_for_decode
from engine.cpu.kernels.gelu import use_fast_gelu
from engine.cpu.kernels.output_head import OutputHead
from engine.cpu.kernels.prefill_ops import use_fast_prefill_ops
from engine.cpu.kernels.vision_attention import use_fast_vision_attention
from engine.cpu.onednn_linear import reorder_weights
from engine.cpu.patch_embed import linearize_patch_embedding
from engine.cpu.quant_store import quantize_language_model


@dataclass(frozen=True)
class ModuleSwap:
    """What is swapped for what, and the function that does it: `apply(model, quantize)`, with
    the engine's quantization mode ("none", "int8", "int4")."""

    what: str
    apply: Callable[[Any, str], object]


MODULE_SWAPS: tuple[ModuleSwap, ...] = (
    ModuleSwap(
        "a bf16 model on a tier without bf16 arithmetic: float32 compute, the language model's "
        "linear weights kept bf16 (half_weights, kernels/bf16_kernel)",
        lambda model, _: compute_in_float32(model),
    ),
    ModuleSwap(
        "vision patch embedding: Conv3d -> one matrix product (patch_embed)",
        lambda model, _: linearize_patch_embedding(model),
    ),
    ModuleSwap(
        "vision attention: rotary embedding in C, attention on AMX tiles in bf16, else in C on"
        " AVX-512 (kernels/vision_attention, kernels/vision_flash, kernels/vision_flash_portable)",
        lambda model, _: use_fast_vision_attention(model),
    ),
    ModuleSwap(
        "vision MLP's tanh GELU: one C pass, bf16 only (kernels/gelu)",
        lambda model, _: use_fast_gelu(model),
    ),
    ModuleSwap(
        "language model linears: int8/int4 weights where quantize asks, saved once and mapped at later"
        " starts (quant, quant_store, kernels/int8_kernel, kernels/int4_kernel)",
        quantize_language_model,
    ),
    ModuleSwap(
        "language model RMSNorms, query/key norm + rotary, SiLU gate over a prompt: one C pass each, "
        "bf16, and float32 on tiers without bf16 arithmetic (kernels/prefill_ops)",
        lambda model, _: use_fast_prefill_ops(model),
    ),
    ModuleSwap(
        "language model bf16 linears (those quantization left): the bf16 matrix-vector kernel for "
        "decode steps (kernels/bf16_kernel)",
        lambda model, _: use_for_decode(model),
    ),
)


def swap_modules(model: Any, quantize: str) -> None:
    """Apply every swap of `MODULE_SWAPS` to `model`, in order."""
    for swap in MODULE_SWAPS:
        swap.apply(model, quantize)


@dataclass(frozen=True)
class DecodeParts:
    """What the scheduler runs instead of transformers' code once the model is loaded."""

    decode_step: DecodeStep | None
    head: OutputHead
    prepare: Callable[[Callable[[], bool]], bool]
    cache_dtype: torch.dtype | None  # what the KV cache keeps (None: the model's dtype)


def decode_parts(model: Any) -> DecodeParts:
    """The decode step, output head and idle-time preparation for a model `swap_modules` has
    been through."""
    head = OutputHead.for_model(model)

    def prepare(should_stop: Callable[[], bool]) -> bool:
        # the head's 8-bit copy first: once it exists, the bf16 head stays in its file
        if not head.prepare(should_stop):
            return False
        # then the float32 vision linears' weights into oneDNN's layout (tiers without bf16)
        if not reorder_weights(model, should_stop):
            return False
        return move_to_huge_pages(model, should_stop, keep=head.kept_in_file())

    return DecodeParts(DecodeStep.for_model(model), head, prepare, cache_dtype(model))
