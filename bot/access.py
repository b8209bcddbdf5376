"""Who may use the bot: the settings allowlists and admins, plus allow/deny entries admins make
at run time (stored in the database, so they take effect at once, on every replica, and survive a
restart).

Which wins: admins are always in; a database deny (of the user, API key or chat) beats any
allow; otherwise a message is let in when the settings allowlists or the database's allow
entries name its user (or key) or its chat, or when the platform has no list at all. On Slack, as
before, a direct message is not held to a channel list (only to a user list, if there is one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from bot.admin_types import Subject, SubjectKind
from bot.db import Database, Tx

Rule = Literal["allow", "deny"]


@dataclass(frozen=True)
class SettingsAccess:
    """What settings say: admin ids and allowlists per platform ("telegram", "slack", "http")."""

    admins: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_users: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_chats: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def is_admin(self, platform: str, user_id: str) -> bool:
        return user_id in self.admins.get(platform, frozenset())


@dataclass(frozen=True)
class PlatformRules:
    """The database entries of one platform, by rule and kind."""

    allowed: frozenset[Subject] = frozenset()
    denied: frozenset[Subject] = frozenset()


def is_direct_message(platform: str, chat_id: str | None) -> bool:
    return platform == "slack" and (chat_id or "").startswith("D")


def decide(
    settings: SettingsAccess,
    rules: PlatformRules,
    platform: str,
    user_id: str,
    chat_id: str | None,
) -> bool:
    """The access decision (see the module's docstring)."""
    if settings.is_admin(platform, user_id):
        return True
    user_kind: SubjectKind = "key" if platform == "http" else "user"
    user = Subject(platform, user_kind, user_id)
    chat = Subject(platform, "chat", chat_id) if chat_id is not None else None
    if user in rules.denied or (chat is not None and chat in rules.denied):
        return False
    users = settings.allowed_users.get(platform, frozenset()) | {
        s.id for s in rules.allowed if s.kind == user_kind
    }
    chats = settings.allowed_chats.get(platform, frozenset()) | {
        s.id for s in rules.allowed if s.kind == "chat"
    }
    if not users and not chats:
        return True
    if user_id in users or (chat_id is not None and chat_id in chats):
        return True
    return is_direct_message(platform, chat_id) and not users


class AccessRules:
    """The allow/deny entries in the database (one per subject: the latest wins)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    async def put(tx: Tx, subject: Subject, rule: Rule, actor: Subject) -> None:
        await tx.execute(
            "DELETE FROM access_rules WHERE platform = ? AND kind = ? AND subject_id = ?",
            [subject.platform, subject.kind, subject.id],
        )
        await tx.execute(
            "INSERT INTO access_rules (platform, kind, subject_id, rule, updated_at, updated_by)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [subject.platform, subject.kind, subject.id, rule, time.time(), str(actor)],
        )

    async def of_platform(self, platform: str) -> PlatformRules:
        rows = await self.db.fetchall(
            "SELECT kind, subject_id, rule FROM access_rules WHERE platform = ?", [platform]
        )
        allowed = {Subject(platform, r["kind"], r["subject_id"]) for r in rows if r["rule"] == "allow"}
        denied = {Subject(platform, r["kind"], r["subject_id"]) for r in rows if r["rule"] == "deny"}
        return PlatformRules(frozenset(allowed), frozenset(denied))

    async def all(self) -> dict[Subject, Rule]:
        rows = await self.db.fetchall(
            "SELECT platform, kind, subject_id, rule FROM access_rules"
            " ORDER BY platform, kind, subject_id"
        )
        return {Subject(r["platform"], r["kind"], r["subject_id"]): r["rule"] for r in rows}
