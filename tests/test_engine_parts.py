"""Unit tests for the engine's parts that need no model: prompt building, hardware and source
resolution, and the incremental detokenizer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from PIL import Image

from bot.engine_port import ModelNotFound
from bot.models import ImagePart, InputRejected, Message, Role, TextPart, Turn
from engine.intake import IntakeLimits
from engine.qwen.loading import (
    cpu_supports_bf16,
    load_processor,
    physical_cores,
    resolve_dtype,
    resolve_source,
)
from engine.qwen.prompt import (
    OMITTED_IMAGE,
    ProcessedImages,
    RecentImages,
    build_prompt,
    count_images,
    remember_processed_images,
)
from engine.qwen.streaming import TokenPipe

LIMITS = IntakeLimits()


def image(tag: str) -> ImagePart:
    return ImagePart(tag.encode(), "image/png", tag)


def fake_open(part: ImagePart, limits: IntakeLimits) -> Image.Image:
    if part.data.startswith(b"bad"):
        raise InputRejected("corrupt_image", "cannot decode")
    picture = Image.new("RGB", (8, 8))
    picture.info["tag"] = part.data.decode()
    return picture


def tags(images: list[Image.Image]) -> list[str]:
    return [str(i.info["tag"]) for i in images]


# --- prompt ------------------------------------------------------------------------------------


def test_prompt_rebuilds_history_with_images_in_order() -> None:
    history = [
        Turn(Role.USER, (image("a"), TextPart("what is this?"))),
        Turn(Role.ASSISTANT, (TextPart("a cat"),)),
        Turn(Role.USER, (TextPart("and these?"), image("b"), image("c"))),
        Turn(Role.ASSISTANT, (TextPart("dogs"), image("never-shown"))),
    ]
    message = Message((image("d"), TextPart("compare all")))
    prompt = build_prompt(
        history, message, limits=LIMITS, system_prompt=" Be brief. ", opener=fake_open
    )
    assert tags(prompt.images) == ["a", "b", "c", "d"]
    assert [m["role"] for m in prompt.messages] == [
        "system", "user", "assistant", "user", "assistant", "user"
    ]
    assert prompt.messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert prompt.messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "what is this?"},
    ]
    assert prompt.messages[3]["content"] == [
        {"type": "text", "text": "and these?"},
        {"type": "image"},
        {"type": "image"},
    ]
    assert prompt.messages[4]["content"] == [{"type": "text", "text": "dogs"}]
    assert prompt.messages[5]["content"][0] == {"type": "image"}
    assert count_images(history, message) == 4


def test_prompt_keeps_the_newest_images_within_max_images() -> None:
    history = [
        Turn(Role.USER, (image("a"), image("b"))),
        Turn(Role.ASSISTANT, (TextPart("ok"),)),
        Turn(Role.USER, (image("c"),)),
    ]
    message = Message.of("now this", image("d"), image("e"))
    prompt = build_prompt(history, message, limits=LIMITS, max_images=3, opener=fake_open)
    assert tags(prompt.images) == ["c", "d", "e"]
    notes = [c for m in prompt.messages for c in m["content"] if c.get("text") == OMITTED_IMAGE]
    assert len(notes) == 2
    # the new message's images are always shown, even past the limit
    prompt = build_prompt(history, message, limits=LIMITS, max_images=1, opener=fake_open)
    assert tags(prompt.images) == ["d", "e"]


def test_prompt_unreadable_history_image_becomes_a_note() -> None:
    history = [Turn(Role.USER, (image("bad-old"), TextPart("hm")))]
    prompt = build_prompt(history, Message.of("again?"), limits=LIMITS, opener=fake_open)
    assert prompt.images == []
    assert prompt.messages[0]["content"][0] == {"type": "text", "text": OMITTED_IMAGE}
    with pytest.raises(InputRejected):
        build_prompt([], Message.of("new", image("bad-new")), limits=LIMITS, opener=fake_open)


def test_recent_images_open_a_follow_ups_earlier_image_once() -> None:
    opened: list[str] = []

    def counting_open(part: ImagePart, limits: IntakeLimits) -> Image.Image:
        opened.append(part.data.decode())
        return fake_open(part, limits)

    recent = RecentImages(counting_open, keep=2)
    first = build_prompt([], Message.of("what is this?", image("a")), limits=LIMITS, opener=recent)
    history = [
        Turn(Role.USER, (image("a"), TextPart("what is this?"))),
        Turn(Role.ASSISTANT, (TextPart("a cat"),)),
    ]
    follow_up = build_prompt(history, Message.of("and its colour?"), limits=LIMITS, opener=recent)
    assert opened == ["a"] and follow_up.images[0] is first.images[0]
    # other limits: opened again (the image is fitted to them)
    build_prompt(history, Message.of("again"), limits=IntakeLimits(max_visual_tokens=64), opener=recent)
    assert opened == ["a", "a"]
    # the least recently used go first; an image that fails to open is not kept
    for tag in ("b", "c", "a"):
        recent(image(tag), LIMITS)
    assert opened == ["a", "a", "b", "c", "a"]
    for _ in range(2):
        with pytest.raises(InputRejected):
            recent(image("bad"), LIMITS)
    assert opened[-2:] == ["bad", "bad"]


def test_processed_images_are_remembered_for_the_same_images_and_options() -> None:
    calls: list[int] = []

    def preprocess(images: object, **options: object) -> dict[str, object]:
        calls.append(1)
        return {"pixels": object()}

    remembered = ProcessedImages(preprocess)
    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))
    first = remembered([[a, b]], size=1)
    assert remembered([[a, b]], size=1) is first and len(calls) == 1  # a follow-up's prompt
    assert remembered([[a, b]], size=2) is not first  # other options
    assert remembered([[a], [b]], size=2) is not None and len(calls) == 3  # other nesting
    assert remembered([[b, a]], size=2) is not first and len(calls) == 4  # other order
    pixels = [[object()]]  # no weak references (like arrays): computed every time
    with pytest.raises(TypeError):
        __import__("weakref").ref(pixels[0][0])
    remembered(pixels)
    remembered(pixels)
    assert len(calls) == 6


def test_tiny_processor_gives_the_same_inputs_from_remembered_images(tiny_qwen3: Path) -> None:
    from transformers import AutoConfig

    processor = load_processor(str(tiny_qwen3), AutoConfig.from_pretrained(str(tiny_qwen3)))
    picture = Image.effect_mandelbrot((96, 64), (-2.0, -1.2, 1.0, 1.2), 60).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]

    def encode() -> dict[str, torch.Tensor]:
        return dict(
            processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", processor_kwargs={"images": [picture]},
            )
        )  # fmt: skip

    want = encode()
    assert remember_processed_images(processor)
    first, again = encode(), encode()
    for got in (first, again):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert again["pixel_values"] is first["pixel_values"]  # not processed again
    assert not remember_processed_images(object())


def test_prompt_rejects_an_empty_message_and_skips_empty_turns() -> None:
    with pytest.raises(InputRejected) as info:
        build_prompt([], Message(()), limits=LIMITS, opener=fake_open)
    assert info.value.code == "empty_question"
    history = [Turn(Role.USER, (TextPart("  "),)), Turn(Role.ASSISTANT, ())]
    prompt = build_prompt(history, Message.of("hi"), limits=LIMITS, opener=fake_open)
    assert prompt.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


# --- hardware and source -------------------------------------------------------------------------

CPUINFO_BF16 = """processor\t: 0
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile

processor\t: 1
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile
"""
CPUINFO_PLAIN = "processor\t: 0\ncore id\t: 0\nflags\t\t: fpu sse avx2\n"


def test_dtype_resolution() -> None:
    assert cpu_supports_bf16(CPUINFO_BF16) and not cpu_supports_bf16(CPUINFO_PLAIN)
    assert resolve_dtype("auto", CPUINFO_BF16) is torch.bfloat16
    assert resolve_dtype("auto", CPUINFO_PLAIN) is torch.float32
    assert resolve_dtype("float32", CPUINFO_BF16) is torch.float32
    assert resolve_dtype("BF16") is torch.bfloat16
    with pytest.raises(ValueError):
        resolve_dtype("int4")


def test_physical_cores_counts_hyperthreads_once() -> None:
    assert physical_cores(CPUINFO_BF16) == 1
    assert physical_cores() >= 1


def test_resolve_source(tmp_path: Path) -> None:
    assert resolve_source("Qwen/Qwen3-VL-2B-Instruct").kind == "hub"
    for name in (str(tmp_path / "missing"), "./missing-model", "not a hub id"):
        with pytest.raises(ModelNotFound, match="does not exist"):
            resolve_source(name)
    with pytest.raises(ModelNotFound, match="no model configured"):
        resolve_source("  ")


# --- incremental detokenizer ---------------------------------------------------------------------


async def test_token_pipe_never_splits_a_character() -> None:
    from engine.devmodel import build_tokenizer

    tokenizer = build_tokenizer()
    text = "Der Hund läuft — 猫が好きです 🐈 ok"
    ids = tokenizer(text)["input_ids"]
    queue: asyncio.Queue[object] = asyncio.Queue()
    pipe = TokenPipe(tokenizer, asyncio.get_running_loop(), queue)
    for token in ids:
        pipe.push(token)
    pipe.end()
    await asyncio.sleep(0)
    pieces: list[str] = []
    while not queue.empty():
        item = queue.get_nowait()
        assert isinstance(item, str)
        pieces.append(item)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pipe.token_count == len(ids) and pipe.first_token_at is not None


def test_onednn_is_kept_for_decode_with_amx_and_dropped_with_avx512_bf16_only() -> None:
    from engine.qwen.loading import onednn_decodes_faster

    assert onednn_decodes_faster("flags\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile")
    assert not onednn_decodes_faster("flags\t: fpu avx512f avx512_bf16")
    assert onednn_decodes_faster("flags\t: fpu avx2")  # no bf16 at all: fp32 weights, keep it
