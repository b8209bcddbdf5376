"""The durable outbox of outbound webhook events: one row per (event, endpoint).

A producer (the triage workflow, a preset-result hook) calls `Outbox.enqueue` and moves on; the
delivery worker (bot/webhooks.py) claims due rows, POSTs them and records the result. A row is
`pending` until its endpoint answers 2xx (`delivered`) or it runs out of attempts or age
(`dead`, kept for inspection: /metrics, /health, `vlbot doctor`).

Delivery is at least once with a stable event id (the `webhook-id` header): a process killed
after the POST but before recording it sends the same id again, and receivers de-duplicate.

Claims take a lease (`lease_until`) so that replicas sharing a Postgres database never deliver
the same row at once: the claim picks due rows `FOR UPDATE SKIP LOCKED` (as bot/pgqueue.py does
for jobs) and leases them; a replica that dies mid-delivery leaves a lease that runs out, and
another replica takes the row. SQLite serves one process per data folder, so a restart there
drops the leases its previous run left (`release_leases`).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bot.db import Database, Row

TRIAGE_EVENT = "triage.result"  # one triage preset result (bot/triage/)
PRESET_EVENT = "preset.result"  # any other preset's validated JSON result (opt-in)
EVENT_TYPES = (TRIAGE_EVENT, PRESET_EVENT)

OutboxState = Literal["pending", "delivered", "dead"]
STATES: tuple[OutboxState, ...] = ("pending", "delivered", "dead")

ERROR_CHARS = 500  # the last error is kept this long


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


@dataclass(frozen=True)
class OutboxEvent:
    """One claimed row: an event on its way to one endpoint."""

    event_id: str
    endpoint: str  # the endpoint's URL as configured
    event_type: str
    payload: Mapping[str, Any]
    attempts: int  # attempts made before this one
    created_at: float

    def body(self) -> str:
        """The JSON body POSTed (the same bytes on every attempt)."""
        return json.dumps(
            {
                "type": self.event_type,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at)),
                "data": self.payload,
            },
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_row(cls, row: Row) -> OutboxEvent:
        return cls(
            event_id=row["event_id"],
            endpoint=row["endpoint"],
            event_type=row["event_type"],
            payload=json.loads(row["payload"]),
            attempts=int(row["attempts"]),
            created_at=float(row["created_at"]),
        )


class Outbox:
    """`endpoints`: the URLs each event goes to; `event_types`: the types stored (None: all).
    An event of another type, or with no endpoint configured, is accepted and stored nowhere."""

    def __init__(
        self,
        db: Database,
        endpoints: Sequence[str] = (),
        *,
        event_types: Collection[str] | None = None,
    ) -> None:
        self.db = db
        self.endpoints = tuple(dict.fromkeys(endpoints))
        self.event_types = frozenset(event_types) if event_types is not None else None
        self.wakeup = asyncio.Event()  # set on enqueue: the worker delivers without waiting

    def wants(self, event_type: str) -> bool:
        return bool(self.endpoints) and (self.event_types is None or event_type in self.event_types)

    async def enqueue(
        self, event_type: str, payload: Mapping[str, Any], *, event_id: str | None = None
    ) -> str:
        """Store the event for every configured endpoint; returns its id (the `webhook-id`).
        The same `event_id` enqueued twice is stored once."""
        event_id = event_id or new_event_id()
        if not self.wants(event_type):
            return event_id
        now = time.time()
        body = json.dumps(payload, ensure_ascii=False, default=str)
        async with self.db.transaction() as tx:
            await tx.executemany(
                "INSERT INTO outbox (event_id, endpoint, event_type, payload, state, attempts,"
                " next_attempt_at, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(event_id, url, event_type, body, now, now, now) for url in self.endpoints],
            )
        self.wakeup.set()
        return event_id

    async def claim(self, limit: int, lease_s: float) -> list[OutboxEvent]:
        """Due pending rows, leased to this process for `lease_s` (no other claim takes them
        meanwhile, on this replica or another)."""
        now = time.time()
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgres" else ""
        async with self.db.transaction() as tx:
            rows = await tx.fetchall(
                "UPDATE outbox SET lease_until = ? WHERE (event_id, endpoint) IN ("
                " SELECT event_id, endpoint FROM outbox WHERE state = 'pending'"
                " AND next_attempt_at <= ? AND COALESCE(lease_until, 0) < ?"
                f" ORDER BY next_attempt_at LIMIT ?{skip_locked}) RETURNING *",
                (now + lease_s, now, now, limit),
            )
        return [OutboxEvent.from_row(row) for row in rows]

    async def next_due(self) -> float | None:
        """When the earliest pending row falls due (time.time()), None if there is none."""
        rows = await self.db.fetchall(
            "SELECT MIN(next_attempt_at) AS at FROM outbox WHERE state = 'pending'"
        )
        at = rows[0]["at"] if rows else None
        return float(at) if at is not None else None

    async def delivered(self, event: OutboxEvent) -> None:
        await self._settle(event, "delivered", None, None)

    async def failed(self, event: OutboxEvent, error: str, retry_at: float | None) -> None:
        """An attempt failed: try again at `retry_at`, or dead-letter the row (None)."""
        await self._settle(event, "pending" if retry_at is not None else "dead", error, retry_at)

    async def _settle(
        self, event: OutboxEvent, state: OutboxState, error: str | None, retry_at: float | None
    ) -> None:
        now = time.time()
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ?, lease_until = NULL, updated_at = ?"
                " WHERE event_id = ? AND endpoint = ? AND state = 'pending'",
                (
                    state,
                    error[:ERROR_CHARS] if error else None,
                    retry_at if retry_at is not None else now,
                    now,
                    event.event_id,
                    event.endpoint,
                ),
            )

    async def release_leases(self) -> int:
        """Drop every lease (SQLite at start: the previous run of this one process left them)."""
        async with self.db.transaction() as tx:
            return await tx.execute(
                "UPDATE outbox SET lease_until = NULL WHERE state = 'pending'"
                " AND lease_until IS NOT NULL"
            )

    async def counts(self) -> dict[str, int]:
        """Rows by state, every state present (0 when none)."""
        rows = await self.db.fetchall("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        found = {row["state"]: int(row["n"]) for row in rows}
        return {state: found.get(state, 0) for state in STATES}

    async def dead_letters(self, limit: int = 20) -> list[Row]:
        """The latest dead rows (id, type, endpoint, attempts, last error), newest first."""
        return await self.db.fetchall(
            "SELECT event_id, event_type, endpoint, attempts, last_error, updated_at FROM outbox"
            " WHERE state = 'dead' ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )

    async def prune(self, older_than_s: float) -> int:
        """Delete delivered rows settled more than `older_than_s` ago (dead ones stay)."""
        async with self.db.transaction() as tx:
            return await tx.execute(
                "DELETE FROM outbox WHERE state = 'delivered' AND updated_at < ?",
                (time.time() - older_than_s,),
            )
