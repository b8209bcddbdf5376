"""Load: 200 messages from 50 Telegram chats and 50 concurrent HTTP clients on the tiny model.
Every message is answered once, each chat's order is kept, chats get fair shares, RSS stays flat."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.intake import IntakeLimits
from engine.qwen.engine import QwenVLEngine
from tests.fake_telegram import FakeTelegram
from tests.hostile import jpeg, picture
from tests.http_helpers import data_url
from tests.http_helpers import running as http_running
from tests.telegram_harness import fake_server, running

__all__ = ["fake_server"]
pytestmark = pytest.mark.slow

CHATS = int(os.environ.get("LOAD_CHATS", "50"))
PER_CHAT = 4


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def engine(tiny_qwen3: Path) -> Iterator[QwenVLEngine]:
    qwen = QwenVLEngine(str(tiny_qwen3), dtype="float32", limits=IntakeLimits())
    asyncio.run(qwen.load())
    yield qwen


async def test_200_messages_from_50_chats(
    fake: FakeTelegram, tmp_path: Path, engine: QwenVLEngine
) -> None:
    photo = jpeg(picture((96, 64)))
    rss: list[float] = []
    async with running(fake, tmp_path, engine=engine, rate_limit_per_minute=100,  # type: ignore[arg-type]
                       adapter_kw={"edit_interval_s": 0.2}) as h:
        h.stack.runner.params = h.stack.runner.params.__class__(max_new_tokens=3)
        h.stack.runner.max_queue = CHATS * PER_CHAT  # the burst fits (VLBOT_MAX_QUEUE)
        for round_ in range(PER_CHAT):
            for chat in range(1, CHATS + 1):
                if round_ == 0:
                    update = h.photo(photo, f"q{round_} from {chat}", chat=chat, user=chat)
                else:
                    update = h.text(f"q{round_} from {chat}", chat=chat, user=chat)
                await fake.push(update)
            if round_ == PER_CHAT // 2:
                rss.append(rss_mb())
        await h.wait_done(CHATS * PER_CHAT, timeout=400)
        rss.append(rss_mb())
        await asyncio.sleep(0.5)  # a duplicate would arrive now
    db = sqlite3.connect(tmp_path / "vlbot.sqlite3")
    rows = db.execute("SELECT conversation, message, status, updated_at, seq FROM jobs").fetchall()
    assert len(rows) == CHATS * PER_CHAT and {r[2] for r in rows} == {"done"}
    by_chat: dict[str, list[tuple[int, float, str]]] = defaultdict(list)
    for conversation, message, _, updated, seq in rows:
        by_chat[conversation].append((seq, updated, message))
    finish_order = sorted((updated, conv) for conv, jobs in by_chat.items() for _, updated, _ in jobs)
    for conv, jobs in by_chat.items():
        jobs.sort()
        assert [u for _, u, _ in jobs] == sorted(u for _, u, _ in jobs), conv  # order kept
        assert all(f"q{i} from" in m for i, (_, _, m) in enumerate(jobs)), (conv, jobs)
        # fair share: a chat's i-th answer lands within the i-th round of answers (+ slack)
        for i, (_, updated, _) in enumerate(jobs):
            rank = finish_order.index((updated, conv))
            assert rank < (i + 1) * CHATS + 5, (conv, i, rank)
    for chat in range(1, CHATS + 1):  # one reply message per question, none duplicated
        shown = fake.texts(chat)
        assert len(shown) == PER_CHAT, (chat, shown)
    turns = db.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    assert turns == 2 * CHATS * PER_CHAT
    print(f"\nRSS after 100 messages {rss[0]:.0f} MB, after 200: {rss[1]:.0f} MB")
    assert rss[1] <= rss[0] * 1.05 + 20


async def test_50_concurrent_http_clients(tmp_path: Path, engine: QwenVLEngine) -> None:
    image = data_url(jpeg(picture((96, 64))), "image/jpeg")
    async with http_running(tmp_path, engine=engine, max_new_tokens=3,  # type: ignore[arg-type]
                            runner={"max_queue": 100}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            async def ask(i: int) -> httpx.Response:
                return await client.post("/v1/chat/completions", json={
                    "model": "m", "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": f"client {i}: what is this?"}]}]})

            replies = await asyncio.gather(*(ask(i) for i in range(50)))
    assert [r.status_code for r in replies] == [200] * 50
    assert all(r.json()["choices"][0]["message"]["content"] for r in replies)
    assert len({r.json()["id"] for r in replies}) == 50
