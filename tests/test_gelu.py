"""engine.cpu.kernels.gelu: the vision MLP's tanh-approximated GELU in C gives the function's value rounded to
bfloat16 (as close as torch's operator, or closer), and in float32 within a few units in the last
place, built for every x86 tier this machine runs (forced ones too). It replaces bfloat16 models'
GELUs, and float32 ones only on a tier without bf16 arithmetic (the half-size-weights model)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.activations import GELUTanh

from engine.cpu.kernels.gelu import FastGeluTanh, GeluKernel, load_kernel, use_fast_gelu
from tests.engine_fixtures import built_or_skip
from tests.tier_helpers import forced


@pytest.fixture(params=["avx2", "avx512", "avx512_bf16"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[GeluKernel]:
    """The kernel built for each x86 tier (forced where the CPU has more)."""
    with forced(monkeypatch, request.param, load_kernel):
        yield built_or_skip(load_kernel(), f"GELU kernel ({request.param})")


def every_bfloat16(low: float, high: float) -> torch.Tensor:
    """Every finite bfloat16 value in [low, high] (an odd count: the vector tail is used too)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    keep = torch.isfinite(values) & (values >= low) & (values <= high) & (values.abs() > 1e-30)
    chosen = values[keep]
    return chosen[: chosen.numel() - (1 - chosen.numel() % 2)].contiguous()


def exact(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) in float64, as x * sigmoid(2u): no cancellation for negative x."""
    d = x.double()
    inner = 0.7978845608028654 * (d + 0.044715 * d**3)
    return d * torch.sigmoid(2 * inner)


def test_kernel_gives_the_function_rounded_to_bfloat16(kernel: GeluKernel) -> None:
    x = every_bfloat16(-12.0, 60.0)
    got = kernel(x)
    truth = exact(x).to(torch.bfloat16)
    ours_off = (got != truth).float().mean().item()
    torch_off = (torch.nn.functional.gelu(x, approximate="tanh") != truth).float().mean().item()
    assert ours_off <= torch_off + 1e-3 and ours_off < 0.01
    # where it differs it is by one bfloat16 step at most
    step = truth.double().abs() * 2.0**-7 + 1e-30
    assert ((got.double() - truth.double()).abs() <= step).all()


def test_kernel_matches_torch_on_activations(kernel: GeluKernel) -> None:
    x = torch.randn(37, 4096, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    got, want = kernel(x), torch.nn.functional.gelu(x, approximate="tanh")
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-6)
    assert (got == want).float().mean().item() > 0.9
    assert torch.equal(kernel(torch.zeros(5, dtype=torch.bfloat16)), torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernel(x.half())


def test_float32_within_a_few_units_in_the_last_place(kernel: GeluKernel) -> None:
    """Within 16 units in the last place from x = -4 up (below, GELU is tiny and computed as x / (1 +
    e^|big|): e^ of a rounded argument adds ~|x|^3 1e-8 relative error, still at most 1e-24 absolute;
    torch's 0.5 x (1 + tanh) cancels to 0 there), and closer than torch's on average."""
    x = torch.cat([torch.linspace(-12.0, 60.0, 100_003), torch.randn(37, 4096).flatten() * 3])
    got, truth = kernel(x).double(), exact(x)
    theirs = torch.nn.functional.gelu(x, approximate="tanh").double()
    ulp = truth.abs() * 2.0**-23
    usual = x >= -4
    assert ((got - truth).abs()[usual] <= 16 * ulp[usual]).all()
    assert ((got - truth).abs() <= 1e-24 + 1e-4 * truth.abs()).all()
    assert (got - truth).abs().mean() <= (theirs - truth).abs().mean()


def tiny(folder: Path, dtype: torch.dtype) -> Any:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    return model.eval()


def test_bfloat16_vision_tower_uses_the_kernel(tiny_qwen3: Path, kernel: GeluKernel) -> None:
    model = tiny(tiny_qwen3, torch.bfloat16)
    reference = copy.deepcopy(model)
    assert use_fast_gelu(model) == len(model.model.visual.blocks) > 0
    assert all(isinstance(block.mlp.act_fn, FastGeluTanh) for block in model.model.visual.blocks)
    grid = torch.tensor([[1, 16, 20]])
    patch = model.config.vision_config.patch_size
    pixels = torch.randn(320, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model.model.visual(pixels.to(torch.bfloat16), grid_thw=grid).pooler_output
        want = reference.model.visual(pixels.to(torch.bfloat16), grid_thw=grid).pooler_output
    assert torch.allclose(got.float(), want.float(), rtol=0.05, atol=0.05)


def test_float32_models_keep_torchs_gelu_where_the_tier_has_bf16_arithmetic(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with forced(monkeypatch, "avx512_bf16", load_kernel):
        model = tiny(tiny_qwen3, torch.float32)
        assert use_fast_gelu(model) == 0
        assert all(type(block.mlp.act_fn) is GELUTanh for block in model.model.visual.blocks)
        assert use_fast_gelu(object()) == 0


def test_float32_vision_tower_uses_the_kernel_without_bf16_arithmetic(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with forced(monkeypatch, "avx2", load_kernel):
        built_or_skip(load_kernel(), "GELU kernel (avx2)")
        model = tiny(tiny_qwen3, torch.float32)
        reference = copy.deepcopy(model)
        assert use_fast_gelu(model) == len(model.model.visual.blocks) > 0
        grid = torch.tensor([[1, 16, 20]])
        patch = model.config.vision_config.patch_size
        pixels = torch.randn(320, 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            got = model.model.visual(pixels, grid_thw=grid).pooler_output
            want = reference.model.visual(pixels, grid_thw=grid).pooler_output
    activations = [block.mlp.act_fn for block in model.model.visual.blocks]
    assert all(isinstance(a, FastGeluTanh) and a.in_place for a in activations)  # fc1's output, read once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_in_place_overwrites_only_when_asked(kernel: GeluKernel) -> None:
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    kept = x.clone()
    out = kernel(x)
    assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
    again = kernel(x, in_place=True)
    assert again.data_ptr() == x.data_ptr() and torch.equal(again, out)
