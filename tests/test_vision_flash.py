"""engine.cpu.kernels.vision_flash: the AMX vision attention is as close to exact attention as torch's own
bfloat16 attention, for any number of patches (partial blocks and chunks), peaked and flat
softmaxes, several images in one call, and inside the vision tower."""

from __future__ import annotations

import copy
import ctypes
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from engine.cpu.kernels.vision_attention import VisionAttention, use_fast_vision_attention
from engine.cpu.kernels.vision_flash import FlashKernel, WindowAddresses, load_kernel, per_window
from tests.engine_fixtures import built_or_skip

HEADS, DIM, SCALE = 3, 64, 0.125


@pytest.fixture
def kernel() -> FlashKernel:
    return built_or_skip(load_kernel(), "AMX vision attention kernel")


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(heads, seq, dim) -> (seq, heads x dim), in float64."""
    weights = torch.softmax(q.double() @ k.double().transpose(1, 2) * SCALE, dim=-1)
    out = weights @ v.double()
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=SCALE)[0]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def inputs(
    rows: int, seed: int, spread: float = 1.0, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(HEADS, rows, DIM, generator=generator) for _ in range(3))
    return (q * spread).to(dtype), k.to(dtype), v.to(dtype)


def assert_as_close_as_torch(got: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    truth = exact(q, k, v)
    ours = (got.double() - truth).abs()
    theirs = (torch_attention(q, k, v).double() - truth).abs()
    assert got.dtype == q.dtype and got.shape == truth.shape
    assert ours.max() <= 1.25 * theirs.max() + 1e-6, (ours.max(), theirs.max())
    assert ours.mean() <= 1.1 * theirs.mean() + 1e-7, (ours.mean(), theirs.mean())


# 32 queries per block, keys padded to 32 and taken 512 at a time: partial and whole blocks,
# one chunk, several, and a partial last chunk
@pytest.mark.parametrize("rows", [1, 17, 32, 33, 100, 511, 512, 513, 1100, 2049])
def test_as_close_to_exact_attention_as_torch(kernel: FlashKernel, rows: int) -> None:
    q, k, v = inputs(rows, seed=rows)
    got = kernel(q, k, v, [(0, rows)], SCALE)
    assert got is not None
    assert_as_close_as_torch(got, q, k, v)


def test_peaked_scores_and_a_maximum_in_a_late_chunk(kernel: FlashKernel) -> None:
    """Large scores (softmaxes close to one-hot, most probabilities underflowing) and, for every
    query, its largest score among the last keys: the running maximum rises chunk after chunk
    and what was summed before must be rescaled."""
    rows = 1300
    q, k, v = inputs(rows, seed=1, spread=6.0)
    k = k.clone()
    k[:, -40:] = (q[:, :40].float() * 2).to(torch.bfloat16)  # last keys: the first queries, doubled
    got = kernel(q, k, v, [(0, rows)], SCALE)
    assert got is not None
    assert_as_close_as_torch(got, q, k, v)
    # the first queries attend (almost) only to their doubled copies among the last keys
    top = got[:40].float().reshape(40, HEADS, DIM).transpose(0, 1)
    assert torch.allclose(top, v[:, -40:].float(), atol=0.05)


def assert_images_see_only_themselves(kernel: Any, dtype: torch.dtype = torch.bfloat16) -> None:
    """Three images in one call: each one's rows equal the kernel's result for it alone."""
    q, k, v = inputs(300, seed=2, dtype=dtype)
    windows = [(0, 120), (120, 37), (157, 143)]
    got = kernel(q, k, v, windows, SCALE)
    assert got is not None
    for start, length in windows:
        part = slice(start, start + length)
        alone = kernel(
            q[:, part].contiguous(), k[:, part].contiguous(), v[:, part].contiguous(), [(0, length)], SCALE
        )
        assert alone is not None
        assert torch.equal(got[part], alone)
        assert_as_close_as_torch(got[part], q[:, part], k[:, part], v[:, part])


def test_images_in_one_call_see_only_themselves(kernel: FlashKernel) -> None:
    assert_images_see_only_themselves(kernel)


def test_per_window_hands_each_window_its_own_addresses() -> None:
    """The loop both kernels' wrappers share (it runs on any CPU): each (start, length) window
    gets its q, k, v and output addresses, the heads' stride over the whole sequence and the
    output's row stride; an empty window is skipped; a failed call gives None."""
    base = torch.arange(2 * 10 * 4, dtype=torch.float32).reshape(2, 10, 4)
    q, k, v = (base + shift for shift in (0, 100, 200))
    calls: list[tuple[int, ...]] = []

    def attend(at: WindowAddresses, heads: int, length: int, head_stride: int, out_stride: int) -> bool:
        calls.append((heads, length, head_stride, out_stride))
        for head in range(heads):  # out[row, head] = k[head, row] (what a real kernel would read)
            for row in range(length):
                source = torch.from_numpy(_floats(at[1] + (head * head_stride + row * 4) * 4, 4))
                _floats(at[3] + (row * out_stride + head * 4) * 4, 4)[:] = source.numpy()
        return False

    out = per_window(q, k, v, [(0, 3), (3, 0), (3, 7)], attend)
    assert out is not None and out.shape == (10, 8)
    assert calls == [(2, 3, 40, 8), (2, 7, 40, 8)]
    assert torch.equal(out, k.transpose(0, 1).reshape(10, 8))
    assert per_window(q, k, v, [(0, 10)], lambda *_: True) is None


def _floats(address: int, count: int) -> Any:
    """`count` float32 values at `address`, as a writable numpy view."""
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address))


def test_only_bfloat16_64_channel_heads(kernel: FlashKernel) -> None:
    q, k, v = inputs(40, seed=3)
    assert kernel.supports(q) and not kernel.supports(q.float()) and not kernel.supports(q[..., :32])
    with pytest.raises(ValueError):
        kernel(q.float(), k.float(), v.float(), [(0, 40)], SCALE)
    with pytest.raises(ValueError):
        kernel(q, k[:, :20], v, [(0, 40)], SCALE)


def vision_tower(dtype: torch.dtype) -> Any:
    config = Qwen3VLVisionConfig(
        depth=2, hidden_size=128, intermediate_size=256, num_heads=2, out_hidden_size=64,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model: Any = Qwen3VLVisionModel(config)
    return model.to(dtype).eval()


class Wrapped:
    """A vision tower where use_fast_vision_attention looks for it (it takes the whole model)."""

    def __init__(self, visual: Any) -> None:
        self.model = type("Inner", (), {"visual": visual})()


def test_vision_tower_with_the_kernel_is_as_close_to_float32_as_transformers(
    kernel: FlashKernel,
) -> None:
    """A vision tower with 64-channel heads (as the published ones): bfloat16 features with the
    kernel are as close to the float32 tower's as transformers' bfloat16 features, for two
    images of different sizes in one call."""
    model = vision_tower(torch.bfloat16)
    reference = copy.deepcopy(model)
    exact_model = copy.deepcopy(model).float()
    assert use_fast_vision_attention(Wrapped(model)) == 2
    assert all(isinstance(b.attn, VisionAttention) and b.attn._flash is kernel for b in model.blocks)
    grid = torch.tensor([[1, 24, 30], [1, 10, 14]])
    pixels = torch.randn(
        int(grid.prod(dim=-1).sum()), 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        ours = model(pixels.to(torch.bfloat16), grid_thw=grid).last_hidden_state.double()
        theirs = reference(pixels.to(torch.bfloat16), grid_thw=grid).last_hidden_state.double()
        truth = exact_model(pixels, grid_thw=grid).last_hidden_state.double()
    assert not torch.equal(ours, theirs)  # the kernel ran (it does not round as torch does)
    assert (ours - truth).abs().mean() <= 1.1 * (theirs - truth).abs().mean()
    assert (ours - truth).abs().max() <= 1.5 * (theirs - truth).abs().max()
