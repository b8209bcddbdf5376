"""ctypes bindings of engine/cpu/kernels/decode_layer.c: a decode step's layer in two C calls.

engine.cpu.decode_step runs a layer as ~15 operators from Python; with bfloat16 weights, the layer's
products already in C (engine.cpu.kernels.bf16_kernel) and its weights back to back (q/k/v and gate/up, see
engine.cpu.kernels.bf16_kernel.AdjacentLinears), the operators between the products cost ~20 ms of a ~135 ms
step on the 2-core machine vlbot is measured on. `LayerKernel.before_attention` and
`after_attention` do them in C around the KV cache's append; the products, norms, rotary and
attention are the other kernels' functions, passed by address, so the arithmetic is theirs.
The activations are bfloat16, or float32 where the tier has no bf16 arithmetic and the model
computes in float32 over bfloat16 weights (engine.cpu.half_weights): there the operators cost
~10 ms of a ~66 ms one-row step with AVX2 forced, ~24 of ~107 ms for four rows. The products'
weights are bfloat16 or the int8 / int4 kernels' (`Product`); with int4 weights the operators
were a third of a step (~8 of 23.5 ms natively, ~9 of 30 ms with AVX2 forced).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.cpu.kernels.bf16_kernel import Bf16Kernel
from engine.cpu.kernels.decode_attention import (
    ARM_FLAGS,
    CPU_FLAGS,
    DTYPE_PAIRS,
    DecodeAttention,
    cache_arguments,
)
from engine.cpu.kernels.decode_ops import DecodeOps
from engine.cpu.native import F32, I32, I64, POINTER, active_tier, c_function, load_library

COMPILE_FLAGS = ("-ffp-contract=off",)  # torch's rounding: no fused multiply-adds


class Kernels(ctypes.Structure):
    """`struct kernels`: the C functions the layer calls (int8, int4: 0 where not used)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("matvec", "rms", "qk", "attention", "int8", "int4")]


BF16, INT8, INT4 = 0, 1, 2  # `enum weights`


class Linear(ctypes.Structure):
    """`struct linear`: one product's weights."""

    _fields_ = [
        ("kind", ctypes.c_int64), ("n", ctypes.c_int64), ("group", ctypes.c_int64),
        ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("lows", ctypes.c_void_p),
    ]  # fmt: skip


class Layer(ctypes.Structure):
    """`struct layer`: a decoder layer's weights."""

    _fields_ = [
        ("qkv", Linear * 3), ("o", Linear), ("gate_up", Linear * 2), ("down", Linear),
        ("qkv_count", ctypes.c_int64), ("gate_up_count", ctypes.c_int64),
        *[(name, ctypes.c_void_p) for name in ("input_norm", "q_norm", "k_norm", "post_norm")],
    ]  # fmt: skip


@dataclass(frozen=True)
class Product:
    """One product's weights as the C layer takes them: `kind` BF16 (tensors: the (n, k) weight),
    INT8 (packed, row scales) or INT4 (packed, scales, lows), with `group` the quantized kernels'."""

    kind: int
    n: int
    tensors: tuple[torch.Tensor, ...]
    group: int = 0

    def linear(self) -> Linear:
        pointers = [t.data_ptr() for t in self.tensors] + [0] * (3 - len(self.tensors))
        return Linear(self.kind, self.n, self.group, *pointers)


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
    """One decoder layer's weights as the C functions take them: the products' (`Product`; q/k/v
    and gate/up as one product each where bf16 back to back, else three and two), the norms'
    weights of the activations' dtype, contiguous. `layer` is the C struct over them."""

    input_norm: torch.Tensor
    qkv: tuple[Product, ...]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: Product
    post_norm: torch.Tensor
    gate_up: tuple[Product, ...]
    down: Product
    layer: Layer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= len(self.qkv) <= 3 or not 1 <= len(self.gate_up) <= 2:
            raise ValueError("q/k/v take one to three products, gate/up one or two")
        layer = Layer()
        for i, product in enumerate(self.qkv):
            layer.qkv[i] = product.linear()
        for i, product in enumerate(self.gate_up):
            layer.gate_up[i] = product.linear()
        layer.o, layer.down = self.o.linear(), self.down.linear()
        layer.qkv_count, layer.gate_up_count = len(self.qkv), len(self.gate_up)
        norms = (self.input_norm, self.q_norm, self.k_norm, self.post_norm)
        layer.input_norm, layer.q_norm, layer.k_norm, layer.post_norm = (t.data_ptr() for t in norms)
        object.__setattr__(self, "layer", layer)


def _address(function: Any) -> int:
    return int(ctypes.cast(function, ctypes.c_void_p).value or 0)


class LayerKernel:
    """The loaded library, bound to the other kernels' functions."""

    def __init__(self, library: ctypes.CDLL, kernels: dict[tuple[torch.dtype, torch.dtype], Kernels]) -> None:
        # per (activation, cache) dtype; kept alive: C reads them on every call
        self._kernels = kernels
        self._before = c_function(
            library, "vlbot_layer_before_attention", I32, POINTER, POINTER, POINTER, POINTER,
            POINTER, POINTER, POINTER, POINTER, POINTER,
        )  # fmt: skip
        self._after = c_function(
            library, "vlbot_layer_after_attention", I32, POINTER, POINTER, POINTER, POINTER,
            POINTER, POINTER, I64, I64, I64, POINTER, I64, F32, POINTER,
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
            ctypes.byref(self._kernels[hidden.dtype, hidden.dtype]),  # the cache is not read here
            ctypes.byref(shape),
            hidden.data_ptr(),
            ctypes.byref(weights.layer),
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
            ctypes.byref(self._kernels[hidden.dtype, keys.dtype]),
            ctypes.byref(shape),
            hidden.data_ptr(),
            *cache_arguments(q, keys, values, starts),
            keys.shape[2],
            scale,
            ctypes.byref(weights.layer),
        )
        if status != 0:
            raise RuntimeError("the decode layer kernel refused its inputs or ran out of memory")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return load_library("decode_layer", COMPILE_FLAGS, ARM_FLAGS if active_tier().is_arm else CPU_FLAGS)


def load_layer(
    matvec: Bf16Kernel,
    ops: DecodeOps,
    attention: DecodeAttention,
    int8: object | None = None,
    int4: object | None = None,
) -> LayerKernel | None:
    """The layer kernel calling these kernels' functions (`int8`, `int4`: the quantized kernels'
    C functions, where layers have such weights), or None where it cannot be built."""
    library = _library()
    if library is None:
        return None
    norm, qk = _address(ops.norm_function), _address(ops.qk_function)  # both dtypes, by a flag
    quantized = (_address(int8) if int8 else 0, _address(int4) if int4 else 0)
    kernels = {
        (activations, cache): Kernels(
            _address(matvec.function if activations == torch.bfloat16 else matvec.function_f32),
            norm,
            qk,
            _address(attention.function_for(activations, cache)),
            *quantized,
        )
        for activations, cache in DTYPE_PAIRS
    }
    return LayerKernel(library, kernels)
