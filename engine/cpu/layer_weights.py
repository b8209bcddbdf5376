"""A decoder layer's weights as engine.cpu.kernels.decode_layer's C layer takes them.

engine.cpu.decode_step runs a decode step's layers in C where every product of every layer is one
the C layer can call: a bf16 weight through the bf16 kernel (engine.cpu.kernels.bf16_kernel's
DecodeLinear; q/k/v and gate/up back to back as one product each, AdjacentLinears), or the int8 /
int4 kernels' packed weights (engine.cpu.quant's Int8Linear / Int4Linear with their kernel; q, k,
v and gate, up then as separate products). Anything else (a layer with a bias, torch's fallback
for quantized weights, weights not yet back to back) keeps the operator-by-operator step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from engine.cpu.hugepages import moves
from engine.cpu.kernels.bf16_kernel import AdjacentLinears, DecodeLinear
from engine.cpu.kernels.decode_layer import BF16, INT4, INT8, LayerWeights, Product
from engine.cpu.quant import Int4Linear, Int8Linear


def product_of(module: nn.Module) -> Product | None:
    """The C layer's view of one linear layer, or None where it cannot call it."""
    if getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, DecodeLinear):
        weight = module.weight.detach()
        if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
            return None
        return Product(BF16, module.out_features, (weight,))
    if isinstance(module, Int8Linear) and module._kernel is not None:
        weights = module._weights()
        return Product(INT8, module.out_features, (weights.packed, weights.scales), weights.group)
    if isinstance(module, Int4Linear) and module._kernel is not None:
        return Product(INT4, module.out_features, (module.packed, module.scales, module.lows), module.group)
    return None


def _joined(adjacent: AdjacentLinears, modules: Sequence[nn.Module]) -> tuple[Product, ...] | None:
    """One bf16 product over weights back to back, else one product per module (all quantized)."""
    weight = adjacent.weight
    if weight is not None:
        return (Product(BF16, int(weight.shape[0]), (weight.detach(),)),)
    products = [product_of(module) for module in modules]
    if any(p is None or p.kind == BF16 for p in products):
        return None  # bf16 weights not back to back yet: the operator step until they are
    return tuple(p for p in products if p is not None)


def layer_weights(
    layer: Any, qkv: AdjacentLinears, gate_up: AdjacentLinears, dtype: torch.dtype
) -> LayerWeights | None:
    """One Qwen3-VL text decoder layer's weights for activations of `dtype`, or None."""
    attention, mlp = layer.self_attn, layer.mlp
    projections = _joined(qkv, [attention.q_proj, attention.k_proj, attention.v_proj])
    gate_and_up = _joined(gate_up, [mlp.gate_proj, mlp.up_proj])
    o, down = product_of(attention.o_proj), product_of(mlp.down_proj)
    if projections is None or gate_and_up is None or o is None or down is None:
        return None
    norms = [
        layer.input_layernorm.weight, attention.q_norm.weight, attention.k_norm.weight,
        layer.post_attention_layernorm.weight,
    ]  # fmt: skip
    if not all(t.dtype == dtype and t.is_contiguous() for t in norms):
        return None
    input_norm, q_norm, k_norm, post_norm = (t.detach() for t in norms)
    return LayerWeights(input_norm, projections, q_norm, k_norm, o, post_norm, gate_and_up, down)


def weights_key(layers: Sequence[Any]) -> tuple[int, ...]:
    """Changes when the layers' weights move (engine.cpu.hugepages moves them at idle time, then
    the C layer's pointers must be taken again): the move count, and where the first and last
    layers' first weights are (a cheap guard against a move elsewhere; a decode step calls this)."""
    first, last = layers[0].self_attn.q_proj, layers[-1].mlp.down_proj
    return (moves(), *(_first_tensor(module).data_ptr() for module in (first, last)))


def _first_tensor(module: nn.Module) -> torch.Tensor:
    tensor = module._buffers.get("packed")
    if tensor is None:
        tensor = module._parameters.get("weight")
    return tensor if tensor is not None else torch.empty(0)


def quantized_kernels(layers: Sequence[Any]) -> tuple[object | None, object | None]:
    """The int8 and int4 kernels' C functions the layers' quantized weights use (None: none)."""
    found: dict[type, object] = {}
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, (Int8Linear, Int4Linear)) and module._kernel is not None:
                found.setdefault(type(module), module._kernel.function)
    return found.get(Int8Linear), found.get(Int4Linear)
