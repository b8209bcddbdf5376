"""engine.decode_step gives the logits transformers' forward gives, for one conversation and for
a padded batch, in float32 and in bfloat16 (with the bf16 kernel where this machine has it)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.batching import Batch, Row
from engine.bf16_kernel import DecodeLinear, load_kernel, use_for_decode
from engine.decode_step import DecodeStep
from engine.kvbuffer import appending_cache
from engine.qwen import QwenVLEngine

PROMPTS = [list(range(5, 40)), list(range(100, 112)), list(range(300, 322))]


def load(folder: Path, dtype: torch.dtype) -> Any:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    return model.eval()


def prefilled_batch(model: Any, prompts: list[list[int]]) -> Batch:
    batch = Batch(lambda: appending_cache(model.config))
    for n, ids in enumerate(prompts):
        cache = appending_cache(model.config)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        batch.join(Row(n, 0, len(ids), int(out.logits[0, -1].argmax())), cache)
    return batch


def compare_steps(model: Any, prompts: list[list[int]], steps: int, tolerance: float) -> None:
    """Run the same decode steps through DecodeStep and the model's forward on two copies of a
    batch; both must give the same logits, step after step (the caches stay in step too)."""
    step = DecodeStep.for_model(model)
    assert step is not None
    ours, theirs = prefilled_batch(model, prompts), None
    theirs = copy.deepcopy(ours)
    for _ in range(steps):
        with torch.inference_mode():
            a_inputs, b_inputs = ours.step_inputs(), theirs.step_inputs()
            got = step(**a_inputs)
            want = model(**b_inputs, logits_to_keep=1).logits[:, -1]
        scale = float(want.abs().max())
        assert got.shape == want.shape
        assert float((got.float() - want.float()).abs().max()) <= tolerance * scale
        for batch, inputs in ((ours, a_inputs), (theirs, b_inputs)):
            batch.advance(inputs["attention_mask"])
            for row, token in zip(batch.rows, want.argmax(dim=-1).tolist(), strict=True):
                row.last = token


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
def test_float32_step_equals_the_forward(tiny_qwen3: Path, prompts: list[list[int]]) -> None:
    compare_steps(load(tiny_qwen3, torch.float32), prompts, steps=6, tolerance=1e-5)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
def test_bfloat16_step_with_the_kernel_is_close_to_the_forward(
    tiny_qwen3: Path, prompts: list[list[int]]
) -> None:
    model = load(tiny_qwen3, torch.bfloat16)
    reference = copy.deepcopy(model)  # oneDNN / torch products throughout
    head_weight = model.lm_head.weight
    swapped = use_for_decode(model)
    layers = len(model.model.language_model.layers)  # 7 linear layers each, and the output head
    assert swapped == (0 if load_kernel() is None else layers * 7 + 1)
    if swapped:
        assert isinstance(model.lm_head, DecodeLinear)
        assert model.lm_head.weight is head_weight  # the same tensor (tied ones stay tied)
    step = DecodeStep.for_model(model)
    assert step is not None
    batch, twin = prefilled_batch(reference, prompts), None
    twin = copy.deepcopy(batch)
    with torch.inference_mode():
        got = step(**batch.step_inputs())
        want = reference(**twin.step_inputs(), logits_to_keep=1).logits[:, -1]
    error = (got.float() - want.float()).norm() / want.float().norm()
    assert float(error) < 0.02  # bf16: products summed in another order, rounded once


def test_other_architectures_use_the_models_forward(tiny_qwen25: Path) -> None:
    assert DecodeStep.for_model(load(tiny_qwen25, torch.float32)) is None
    assert DecodeStep.for_model(object()) is None


async def test_the_engine_decodes_with_the_step(tiny_qwen3: Path) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await engine.load()
    assert isinstance(engine.scheduler.decode_step if engine.scheduler else None, DecodeStep)
    await engine.close()
