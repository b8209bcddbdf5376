"""The job queue replicas share on Postgres (bot/pgqueue.py), with two queues on two connection
pools standing for two replicas: round robin across conversations, one conversation's jobs in
order and one at a time, a dead replica's job taken over after its lease, HTTP jobs pinned to
the replica holding the client, and two runners answering every job once."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from bot.db import Database
from bot.history import HistoryStore
from bot.jobs import JobStore, new_job_id
from bot.models import ConversationId, Job, JobStatus, Message, User
from bot.pgqueue import SharedJobQueue
from bot.runner import Runner
from tests.fakes import RecordingAdapter, ScriptedEngine, incoming


@dataclass
class Replica:
    db: Database
    jobs: JobStore
    queue: SharedJobQueue


@pytest.fixture
async def replicas(postgres_url: str) -> AsyncIterator[list[Replica]]:
    made = []
    for name in ("replica-a", "replica-b"):
        db = await Database.open(postgres_url)
        jobs = JobStore(db, HistoryStore(db))
        made.append(Replica(db, jobs, SharedJobQueue(db, jobs, lease_s=30, replica_id=name)))
    yield made
    for replica in made:
        await replica.queue.stop()
        await replica.db.close()


async def add(replica: Replica, chat: str, text: str, pinned_to: str | None = None) -> Job:
    new = Job(id=new_job_id(), conversation=ConversationId("test", chat), message=Message.of(text),
              user=User(platform_id="u"))
    assert await replica.jobs.insert(new, pinned_to=pinned_to)
    return new


async def finish(replica: Replica, claimed: Job) -> None:
    await replica.jobs.finish(claimed, JobStatus.FAILED, "test")  # any end frees the conversation


async def test_conversations_take_turns_and_each_runs_in_order(replicas: list[Replica]) -> None:
    a, b = replicas
    for text in ("a1", "a2", "a3"):
        await add(a, "A", text)
    await add(a, "B", "b1")
    await add(b, "C", "c1")
    order = []
    for replica in (a, b, a, b, a):
        claimed = await replica.queue.claim()
        assert claimed is not None
        order.append(claimed.message.text)
        await finish(replica, claimed)
    assert order == ["a1", "b1", "c1", "a2", "a3"]  # a chatty conversation does not starve others
    assert await a.queue.claim() is None


async def test_a_busy_conversation_is_not_claimed_by_the_other_replica(replicas: list[Replica]) -> None:
    a, b = replicas
    await add(a, "A", "first")
    await add(a, "A", "second")
    running = await a.queue.claim()
    assert running is not None and running.message.text == "first"
    assert await b.queue.claim() is None  # "second" waits until "first" has ended
    await finish(a, running)
    after = await b.queue.claim()
    assert after is not None and after.message.text == "second"


async def test_a_dead_replicas_job_is_taken_over_after_its_lease(replicas: list[Replica]) -> None:
    a, b = replicas
    a.queue.lease_s = 0.5  # replica a claims, then dies (no heartbeat renews the lease)
    await add(a, "A", "question")
    taken = await a.queue.claim()
    assert taken is not None
    assert await b.queue.claim() is None  # the lease still runs
    await asyncio.sleep(0.6)
    again = await b.queue.claim()
    assert again is not None and again.id == taken.id
    assert b.queue.takeovers == 1


async def test_the_heartbeat_keeps_a_long_job_leased(replicas: list[Replica]) -> None:
    a, b = replicas
    a.queue.lease_s = 0.6
    await a.queue.start()  # renews every lease_s / 3
    await add(a, "A", "a long answer")
    assert await a.queue.claim() is not None
    await asyncio.sleep(1.5)
    assert await b.queue.claim() is None


async def test_a_pinned_job_waits_for_its_replica_while_that_one_lives(replicas: list[Replica]) -> None:
    a, b = replicas
    await a.queue.start()  # a is alive (its heartbeat row)
    await add(a, "web", "streamed to a client on a", pinned_to="replica-a")
    assert await b.queue.claim() is None
    await a.queue.stop()  # a leaves (or its heartbeat lapses): b may run it
    claimed = await b.queue.claim()
    assert claimed is not None and claimed.message.text == "streamed to a client on a"


async def test_racing_claims_never_run_a_conversation_twice_at_once(replicas: list[Replica]) -> None:
    a, b = replicas
    expected: dict[str, list[str]] = {}
    for n in range(40):
        chat = f"c{n % 8}"
        await add(a if n % 2 else b, chat, f"{chat}-{n}")
        expected.setdefault(chat, []).append(f"{chat}-{n}")
    ran: dict[str, list[str]] = {}
    running: set[str] = set()

    async def worker(replica: Replica) -> None:
        idle = 0
        while idle < 5:
            claimed = await replica.queue.claim()
            if claimed is None:
                idle += 1
                await asyncio.sleep(0.02)
                continue
            idle = 0
            chat = claimed.conversation.chat
            assert chat not in running, f"{chat} claimed while running"
            running.add(chat)
            ran.setdefault(chat, []).append(claimed.message.text)
            await asyncio.sleep(random.uniform(0, 0.01))
            running.discard(chat)
            await finish(replica, claimed)

    await asyncio.gather(*(worker(r) for r in (a, b, a, b)))
    assert ran == expected  # every job once, each chat in order


async def test_two_runners_answer_every_job_once_in_order(replicas: list[Replica]) -> None:
    adapters = [RecordingAdapter(), RecordingAdapter()]
    runners = []
    for replica, adapter in zip(replicas, adapters, strict=True):
        runner = Runner(replica.jobs, replica.jobs.history, ScriptedEngine(delay_s=0.001),
                        max_concurrency=2, queue=replica.queue)
        runner.attach({"test": adapter})
        await runner.start()
        runners.append(runner)
    try:
        started = time.monotonic()
        for n in range(30):
            await runners[n % 2].submit(incoming(f"chat{n % 6}", f"q{n}"))
        while sum(len(ad.finals()) for ad in adapters) < 30 and time.monotonic() - started < 60:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # answers come to either adapter
    finally:
        for runner in runners:
            await runner.stop(grace_s=1)
    finals = [s for ad in adapters for s in ad.finals()]
    assert len(finals) == 30 and len({s.job_id for s in finals}) == 30
    assert {ad_index for ad_index, ad in enumerate(adapters) if ad.finals()} == {0, 1}
    counts = await replicas[0].jobs.counts()
    assert counts == {"done": 30}
    history = replicas[0].jobs.history
    for chat in range(6):
        turns = await history.recent(ConversationId("test", f"chat{chat}"), limit=100)
        questions = [t.text for t in turns if t.role.value == "user"]
        assert questions == [f"q{n}" for n in range(chat, 30, 6)]
