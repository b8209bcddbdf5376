"""The audit log: every allow, deny, quota change and API key made or revoked, with who made it
and when. Written in the same transaction as the change it records."""

from __future__ import annotations

import time

from bot.admin_types import AuditEntry, Subject
from bot.db import Database, Tx


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def write(
        tx: Tx, actor: Subject, action: str, subject: Subject, detail: str = ""
    ) -> AuditEntry:
        entry = AuditEntry(time.time(), actor, action, subject, detail)
        await tx.execute(
            "INSERT INTO audit_log (at, actor, action, subject, detail) VALUES (?, ?, ?, ?, ?)",
            [entry.at, str(actor), action, str(subject), detail],
        )
        return entry

    async def latest(self, limit: int = 50) -> list[AuditEntry]:
        """The newest entries first."""
        rows = await self.db.fetchall(
            "SELECT at, actor, action, subject, detail FROM audit_log ORDER BY at DESC LIMIT ?",
            [max(0, limit)],
        )
        return [
            AuditEntry(
                float(r["at"]),
                Subject.parse(r["actor"]),
                r["action"],
                Subject.parse(r["subject"]),
                r["detail"],
            )
            for r in rows
        ]
