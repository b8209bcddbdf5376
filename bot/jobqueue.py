"""The runner's queue: which job a worker starts next. Two implementations, one interface:

- `LocalJobQueue` (SQLite, one process): the in-memory round robin of bot/fairqueue.py, fed by
  submit and by the resume at start.
- `SharedJobQueue` (Postgres, bot/pgqueue.py): the jobs table itself, claimed by every replica
  with `FOR UPDATE SKIP LOCKED` under a lease that the claiming replica renews while it works.

Both keep the same rules: conversations take turns (round robin), one conversation's jobs run in
order and one at a time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from bot.fairqueue import FairQueue
from bot.models import Job

# This process among the replicas of one database (leases, pinned jobs, pending updates).
REPLICA_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobQueue(Protocol):
    # jobs of other processes are in it too: a restart resumes through claims, not a reload
    shared: bool
    # idle workers look for claimable work this often (None: they wait for a push)
    poll_s: float | None
    # pinned jobs (an HTTP client waits on this replica) go only to this replica while it lives
    replica_id: str | None
    # a new job is held (claimed by no one) this long at most, until `ready`: None, not held
    hold_s: float | None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def __len__(self) -> int:
        """Jobs waiting to start (all replicas' for a shared queue, as last seen)."""

    def push(self, job: Job, front: bool = False) -> None:
        """A job this process queued (new, or back after a failed attempt)."""

    async def ready(self, job: Job) -> None:
        """A held new job's acknowledgement was sent: any replica may claim it now."""

    async def claim(self) -> Job | None:
        """The next job to run, its conversation now busy; None if nothing is eligible."""

    async def release(self, job: Job) -> None:
        """The job's run ended (whatever its outcome): its conversation may run again."""

    async def remove(self, conversation_key: str) -> list[Job]:
        """Take every waiting job of a conversation out of the queue."""

    def predicted_order(self) -> list[Job]:
        """This process's waiting jobs in the order they would start."""

    def still_waiting(self, job: Job) -> AbstractAsyncContextManager[bool]:
        """Whether the job still waits; while inside, no replica starts it."""


class LocalJobQueue:
    """One process: the in-memory fair queue."""

    shared = False
    poll_s: float | None = None
    replica_id: str | None = None
    hold_s: float | None = None

    def __init__(self) -> None:
        self._fair = FairQueue()

    async def start(self) -> None:
        self._fair = FairQueue()

    async def stop(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._fair)

    def push(self, job: Job, front: bool = False) -> None:
        self._fair.push(job, front)

    async def ready(self, job: Job) -> None:
        return None

    async def claim(self) -> Job | None:
        return self._fair.pop()

    async def release(self, job: Job) -> None:
        self._fair.release(job.conversation.key())

    async def remove(self, conversation_key: str) -> list[Job]:
        return self._fair.remove(conversation_key)

    def predicted_order(self) -> list[Job]:
        return self._fair.predicted_order()

    @contextlib.asynccontextmanager
    async def still_waiting(self, job: Job) -> AsyncIterator[bool]:
        yield True  # one process: the runner's own bookkeeping already says so


def positions(queue: JobQueue) -> dict[str, int]:
    """Job id → 1-based place in line."""
    return {job.id: i for i, job in enumerate(queue.predicted_order(), start=1)}
