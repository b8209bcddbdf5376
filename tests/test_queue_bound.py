"""VLBOT_MAX_QUEUE under a burst, through the real adapters: with one job running and
MAX_QUEUE=3, a burst of 30 gets exactly 3 places in line; everyone else gets the busy reply at
once (while the running job is still held), and every accepted request is answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bot.models import GenerationParams, Message, Turn
from tests.fake_telegram import FakeTelegram
from tests.fakes import ScriptedEngine
from tests.http_helpers import running as http_running
from tests.telegram_harness import ALICE, ANSWER, fake_server
from tests.telegram_harness import running as telegram_running

__all__ = ["fake_server"]  # the `fake` fixture

MAX_QUEUE = 3
BURST = 30


@dataclass
class GatedEngine(ScriptedEngine):
    """Answers only once `gate` is open: the first job stays running while the burst arrives."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)  # a job reached the engine

    async def stream(
        self, history: Sequence[Turn], message: Message, params: GenerationParams
    ) -> AsyncGenerator[str, None]:
        self.entered.set()
        await self.gate.wait()
        async for piece in super().stream(history, message, params):
            yield piece


async def test_http_burst_admits_max_queue_and_refuses_the_rest_at_once(tmp_path: Path) -> None:
    engine = GatedEngine(reply=lambda h, m: f"answer to {m.text}")
    runner = {"max_queue": MAX_QUEUE, "max_concurrency": 1}
    limits = httpx.Limits(max_connections=BURST + 1)
    async with (
        http_running(tmp_path, engine, runner=runner, http={"rate_limit_per_minute": 1000}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http,
    ):

        asked: dict[asyncio.Task[httpx.Response], str] = {}

        def ask(i: int) -> asyncio.Task[httpx.Response]:
            body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
            task = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            asked[task] = f"q{i}"
            return task

        first = ask(-1)
        await asyncio.wait_for(engine.entered.wait(), 10)  # the first job runs, held by the gate
        burst = [ask(i) for i in range(BURST)]
        refused: list[httpx.Response] = []
        pending = set(burst)
        while len(refused) < BURST - MAX_QUEUE:  # all refusals arrive with the gate still shut
            done, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert done, "requests neither refused nor answered"
            refused += [t.result() for t in done]
        assert not first.done() and len(pending) == MAX_QUEUE
        assert server.stack.runner.queue_depth == MAX_QUEUE
        engine.gate.set()
        accepted = {asked[t]: await t for t in [first, *pending]}

    assert all(r.status_code == 503 for r in refused)
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
    assert all("busy" in r.json()["error"]["message"] for r in refused)
    assert [r.status_code for r in accepted.values()] == [200] * (MAX_QUEUE + 1)
    for question, response in accepted.items():
        assert response.json()["choices"][0]["message"]["content"] == f"answer to {question}"


async def test_telegram_burst_gets_the_busy_reply_beyond_max_queue(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = GatedEngine(reply=lambda h, m: ANSWER)
    chats = [ALICE + 1000 + i for i in range(BURST)]  # one message per chat: no per-user limit
    async with telegram_running(fake, tmp_path, engine) as h:
        h.stack.runner.max_queue = MAX_QUEUE
        await fake.push(h.text("what is on my receipt?"))
        await asyncio.wait_for(engine.entered.wait(), 10)
        for chat in chats:
            await fake.push(h.text(f"question from {chat}", chat=chat, user=chat))

        def busy(chat: int) -> bool:
            return any(t.startswith("I'm busy right now") for t in fake.texts(chat))

        def queued(chat: int) -> bool:
            return any(t.startswith("queued:") for t in fake.texts(chat))

        await fake.wait_for(lambda: sum(busy(c) or queued(c) for c in chats) == BURST)
        refused = [c for c in chats if busy(c)]
        waiting = [c for c in chats if queued(c)]
        assert len(refused) == BURST - MAX_QUEUE and len(waiting) == MAX_QUEUE
        assert not any(ANSWER in fake.texts(c) for c in [ALICE, *chats])  # nothing answered yet
        engine.gate.set()
        for chat in [ALICE, *waiting]:
            await h.wait_text(chat, ANSWER)
        await h.wait_done(MAX_QUEUE + 1)
    assert all(fake.texts(c) == [fake.texts(c)[0]] for c in refused)  # the busy reply, nothing else
    assert all(ANSWER not in fake.texts(c) for c in refused)
    assert len(engine.calls) == MAX_QUEUE + 1


async def test_telegram_queue_label_has_no_invented_estimate_before_a_job_was_timed(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    engine = GatedEngine(reply=lambda h, m: ANSWER)
    first, second, third, fourth = (ALICE + 2000 + i for i in range(4))
    async with telegram_running(fake, tmp_path, engine) as h:
        await fake.push(h.text("what is on my receipt?", chat=first, user=first))
        await asyncio.wait_for(engine.entered.wait(), 10)
        await fake.push(h.text("and mine?", chat=second, user=second))
        await h.wait_text(second, "queued: 1st in line")  # the place only: nothing timed yet
        engine.gate.set()
        await h.wait_text(second, ANSWER)
        await h.wait_done(2)

        engine.gate, engine.entered = asyncio.Event(), asyncio.Event()
        await fake.push(h.text("a third question", chat=third, user=third))
        await asyncio.wait_for(engine.entered.wait(), 10)
        await fake.push(h.text("a fourth one", chat=fourth, user=fourth))
        await fake.wait_for(lambda: any(t.startswith("queued:") for t in fake.texts(fourth)))
        label = next(t for t in fake.texts(fourth) if t.startswith("queued:"))
        engine.gate.set()
        await h.wait_done(4)
    measured = h.stack.runner.job_seconds()
    assert measured < 30  # the jobs' own time, not a 30 s guess per job
    assert label.startswith("queued: 1st in line, about ") and label.endswith(" s"), label
    seen = [t for c in (first, second) for m in fake.bot_messages(c) for t in m.edits]
    assert not any("about" in t for t in seen), seen
