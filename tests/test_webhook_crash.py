"""SIGKILL the real `vlbot serve` with webhook events pending, some delivered, some in flight
(the receiver has them but vlbot has no answer yet): after a restart the receiver, which
verifies signatures and de-duplicates by webhook-id, has every event exactly once, and the
in-flight ones were sent again under the same id."""

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

import pytest

from bot.db import Database
from bot.outbox import TRIAGE_EVENT, Outbox
from tests.webhook_receiver import WebhookReceiver, new_secret

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 24
ANSWERED_BEFORE_KILL = 5


async def start_serve(data: Path, receiver: WebhookReceiver, secret: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's code, whatever the venv has installed
        "HF_HUB_OFFLINE": "1",
        "VLBOT_DATA_DIR": str(data),
        "VLBOT_ENGINE": "openai",  # no model to load: the outbox is what is under test
        "VLBOT_REMOTE__BASE_URL": "http://127.0.0.1:9/v1",
        "VLBOT_HTTP__ENABLED": "true",
        "VLBOT_HTTP__PORT": "0",
        "VLBOT_WEBHOOKS__ENDPOINTS": json.dumps([{"url": receiver.url, "secret": secret}]),
        "VLBOT_WEBHOOKS__ALLOW_PRIVATE_HOSTS": '["127.0.0.1"]',
        "VLBOT_WEBHOOKS__TIMEOUT_S": "120",  # held requests stay in flight until the kill
        "VLBOT_WEBHOOKS__BACKOFF_S": "0.2",
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "serve", env=env, cwd=data.parent,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )


def outbox_states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())


def delivered_ids(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT event_id FROM outbox WHERE state = 'delivered'")}


async def until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def enqueue_events(db_path: Path, url: str) -> list[str]:
    """Events as the triage workflow leaves them: rows in the outbox of vlbot's database."""
    db = await Database.open(db_path)
    try:
        outbox = Outbox(db, [url])
        return [
            await outbox.enqueue(TRIAGE_EVENT, {"error_message": f"Error {n}: card declined", "n": n})
            for n in range(EVENTS)
        ]
    finally:
        await db.close()


async def test_sigkill_with_events_pending_and_in_flight_then_restart_delivers_each_once(
    tmp_path: Path,
) -> None:
    secret = new_secret()
    data = tmp_path / "data"
    db = data / "vlbot.sqlite3"
    with WebhookReceiver(secret, hold_after=ANSWERED_BEFORE_KILL) as receiver:
        ids = await enqueue_events(db, receiver.url)
        first = await start_serve(data, receiver, secret)
        try:  # some answered, then requests held: in flight at the kill
            await asyncio.to_thread(
                receiver.wait_for, lambda: any(a.status == 0 for a in receiver.attempts), 90
            )
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        held = {a.event_id for a in receiver.attempts if a.status == 0}
        recorded = delivered_ids(db)  # answered and recorded before the kill
        assert len(recorded) <= ANSWERED_BEFORE_KILL and not recorded & held
        assert outbox_states(db).get("pending", 0) == EVENTS - len(recorded)
        receiver.release()

        second = await start_serve(data, receiver, secret)
        try:
            await until(lambda: outbox_states(db) == {"delivered": EVENTS}, 120)
        finally:
            second.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 0, stderr.decode()[-2000:]
        assert secret not in stderr.decode()

    assert all(a.verified for a in receiver.attempts)
    assert receiver.seen_ids == set(ids)  # every event at least once: none lost
    processed = [body["data"]["n"] for body in receiver.processed]
    assert sorted(processed) == list(range(EVENTS))  # and each processed once, by webhook-id
    assert held  # the in-flight ones came again after the restart, under the same id
    for event_id in held:
        assert [a.status for a in receiver.attempts_of(event_id)] == [0, 200]
    for event_id in recorded:  # what vlbot had recorded as delivered is not sent again
        assert [a.status for a in receiver.attempts_of(event_id)] == [200]
    for event_id in set(ids) - recorded - held:  # the rest: once, or again if answered just
        statuses = [a.status for a in receiver.attempts_of(event_id)]  # before the kill
        assert statuses in ([200], [200, 200]), statuses
