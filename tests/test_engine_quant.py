"""Opt-in weight-only int8 / int4 quantization of the language model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bot.models import Message
from engine.cpu.quant import Int4Linear, Int8Linear, quantize_language_model
from engine.qwen.engine import QwenVLEngine
from tests.test_engine_qwen import answer, png_image


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_linear_is_close_to_the_original(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    q = Int8Linear(linear, torch.bfloat16) if cls is Int8Linear else Int4Linear(linear, 128)
    want, got = linear(x).float(), q(x).float()
    assert got.shape == want.shape and got.dtype == torch.float32
    error = (got - want).norm() / want.norm()
    assert error < (0.02 if cls is Int8Linear else 0.15), float(error)


@pytest.mark.parametrize("mode", ["int8", "int4"])
async def test_engine_answers_with_a_quantized_language_model(tiny_qwen3: Path, mode: str) -> None:
    engine = QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2, quantize=mode)
    await engine.load()
    assert engine.info.details["quantize"] == mode
    kinds = {type(m) for m in engine.model.model.language_model.modules()}
    assert Int8Linear in kinds or Int4Linear in kinds
    assert not any(isinstance(m, nn.Linear) for m in engine.model.model.language_model.layers.modules())
    head = engine.model.lm_head  # int4 packs rows in eights: the tiny vocabulary (685) is not
    assert isinstance(head, (Int8Linear, Int4Linear)) == (mode == "int8" or head.out_features % 8 == 0)
    assert isinstance(engine.model.model.language_model.embed_tokens.weight, torch.Tensor)
    message = Message.of("What is in this picture?", png_image())
    text = await answer(engine, message)
    assert text.strip() and text == await answer(engine, message)
    await engine.close()


def test_unknown_quantize_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="quantize"):
        QwenVLEngine("/nowhere", quantize="int3")
    assert quantize_language_model(object(), "none") == 0


def test_each_replaced_layer_lets_go_of_its_file_pages_at_once(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading with int4 peaked at 8.9 GB on the full-size model while every bf16 weight stayed
    resident until the end; each layer's file pages now go as soon as it is quantized (6.1 GB)."""
    from transformers import AutoModelForImageTextToText

    from engine.cpu import quant

    model = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3), dtype=torch.float32)
    events: list[tuple[str, int]] = []
    quantize_one = quant._quantized

    def quantized(linear: nn.Linear, *args: object) -> nn.Module | None:
        events.append(("quantize", linear.weight.data_ptr()))
        return quantize_one(linear, *args)  # type: ignore[arg-type]

    def release(tensors: list[torch.Tensor], mappings: object = None) -> None:
        events.extend(("release", t.data_ptr()) for t in tensors)

    monkeypatch.setattr(quant, "_quantized", quantized)
    monkeypatch.setattr(quant, "release_file_pages", release)
    layers = quantize_language_model(model, "int8")
    linears = len(model.model.language_model.layers) * 7
    # each layer's weights are released right after it is quantized, before the next one
    for at in range(linears):
        (first, pointer), (then, released) = events[2 * at], events[2 * at + 1]
        assert (first, then) == ("quantize", "release") and released == pointer
    # then the output head, quantized as a copy: its (tied) embedding weights keep their pages
    assert [kind for kind, _ in events[2 * linears :]] == ["quantize"] and layers == linears + 1
