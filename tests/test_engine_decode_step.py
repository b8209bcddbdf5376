"""engine.cpu.decode_step's hidden states, through the output head, give the logits transformers'
forward gives, for one conversation and for a padded batch, in float32 and in bfloat16 (with the
bf16 kernel where this machine has it)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.cpu.decode_step import DecodeStep
from engine.cpu.kernels.bf16_kernel import DecodeLinear, load_kernel, use_for_decode
from engine.qwen.batching import Batch, Row
from engine.qwen.engine import QwenVLEngine
from engine.qwen.kvbuffer import appending_cache

PROMPTS = [list(range(5, 40)), list(range(100, 112)), list(range(300, 322))]


def load(folder: Path, dtype: torch.dtype) -> Any:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    return model.eval()


def prefilled_batch(model: Any, prompts: list[list[int]], storage: torch.dtype | None = None) -> Batch:
    """The prompts prefilled by the model, joined in a batch whose caches keep `storage` (None:
    the model's dtype)."""
    batch = Batch(lambda: appending_cache(model.config, storage))
    for n, ids in enumerate(prompts):
        cache = appending_cache(model.config, storage)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
        batch.join(Row(n, 0, len(ids), int(out.logits[0, -1].argmax())), cache)
    return batch


def compare_steps(
    model: Any, prompts: list[list[int]], steps: int, tolerance: float, storage: torch.dtype | None = None
) -> None:
    """Run the same decode steps through DecodeStep and the model's forward on two copies of a
    batch (caches kept in `storage`); both must give the same logits, step after step (the caches
    stay in step too)."""
    step = DecodeStep.for_model(model)
    assert step is not None
    ours, theirs = prefilled_batch(model, prompts, storage), None
    theirs = copy.deepcopy(ours)
    for _ in range(steps):
        with torch.inference_mode():
            a_inputs, b_inputs = ours.step_inputs(), theirs.step_inputs()
            got = model.lm_head(step(**a_inputs))
            want = model(**b_inputs, logits_to_keep=1).logits[:, -1]
        scale = float(want.abs().max())
        assert got.shape == want.shape
        assert float((got.float() - want.float()).abs().max()) <= tolerance * scale
        for batch, inputs in ((ours, a_inputs), (theirs, b_inputs)):
            batch.advance(inputs["attention_mask"])
            for row, token in zip(batch.rows, want.argmax(dim=-1).tolist(), strict=True):
                row.last = token


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded-batch"])
@pytest.mark.parametrize("storage", [None, torch.bfloat16], ids=["float32-cache", "bf16-cache"])
def test_float32_step_equals_the_forward(
    tiny_qwen3: Path, prompts: list[list[int]], storage: torch.dtype | None
) -> None:
    """Also over a cache kept in bfloat16 (engine.cpu.half_weights): the step reads it as stored,
    the forward gets float32 copies of it."""
    compare_steps(load(tiny_qwen3, torch.float32), prompts, steps=6, tolerance=1e-5, storage=storage)


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
        got = model.lm_head(step(**batch.step_inputs()))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_c_norms_and_rotary_round_as_transformers_does(dtype: torch.dtype) -> None:
    """engine/cpu/kernels/decode_ops.c against transformers' own RMSNorm and rotary functions."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        Qwen3VLTextRMSNorm,
        apply_rotary_pos_emb,
    )

    from engine.cpu.kernels.decode_ops import load_ops

    ops = load_ops()
    if ops is None:
        pytest.skip("no C compiler here")
    generator = torch.Generator().manual_seed(0)
    norm = Qwen3VLTextRMSNorm(128, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(128, generator=generator) + 0.5)
    x = (torch.randn(3, 1, 128, generator=generator) * 3).to(dtype)
    with torch.inference_mode():
        want = norm(x)
        got = ops.rms_norm(x, norm.weight.detach(), 1e-6)
    ulps = 2**-7 if dtype == torch.bfloat16 else 1e-6  # rsqrt vs 1/sqrt may differ in the last bit
    assert float((got.float() - want.float()).abs().max()) <= ulps * float(want.abs().max())

    q = (torch.randn(3, 1, 4, 128, generator=generator)).to(dtype)
    k = (torch.randn(3, 1, 2, 128, generator=generator)).to(dtype)
    angles = torch.rand(3, 64, generator=generator) * 50
    cos = torch.cat((angles, angles), dim=-1).cos().to(dtype)
    sin = torch.cat((angles, angles), dim=-1).sin().to(dtype)
    q_norm, k_norm = Qwen3VLTextRMSNorm(128).to(dtype), Qwen3VLTextRMSNorm(128).to(dtype)
    with torch.inference_mode():
        want_q, want_k = apply_rotary_pos_emb(
            q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos[:, None], sin[:, None]
        )
        got_q, got_k = q.clone(), k.clone()
        ops.qk_norm_rotate(got_q, q_norm.weight, got_k, k_norm.weight, cos, sin, 1e-6)
    for got_t, want_t in ((got_q.transpose(1, 2), want_q), (got_k.transpose(1, 2), want_k)):
        assert float((got_t.float() - want_t.float()).abs().max()) <= 2 * ulps * float(want_t.abs().max())
