"""The triage store: each triage result with its place, link, severity, area, error and group.

`record` groups a result with the repeats of its error among the recent triages of the same
place (platform and chat), never across places: the reply's "first here: <link>" then always
points into the chat the user is in, and one team's chats never leak into another's. A result
is recorded once per job (a job generated again after a crash keeps its first record). Rows are
pruned with the history's retention (VLBOT_RETENTION_DAYS), and so are the digest records.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.db import Database, Row, Tx
from bot.triage.grouping import DEFAULT_THRESHOLD, Candidate, ErrorKey, best_match
from bot.triage.rules import Place

MAX_CANDIDATES = 2000  # the most recent triages of a place compared with a new one


@dataclass(frozen=True)
class TriageRecord:
    job_id: str
    place: Place
    link: str | None
    user_id: str
    user_name: str
    severity: str
    product_area: str | None
    error_message: str | None
    error_code: str | None
    auto_triage: bool
    created_at: float

    @classmethod
    def of(
        cls, job_id: str, place: Place, result: Mapping[str, Any], *, link: str | None = None,
        user_id: str = "", user_name: str = "", auto_triage: bool = False,
        created_at: float | None = None,
    ) -> TriageRecord:
        """From a validated TriageResult's JSON (bot/presets/schemas.py)."""
        def text(name: str) -> str | None:
            value = result.get(name)
            return str(value) if value not in (None, "") else None

        return cls(
            job_id=job_id, place=place, link=link, user_id=user_id, user_name=user_name,
            severity=text("severity") or "minor", product_area=text("product_area"),
            error_message=text("error_message"), error_code=text("error_code"),
            auto_triage=auto_triage, created_at=time.time() if created_at is None else created_at,
        )


@dataclass(frozen=True)
class Grouped:
    """A recorded triage's group: how often its error was seen, since when, first where."""

    group_id: str
    count: int  # the group's triages, this one included
    first_seen: float
    first_link: str | None
    new: bool  # False: this job was recorded before (the result came again)


def new_group_id() -> str:
    return f"grp_{uuid.uuid4().hex[:16]}"


class TriageStore:
    def __init__(
        self,
        db: Database,
        *,
        retention_days: float = 30.0,
        window_days: float = 14.0,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self.db = db
        self.retention_days = retention_days
        self.window_days = window_days
        self.threshold = threshold

    async def record(self, record: TriageRecord) -> Grouped:
        """Store the result in the group of its error's most alike recent repeat in the same
        place (a new group when there is none) and return the group as it is now."""
        async with self.db.transaction() as tx:
            if self.db.dialect == "postgres":  # replicas: one place's grouping at a time
                await tx.fetchall("SELECT pg_advisory_xact_lock(hashtext(?))", (f"triage:{record.place}",))
            existing = await tx.fetchall(
                "SELECT group_id FROM triages WHERE job_id = ?", (record.job_id,)
            )
            if existing:
                group_id, new = str(existing[0]["group_id"]), False
            else:
                group_id, new = await self._group_of(tx, record), True
                key = ErrorKey.of(record.error_message, record.error_code)
                await tx.execute(
                    "INSERT INTO triages (job_id, platform, chat, link, user_id, user_name,"
                    " severity, product_area, error_message, error_code, normalized, group_id,"
                    " auto_triage, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.job_id, record.place.platform, record.place.chat, record.link,
                     record.user_id, record.user_name, record.severity, record.product_area,
                     record.error_message, record.error_code, key.text, group_id,
                     int(record.auto_triage), record.created_at),
                )
            return await self._group(tx, group_id, new)

    async def _group_of(self, tx: Tx, record: TriageRecord) -> str:
        key = ErrorKey.of(record.error_message, record.error_code)
        if key.empty:
            return new_group_id()
        rows = await tx.fetchall(
            "SELECT group_id, error_message, error_code FROM triages"
            " WHERE platform = ? AND chat = ? AND created_at >= ?"
            " ORDER BY created_at DESC LIMIT ?",
            (record.place.platform, record.place.chat,
             record.created_at - self.window_days * 86400, MAX_CANDIDATES),
        )
        candidates = [
            Candidate(str(r["group_id"]), ErrorKey.of(r["error_message"], r["error_code"]))
            for r in reversed(rows)  # oldest first: of equally alike groups, the older one
        ]
        match = best_match(key, candidates, self.threshold)
        return match.group_id if match is not None else new_group_id()

    async def _group(self, tx: Tx, group_id: str, new: bool) -> Grouped:
        rows = await tx.fetchall(
            "SELECT created_at, link FROM triages WHERE group_id = ? ORDER BY created_at, job_id",
            (group_id,),
        )
        first_link = next((r["link"] for r in rows if r["link"]), None)
        return Grouped(group_id, len(rows), float(rows[0]["created_at"]), first_link, new)

    async def between(self, start: float, end: float, place: Place | None = None) -> list[Row]:
        """The triages recorded in [start, end), oldest first (of one place, or of all)."""
        sql = ("SELECT job_id, platform, chat, link, user_id, user_name, severity, product_area,"
               " error_message, error_code, normalized, group_id, auto_triage, created_at"
               " FROM triages WHERE created_at >= ? AND created_at < ?")
        params: tuple[Any, ...] = (start, end)
        if place is not None:
            sql += " AND platform = ? AND chat = ?"
            params += (place.platform, place.chat)
        return await self.db.fetchall(sql + " ORDER BY created_at, job_id", params)

    async def claim_digest(self, place: Place, day: str, now: float) -> bool:
        """Take the digest of `place` for `day` (YYYY-MM-DD); False if it was taken before (by
        this process before a restart, or by another replica)."""
        async with self.db.transaction() as tx:
            inserted = await tx.execute(
                "INSERT INTO triage_digests (platform, chat, day, sent_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (place.platform, place.chat, day, now),
            )
        return inserted == 1

    async def release_digest(self, place: Place, day: str) -> None:
        """Give a claimed digest back (its post failed): the next pass tries again."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "DELETE FROM triage_digests WHERE platform = ? AND chat = ? AND day = ?",
                (place.platform, place.chat, day),
            )

    async def prune(self, now: float | None = None) -> int:
        """Delete triages (and digest records) older than the retention period."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        async with self.db.transaction() as tx:
            deleted = await tx.execute("DELETE FROM triages WHERE created_at < ?", (cutoff,))
            await tx.execute("DELETE FROM triage_digests WHERE sent_at < ?", (cutoff,))
        return deleted
