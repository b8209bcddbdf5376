"""ctypes bindings of engine/cpu/kernels/decode_layer.c: a decode step's layer in two C calls.

engine.cpu.decode_step runs a layer as ~15 operators from Python; with bfloat16 weights, the layer's
products already in C (engine.cpu.kernels.bf16_kernel) and its weights back to back (q/k/v and gate/up, see
engine.cpu.kernels.bf16_kernel.AdjacentLinears), the operators between the products cost ~20 ms of a ~135 ms
step on the 2-core machine vlbot is measured on. `LayerKernel.before_attention` and
`after_attention` do them in C around the KV cache's append; the products, norms, rotary and
attention are the other kernels' functions, passed by address, so the arithmetic is theirs.
The activations are bfloat16, or float32 where the tier has no bf16 arithmetic and the model
computes in float32 over bfloat16 weights (engine.cpu.half_weights): there the operators cost
~10 ms of a ~66 ms one-row step with AVX2 forced, ~24 of ~107 ms for four rows.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any

import torch

from engine.cpu.kernels.bf16_kernel import Bf16Kernel
from engine.cpu.kernels.decode_attention import ARM_FLAGS, CPU_FLAGS, DecodeAttention, cache_arguments
from engine.cpu.kernels.decode_ops import DecodeOps
from engine.cpu.native import F32, I32, I64, POINTER, active_tier, c_function, load_library

COMPILE_FLAGS = ("-ffp-contract=off",)  # torch's rounding: no fused multiply-adds


class Kernels(ctypes.Structure):
    """`struct kernels`: the C functions the layer calls."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("matvec", "rms", "qk", "attention")]


class Shape(ctypes.Structure):
    """`struct shape`: one step's layer sizes, and whether its activations are bfloat16 (else float32)."""

    _fields_ = [
        *[
            (name, ctypes.c_int64)
            for name in ("rows", "hidden", "q_heads", "kv_heads", "head_dim", "intermediate")
        ],
        ("eps", ctypes.c_float),
        ("threads", ctypes.c_int),
        ("bf16", ctypes.c_int),
    ]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's tensors as the C functions take them (contiguous): the products'
    weights bfloat16, the norms' weights of the activations' dtype."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections back to back (q + 2 kv rows, hidden)
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections back to back (2 intermediate rows, hidden)
    down: torch.Tensor


def _address(function: Any) -> int:
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


class LayerKernel:
    """The loaded library, bound to the other kernels' functions."""

    def __init__(self, library: ctypes.CDLL, kernels: dict[torch.dtype, Kernels]) -> None:
        self._kernels = kernels  # per activation dtype; kept alive: C reads them on every call
        self._before = c_function(
            library, "vlbot_layer_before_attention", I32, POINTER, POINTER, POINTER, POINTER,
            POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER, POINTER,
        )  # fmt: skip
        self._after = c_function(
            library, "vlbot_layer_after_attention", I32, POINTER, POINTER, POINTER, POINTER,
            POINTER, POINTER, I64, I64, I64, POINTER, I64, F32, POINTER, POINTER, POINTER, POINTER,
        )  # fmt: skip

    def before_attention(
        self,
        shape: Shape,
        hidden: torch.Tensor,
        weights: LayerWeights,
        cos: torch.Tensor,
        sin: torch.Tensor,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        """q, k, v (`out`: (B, 1, heads, D) each, contiguous) for hidden states (B, 1, hidden)."""
        q, k, v = out
        status = self._before(
            ctypes.byref(self._kernels[hidden.dtype]),
            ctypes.byref(shape),
            hidden.data_ptr(),
            weights.input_norm.data_ptr(),
            weights.qkv.data_ptr(),
            weights.q_norm.data_ptr(),
            weights.k_norm.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
        )
        if status != 0:
            raise MemoryError("the decode layer kernel could not allocate its scratch memory")

    def after_attention(
        self,
        shape: Shape,
        hidden: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        starts: torch.Tensor | None,
        scale: float,
        weights: LayerWeights,
    ) -> None:
        """The rest of the layer, in place on `hidden` (B, 1, hidden), contiguous: keys and
        values as engine.cpu.kernels.decode_attention takes them (`DecodeAttention.takes`)."""
        status = self._after(
            ctypes.byref(self._kernels[hidden.dtype]),
            ctypes.byref(shape),
            hidden.data_ptr(),
            *cache_arguments(q, keys, values, starts),
            keys.shape[2],
            scale,
            weights.o.data_ptr(),
            weights.post_norm.data_ptr(),
            weights.gate_up.data_ptr(),
            weights.down.data_ptr(),
        )
        if status != 0:
            raise RuntimeError("the decode layer kernel refused its inputs or ran out of memory")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library("decode_layer", COMPILE_FLAGS, ARM_FLAGS if active_tier().is_arm else CPU_FLAGS)


def load_layer(matvec: Bf16Kernel, ops: DecodeOps, attention: DecodeAttention) -> LayerKernel | None:
    """The layer kernel calling these kernels' functions, or None where it cannot be built."""
    library = _library()
    if library is None:
        return None
    norm, qk = _address(ops.norm_function), _address(ops.qk_function)  # both dtypes, by a flag
    kernels = {
        torch.bfloat16: Kernels(_address(matvec.function), norm, qk, _address(attention.function)),
        torch.float32: Kernels(_address(matvec.function_f32), norm, qk, _address(attention.function_f32)),
    }
    return LayerKernel(library, kernels)
