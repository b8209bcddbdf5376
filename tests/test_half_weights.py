"""Half-size weights on a tier without bf16 arithmetic (engine.cpu.half_weights): the tiny model
loaded in bf16 under VLBOT_CPU=avx2 computes in float32 with its language model's linear weights
kept bf16, and its logits match a float32 model holding the same (bf16-rounded) weights; its KV
cache keeps bf16 as well (half the bytes), its decode steps' logits within bf16 rounding of a
float32 cache's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from engine.cpu import tiers
from engine.cpu.half_weights import compute_in_float32
from engine.cpu.kernels import bf16_gemm
from engine.cpu.kernels.bf16_kernel import FLOAT_PROMPT_MAX_ROWS, DecodeLinear, load_kernel
from engine.cpu.onednn_linear import OneDnnLinear, available
from engine.cpu.swap import decode_parts, swap_modules
from engine.qwen.kvbuffer import appending_cache
from engine.qwen.kvcache import cache_nbytes
from engine.qwen.loading import load_processor, resolve_dtype
from tests.engine_fixtures import resident_file_bytes
from tests.tier_helpers import forced


@pytest.fixture
def avx2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with forced(monkeypatch, "avx2", load_kernel):
        if load_kernel() is None:
            pytest.skip("no C compiler: the bf16 kernel cannot be built")
        yield


@pytest.fixture
def without_prompt_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a tier where engine.cpu.kernels.bf16_gemm is not used."""
    monkeypatch.setattr(bf16_gemm, "load_kernel", lambda: None)


def load(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(folder), dtype=dtype).eval()


def inputs(folder: Path, with_image: bool, tokens: int = 0) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig

    processor = load_processor(str(folder), AutoConfig.from_pretrained(str(folder)))
    picture = Image.effect_mandelbrot((96, 64), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    content: list[dict[str, str]] = [{"type": "text", "text": "what is this?"}]
    if with_image:
        content.insert(0, {"type": "image"})
    batch = dict(
        processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt",
            processor_kwargs={"images": [picture]} if with_image else {},
        )
    )  # fmt: skip
    if with_image:
        return batch
    return {name: batch[name][:, :tokens] for name in ("input_ids", "attention_mask")}  # decode-sized


def float32_reference(folder: Path) -> Any:
    """The float32 model with every weight rounded to bf16, as loading in bf16 rounds them."""
    model = load(folder, torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return model


def test_auto_keeps_bf16_weights_where_the_tier_lacks_bf16_arithmetic(avx2: None) -> None:
    assert resolve_dtype("auto") is torch.bfloat16


@torch.inference_mode()
@pytest.mark.parametrize(
    ("with_image", "tokens"),
    [(True, 0), (False, 1), (False, 6), (False, 100)],
    ids=["image-prompt", "1-row", "6-rows", "text-prompt"],
)
def test_logits_match_float32_with_the_weights_in_bf16(
    avx2: None, tiny_qwen3: Path, with_image: bool, tokens: int
) -> None:
    """With an image the prompt is long (weights widened for torch's float32 products); a short
    text has as few rows as a decode step (the C kernel's float32 path: one row, a batch), and a
    whole text prompt (a follow-up's new tokens) goes through the kernel a batch at a time."""
    batch = inputs(tiny_qwen3, with_image, tokens)
    want = float32_reference(tiny_qwen3)(**batch).logits
    model = load(tiny_qwen3, torch.bfloat16)
    swap_modules(model, "none")
    language_model = model.model.language_model
    linears = [m for m in language_model.modules() if isinstance(m, DecodeLinear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert isinstance(model.lm_head, DecodeLinear) and model.lm_head.weight.dtype == torch.bfloat16
    assert next(model.model.visual.parameters()).dtype == torch.float32
    vision_linears = [
        m for m in model.model.visual.modules() if isinstance(m, (nn.Linear, OneDnnLinear, DecodeLinear))
    ]
    if bf16_gemm.load_kernel() is not None:  # the AVX2 tier: bf16 weights, the C prompt product
        assert vision_linears and all(isinstance(m, DecodeLinear) for m in vision_linears)
        assert all(m.weight.dtype == torch.bfloat16 for m in vision_linears)
    else:  # through oneDNN, the vision linears' weights are widened at their first product
        assert vision_linears and all(isinstance(m, OneDnnLinear) for m in vision_linears) == available()
        widened_later = torch.bfloat16 if available() else torch.float32
        assert all(m.weight.dtype == widened_later for m in vision_linears)
    rows = batch["input_ids"].shape[1]
    assert (rows > FLOAT_PROMPT_MAX_ROWS) == with_image
    assert with_image or tokens <= rows or rows > load_kernel().max_rows  # type: ignore[union-attr]
    got = model(**batch).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_tier_with_bf16_arithmetic_keeps_the_bf16_model(monkeypatch: pytest.MonkeyPatch) -> None:
    if not tiers.detect(tiers.cpu_flags()).bf16_arithmetic:
        pytest.skip("this CPU has no tier with bf16 arithmetic")
    tiers.active_tier.cache_clear()
    monkeypatch.delenv("VLBOT_CPU", raising=False)
    try:
        model = nn.Module()
        assert compute_in_float32(model) is False
    finally:
        tiers.active_tier.cache_clear()


@torch.inference_mode()
def test_vision_linears_through_onednn_match_float32_too(
    avx2: None, without_prompt_product: None, tiny_qwen3: Path
) -> None:
    """Where the C prompt product is not used (AVX-512 tiers without bf16, aarch64), the vision
    linears are float32 through oneDNN (widened at their first product): the same logits."""
    batch = inputs(tiny_qwen3, with_image=True)
    want = float32_reference(tiny_qwen3)(**batch).logits
    model = load(tiny_qwen3, torch.bfloat16)
    swap_modules(model, "none")
    assert not any(isinstance(m, DecodeLinear) for m in model.model.visual.modules())
    got = model(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("widened_by", ["idle-time preparation", "first image"])
def test_the_bf16_originals_of_converted_weights_leave_memory(
    avx2: None, without_prompt_product: None, tiny_qwen3: Path, wide_qwen3: Path, widened_by: str
) -> None:
    """Without the C prompt product the vision tower is converted to float32 (its linears after
    load, by the engine's idle-time preparation or at their first product): its bf16 pages in the
    safetensors file mapping are released as it goes, so it is not resident twice (Qwen3-VL-2B:
    0.8 GB more peak memory)."""
    model = load(wide_qwen3, torch.bfloat16)
    vision_bf16 = sum(p.numel() * 2 for p in model.model.visual.parameters())
    assert compute_in_float32(model) is True
    if widened_by == "first image":
        with torch.inference_mode():
            batch = inputs(tiny_qwen3, with_image=True)  # (the wide model has no processor)
            model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    else:
        assert decode_parts(model).prepare(lambda: False) is True
    assert all(p.dtype == torch.float32 for p in model.model.visual.parameters())
    assert all(b.dtype == torch.float32 for b in model.model.visual.buffers())
    assert resident_file_bytes(wide_qwen3 / "model.safetensors") < vision_bf16 / 10


def test_idle_preparation_reorders_the_vision_linears_with_the_same_logits(
    avx2: None, without_prompt_product: None, tiny_qwen3: Path
) -> None:
    """The engine's idle-time preparation (engine.cpu.swap.decode_parts) puts the float32 vision
    linears' weights into oneDNN's layout; an image prompt's logits stay the same bits."""
    if not available():
        pytest.skip("this torch has no oneDNN float32 linear")
    batch = inputs(tiny_qwen3, with_image=True)
    model = load(tiny_qwen3, torch.bfloat16)
    swap_modules(model, "none")
    vision_linears = [m for m in model.model.visual.modules() if isinstance(m, OneDnnLinear)]
    assert vision_linears and not any(m.reordered for m in vision_linears)  # load-to-ready pays nothing
    with torch.inference_mode():
        before = model(**batch).logits
        assert decode_parts(model).prepare(lambda: False) is True
        assert all(m.reordered for m in vision_linears)
        assert torch.equal(model(**batch).logits, before)


@torch.inference_mode()
def test_the_kv_cache_is_kept_in_bf16_with_the_same_answer(avx2: None, tiny_qwen3: Path) -> None:
    """The engine's caches (engine.cpu.swap.decode_parts' `cache_dtype`) keep bf16 for a model
    computing in float32 over bf16 weights: half the bytes per token, and a prompt's and the decode
    steps' logits within bf16 rounding of the keys and values of a float32 cache's, the same
    greedy tokens. A float32 model keeps its float32 cache."""
    assert decode_parts(load(tiny_qwen3, torch.float32)).cache_dtype is None
    model = load(tiny_qwen3, torch.bfloat16)
    swap_modules(model, "none")
    parts = decode_parts(model)
    assert parts.cache_dtype is torch.bfloat16 and parts.decode_step is not None
    ids = torch.tensor([list(range(7, 47))])
    logits, caches = [], []
    for storage in (torch.bfloat16, None):
        cache = appending_cache(model.config, storage)
        first = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        steps, token, length = [first], int(first.argmax()), ids.shape[1]
        for _ in range(8):
            hidden = parts.decode_step(
                input_ids=torch.tensor([[token]]),
                attention_mask=torch.ones((1, length + 1), dtype=torch.long),
                position_ids=torch.full((3, 1, 1), length),
                cache=cache,
            )
            steps.append(model.lm_head(hidden))
            token, length = int(steps[-1].argmax()), length + 1
        logits.append(torch.cat(steps))
        caches.append(cache)
    assert caches[0].layers[0].keys.dtype == torch.bfloat16
    assert caches[1].layers[0].keys.dtype == torch.float32
    assert 2 * cache_nbytes(caches[0]) == cache_nbytes(caches[1])
    ours, theirs = logits
    assert float((ours - theirs).abs().max()) <= 2e-2 * float(theirs.abs().max())
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
