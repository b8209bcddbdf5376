"""engine.cpu.hugepages: the language model's weights move onto huge pages without changing a single
value or answer; the move yields to requests and resumes in idle time."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import engine.qwen.engine
from bot.models import Message
from engine.cpu import hugepages, swap
from engine.cpu.hugepages import move_to_huge_pages, on_huge_pages, release_file_pages
from engine.cpu.quant_store import quantize_language_model
from tests.engine_fixtures import peak_rss, reset_peak_rss, resident_file_bytes
from tests.test_engine_qwen import answer, png_image

pytestmark = pytest.mark.skipif(not hugepages.huge_pages_available(), reason="no transparent huge pages")


@pytest.fixture
def every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "MIN_BYTES", 0)  # the tiny model's tensors are all small


def tiny(folder: Path) -> Any:
    model: Any = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    return model.eval()


def logits(model: Any) -> torch.Tensor:
    with torch.inference_mode():
        out: torch.Tensor = model(input_ids=torch.arange(5, 30)[None]).logits
        return out


async def settled(loaded: engine.qwen.engine.QwenVLEngine, timeout: float = 5.0) -> bool:
    """Wait until the engine's idle-time preparation is done; whether it was."""
    scheduler = loaded.scheduler
    assert scheduler is not None
    for _ in range(int(timeout / 0.01)):
        if scheduler.prepared:
            break
        await asyncio.sleep(0.01)
    return scheduler.prepared


def language_tensors(model: Any) -> list[torch.Tensor]:
    tensors = [
        t
        for module in model.model.language_model.modules()
        if not isinstance(module, torch.nn.Embedding)
        for t in [*module._parameters.values(), *module._buffers.values()]
        if t is not None
    ]
    return tensors + list(model.lm_head.parameters())


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_moved_weights_give_the_same_logits(tiny_qwen3: Path, every_tensor: None, quantize: str) -> None:
    model = tiny(tiny_qwen3)
    quantize_language_model(model, quantize)
    before = logits(model)
    reference = copy.deepcopy(model.state_dict())
    assert move_to_huge_pages(model) is True
    assert all(on_huge_pages(model, t) for t in language_tensors(model) if t.is_contiguous())
    assert torch.equal(logits(model), before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert move_to_huge_pages(model) is True  # nothing left: no new arena
    assert len(model._vlbot_huge_pages) == 1


def test_the_move_stops_when_asked_and_resumes(tiny_qwen3: Path, every_tensor: None) -> None:
    model = tiny(tiny_qwen3)
    before = logits(model)
    asked = 0

    def stop_after_three() -> bool:
        nonlocal asked
        asked += 1
        return asked > 3

    assert move_to_huge_pages(model, stop_after_three) is False
    moved = [t for t in language_tensors(model) if on_huge_pages(model, t)]
    assert len(moved) == 3
    assert torch.equal(logits(model), before)  # half moved, same answers
    assert move_to_huge_pages(model) is True
    assert len(model._vlbot_huge_pages) == 2
    assert torch.equal(logits(model), before)


def test_without_huge_pages_nothing_moves(tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    model = tiny(tiny_qwen3)
    assert move_to_huge_pages(model) is True
    assert not getattr(model, "_vlbot_huge_pages", None)


def test_released_file_pages_still_read_right(tiny_qwen3: Path) -> None:
    """Weights still in the safetensors mapping: releasing their pages drops them from this
    process only; reading them again gives the file's values."""
    model = tiny(tiny_qwen3)
    weight = model.model.language_model.layers[0].mlp.up_proj.weight.data
    copied = weight.clone()
    release_file_pages([weight])
    assert torch.equal(weight, copied)


async def test_the_engine_moves_in_idle_time_and_a_request_goes_first(
    tiny_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[bool] = []

    def slow_move(model: Any, should_stop: Any, keep: Any = ()) -> bool:
        """Takes 2 s unless a request comes; done on the second call."""
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            if should_stop():
                calls.append(False)
                return False
            time.sleep(0.005)
        calls.append(True)
        return len(calls) >= 2

    monkeypatch.setattr(swap, "move_to_huge_pages", slow_move)
    tiny_engine = engine.qwen.engine.QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await tiny_engine.load()
    started = time.monotonic()
    text = await answer(tiny_engine, Message.of("What is in this picture?", png_image()))
    assert text.strip() and time.monotonic() - started < 1.5  # did not wait for the move
    assert calls[0] is False  # the first call stopped for the request
    assert await settled(tiny_engine) and calls[-1] is True
    await tiny_engine.close()


async def test_the_engine_answers_the_same_on_huge_pages(
    tiny_qwen3: Path, every_tensor: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_engine = engine.qwen.engine.QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await tiny_engine.load()
    assert await settled(tiny_engine)
    model = tiny_engine.model
    assert all(on_huge_pages(model, t) for t in language_tensors(model) if t.is_contiguous())
    message = Message.of("What is in this picture?", png_image())
    moved_answer = await answer(tiny_engine, message)
    await tiny_engine.close()
    monkeypatch.setattr(hugepages, "huge_pages_available", lambda: False)
    unmoved = engine.qwen.engine.QwenVLEngine(str(tiny_qwen3), dtype="float32", threads=2)
    await unmoved.load()
    assert not getattr(unmoved.model, "_vlbot_huge_pages", None)
    assert moved_answer == await answer(unmoved, message)
    await unmoved.close()


def test_a_large_tensor_is_not_resident_twice_while_it_moves(
    wide_qwen3: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output head (16 MB here, 0.6 GB in Qwen3-VL-2B) is copied a step at a time, each
    step's file pages released: the move's peak memory is the moved weights, not + the head."""
    monkeypatch.setattr(hugepages, "COPY_STEP", 1 << 20)
    model: Any = AutoModelForImageTextToText.from_pretrained(str(wide_qwen3), dtype=torch.bfloat16)
    head_bytes = model.lm_head.weight.numel() * 2
    file = wide_qwen3 / "model.safetensors"
    assert resident_file_bytes(file) < head_bytes / 4  # the file is mapped, not yet read
    start = reset_peak_rss()
    assert move_to_huge_pages(model) is True
    growth = peak_rss() - start
    moved = sum(arena.nbytes for arena in model._vlbot_huge_pages)
    assert on_huge_pages(model, model.lm_head.weight)
    assert growth < moved + head_bytes / 2
    assert resident_file_bytes(file) < head_bytes / 4
    assert torch.equal(model.lm_head.weight, load_file(file)["lm_head.weight"])
