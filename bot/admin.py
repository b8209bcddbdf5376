"""The admin facade adapters use for #23: who may use the bot, quotas, usage, the audit log and
HTTP API keys made at run time. One object (`Core.admin`), backed by the stores in bot/usage.py,
bot/access.py, bot/quotas.py, bot/audit.py and bot/api_keys.py.

Access (`access`): admins are always in; a database deny (user, key or chat) beats any allow;
otherwise a message is allowed if the settings allowlists or the database's allow entries name
its user or its chat, or if there is no list at all for the platform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from bot.admin_types import (
    ApiKeyInfo,
    AuditEntry,
    DailyUsage,
    DayUse,
    Limits,
    Remaining,
    Subject,
    SubjectKind,
    TopUsage,
    UsageRecord,
    UsageReport,
    UsageTotals,
)
from bot.db import Database

__all__ = [
    "AdminPolicy",
    "AdminService",
    "ApiKeyInfo",
    "AuditEntry",
    "DailyUsage",
    "DayUse",
    "Limits",
    "Remaining",
    "Subject",
    "SubjectKind",
    "TopUsage",
    "UsageRecord",
    "UsageReport",
    "UsageTotals",
]


@dataclass(frozen=True)
class AdminPolicy:
    """What settings say: admin ids and allowlists per platform, default quota limits."""

    admins: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_users: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allowed_chats: Mapping[str, frozenset[str]] = field(default_factory=dict)
    defaults: Limits = field(default_factory=Limits)


class AdminService:
    def __init__(self, db: Database, policy: AdminPolicy | None = None) -> None:
        self.db = db
        self.policy = policy or AdminPolicy()

    def is_admin(self, platform: str, user_id: str) -> bool:
        raise NotImplementedError

    async def access(self, platform: str, user_id: str, chat_id: str | None) -> bool:
        """Settings allowlists and database entries combined; admins always in."""
        raise NotImplementedError

    async def allow(self, actor: Subject, subject: Subject) -> None:
        raise NotImplementedError

    async def deny(self, actor: Subject, subject: Subject) -> None:
        raise NotImplementedError

    async def set_quota(self, actor: Subject, subject: Subject, limits: Limits) -> Limits:
        """Store an override (fields left None keep their stored value); the override after."""
        raise NotImplementedError

    async def effective_limits(self, user: Subject, chat: Subject | None) -> Limits:
        raise NotImplementedError

    async def remaining(self, user: Subject, chat: Subject | None) -> Remaining:
        raise NotImplementedError

    async def usage(self, subject: Subject | None, days: float) -> UsageReport:
        raise NotImplementedError

    async def usage_records(self, since: float, until: float | None = None) -> list[UsageRecord]:
        raise NotImplementedError

    async def audit(self, limit: int = 50) -> list[AuditEntry]:
        raise NotImplementedError

    async def create_key(
        self, actor: Subject, name: str, limits: Limits | None = None
    ) -> tuple[ApiKeyInfo, str]:
        raise NotImplementedError

    async def list_keys(self) -> list[ApiKeyInfo]:
        raise NotImplementedError

    async def revoke_key(self, actor: Subject, key_id: str) -> bool:
        raise NotImplementedError

    async def key_for_secret(self, secret: str) -> ApiKeyInfo | None:
        raise NotImplementedError
