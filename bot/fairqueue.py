"""Round-robin queue across conversations; one conversation's jobs in order, one at a time."""

from __future__ import annotations

from collections import deque

from bot.models import Job


class FairQueue:
    """Conversations take turns: after one of its jobs ran, a conversation goes to the back of
    the line, so a chatty conversation cannot starve the others. A conversation with a job
    running is not eligible until `release` is called for it."""

    def __init__(self) -> None:
        self._pending: dict[str, deque[Job]] = {}
        self._ready: deque[str] = deque()  # conversations with pending jobs, none running
        self._busy: set[str] = set()

    def __len__(self) -> int:
        return sum(len(q) for q in self._pending.values())

    def push(self, job: Job, front: bool = False) -> None:
        key = job.conversation.key()
        queue = self._pending.setdefault(key, deque())
        if front:
            queue.appendleft(job)
        else:
            queue.append(job)
        if key not in self._busy and key not in self._ready:
            self._ready.append(key)

    def pop(self) -> Job | None:
        """The next job to run, marking its conversation busy; None if nothing is eligible."""
        if not self._ready:
            return None
        key = self._ready.popleft()
        queue = self._pending[key]
        job = queue.popleft()
        if not queue:
            del self._pending[key]
        self._busy.add(key)
        return job

    def release(self, conversation_key: str) -> None:
        """The conversation's running job ended: it may run again, at the back of the line."""
        self._busy.discard(conversation_key)
        if conversation_key in self._pending and conversation_key not in self._ready:
            self._ready.append(conversation_key)

    def remove(self, conversation_key: str) -> list[Job]:
        """Take every queued job of a conversation out of the queue."""
        jobs = list(self._pending.pop(conversation_key, ()))
        if conversation_key in self._ready:
            self._ready.remove(conversation_key)
        return jobs

    def predicted_order(self) -> list[Job]:
        """All queued jobs in the order they would start if nothing else arrived; busy
        conversations rejoin the line after the ready ones, as `release` would put them."""
        queues = {key: deque(q) for key, q in self._pending.items()}
        line = list(self._ready) + [k for k in self._pending if k in self._busy]
        order: list[Job] = []
        ring = deque(line)
        while ring:
            key = ring.popleft()
            order.append(queues[key].popleft())
            if queues[key]:
                ring.append(key)
        return order

    def positions(self) -> dict[str, int]:
        """Job id → 1-based place in line."""
        return {job.id: i for i, job in enumerate(self.predicted_order(), start=1)}
