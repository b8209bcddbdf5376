"""engine.cpu.kernels.vision_attention: the vision tower with the rotary pass in C gives bit for bit what
transformers' attention gives, for one image and for several in one call."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForImageTextToText

from engine.cpu.kernels.vision_attention import VisionAttention, load_kernel, use_fast_vision_attention


def tiny(folder: Path, dtype: torch.dtype) -> Any:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype)
    return model.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grids", [[[1, 16, 20]], [[1, 16, 16], [1, 8, 12]]], ids=["one", "two-images"])
def test_same_vision_features_as_transformers(
    tiny_qwen3: Path, dtype: torch.dtype, grids: list[list[int]]
) -> None:
    if load_kernel() is None:
        pytest.skip("this machine cannot build the rotary kernel")
    model = tiny(tiny_qwen3, dtype)
    reference = copy.deepcopy(model)
    replaced = use_fast_vision_attention(model)
    assert replaced == len(model.model.visual.blocks) > 0
    assert all(isinstance(block.attn, VisionAttention) for block in model.model.visual.blocks)
    grid = torch.tensor(grids)
    patch = model.config.vision_config.patch_size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(dim=-1).sum()), 3 * 2 * patch * patch, generator=generator)
    with torch.inference_mode():
        got = model.model.visual(pixels.to(dtype), grid_thw=grid)
        want = reference.model.visual(pixels.to(dtype), grid_thw=grid)
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    assert torch.equal(got.pooler_output, want.pooler_output)
    for ours, theirs in zip(got.deepstack_features, want.deepstack_features, strict=True):
        assert torch.equal(ours, theirs)


def test_other_attention_implementations_are_left_alone(tiny_qwen3: Path) -> None:
    model = tiny(tiny_qwen3, torch.float32)
    model.model.visual.config._attn_implementation = "eager"
    assert use_fast_vision_attention(model) == 0
    assert not any(isinstance(b.attn, VisionAttention) for b in model.model.visual.blocks)
    assert use_fast_vision_attention(object()) == 0
