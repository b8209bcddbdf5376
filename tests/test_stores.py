"""Jobs, seen events and pending updates on both backends (SQLite file, real Postgres): what the
runner and the adapters rely on, including two processes' connections racing for one event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.db import Database, DataDirError
from bot.history import HistoryStore
from bot.jobs import JobStore, new_job_id
from bot.models import ConversationId, ImagePart, Job, JobStatus, Message, User
from bot.pending import PendingUpdates
from bot.settings import Settings

CHAT = ConversationId("telegram", "42")
PHOTO = ImagePart(b"\x89PNG a chart", "image/png", "chart.png")


def job(text: str, *images: ImagePart, origin: dict[str, object] | None = None) -> Job:
    return Job(
        id=new_job_id(),
        conversation=CHAT,
        message=Message.of(text, *images),
        user=User(platform_id="7", display_name="Ann", language_code="en"),
        origin=dict(origin or {}),
    )


@pytest.fixture
async def db(database_target: Path | str) -> AsyncIterator[Database]:
    database = await Database.open(database_target)
    yield database
    await database.close()


async def test_a_job_round_trips_and_completes_into_history(db: Database) -> None:
    history = HistoryStore(db)
    jobs = JobStore(db, history)
    first = job("what does the chart show?", PHOTO, origin={"message_id": 10})
    second = job("and the trend?", origin={"message_id": 12})
    assert await jobs.insert(first, "telegram:update:1")
    assert await jobs.insert(second, "telegram:update:2")
    assert [j.id for j in await jobs.unfinished()] == [first.id, second.id]  # in arrival order
    stored = await jobs.get(first.id)
    assert stored is not None and stored.message.images[0].data == PHOTO.data
    assert stored.user == first.user and stored.origin == {"message_id": 10}

    answered = await jobs.update(stored, status=JobStatus.ANSWERED, answer="sales rise",
                                 origin={"message_id": 10, "placeholder_id": 11})
    await jobs.complete(answered)
    await jobs.finish(second, JobStatus.FAILED, "engine down")
    assert await jobs.counts() == {"done": 1, "failed": 1}
    turns = await history.recent(CHAT)
    assert [t.text for t in turns] == ["what does the chart show?", "sales rise"]
    assert turns[0].images[0].data == PHOTO.data
    # a reply to the bot's answer (placeholder 11) or the question (10) finds the chart again
    for ref in (10, 11):
        assert [i.data for i in await jobs.images_for_reply(CHAT, ref)] == [PHOTO.data]
    assert await jobs.images_for_reply(CHAT, 999) == []


async def test_reply_lookup_by_answer_and_album_message_ids(db: Database) -> None:
    jobs = JobStore(db, HistoryStore(db))
    album = job("compare", PHOTO, origin={"message_ids": ["m1", "m2"], "answer_ids": [30, 31]})
    await jobs.insert(album)
    assert [i.data for i in await jobs.images_for_reply(CHAT, "m2")] == [PHOTO.data]
    assert [i.data for i in await jobs.images_for_reply(CHAT, 31)] == [PHOTO.data]
    assert await jobs.images_for_reply(CHAT, 32) == []


async def test_an_event_seen_before_writes_no_second_job(db: Database) -> None:
    jobs = JobStore(db, HistoryStore(db))
    assert await jobs.insert(job("hi"), "slack:Ev1")
    assert not await jobs.insert(job("hi again"), "slack:Ev1")
    assert len(await jobs.unfinished()) == 1


async def test_two_processes_racing_for_one_event_make_one_job(database_target: Path | str) -> None:
    """Two replicas receive the same redelivered event at once: the unique key lets one win."""
    first, second = await Database.open(database_target), await Database.open(database_target)
    try:
        stores = [JobStore(d, HistoryStore(d)) for d in (first, second)]
        for n in range(10):
            results = await asyncio.gather(
                *(stores[i % 2].insert(job(f"q{n}"), f"slack:Ev-race-{n}") for i in range(6))
            )
            assert sorted(results) == [False] * 5 + [True], n
        assert len(await stores[0].unfinished()) == 10
    finally:
        await first.close()
        await second.close()


async def test_pending_updates_of_a_live_replica_are_not_replayed_by_another(db: Database) -> None:
    mine = PendingUpdates(db, "telegram", owner="replica-a")
    theirs = PendingUpdates(db, "telegram", owner="replica-b")
    await mine.add("100", {"update_id": 100, "text": "bonjour \ud83d"})  # a lone surrogate stored
    await mine.add("100", {"update_id": 100})  # a second add is a no-op
    await theirs.add("99", {"update_id": 99})
    async with db.transaction() as tx:  # replica-b is alive (its heartbeat, bot/pgqueue.py)
        await tx.execute("INSERT INTO replicas (id, alive_until) VALUES (?, ?)",
                         ("replica-b", time.time() + 60))
    assert [u["update_id"] for u in await mine.all()] == [100]
    assert (await mine.all())[0]["text"] == "bonjour \ud83d"
    async with db.transaction() as tx:  # replica-b died: its update is replayed by the others
        await tx.execute("UPDATE replicas SET alive_until = ? WHERE id = ?", (time.time() - 1, "replica-b"))
    assert sorted(u["update_id"] for u in await mine.all()) == [99, 100]
    await mine.remove(["100", "99"])
    assert await mine.all() == []


async def test_images_of_one_owner_are_not_served_to_another(db: Database) -> None:
    history = HistoryStore(db)
    jobs = JobStore(db, history)
    answered = await jobs.update(job("q", PHOTO), status=JobStatus.ANSWERED, answer="a")
    await jobs.insert(answered)
    await jobs.complete(answered)
    assert await history.image_in(PHOTO.sha256, "telegram:42") == PHOTO.data
    assert await history.image_in(PHOTO.sha256, "telegram:43") is None
    assert await history.image_in(PHOTO.sha256, "slack:") is None


async def test_a_wrong_database_url_is_a_clear_error_without_the_password() -> None:
    from tests.postgres_server import free_port

    url = f"postgresql://vlbot:hunter2@127.0.0.1:{free_port()}/vlbot"
    with pytest.raises(DataDirError) as caught:
        await Database.open(url)
    message = str(caught.value)
    assert "VLBOT_DATABASE_URL" in message and "127.0.0.1" in message
    assert "hunter2" not in message


def test_the_database_setting_switches_backends(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VLBOT_DATA_DIR", str(tmp_path))
    assert Settings(_env_file=None).database == tmp_path / "vlbot.sqlite3"  # type: ignore[call-arg]
    monkeypatch.setenv("VLBOT_DATABASE_URL", "postgresql://bot@db/vlbot")
    assert Settings(_env_file=None).database == "postgresql://bot@db/vlbot"  # type: ignore[call-arg]
