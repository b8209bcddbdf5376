"""A task cancelled in the middle of a database transaction leaves the shared connection usable.

The bot cancels tasks routinely (a /reset or /cancel stops a running job, a client disconnects).
aiosqlite runs each statement on its own thread whether or not the awaiting task is still there,
so a cancellation that lands while BEGIN, a write or COMMIT is pending must still end the
transaction; otherwise every later write fails with "cannot start a transaction within a
transaction" (seen in CI: a Slack /vlbot reset right after an answer was being stored).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.db import Database


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await Database.open(tmp_path / "vlbot.sqlite3")
    await database.conn.execute("CREATE TABLE notes (text TEXT NOT NULL)")
    yield database
    await database.close()


async def notes(db: Database) -> list[str]:
    return [row["text"] for row in await db.fetchall("SELECT text FROM notes ORDER BY rowid")]


async def write(db: Database, *texts: str) -> None:
    async with db.transaction() as conn:
        for text in texts:
            await conn.execute("INSERT INTO notes (text) VALUES (?)", (text,))


@pytest.mark.parametrize("steps", [0, 1, 2, 3])  # yields before the cancel: BEGIN, inserts, COMMIT
async def test_a_cancelled_transaction_is_all_or_nothing_and_the_next_one_works(
    db: Database, steps: int
) -> None:
    task = asyncio.create_task(write(db, "first", "second"))
    for _ in range(steps + 1):
        await asyncio.sleep(0)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert await notes(db) in ([], ["first", "second"])  # never half of it
    await write(db, "after")
    assert (await notes(db))[-1] == "after"
    assert not db.conn.in_transaction
