"""Follow-up questions reuse the conversation's KV cache, and answer exactly as from scratch.

Greedy decoding in float32 on the tiny random Qwen3-VL (weights drawn with a large spread, so its
answers vary token by token): any error in the reused cache or in the 3-D rotary positions of the
new tokens changes the answer. The from-scratch reference is the same engine without a session.
End-of-turn tokens are forbidden so every answer has all its tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bot.models import GenerationParams, Message, Role, TextPart, Turn
from engine.qwen.engine import QwenVLEngine
from engine.qwen.kvcache import (
    ImageSpan,
    SessionCacheStore,
    image_spans,
    prompt_keys,
    reusable_prefix,
)
from engine.qwen.scheduler import Encoded, Positions, rope_positions
from tests.test_engine_qwen import _never_end, answer, png_image

PARAMS = GenerationParams(max_new_tokens=24, temperature=0.0)


def session(key: str | None) -> GenerationParams:
    return GenerationParams(max_new_tokens=24, temperature=0.0, session=key)


async def engine_for(folder: Path, **kwargs: Any) -> QwenVLEngine:
    engine = QwenVLEngine(str(folder), dtype="float32", threads=2, **kwargs)
    await engine.load()
    _never_end(engine.model)  # every answer is max_new_tokens long: more tokens to compare
    return engine


def turns(message: Message, reply: str) -> tuple[Turn, Turn]:
    return (Turn(Role.USER, message.parts), Turn(Role.ASSISTANT, (TextPart(reply),)))


async def first_turn(engine: QwenVLEngine, key: str, message: Message) -> tuple[Turn, ...]:
    reply = await answer(engine, message, params=session(key))
    assert key in engine.caches
    return turns(message, reply)


# --- pure parts ----------------------------------------------------------------------------------


def test_reusable_prefix_never_ends_inside_an_image_and_leaves_a_token() -> None:
    spans = [ImageSpan(2, 6)]
    assert reusable_prefix([1, 2, 9, 9, 9, 9, 3, 4], [1, 2, 9, 9, 9, 9, 3, 4, 5], spans) == 8
    assert reusable_prefix([1, 2, 9, 9, 9, 9], [1, 2, 9, 9, 9, 9], spans) == 2  # 5 is in the image
    assert reusable_prefix([1, 2, 9, 9, 7], [1, 2, 9, 9, 9, 9, 3], spans) == 2
    assert reusable_prefix([5, 5], [1, 2, 3], []) == 0
    assert reusable_prefix([1, 2, 3, 4], [1, 2, 3, 4], []) == 3


def test_keys_tell_different_pictures_of_the_same_size_apart() -> None:
    ids = [1, 7, 7, 7, 2, 7, 7, 3]
    spans = image_spans(ids, 7)
    assert spans == [ImageSpan(1, 4), ImageSpan(5, 7)]
    a = prompt_keys(ids, spans, [b"a" * 16, b"b" * 16])
    b = prompt_keys(ids, spans, [b"a" * 16, b"c" * 16])
    assert a[:5] == b[:5] and a[5] != b[5] and a[7] == b[7] == 3
    assert reusable_prefix(a, b, spans) == 5


def cache(tokens: int) -> Any:
    """A stand-in Cache of one layer: `tokens` x 32 bytes."""
    layer = type("L", (), {})()
    layer.keys = torch.zeros(1, 1, tokens, 4)
    layer.values = torch.zeros(1, 1, tokens, 4)
    return type("C", (), {"layers": [layer]})()


def test_store_evicts_least_recently_used_within_budget() -> None:
    store = SessionCacheStore(budget_bytes=3 * 10 * 32)  # three 10-token caches
    for key in "abc":
        assert store.put(key, [1] * 10, cache(10))
    assert store.take("a") is not None  # a is taken out (in use) ...
    assert store.put("a", [1] * 10, cache(10))  # ... and back: now the most recent
    assert store.put("d", [1] * 10, cache(10))
    assert "b" not in store and {"a", "c", "d"} == {k for k in "abcd" if k in store}
    assert store.evictions == 1 and store.nbytes <= store.budget_bytes
    assert not store.put("huge", [1] * 40, cache(40))  # larger than the whole budget
    assert store.take(None) is None and not store.put(None, [1], cache(1))


def test_store_leaves_room_for_the_conversations_being_answered() -> None:
    store = SessionCacheStore(budget_bytes=3 * 10 * 32)
    for key in "abc":
        assert store.put(key, [1] * 10, cache(10))
    assert store.make_room(in_use=15 * 32) == 2  # 15 tokens in flight: the two oldest go
    assert "c" in store and "a" not in store and "b" not in store
    assert store.put("d", [1] * 10, cache(10), in_use=10 * 32)  # c, d and 10 in flight: fit
    assert "c" in store and store.put("e", [1] * 10, cache(10), in_use=10 * 32)
    assert "c" not in store and {"d", "e"} == {k for k in "cde" if k in store}
    assert not store.put("f", [1] * 10, cache(10), in_use=25 * 32)  # not beside what is in flight
    assert store.make_room(in_use=0) == 0 and store.evictions == 3


# --- end to end on the tiny model -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "quantize"),
    [(24, "none"), (150, "none"), (40, "int4")],  # 150: the in-place cache outgrows its room twice
)
async def test_engine_decode_loop_equals_transformers_generate(
    tiny_qwen3: Path, tokens: int, quantize: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Also with 4-bit weights: generate's steps go through the same kernels (the VNNI kernel
    for single rows where this CPU has it), so the answers match token for token. With 4-bit
    weights the decode steps keep torch's attention here: its float32 result and the C kernel's
    differ in the last bits (both as close to exact attention: tests/test_decode_attention.py),
    which the 8-bit rounding of the activations turns into other tokens of this random model."""
    if quantize == "int4":
        monkeypatch.setattr("engine.cpu.decode_step.load_attention", lambda: None)
    engine = await engine_for(tiny_qwen3, quantize=quantize)
    message = Message.of("What is in this picture?", png_image())
    text = await answer(engine, message, params=GenerationParams(max_new_tokens=tokens, temperature=0.0))
    prompt_tokens = engine.last_stats.prompt_tokens if engine.last_stats else 0
    from engine.qwen.prompt import build_prompt

    assert engine._loaded is not None
    prompt = build_prompt((), message, limits=engine.limits, max_images=8)
    inputs = engine._encode(engine._loaded, prompt)
    assert int(inputs["input_ids"].shape[1]) == prompt_tokens
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    expected = engine.processor.tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True)
    assert text == expected and len(set(text.split())) > 3
    await engine.close()


async def test_follow_up_reuses_the_cache_and_answers_as_from_scratch(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3)
    message = Message.of("What is this?", png_image())
    history = await first_turn(engine, "chat-1", message)
    first = engine.last_stats
    follow = Message.of("And what colour is the stripe?")
    reused = await answer(engine, follow, history, session("chat-1"))
    assert first is not None and engine.last_reused_tokens >= first.prompt_tokens
    scratch = await answer(engine, follow, history, PARAMS)
    assert engine.last_reused_tokens == 0
    assert reused == scratch and len(set(reused.split())) > 3
    # a third turn with a new image continues from the second turn's cache
    history2 = (*history, *turns(follow, reused))
    third = Message.of("Compare with this one", png_image((0, 0, 0), (200, 160)))
    reused3 = await answer(engine, third, history2, session("chat-1"))
    assert engine.last_reused_tokens > engine.last_stats.prompt_tokens // 2  # type: ignore[union-attr]
    assert reused3 == await answer(engine, third, history2, PARAMS)
    await engine.close()


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_qwen25"])
async def test_follow_up_is_exact_after_another_conversation_ran(
    family: str, request: pytest.FixtureRequest
) -> None:
    engine = await engine_for(request.getfixturevalue(family))
    one = Message.of("What is this?", png_image())
    history = await first_turn(engine, "one", one)
    # another conversation, with an image of another shape (other rope deltas), runs in between
    other = Message.of("Describe", png_image((0, 120, 0), (160, 400)))
    other_history = await first_turn(engine, "two", other)
    await answer(engine, Message.of("more?"), other_history, session("two"))
    follow = Message.of("Tell me more")
    reused = await answer(engine, follow, history, session("one"))
    assert engine.last_reused_tokens > 0
    assert reused == await answer(engine, follow, history, PARAMS)
    await engine.close()


async def test_evicted_conversation_falls_back_to_a_full_prefill(tiny_qwen3: Path) -> None:
    probe = await engine_for(tiny_qwen3)
    one = Message.of("What is this?", png_image())
    await answer(probe, one, params=session("probe"))
    one_bytes = probe.caches.nbytes
    await probe.close()
    engine = await engine_for(tiny_qwen3, kv_cache_bytes=int(one_bytes * 1.8))  # one fits, two do not
    history = await first_turn(engine, "one", one)
    await first_turn(engine, "two", Message.of("Describe", png_image((0, 120, 0), (300, 200))))
    assert "one" not in engine.caches and engine.caches.evictions >= 1
    follow = Message.of("Tell me more")
    reused = await answer(engine, follow, history, session("one"))
    assert engine.last_reused_tokens == 0
    assert "one" in engine.caches  # kept again for the next turn
    assert reused == await answer(engine, follow, history, PARAMS)
    await engine.close()


async def test_kept_caches_make_room_for_the_conversation_being_answered(tiny_qwen3: Path) -> None:
    """The budget bounds all KV memory: while a chat is answered, its cache and the kept ones
    together stay within it (the oldest kept chat is evicted, the newer one stays)."""
    probe = await engine_for(tiny_qwen3)
    one = Message.of("What is this?", png_image())
    await answer(probe, one, params=session("probe"))
    one_bytes = probe.caches.nbytes
    await probe.close()
    engine = await engine_for(tiny_qwen3, kv_cache_bytes=int(one_bytes * 2.5))  # 2 kept fit, 3 not
    await first_turn(engine, "old", one)
    await first_turn(engine, "newer", Message.of("Describe", png_image((0, 120, 0))))
    assert "old" in engine.caches and "newer" in engine.caches
    scheduler = engine.scheduler
    assert scheduler is not None
    held: list[int] = []
    engine.model.lm_head.register_forward_hook(
        lambda *_: held.append(engine.caches.nbytes + scheduler.kv_in_use_bytes)
    )
    await answer(engine, Message.of("And this?", png_image((0, 0, 120))), params=session("third"))
    assert len(held) > 10 and max(held) <= engine.caches.budget_bytes
    assert "old" not in engine.caches and "newer" in engine.caches and "third" in engine.caches
    await engine.close()


async def test_a_different_picture_of_the_same_size_is_encoded_again(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3)
    await first_turn(engine, "chat", Message.of("What is this?", png_image()))
    other = Message.of("What is this?", png_image((10, 200, 10)))  # same size, other pixels
    fresh = await answer(engine, other, (), session("chat"))
    assert 0 < engine.last_reused_tokens < 10  # only the text before the image
    assert fresh == await answer(engine, other, (), PARAMS)
    await engine.close()


async def test_wrong_positions_for_the_new_tokens_change_the_answer(tiny_qwen3: Path) -> None:
    """The comparison above can fail: shift the follow-up's new tokens as a stale delta would."""
    engine = await engine_for(tiny_qwen3)
    message = Message.of("What is this?", png_image())
    history = await first_turn(engine, "chat", message)
    cached = engine.last_stats.prompt_tokens if engine.last_stats else 0
    follow = Message.of("And what colour is the stripe?")
    scratch = await answer(engine, follow, history, PARAMS)
    assert engine.scheduler is not None

    def stale(model: Any, encoded: Encoded) -> Positions:
        right = rope_positions(model, encoded)
        ids = right.ids.clone()
        ids[:, :, cached:] += 5
        return Positions(ids, right.delta + 5)

    engine.scheduler.positions = stale
    wrong = await answer(engine, follow, history, session("chat"))
    assert engine.last_reused_tokens >= cached
    assert wrong != scratch
    await engine.close()


async def test_no_budget_means_no_reuse(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3, kv_cache_bytes=0)
    message = Message.of("What is this?", png_image())
    reply = await answer(engine, message, params=session("chat"))
    assert len(engine.caches) == 0
    await answer(engine, Message.of("more"), turns(message, reply), session("chat"))
    assert engine.last_reused_tokens == 0
    await engine.close()
