"""engine.cpu.kernels.decode_layer: with bfloat16 weights back to back, a decode step runs each layer in two C
calls and gives the hidden states the operator-by-operator step gives (the same kernels; only
silu's last bit may differ now and then), for one conversation and a padded batch, and keeps the
caches the same; batches larger than the bf16 kernel takes keep the operator step. Where the tier
has no bf16 arithmetic (AVX2 forced) and the model computes in float32 over its bf16 weights, the
layers run in C as well, within float32 rounding of the operator step; and so do layers with
int8 or int4 weights (engine.cpu.quant), in bfloat16 and in float32."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engine.cpu.decode_step import DecodeStep
from engine.cpu.half_weights import compute_in_float32
from engine.cpu.kernels import decode_layer
from engine.cpu.kernels.bf16_kernel import load_kernel, use_for_decode
from engine.cpu.kernels.decode_attention import load_attention
from engine.cpu.kernels.decode_ops import load_ops
from engine.cpu.kernels.int4_kernel import load_kernel as load_int4_kernel
from engine.cpu.kernels.int8_kernel import load_kernel as load_int8_kernel
from engine.cpu.quant import Int4Linear, Int8Linear, load_mode_kernel, quantize_in_place
from engine.qwen.batching import Batch
from tests.engine_fixtures import built_or_skip
from tests.test_engine_decode_step import PROMPTS, load, prefilled_batch
from tests.tier_helpers import forced

pytest_plugins = ["tests.engine_fixtures"]


def back_to_back(linears: list[nn.Module]) -> None:
    """Put the layers' weights one after the other in one tensor (what engine.cpu.hugepages does)."""
    joined = torch.cat([linear.weight.detach() for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = joined[start : start + rows]
        start += rows


def fast_model(folder: Path, in_float32: bool = False) -> tuple[Any, DecodeStep]:
    model = load(folder, torch.bfloat16)
    if in_float32:
        assert compute_in_float32(model)
    else:
        use_for_decode(model)
    for layer in model.model.language_model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        back_to_back([attention.q_proj, attention.k_proj, attention.v_proj])
        back_to_back([mlp.gate_proj, mlp.up_proj])
    step = DecodeStep.for_model(model)
    assert step is not None
    built_or_skip(step.layer_kernel, "decode layer kernel")
    return model, step


def run_both(model: Any, step: DecodeStep, batch: Batch, steps: int, tolerance: float = 2**-6) -> int:
    """Steps through the C layers on `batch` and through the operators on a copy; returns how
    many ran in C. Hidden states and caches must agree at every step (within `tolerance` of
    their largest value; bfloat16 ones bit for bit, mostly)."""
    twin = copy.deepcopy(batch)
    kernel = step.layer_kernel
    before = step.fast_steps
    for _ in range(steps):
        with torch.inference_mode():
            a_inputs, b_inputs = batch.step_inputs(), twin.step_inputs()
            got = step(**a_inputs)
            step.layer_kernel = None
            try:
                want = step(**b_inputs)
            finally:
                step.layer_kernel = kernel
            tokens = model.lm_head(want).argmax(dim=-1).tolist()
        assert got.dtype == want.dtype
        scale = float(want.float().abs().max())
        assert float((got.float() - want.float()).abs().max()) <= tolerance * scale
        if got.dtype == torch.bfloat16:  # the same bits, but for silu's rare last bit
            assert float((got == want).float().mean()) > 0.9
        for layer_a, layer_b in zip(batch.cache.layers, twin.cache.layers, strict=True):
            keys_a, keys_b = layer_a.keys.float(), layer_b.keys.float()
            assert float((keys_a - keys_b).abs().max()) <= tolerance * float(keys_b.abs().max())
        for each, inputs in ((batch, a_inputs), (twin, b_inputs)):
            each.advance(inputs["attention_mask"])
            for row, token in zip(each.rows, tokens, strict=True):
                row.last = token
    return step.fast_steps - before


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
def test_the_c_layers_give_the_operator_steps_hidden_states(
    tiny_qwen3: Path, prompts: list[list[int]]
) -> None:
    model, step = fast_model(tiny_qwen3)
    assert run_both(model, step, prefilled_batch(model, prompts), steps=5) == 5


@pytest.fixture
def avx2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """AVX2 forced, every kernel the decode step loads built again for it."""
    with forced(monkeypatch, "avx2", load_kernel, load_ops, load_attention, decode_layer._library):
        yield


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=["float32-cache", "bf16-cache"])
def test_float32_activations_over_bf16_weights_run_the_layers_in_c(
    avx2: None, tiny_qwen3: Path, prompts: list[list[int]], storage: torch.dtype
) -> None:
    """Over a float32 cache, and over the bf16 one the engine keeps for such a model."""
    model, step = fast_model(tiny_qwen3, in_float32=True)
    batch = prefilled_batch(model, prompts, storage)
    assert batch.cache.layers[0].keys.dtype == storage
    assert run_both(model, step, batch, steps=5, tolerance=1e-5) == 5


def quantized_model(folder: Path, mode: str, in_float32: bool) -> tuple[Any, DecodeStep]:
    model = load(folder, torch.bfloat16)
    if in_float32:
        assert compute_in_float32(model)
    quantize_in_place(model, mode, built_or_skip(load_mode_kernel(mode), f"{mode} kernel"))  # type: ignore[arg-type]
    use_for_decode(model)
    kinds = {type(m) for m in model.model.language_model.layers.modules()}
    assert (Int8Linear if mode == "int8" else Int4Linear) in kinds
    step = DecodeStep.for_model(model)
    assert step is not None
    built_or_skip(step.layer_kernel, "decode layer kernel")
    return model, step


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_layers_run_in_c(tiny_qwen3: Path, mode: str) -> None:
    model, step = quantized_model(tiny_qwen3, mode, in_float32=False)
    assert run_both(model, step, prefilled_batch(model, PROMPTS), steps=4) == 4


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_float32_layers_run_in_c(avx2: None, tiny_qwen3: Path, mode: str) -> None:
    load_int8_kernel.cache_clear()
    load_int4_kernel.cache_clear()
    try:
        model, step = quantized_model(tiny_qwen3, mode, in_float32=True)
        # the operator step with the C norms too (float32 steps keep torch's otherwise): their
        # last bits differ from torch's, and 8-bit activations turn that into larger differences
        step.ops = load_ops()
        batch = prefilled_batch(model, PROMPTS)
        assert batch.cache.layers[0].keys.dtype == torch.float32
        assert run_both(model, step, batch, steps=4, tolerance=2**-6) == 4
    finally:
        load_int8_kernel.cache_clear()
        load_int4_kernel.cache_clear()


def test_weights_not_back_to_back_keep_the_operator_step(tiny_qwen3: Path) -> None:
    model = load(tiny_qwen3, torch.bfloat16)
    use_for_decode(model)
    step = DecodeStep.for_model(model)
    assert step is not None
    built_or_skip(step.layer_kernel, "decode layer kernel")
    layer = model.model.language_model.layers[0]
    # q, k, v in separate tensors: not joined, so no layer runs in C
    for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        linear.weight.data = linear.weight.detach().clone()
    batch = prefilled_batch(model, PROMPTS[:1])
    with torch.inference_mode():
        step(**batch.step_inputs())
    assert step.fast_steps == 0


def test_batches_beyond_the_kernels_rows_keep_the_operator_step(tiny_qwen3: Path) -> None:
    model, step = fast_model(tiny_qwen3)
    rows = step.layer_rows + 1
    prompts = [list(range(10 + n, 20 + 2 * n)) for n in range(rows)]
    assert run_both(model, step, prefilled_batch(model, prompts), steps=2) == 0


def test_the_c_layers_are_close_to_transformers_forward(tiny_qwen3: Path) -> None:
    reference = load(tiny_qwen3, torch.bfloat16)  # oneDNN / torch products throughout
    model, step = fast_model(tiny_qwen3)
    batch = prefilled_batch(reference, PROMPTS)
    twin = copy.deepcopy(batch)
    with torch.inference_mode():
        got = model.lm_head(step(**batch.step_inputs()))
        want = reference(**twin.step_inputs(), logits_to_keep=1).logits[:, -1]
    assert step.fast_steps == 1
    error = (got.float() - want.float()).norm() / want.float().norm()
    assert float(error) < 0.02  # bf16: products summed in another order, rounded once
