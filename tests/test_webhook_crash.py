"""SIGKILL the real `vlbot serve` with webhook events from real triage jobs pending, some
delivered, some in flight (the receiver has them, vlbot has no answer yet): after a restart the
receiver, which verifies signatures and de-duplicates by webhook-id, has every event exactly
once, and the in-flight ones were sent again under the same id."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fake_openai import FakeOpenAIServer
from tests.http_helpers import data_url, png
from tests.postgres_server import free_port
from tests.test_presets import GOOD
from tests.webhook_receiver import WebhookReceiver, new_secret

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRIAGES = 10
ANSWERED_BEFORE_KILL = 3


class TriageModel(FakeOpenAIServer):
    """A model server whose every answer is a valid triage result."""

    def answer(self, question: str) -> str:
        return GOOD["triage"]


class Serve:
    def __init__(self, data: Path, model: FakeOpenAIServer, receiver: WebhookReceiver, secret: str) -> None:
        self.data = data
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),  # this checkout's code, whatever the venv has installed
            "VLBOT_DATA_DIR": str(data),
            "VLBOT_ENGINE": "openai",
            "VLBOT_REMOTE__BASE_URL": model.base_url,
            "VLBOT_HTTP__ENABLED": "true",
            "VLBOT_HTTP__PORT": str(self.port),
            "VLBOT_WEBHOOKS__ENDPOINTS": json.dumps([{"url": receiver.url, "secret": secret}]),
            "VLBOT_WEBHOOKS__ALLOW_PRIVATE_HOSTS": '["127.0.0.1"]',
            "VLBOT_WEBHOOKS__TIMEOUT_S": "120",  # held requests stay in flight until the kill
            "VLBOT_WEBHOOKS__BACKOFF_S": "0.2",
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot.cli", "serve", env=self.env, cwd=self.data.parent,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        async with httpx.AsyncClient() as http:
            async def healthy() -> bool:
                assert self.process is not None and self.process.returncode is None
                try:
                    health = await http.get(f"http://127.0.0.1:{self.port}/health")
                except httpx.HTTPError:
                    return False
                return health.json().get("status") == "healthy"

            await until_async(healthy, 90)

    async def triage(self, http: httpx.AsyncClient, n: int) -> None:
        answer = await http.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", timeout=60, json={
            "model": "m", "preset": "triage", "conversation_id": "support-desk",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(png(color=(20 * n, 40, 90)))}},
                {"type": "text", "text": f"case {n}: what broke?"}]}]})
        assert answer.status_code == 200, answer.text

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def terminate(self) -> str:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), 30)
        assert self.process.returncode == 0, stderr.decode()[-2000:]
        return stderr.decode()


def outbox(db: Path, state: str | None = None) -> set[str]:
    """Event ids in the outbox (in `state`)."""
    with sqlite3.connect(db) as conn:
        sql, args = "SELECT event_id FROM outbox", ()
        if state is not None:
            sql, args = sql + " WHERE state = ?", (state,)
        return {r[0] for r in conn.execute(sql, args)}


async def until_async(check: Callable[[], object], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if asyncio.iscoroutine(done):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fail_first", [0, 3], ids=["receiver-up", "receiver-fails-3-first"])
async def test_sigkill_with_triage_events_pending_and_in_flight_then_restart_delivers_each_once(
    tmp_path: Path, fail_first: int
) -> None:
    """With `fail_first`=3 the receiver also answers each event's first 3 attempts 503 (before
    and after the kill, counted across both), as a ticket system that is down for a while."""
    secret = new_secret()
    data = tmp_path / "data"
    db = data / "vlbot.sqlite3"
    model = await TriageModel("triage-model").start()
    try:
        with WebhookReceiver(
            secret, fail_first=fail_first, hold_after=ANSWERED_BEFORE_KILL
        ) as receiver:
            first = Serve(data, model, receiver, secret)
            await first.start()
            try:
                async with httpx.AsyncClient() as http:
                    for n in range(TRIAGES):  # one conversation: its jobs run in order
                        await first.triage(http, n)
                # some events answered, then requests held: in flight at the kill
                await asyncio.to_thread(
                    receiver.wait_for, lambda: any(a.status == 0 for a in receiver.attempts), 60
                )
            finally:
                first.kill()
                await first.process.wait()  # type: ignore[union-attr]
            ids = outbox(db)
            assert len(ids) == TRIAGES  # one event per triage job, all in the outbox
            held = {a.event_id for a in receiver.attempts if a.status == 0}
            recorded = outbox(db, "delivered")  # answered and recorded before the kill
            assert len(recorded) <= ANSWERED_BEFORE_KILL and not recorded & held
            receiver.release()

            second = Serve(data, model, receiver, secret)
            await second.start()
            try:
                await until_async(lambda: outbox(db, "delivered") == ids, 120)
            finally:
                stderr = await second.terminate()
            assert secret not in stderr
    finally:
        await model.stop()

    assert all(a.verified for a in receiver.attempts)
    assert receiver.seen_ids == ids  # every event at least once: none lost
    # each processed once (de-duplicated by webhook-id): the same error, counted 1 to 10
    assert sorted(body["data"]["count"] for body in receiver.processed) == list(range(1, TRIAGES + 1))
    assert len({body["data"]["group_id"] for body in receiver.processed}) == 1
    failed = [503] * fail_first

    def after_failures(event_id: str) -> list[int]:
        """The event's answers after its first `fail_first`, which must all be 503."""
        statuses = [a.status for a in receiver.attempts_of(event_id)]
        assert statuses[:fail_first] == failed, statuses
        return statuses[fail_first:]

    assert held  # the in-flight ones came again after the restart, under the same id
    for event_id in held:
        assert after_failures(event_id) == [0, 200]
    for event_id in recorded:  # what vlbot had recorded as delivered is not sent again
        assert after_failures(event_id) == [200]
    for event_id in ids - recorded - held:  # the rest: once, or again if answered just
        statuses = after_failures(event_id)  # before the kill
        assert statuses in ([200], [200, 200]), statuses
