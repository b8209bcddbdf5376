"""engine.cpu.kernels.vision_flash_portable: the vector vision attention is as close to exact attention as
torch's own, in float32 and bfloat16, for any number of patches, peaked softmaxes and several
images in one call, built for every x86 tier this machine runs (forced ones too; aarch64 runs
tests/native/kernel_check.c under qemu). The vision tower uses it on AVX-512 tiers and keeps
torch's attention with AVX2, where it only draws level."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from engine.cpu.kernels.vision_attention import VisionAttention, use_fast_vision_attention
from engine.cpu.kernels.vision_flash import load_kernel as load_amx_kernel
from engine.cpu.kernels.vision_flash_portable import PortableFlash, build_kernel, load_kernel
from tests.engine_fixtures import built_or_skip
from tests.test_vision_flash import (
    HEADS,
    SCALE,
    Wrapped,
    assert_as_close_as_torch,
    assert_images_see_only_themselves,
    inputs,
    vision_tower,
)  # fmt: skip
from tests.tier_helpers import forced

TIERS = ["avx2", "avx512", "avx512_bf16"]


@pytest.fixture(params=TIERS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[PortableFlash]:
    """The kernel built for each tier (forced where the CPU has more)."""
    with forced(monkeypatch, request.param, load_kernel):
        yield built_or_skip(build_kernel(), f"vector vision attention kernel ({request.param})")


# 4-6 queries per register block, 32-48 per task, keys in blocks of 16-64 and chunks of 256
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33, 255, 257, 600])
def test_as_close_to_exact_attention_as_torch(kernel: PortableFlash, rows: int, dtype: torch.dtype) -> None:
    q, k, v = inputs(rows, seed=rows, dtype=dtype)
    got = kernel(q, k, v, [(0, rows)], SCALE)
    assert got is not None
    assert_as_close_as_torch(got, q, k, v)


def test_peaked_scores_and_a_maximum_in_a_late_chunk(kernel: PortableFlash) -> None:
    """Softmaxes close to one-hot, each first query's largest score among the last keys: the
    running maximum rises chunk after chunk and the earlier sums must be rescaled."""
    rows = 700
    q, k, v = inputs(rows, seed=1, spread=6.0, dtype=torch.float32)
    k = k.clone()
    k[:, -40:] = q[:, :40] * 2
    got = kernel(q, k, v, [(0, rows)], SCALE)
    assert got is not None
    assert_as_close_as_torch(got, q, k, v)
    top = got[:40].reshape(40, HEADS, -1).transpose(0, 1)
    assert torch.allclose(top, v[:, -40:], atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_in_one_call_see_only_themselves(kernel: PortableFlash, dtype: torch.dtype) -> None:
    assert_images_see_only_themselves(kernel, dtype)


def test_only_64_channel_heads_of_one_dtype(kernel: PortableFlash) -> None:
    q, k, v = inputs(40, seed=3, dtype=torch.float32)
    assert kernel.supports(q) and kernel.supports(q.bfloat16()) and not kernel.supports(q[..., :32])
    assert not kernel.supports(q.half())
    with pytest.raises(ValueError):
        kernel(q, k.bfloat16(), v, [(0, 40)], SCALE)
    with pytest.raises(ValueError):
        kernel(q, k[:, :20], v, [(0, 40)], SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vision_tower_on_avx512_uses_it_and_stays_as_close_to_float64(dtype: torch.dtype) -> None:
    """On an AVX-512 tier (without AMX) the tower's attention is this kernel, and its features are
    as close to the exact (float64) tower's as transformers' own, for two images in one call."""
    if load_amx_kernel() is not None:
        pytest.skip("this CPU has AMX: the tile kernel comes first")
    built_or_skip(load_kernel(), "vector vision attention kernel (AVX-512 tiers only)")
    model = vision_tower(dtype)
    reference = copy.deepcopy(model)
    exact_model = copy.deepcopy(model).double()
    assert use_fast_vision_attention(Wrapped(model)) == 2
    attentions = [b.attn for b in model.blocks]
    assert all(isinstance(a, VisionAttention) and isinstance(a._flash, PortableFlash) for a in attentions)
    grid = torch.tensor([[1, 24, 30], [1, 10, 14]])
    pixels = torch.randn(
        int(grid.prod(dim=-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        ours = model(pixels.to(dtype), grid_thw=grid).last_hidden_state.double()
        theirs = reference(pixels.to(dtype), grid_thw=grid).last_hidden_state.double()
        truth = exact_model(pixels.double(), grid_thw=grid).last_hidden_state
    assert not torch.equal(ours, theirs)  # the kernel ran (it does not round as torch does)
    assert (ours - truth).abs().mean() <= 1.1 * (theirs - truth).abs().mean()
    assert (ours - truth).abs().max() <= 1.5 * (theirs - truth).abs().max()


def test_avx2_keeps_torchs_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    model = vision_tower(torch.float32)
    with forced(monkeypatch, "avx2", load_kernel, load_amx_kernel):
        assert use_fast_vision_attention(Wrapped(model)) == 2
    assert all(isinstance(b.attn, VisionAttention) and b.attn._flash is None for b in model.blocks)
