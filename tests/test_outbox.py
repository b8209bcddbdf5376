"""The outbox store on both backends: one row per event and endpoint, an id stored once, claims
leased (a row is never handed to two claimers at once, also across connections on Postgres),
retries and dead letters, leases dropped at a SQLite restart, delivered rows pruned."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.db import Database
from bot.outbox import PRESET_EVENT, TRIAGE_EVENT, Outbox

A, B = "https://hooks.example/a", "https://hooks.example/b"


@pytest.fixture
async def db(database_target: Path | str) -> AsyncIterator[Database]:
    database = await Database.open(database_target)
    yield database
    await database.close()


async def test_one_row_per_endpoint_and_an_event_id_stored_once(db: Database) -> None:
    outbox = Outbox(db, [A, B])
    first = await outbox.enqueue(TRIAGE_EVENT, {"severity": "major"})
    again = await outbox.enqueue(TRIAGE_EVENT, {"severity": "major"}, event_id=first)
    assert again == first
    other = await outbox.enqueue(TRIAGE_EVENT, {"severity": "minor"})
    assert other != first
    assert await outbox.counts() == {"pending": 4, "delivered": 0, "dead": 0}
    claimed = await outbox.claim(10, lease_s=60)
    assert sorted((e.event_id, e.endpoint) for e in claimed) == sorted(
        [(first, A), (first, B), (other, A), (other, B)]
    )
    by_id = {e.event_id: e for e in claimed}
    assert by_id[first].payload == {"severity": "major"} and by_id[first].attempts == 0


async def test_unsubscribed_types_and_no_endpoints_store_nothing(db: Database) -> None:
    triage_only = Outbox(db, [A], event_types=[TRIAGE_EVENT])
    event_id = await triage_only.enqueue(PRESET_EVENT, {"preset": "ocr"})
    assert event_id.startswith("evt_")
    await Outbox(db, []).enqueue(TRIAGE_EVENT, {"x": 1})
    assert await triage_only.counts() == {"pending": 0, "delivered": 0, "dead": 0}


async def test_a_claimed_row_is_not_claimed_again_until_its_lease_runs_out(db: Database) -> None:
    outbox = Outbox(db, [A])
    await outbox.enqueue(TRIAGE_EVENT, {"n": 1})
    assert len(await outbox.claim(10, lease_s=0.3)) == 1
    assert await outbox.claim(10, lease_s=60) == []  # in flight elsewhere
    await asyncio.sleep(0.35)
    taken_over = await outbox.claim(10, lease_s=60)  # its deliverer died: another takes it
    assert len(taken_over) == 1


async def test_failure_schedules_a_retry_then_dead_letters(db: Database) -> None:
    outbox = Outbox(db, [A])
    event_id = await outbox.enqueue(TRIAGE_EVENT, {"n": 1})
    (event,) = await outbox.claim(10, lease_s=60)
    await outbox.failed(event, "HTTP 503", retry_at=time.time() + 3600)
    assert await outbox.claim(10, lease_s=60) == []  # not due yet
    assert (await outbox.counts())["pending"] == 1
    await outbox.failed(event, "HTTP 503", retry_at=time.time() - 1)  # (a second attempt, due)
    (retry,) = await outbox.claim(10, lease_s=60)
    assert retry.attempts == 2
    await outbox.failed(retry, "HTTP 500: " + "x" * 2000, retry_at=None)
    assert await outbox.counts() == {"pending": 0, "delivered": 0, "dead": 1}
    (dead,) = await outbox.dead_letters()
    assert dead["event_id"] == event_id and dead["endpoint"] == A and dead["attempts"] == 3
    assert dead["last_error"].startswith("HTTP 500") and len(dead["last_error"]) == 500
    assert await outbox.claim(10, lease_s=60) == []


async def test_delivered_is_final_and_pruned_later(db: Database) -> None:
    outbox = Outbox(db, [A, B])
    await outbox.enqueue(TRIAGE_EVENT, {"n": 1})
    to_a, to_b = sorted(await outbox.claim(10, lease_s=60), key=lambda e: e.endpoint)
    await outbox.delivered(to_a)
    await outbox.failed(to_b, "HTTP 410", retry_at=None)
    await outbox.failed(to_a, "late", retry_at=time.time())  # a late report changes nothing
    assert await outbox.counts() == {"pending": 0, "delivered": 1, "dead": 1}
    assert await outbox.prune(older_than_s=3600) == 0
    assert await outbox.prune(older_than_s=-1) == 1  # delivered ones go, dead ones stay
    assert await outbox.counts() == {"pending": 0, "delivered": 0, "dead": 1}


async def test_pending_rows_and_their_leases_survive_a_reopen(database_target: Path | str) -> None:
    db = await Database.open(database_target)
    outbox = Outbox(db, [A])
    ids = {await outbox.enqueue(TRIAGE_EVENT, {"n": n}) for n in range(3)}
    assert len(await outbox.claim(1, lease_s=3600)) == 1  # then the process dies
    await db.close()
    db = await Database.open(database_target)
    try:
        outbox = Outbox(db, [A])
        assert len(await outbox.claim(10, lease_s=60)) == 2  # the leased one waits ...
        assert await outbox.release_leases() == 3  # ... until a SQLite restart drops leases
        resumed = await outbox.claim(10, lease_s=60)
        assert {e.event_id for e in resumed} == ids
    finally:
        await db.close()


async def test_concurrent_claimers_never_share_a_row(database_target: Path | str) -> None:
    """Several claimers at once (on Postgres each its own connection, as replicas are): every
    row is handed out exactly once."""
    dbs = [await Database.open(database_target) for _ in range(3 if isinstance(database_target, str) else 1)]
    try:
        outbox = Outbox(dbs[0], [A, B])
        for n in range(40):
            await outbox.enqueue(TRIAGE_EVENT, {"n": n})
        claimers = [Outbox(dbs[i % len(dbs)], [A, B]) for i in range(6)]

        async def drain(o: Outbox) -> list[tuple[str, str]]:
            got: list[tuple[str, str]] = []
            while batch := await o.claim(3, lease_s=600):
                got += [(e.event_id, e.endpoint) for e in batch]
                await asyncio.sleep(0)
            return got

        results = await asyncio.gather(*(drain(o) for o in claimers))
        everything = [row for got in results for row in got]
        assert len(everything) == 80 and len(set(everything)) == 80
    finally:
        for d in dbs:
            await d.close()
