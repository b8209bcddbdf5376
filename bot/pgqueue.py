"""The job queue shared by replicas on Postgres: the jobs table, claimed under leases.

Claim: one statement picks the job to start with `FOR UPDATE SKIP LOCKED` (two replicas never
take the same row, and neither waits for the other), marks it running and leases it to this
replica for `lease_s`. A job is eligible when
- it is queued, or running/answered under a lease that expired (its replica died: take over;
  an answered job is delivered, not generated again); a new job is held (leased) by the replica
  that accepted it until its acknowledgement (the placeholder) is sent and recorded,
- no earlier unfinished job of its conversation exists (turns in order, one at a time),
- it is not pinned to another live replica (an HTTP client waits for it there).
Fairness: conversations take turns as in bot/fairqueue.py: the next job is the oldest one of the
conversation that has waited longest since it was last served (`queue_turns`).

A heartbeat renews this replica's row in `replicas` and the leases of the jobs it holds every
lease_s / 3, so a job that runs longer than the lease keeps it. Idle workers poll (`poll_s`);
a submit on this replica wakes its own workers at once.

Not a library (procrastinate, pgqueuer …): they run a function per job, but the runner needs its
own round robin across conversations, per-conversation order and streaming from the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

from bot.db import Database, Row
from bot.jobqueue import REPLICA_ID
from bot.jobs import JobStore
from bot.models import Job
from bot.tasks import cancel_and_wait

log = logging.getLogger("vlbot.queue")

LIVE = "('running', 'answered')"
UNFINISHED = "('queued', 'running', 'answered')"

CLAIM = f"""
WITH candidate AS (
    SELECT j.id, j.lease_owner AS previous_owner FROM jobs j
    LEFT JOIN queue_turns q ON q.conversation = j.conversation
    WHERE j.status IN {UNFINISHED} AND COALESCE(j.lease_until, 0) < ?
      AND (j.pinned_to IS NULL OR j.pinned_to = ? OR NOT EXISTS (
            SELECT 1 FROM replicas r WHERE r.id = j.pinned_to AND r.alive_until >= ?))
      AND NOT EXISTS (SELECT 1 FROM jobs b WHERE b.conversation = j.conversation
            AND b.id <> j.id AND b.status IN {LIVE} AND b.lease_until >= ?)
      AND NOT EXISTS (SELECT 1 FROM jobs e WHERE e.conversation = j.conversation
            AND e.seq < j.seq AND e.status IN {UNFINISHED})
    ORDER BY GREATEST(COALESCE(q.served_at, 0), j.created_at), j.seq
    LIMIT 1
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE jobs SET lease_owner = ?, lease_until = ?,
    status = CASE WHEN jobs.status = 'answered' THEN 'answered' ELSE 'running' END
FROM candidate WHERE jobs.id = candidate.id
RETURNING jobs.*, candidate.previous_owner
"""

WAITING = """
SELECT j.id, j.conversation FROM jobs j LEFT JOIN queue_turns q ON q.conversation = j.conversation
WHERE j.status = 'queued' ORDER BY GREATEST(COALESCE(q.served_at, 0), j.created_at), j.seq
"""


def round_robin(rows: list[Row]) -> list[str]:
    """Job ids in start order: conversations (first seen first) take one job each in turn."""
    per: dict[str, deque[str]] = {}
    for row in rows:
        per.setdefault(row["conversation"], deque()).append(row["id"])
    ring = deque(per)
    order: list[str] = []
    while ring:
        key = ring.popleft()
        order.append(per[key].popleft())
        if per[key]:
            ring.append(key)
    return order


class SharedJobQueue:
    shared = True

    def __init__(
        self,
        db: Database,
        jobs: JobStore,
        lease_s: float = 30.0,
        poll_s: float = 0.5,
        replica_id: str = REPLICA_ID,
    ) -> None:
        if db.dialect != "postgres":
            raise ValueError("the shared job queue needs PostgreSQL (VLBOT_DATABASE_URL)")
        self.db = db
        self.jobs = jobs
        self.lease_s = lease_s
        self.poll_s: float | None = poll_s
        self.replica_id: str | None = replica_id
        self.hold_s: float | None = lease_s
        self.takeovers = 0  # jobs this replica took over from a replica whose lease ran out
        self._local: dict[str, Job] = {}  # waiting jobs accepted here (their place is announced)
        self._waiting: list[str] = []  # every waiting job id, in predicted order (last look)
        self._looked = 0.0  # time.monotonic() of the last look
        self._heartbeat: asyncio.Task[None] | None = None
        # place-in-line sends hold a connection each: a few at a time, the pool stays free
        self._announcing = asyncio.Semaphore(2)

    async def start(self) -> None:
        await self._beat()
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="vlbot-queue-heartbeat")
        log.info("shared job queue: replica %s, lease %.0f s", self.replica_id, self.lease_s)

    async def stop(self) -> None:
        await cancel_and_wait(self._heartbeat)
        self._heartbeat = None
        with contextlib.suppress(Exception):  # leave now: pinned jobs go to the others at once
            async with self.db.transaction() as tx:
                await tx.execute("DELETE FROM replicas WHERE id = ?", (self.replica_id,))

    async def _beat(self) -> None:
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO replicas (id, alive_until) VALUES (?, ?)"
                " ON CONFLICT (id) DO UPDATE SET alive_until = EXCLUDED.alive_until",
                (self.replica_id, now + self.lease_s),
            )
            await tx.execute(
                f"UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND status IN {LIVE}",
                (now + self.lease_s, self.replica_id),
            )
            await tx.execute("DELETE FROM replicas WHERE alive_until < ?", (now - 3600,))

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._beat()
            except Exception as exc:  # the database is away: keep trying, leases may lapse
                log.warning("queue heartbeat failed: %r", exc)

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, job: Job, front: bool = False) -> None:
        self._local[job.id] = job
        if job.id not in self._waiting:
            self._waiting.insert(0, job.id) if front else self._waiting.append(job.id)

    async def ready(self, job: Job) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE jobs SET lease_until = NULL WHERE id = ? AND status = 'queued'", (job.id,)
            )

    async def claim(self) -> Job | None:
        now = time.time()
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                CLAIM, (now, self.replica_id, now, now, self.replica_id, now + self.lease_s)
            )
            if rows:
                await tx.execute(
                    "INSERT INTO queue_turns (conversation, served_at) VALUES (?, ?) ON CONFLICT"
                    " (conversation) DO UPDATE SET served_at = EXCLUDED.served_at",
                    (rows[0]["conversation"], now),
                )
        if rows or time.monotonic() - self._looked >= (self.poll_s or 0):
            await self._look()  # idle workers poll together: one look per poll_s is enough
        if not rows:
            return None
        row = rows[0]
        previous = row["previous_owner"]
        if previous is not None and previous != self.replica_id:
            self.takeovers += 1
            log.warning("job %s taken over from replica %s (its lease ran out)", row["id"], previous)
        self._local.pop(row["id"], None)
        return await self.jobs.job_from_row(row)

    async def _look(self) -> None:
        """Refresh the view of waiting jobs (place in line, queue depth)."""
        self._looked = time.monotonic()
        self._waiting = round_robin(await self.db.fetchall(WAITING))
        waiting = set(self._waiting)
        for job_id in [j for j in self._local if j not in waiting]:
            del self._local[job_id]

    async def release(self, job: Job) -> None:
        return None  # the job's status (no longer running) frees its conversation

    async def remove(self, conversation_key: str) -> list[Job]:
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                "UPDATE jobs SET status = 'cancelled', updated_at = ? WHERE conversation = ?"
                " AND status = 'queued' RETURNING *",
                (time.time(), conversation_key),
            )
        for row in rows:
            self._local.pop(row["id"], None)
        return [await self.jobs.job_from_row(row) for row in rows]

    def predicted_order(self) -> list[Job]:
        return [self._local[j] for j in self._waiting if j in self._local]

    @contextlib.asynccontextmanager
    async def still_waiting(self, job: Job) -> AsyncIterator[bool]:
        """A KEY SHARE lock on the waiting job's row: a claim (FOR UPDATE SKIP LOCKED) passes
        it by meanwhile, while the origin update a send may make (NO KEY UPDATE) goes ahead."""
        async with self._announcing, self.db.transaction() as tx:
            rows = await tx.fetchall(
                "SELECT id FROM jobs WHERE id = ? AND status = 'queued'"
                " AND COALESCE(lease_until, 0) < ? FOR KEY SHARE SKIP LOCKED",
                (job.id, time.time()),
            )
            yield bool(rows)
