"""Platform updates received but not yet turned into jobs, kept in the database so that a restart
(SIGTERM or SIGKILL) between acknowledging an update and writing its job loses nothing.

An adapter adds an update here *before* the platform learns it was received, and removes it once
the update is fully handled (a job written, a refusal sent, or nothing to do). What is still here
at start was interrupted: the adapter handles it again (job writes dedupe by event key).

With replicas on one database each update is stored with the replica that received it (`owner`):
a replica replays its own and those of replicas no longer alive (bot/jobqueue.py's heartbeats),
never one that another live replica is handling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from bot.db import Database


class PendingUpdates:
    def __init__(self, db: Database, platform: str, owner: str | None = None) -> None:
        self.db = db
        self.platform = platform
        self.owner = owner

    async def add(self, update_id: str, body: dict[str, Any]) -> None:
        """Store an update (committed when this returns; a second add of the same id is a no-op).
        JSON escapes lone surrogates, so any text Telegram sends can be stored."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO pending_updates (platform, id, body, created_at, owner)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (self.platform, update_id, json.dumps(body), time.time(), self.owner),
            )

    async def remove(self, update_ids: Iterable[str]) -> None:
        ids = list(update_ids)
        if not ids:
            return
        async with self.db.transaction() as conn:
            await conn.executemany(
                "DELETE FROM pending_updates WHERE platform = ? AND id = ?",
                [(self.platform, i) for i in ids],
            )

    async def all(self) -> list[dict[str, Any]]:
        """The stored updates this replica may handle, oldest first."""
        rows = await self.db.fetchall(
            "SELECT body FROM pending_updates p WHERE platform = ? AND (owner IS NULL OR owner = ?"
            " OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = p.owner AND r.alive_until > ?))"
            " ORDER BY created_at, length(id), id",
            (self.platform, self.owner or "", time.time()),
        )
        return [json.loads(row["body"]) for row in rows]
