"""Concurrent conversations decode together (continuous batching) and answer exactly as alone.

Greedy decoding in float32 on the tiny random Qwen3-VL with end-of-turn tokens forbidden, so every
answer runs to max_new_tokens and any mix-up between rows (padding, positions, cache rows) changes
some answer. Blocks are slowed a little so streams overlap for many steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.models import GenerationParams, Message, Role, TextPart, Turn
from engine.qwen.engine import QwenVLEngine
from tests.test_engine_kvcache import engine_for
from tests.test_engine_qwen import _slow_blocks, answer, png_image


def greedy(tokens: int, key: str | None = None) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=0.0, session=key)


CHATS = [
    (Message.of("What is in this picture?", png_image()), 40),
    (Message.of("Describe it", png_image((0, 0, 120), (200, 300))), 24),  # leaves early
    (Message.of("Hello, how are you today?"), 32),  # text only
    (Message.of("Read the text", png_image((250, 250, 250), (400, 120))), 36),
]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


async def alone(engine: QwenVLEngine) -> list[str]:
    return [await answer(engine, m, params=greedy(n)) for m, n in CHATS]


async def test_concurrent_chats_decode_together_and_answer_as_alone(tiny_qwen3: Path) -> None:
    """Not with int4: its kernel rounds activations to 8 bits, which turns the last-bit
    differences of batched attention (present in float32 too, ~1e-5 on the logits) into
    different tokens on random weights. Its rows are independent (tests/test_int4_kernel.py)."""
    engine = await engine_for(tiny_qwen3)
    expected = await alone(engine)
    assert engine.scheduler is not None and engine.scheduler.peak_batch == 1
    _slow_blocks(engine.model, 0.001)

    async def late_joiner() -> str:
        stream = engine.stream((), CHATS[3][0], greedy(CHATS[3][1]))
        return "".join([piece async for piece in stream])

    async def first_three() -> list[str]:
        return list(
            await asyncio.gather(*(answer(engine, m, params=greedy(n)) for m, n in CHATS[:3]))
        )

    early = asyncio.create_task(first_three())
    scheduler = engine.scheduler
    await until(lambda: scheduler.batch_size == 3)  # the three are decoding together ...
    late = asyncio.create_task(late_joiner())  # ... when the fourth arrives
    got = [*await early, await late]
    assert got == expected
    assert engine.scheduler.peak_batch == 4
    assert engine.scheduler.batch_size == 0
    await engine.close()


async def test_closing_one_stream_leaves_the_others_undisturbed(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3)
    expected = await alone(engine)
    assert engine.scheduler is not None
    _slow_blocks(engine.model, 0.001)
    quitter = engine.stream((), CHATS[0][0], greedy(400))
    pieces = 0
    others = asyncio.gather(*(answer(engine, m, params=greedy(n)) for m, n in CHATS[1:]))
    async for _ in quitter:
        pieces += 1
        if pieces == 5:
            break
    scheduler = engine.scheduler
    await until(lambda: scheduler.batch_size == 4)
    await quitter.aclose()  # type: ignore[attr-defined]
    assert engine.last_stats is not None and engine.last_stats.completion_tokens < 100
    assert list(await others) == expected[1:]
    await engine.close()


async def test_caches_taken_out_of_a_padded_batch_serve_follow_ups(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3)
    assert engine.scheduler is not None
    _slow_blocks(engine.model, 0.001)
    firsts = [CHATS[0], CHATS[1], CHATS[2]]
    replies = await asyncio.gather(
        *(answer(engine, m, params=greedy(n, f"chat-{i}")) for i, (m, n) in enumerate(firsts))
    )
    assert engine.scheduler.peak_batch >= 2
    follow = Message.of("And then?")
    for i, ((message, _), reply) in enumerate(zip(firsts, replies, strict=True)):
        history = (Turn(Role.USER, message.parts), Turn(Role.ASSISTANT, (TextPart(reply),)))
        reused = await answer(engine, follow, history, greedy(16, f"chat-{i}"))
        assert engine.last_reused_tokens > 0, i
        assert reused == await answer(engine, follow, history, greedy(16)), i
    await engine.close()


async def test_a_waiting_stream_closed_before_its_turn_ends_at_once(tiny_qwen3: Path) -> None:
    engine = await engine_for(tiny_qwen3, max_batch=1)
    scheduler = engine.scheduler
    assert scheduler is not None
    _slow_blocks(engine.model, 0.002)
    running = asyncio.create_task(answer(engine, CHATS[0][0], params=greedy(300)))
    await until(lambda: scheduler.batch_size == 1)
    waiting = asyncio.create_task(answer(engine, CHATS[2][0], params=greedy(8)))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert time.monotonic() - started < 1.0 and not running.done()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert (await answer(engine, CHATS[2][0], params=greedy(8))).strip()  # still serving
    await engine.close()
