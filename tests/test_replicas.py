"""Two real `vlbot serve` replicas (Telegram webhook mode, the tiny model) on one real Postgres:
200 messages from 50 chats, delivered to both replicas as a load balancer would; one replica is
SIGKILLed midway and restarted. Every message is answered once, each chat's turns in order,
nothing lost; a job the killed replica held is taken over by the other after its lease."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.fake_telegram import TOKEN, FakeTelegram
from tests.postgres_server import free_port
from tests.telegram_harness import Harness, fake_server

__all__ = ["fake_server"]

pytestmark = pytest.mark.slow

CHATS = 50
PER_CHAT = 4
SECRET = "replica-webhook-secret"
LEASE_S = 3


class Replica:
    def __init__(self, name: str, fake: FakeTelegram, model: Path, root: Path, url: str) -> None:
        self.name = name
        self.port = free_port()
        self.data = root / name
        self.log = root / f"{name}.log"
        self.env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "VLBOT_MODEL": str(model),
            "VLBOT_DATA_DIR": str(self.data),
            "VLBOT_DATABASE_URL": url,
            "VLBOT_JOB_LEASE_S": str(LEASE_S),
            "VLBOT_THREADS": "1",
            "VLBOT_MAX_CONCURRENCY": "2",
            "VLBOT_MAX_NEW_TOKENS": "6",
            "VLBOT_MAX_QUEUE": "1000",
            "VLBOT_TELEGRAM__TOKEN": TOKEN,
            "VLBOT_TELEGRAM__BASE_URL": fake.base_url,
            "VLBOT_TELEGRAM__BASE_FILE_URL": fake.base_file_url,
            "VLBOT_TELEGRAM__MODE": "webhook",
            "VLBOT_TELEGRAM__WEBHOOK_URL": f"http://127.0.0.1:{self.port}/tg",
            "VLBOT_TELEGRAM__WEBHOOK_SECRET": SECRET,
            "VLBOT_TELEGRAM__WEBHOOK_PORT": str(self.port),
            "VLBOT_TELEGRAM__RATE_LIMIT_PER_MINUTE": "1000",
        }
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot.cli", "serve", env=self.env, cwd=self.data.parent,
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def terminate(self) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)


async def post_update(http: aiohttp.ClientSession, replica: Replica, update: dict[str, Any]) -> bool:
    """Telegram's webhook POST; True once the replica acknowledged it (HTTP 200)."""
    if not replica.alive:
        return False
    try:
        async with http.post(f"http://127.0.0.1:{replica.port}/tg", json=update,
                             headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def wait_ready(replica: Replica, timeout: float = 120) -> None:
    """Until the replica's webhook answers (a POST without the secret: 403)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert replica.alive, replica.log.read_text()[-3000:]
            try:
                async with http.post(f"http://127.0.0.1:{replica.port}/tg", json={}) as response:
                    if response.status == 403:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, replica.log.read_text()[-3000:]
            await asyncio.sleep(0.2)


async def statuses(url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {status: n for status, n in await cur.fetchall()}


async def test_two_replicas_one_killed_midway_answer_every_message_once_in_order(
    fake: FakeTelegram, tiny_qwen3: Path, tmp_path: Path, postgres_url: str
) -> None:
    helper = Harness(fake, None, None)  # type: ignore[arg-type]  # only its update builders
    replicas = [Replica(n, fake, tiny_qwen3, tmp_path, postgres_url) for n in ("a", "b")]
    for replica in replicas:
        await replica.start()
    for replica in replicas:
        await wait_ready(replica)
    sent: dict[int, list[str]] = {}
    started = time.monotonic()
    killed_at = restarted_at = 0.0

    async def chat(http: aiohttp.ClientSession, index: int) -> None:
        chat_id = 5000 + index
        for turn in range(PER_CHAT):
            text = f"chat {index} question {turn}"
            update = helper.text(text, chat=chat_id, user=chat_id)
            await fake.push(update)  # Telegram's record of the message (ids, reply targets)
            attempt = index + turn  # a chat's turns land on both replicas
            while not await post_update(http, replicas[attempt % 2], update):
                attempt += 1  # not acknowledged: Telegram delivers it again (the proxy: elsewhere)
                await asyncio.sleep(0.2)
            sent.setdefault(chat_id, []).append(text)
            await asyncio.sleep(0.05 * (index % 5))

    async def kill_midway() -> None:
        nonlocal killed_at, restarted_at
        while (await statuses(postgres_url)).get("done", 0) < CHATS * PER_CHAT // 3:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        replicas[0].kill()
        killed_at = time.monotonic()
        await replicas[0].process.wait()  # type: ignore[union-attr]
        await asyncio.sleep(LEASE_S + 1)  # then back, as a supervisor would restart it
        await replicas[0].start()
        restarted_at = time.monotonic()

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            await asyncio.wait_for(asyncio.gather(kill_midway(), *(chat(http, i) for i in range(CHATS))), 600)
        deadline = time.monotonic() + 300
        while (await statuses(postgres_url)) != {"done": CHATS * PER_CHAT}:
            assert time.monotonic() < deadline, await statuses(postgres_url)
            assert any(r.alive for r in replicas), "both replicas died"
            await asyncio.sleep(0.3)
        finished = time.monotonic()
        await asyncio.sleep(2.0)  # anything duplicated would show up now
    finally:
        codes = [await replica.terminate() for replica in replicas]
        for replica in replicas:
            if replica.alive:
                replica.kill()
    assert codes == [0, 0], [r.log.read_text()[-3000:] for r in replicas]

    assert sum(len(v) for v in sent.values()) == CHATS * PER_CHAT
    answers = 0
    for chat_id, questions in sent.items():
        shown = fake.bot_messages(chat_id)
        assert len(shown) == len(questions), (chat_id, [m.text for m in shown])  # one reply each
        assert all(m.text and not m.text.startswith(("thinking", "queued")) for m in shown)
        answers += len(shown)
    assert answers == CHATS * PER_CHAT
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cur = await conn.execute(
            "SELECT conversation, parts FROM turns WHERE role = 'user' ORDER BY id")
        asked: dict[str, list[str]] = {}
        for conversation, parts in await cur.fetchall():
            asked.setdefault(conversation.split(":")[1], []).append(parts)
    logs = "".join(r.log.read_text() for r in replicas)
    for chat_id, questions in sent.items():  # history in the order the chat asked
        recorded = asked[str(chat_id)]
        about = [line for line in logs.splitlines() if f":{chat_id} " in line or "serving" in line]
        assert [next(q for q in questions if q in p) for p in recorded] == questions, about

    takeovers = logs.count("taken over from replica")
    print(
        f"\nreplicas: {answers} answers to {CHATS * PER_CHAT} messages from {CHATS} chats in"
        f" {finished - started:.1f} s; replica a SIGKILLed at {killed_at - started:.1f} s,"
        f" restarted at {restarted_at - started:.1f} s; {takeovers} jobs taken over after the lease"
    )
