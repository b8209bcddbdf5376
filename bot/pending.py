"""Platform updates received but not yet turned into jobs, kept in SQLite so that a restart
(SIGTERM or SIGKILL) between acknowledging an update and writing its job loses nothing.

An adapter adds an update here *before* the platform learns it was received, and removes it once
the update is fully handled (a job written, a refusal sent, or nothing to do). What is still here
at start was interrupted: the adapter handles it again (job writes dedupe by event key).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from bot.db import Database


class PendingUpdates:
    def __init__(self, db: Database, platform: str) -> None:
        self.db = db
        self.platform = platform

    async def add(self, update_id: str, body: dict[str, Any]) -> None:
        """Store an update (committed when this returns; a second add of the same id is a no-op).
        JSON escapes lone surrogates, so any text Telegram sends can be stored."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO pending_updates (platform, id, body, created_at)"
                " VALUES (?, ?, ?, ?)",
                (self.platform, update_id, json.dumps(body), time.time()),
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
        """The stored updates, oldest first."""
        rows = await self.db.fetchall(
            "SELECT body FROM pending_updates WHERE platform = ? ORDER BY created_at, rowid",
            (self.platform,),
        )
        return [json.loads(row["body"]) for row in rows]
